"""Reading photos the way people have them: any common format, mode, bit depth and orientation."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ._files import not_a_regular_file
from .errors import ImageError

#: Images larger than this many pixels are refused before decoding (decompression bombs).
DEFAULT_MAX_PIXELS = 100_000_000

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "MPO")


@dataclass(frozen=True)
class LoadedImage:
    """An image as RGB uint8 pixels, upright, with where it came from."""

    pixels: np.ndarray  # (H, W, 3) uint8, RGB
    path: Path | None
    format: str | None
    mode: str  # the file's original mode, e.g. "RGBA", "I;16"

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return self.pixels.shape[1], self.pixels.shape[0]

    @property
    def name(self) -> str:
        return self.path.name if self.path is not None else "image"


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Read ``path`` into an upright RGB image, or raise :class:`ImageError` with the reason."""
    path = Path(path)
    reason = not_a_regular_file(path)
    if reason == "does not exist":
        raise ImageError(f"Image not found: {path}")
    if reason is not None:
        raise ImageError(f"Image {path} {reason}; give an image file.")
    if path.stat().st_size == 0:
        raise ImageError(f"Image file is empty: {path}")
    try:
        with _pillow_limit_lifted, Image.open(path) as opened:
            width, height = opened.size
            if width * height > max_pixels:
                raise ImageError(
                    f"Image is too large: {path} has {width}x{height} = {width * height:,} pixels, "
                    f"more than the limit of {max_pixels:,} (raise it with --max-pixels)."
                )
            if opened.format not in SUPPORTED_FORMATS:
                raise ImageError(
                    f"Unsupported image format {opened.format} for {path}; "
                    f"use JPEG, PNG, WebP, BMP or TIFF."
                )
            mode = opened.mode
            image_format = opened.format
            opened.load()
            ImageOps.exif_transpose(opened, in_place=True)  # a copy less of a large photo
            pixels = to_rgb_array(opened)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"Not an image (or an unsupported format): {path}") from None
    except Image.DecompressionBombError as error:
        raise ImageError(f"Image is too large: {path}: {error}") from None
    except (OSError, SyntaxError, ValueError) as error:
        # Pillow reports truncated and corrupt data as OSError/SyntaxError with a short reason.
        raise ImageError(f"Cannot decode image {path}: {error}") from None
    return LoadedImage(pixels=pixels, path=path, format=image_format, mode=mode)


class _PillowLimitLifted:
    """Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, about 179 million pixels) is a
    module global that it checks on open and again while decoding TIFF tiles, so it would refuse
    images that ``max_pixels`` allows. It is lifted while at least one image is being read, and put
    back when the last one finishes: threads (``batch`` decodes on several) do not restore each
    other's value too early, and each call enforces its own ``max_pixels`` from the header first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._readers = 0
        self._saved: int | None = None

    def __enter__(self) -> None:
        with self._lock:
            if self._readers == 0:
                self._saved = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = None
            self._readers += 1

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._readers -= 1
            if self._readers == 0:
                Image.MAX_IMAGE_PIXELS = self._saved


_pillow_limit_lifted = _PillowLimitLifted()


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Convert any Pillow mode to (H, W, 3) uint8 RGB.

    16- and 32-bit grayscale are scaled by their actual range of the type (not clipped at 255, which
    would turn most 16-bit photos white); transparency is composited over white, as viewers show it.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        gray = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        low, high = float(np.nanmin(values)), float(np.nanmax(values))
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
        gray = np.clip(scaled * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def from_array(pixels: np.ndarray, name: str | None = None) -> LoadedImage:
    """Wrap an (H, W, 3) uint8 RGB array (or a grayscale (H, W) one) as a :class:`LoadedImage`."""
    array = np.asarray(pixels)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
        raise ImageError("An image array must be uint8 with shape (H, W), (H, W, 3) or (H, W, 4).")
    if array.shape[2] == 4:
        array = to_rgb_array(Image.fromarray(array))
    return LoadedImage(pixels=np.ascontiguousarray(array), path=Path(name) if name else None,
                       format=None, mode="RGB")
