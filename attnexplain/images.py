"""Reading photos the way people have them: any common format, mode, bit depth and orientation."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ._files import not_a_regular_file
from .errors import ImageError

#: Images larger than this many pixels are refused before decoding (decompression bombs).
DEFAULT_MAX_PIXELS = 100_000_000

#: The longest a photo's longer side may be, as a multiple of its shorter side. Photos are 4:3 to
#: 16:9 and panoramas a few times wider; far beyond that, "resize the shorter side" turns a thin
#: image of a few hundred bytes into a bomb: a 1×100000 PNG resized to a shorter side of 256 asks
#: for 19.7 GB (1024, Hugging Face's ``shortest_edge``: 315 GB).
MAX_ASPECT_RATIO = 50

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "MPO")


@dataclass(frozen=True)
class LoadedImage:
    """An image as RGB uint8 pixels, upright, with where it came from."""

    pixels: np.ndarray  # (H, W, 3) uint8, RGB
    path: Path | None
    format: str | None
    mode: str  # the file's original mode, e.g. "RGBA", "I;16"
    #: (width, height) of the upright photo in the file, where ``pixels`` were decoded smaller
    #: (see ``longest_side`` in :func:`load_image`); None when they are the file's own size.
    file_size: tuple[int, int] | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return self.pixels.shape[1], self.pixels.shape[0]

    @property
    def full_size(self) -> tuple[int, int]:
        """(width, height) of the photo in the file, whatever size it was decoded at."""
        return self.file_size or self.size

    def describe(self) -> dict[str, Any]:
        """The photo's size in the file, format and mode, and the size it was decoded at if smaller
        (the overlays' size and the pixels detection boxes are given in)."""
        described: dict[str, Any] = {
            "width": self.full_size[0],
            "height": self.full_size[1],
            "format": self.format,
            "mode": self.mode,
        }
        if self.file_size is not None:
            described["decoded"] = {"width": self.size[0], "height": self.size[1]}
        return described

    @property
    def name(self) -> str:
        return self.path.name if self.path is not None else "image"


def load_image(
    path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, *, longest_side: int | None = None, shortest_side: int = 0
) -> LoadedImage:
    """Read ``path`` into an upright RGB image, or raise :class:`ImageError` with the reason.

    ``longest_side`` asks for pixels no longer than that on their longer side (an overlay's size),
    but never shorter than ``shortest_side`` on their shorter side (what the model's input needs):
    a JPEG is then decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (libjpeg's scaled decode:
    a 12 MP photo at 1/2 decodes ~3x faster), and any excess is resized away (area averaging).
    """
    loaded = _read(Path(path), max_pixels, longest_side, shortest_side, decode=True)
    assert loaded is not None
    return loaded


def check_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """The checks :func:`load_image` makes before decoding (a regular file, its size, its format),
    for a bad image to fail before a slow step that has to come before the decoding."""
    _read(Path(path), max_pixels, None, 0, decode=False)


def _read(
    path: Path, max_pixels: int, longest_side: int | None, shortest_side: int, decode: bool
) -> LoadedImage | None:
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
            check_aspect_ratio(width, height, path)
            if opened.format not in SUPPORTED_FORMATS:
                raise ImageError(
                    f"Unsupported image format {opened.format} for {path}; use JPEG, PNG, WebP, BMP or TIFF."
                )
            if not decode:
                return None
            mode = opened.mode
            image_format = opened.format
            scale = _reduction(width, height, longest_side, shortest_side)
            if scale < 1.0 and image_format in ("JPEG", "MPO"):
                # draft() picks the smallest DCT scale whose size is at least the one asked for.
                opened.draft(opened.mode, (math.ceil(width * scale), math.ceil(height * scale)))
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
    upright = (pixels.shape[0] > pixels.shape[1]) == (height > width) or width == height
    full_size = (width, height) if upright else (height, width)
    if scale < 1.0:
        target = (max(1, round(full_size[0] * scale)), max(1, round(full_size[1] * scale)))
        if pixels.shape[1] > target[0]:
            import cv2

            pixels = cv2.resize(pixels, target, interpolation=cv2.INTER_AREA)
    reduced = (pixels.shape[1], pixels.shape[0]) != full_size
    return LoadedImage(
        pixels=pixels, path=path, format=image_format, mode=mode, file_size=full_size if reduced else None
    )


def check_aspect_ratio(width: int, height: int, name: object = None) -> None:
    """Refuse a picture longer than :data:`MAX_ASPECT_RATIO` times its width (or wider than that
    times its height) with an :class:`ImageError`: explaining it would resize it into gigabytes."""
    if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
        what = f"Image {name}" if name is not None else "The image"
        raise ImageError(
            f"{what} is {width}x{height} pixels, an aspect ratio beyond 1:{MAX_ASPECT_RATIO} "
            f"that no camera makes; crop it to the part to explain."
        )


def _reduction(width: int, height: int, longest_side: int | None, shortest_side: int) -> float:
    """The scale (at most 1) that brings the longer side to ``longest_side`` while keeping the
    shorter one at least ``shortest_side``."""
    if longest_side is None or max(width, height) <= longest_side:
        return 1.0
    return min(1.0, max(longest_side / max(width, height), shortest_side / min(width, height)))


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


def channels_first(pixels: np.ndarray) -> Any:
    """An (H, W, 3) uint8 array as a (3, H, W) uint8 torch tensor sharing its memory: torchvision's
    8-bit resize reads that channels-last layout as it lies. Copied only where torch cannot share
    it: a read-only array (a decoded photo; torch would warn), a strided one, another dtype."""
    import torch

    shareable = pixels.dtype == np.uint8 and pixels.flags.writeable and pixels.flags.c_contiguous
    return torch.from_numpy(pixels if shareable else np.array(pixels, dtype=np.uint8, order="C")).permute(2, 0, 1)


def from_array(pixels: np.ndarray, name: str | None = None) -> LoadedImage:
    """Wrap an (H, W, 3) uint8 RGB array (or a grayscale (H, W) one) as a :class:`LoadedImage`."""
    array = np.asarray(pixels)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
        raise ImageError(
            f"An image array must be uint8 with shape (H, W), (H, W, 3) or (H, W, 4), "
            f"not {array.dtype} {tuple(np.shape(pixels))}."
        )
    if not array.shape[0] or not array.shape[1]:
        raise ImageError(f"The image array is empty: {tuple(np.shape(pixels))}.")
    if array.shape[2] == 4:
        array = to_rgb_array(Image.fromarray(array))
    return LoadedImage(pixels=np.ascontiguousarray(array), path=Path(name) if name else None, format=None, mode="RGB")


def image_from(image: Any) -> LoadedImage:
    """An image as Python code holds it, as a :class:`LoadedImage`: a path, a PIL image, a numpy
    array ((H, W) or (H, W, 3): uint8, or floats in [0, 1]) or a torch tensor ((3, H, W) or
    (1, 3, H, W), channels first as torchvision gives them: uint8, or floats in [0, 1]).

    Anything else (a normalised tensor, NaN, a batch of several images) is an :class:`ImageError`
    that says what was expected: guessing a range would explain a different picture.
    """
    if isinstance(image, LoadedImage):
        return image
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, Image.Image):
        mode = image.mode
        upright = ImageOps.exif_transpose(image)
        return LoadedImage(pixels=to_rgb_array(upright), path=None, format=image.format, mode=mode)
    if type(image).__module__.split(".")[0] == "torch" and hasattr(image, "detach"):
        return _from_channels_first(image)
    if isinstance(image, np.ndarray):
        return from_array(_as_uint8(image, "array"))
    raise ImageError(f"An image is a path, a PIL image, a numpy array or a torch tensor, not a {type(image).__name__}.")


def _from_channels_first(tensor: Any) -> LoadedImage:
    shape = tuple(tensor.shape)
    if len(shape) == 4 and shape[0] == 1:
        tensor, shape = tensor[0], shape[1:]
    if len(shape) != 3 or shape[0] not in (1, 3):
        batch = (
            " One image at a time: explain each, or save them and use `attnexplain batch`." if len(shape) == 4 else ""
        )
        raise ImageError(f"An image tensor must be (3, H, W) or (1, 3, H, W), channels first, not {shape}.{batch}")
    array = tensor.detach().cpu()
    if array.is_floating_point():
        array = array.float()
    pixels = array.numpy().transpose(1, 2, 0)
    return from_array(_as_uint8(pixels[:, :, 0] if shape[0] == 1 else pixels, "tensor"))


def _as_uint8(array: np.ndarray, what: str) -> np.ndarray:
    """uint8 pixels as they are; floats in [0, 1] scaled to 0–255; anything else refused."""
    if array.dtype == np.uint8:
        return array
    if not np.issubdtype(array.dtype, np.floating):
        raise ImageError(f"An image {what} must be uint8 (0-255) or floats in [0, 1], not {array.dtype}.")
    if array.size == 0:
        raise ImageError(f"The image {what} is empty: {array.shape}.")
    values = array.astype(np.float32, copy=False)
    if not np.isfinite(values).all():
        raise ImageError(f"The image {what} holds NaN or infinite values.")
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
        raise ImageError(
            f"A float image {what} must hold values in [0, 1]; this one spans "
            f"[{low:.3g}, {high:.3g}] (0-255 values: pass uint8; a normalised tensor: "
            f"undo the normalisation, attnexplain applies the model's own)."
        )
    return (values * 255.0 + 0.5).astype(np.uint8)
