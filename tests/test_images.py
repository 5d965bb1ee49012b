"""Images: every common format, mode, depth and orientation; bad files give a clear ImageError."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from attnexplain.errors import ImageError
from attnexplain.images import load_image


def _gradient(width=40, height=30) -> np.ndarray:
    x = np.linspace(0, 255, width, dtype=np.float64)
    y = np.linspace(0, 255, height, dtype=np.float64)
    return np.stack([np.add.outer(y * 0, x), np.add.outer(y, x * 0), np.full((height, width), 128.0)], axis=2).astype(
        np.uint8
    )


@pytest.mark.parametrize(
    "suffix,format_name", [(".jpg", "JPEG"), (".png", "PNG"), (".webp", "WEBP"), (".bmp", "BMP"), (".tif", "TIFF")]
)
def test_common_formats_load_as_rgb(tmp_path, suffix, format_name):
    path = tmp_path / f"picture{suffix}"
    Image.fromarray(_gradient()).save(path)
    image = load_image(path)
    assert image.pixels.shape == (30, 40, 3) and image.pixels.dtype == np.uint8
    assert image.format == format_name
    # Lossless formats keep the pixels exactly; lossy ones closely.
    assert np.abs(image.pixels.astype(int) - _gradient().astype(int)).mean() < 3


def test_grayscale_becomes_three_equal_channels(tmp_path):
    path = tmp_path / "gray.png"
    Image.fromarray(_gradient()[:, :, 0]).save(path)
    pixels = load_image(path).pixels
    assert pixels.shape == (30, 40, 3)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def test_rgba_is_composited_over_white(tmp_path):
    rgba = np.zeros((10, 10, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, fully transparent on the left half
    rgba[:, 5:, 3] = 255
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba).save(path)
    pixels = load_image(path).pixels
    assert (pixels[:, :5] == 255).all()  # transparent → white
    assert (pixels[:, 5:] == [255, 0, 0]).all()


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 64 * 8).reshape(8, 64).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    image = load_image(path)
    assert image.mode.startswith("I")
    assert image.pixels[..., 0].min() == 0 and image.pixels[..., 0].max() == 255
    assert 100 < image.pixels[..., 0].mean() < 155  # a ramp stays a ramp, not a white sheet


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = [255, 0, 0]  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    image = load_image(path)
    assert image.size == (20, 40)  # width and height swapped
    top, bottom = image.pixels[:15].mean(axis=(0, 1)), image.pixels[-15:].mean(axis=(0, 1))
    assert top[0] > 200 and bottom[0] < 60  # the red half is now on top


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: None, "not found"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_text("this is not a picture"), "Not an image"),
        (lambda p: p.mkdir(), "folder"),
    ],
)
def test_bad_files_raise_one_line_image_error(tmp_path, make, message):
    path = tmp_path / "bad.jpg"
    make(path)
    with pytest.raises(ImageError, match=message) as raised:
        load_image(path)
    assert "\n" not in str(raised.value)


def test_truncated_image_is_an_image_error(tmp_path, photo):
    data = photo.read_bytes()
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="Cannot decode"):
        load_image(path)


def test_pixel_limit_refuses_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.fromarray(_gradient()).save(path)
    with pytest.raises(ImageError, match="too large"):
        load_image(path, max_pixels=1000)


# --- decoding only what is needed (an overlay's size, the model's input) -------------------------


def _photo(path, width=1600, height=1200, orientation=None):
    """A smooth photo-like JPEG (gradients plus a soft disc), optionally with an EXIF rotation."""
    x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    disc = np.exp(-((x - 0.3) ** 2 + (y - 0.6) ** 2) * 20)
    pixels = np.stack([x * 255, y * 255, disc * 255], axis=2).astype(np.uint8)
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif, quality=92)
    return pixels


def _area_resized(pixels, size):
    import cv2

    return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA).astype(int)


def test_a_large_jpeg_is_decoded_at_the_overlay_size(tmp_path):
    pixels = _photo(tmp_path / "big.jpg")
    image = load_image(tmp_path / "big.jpg", longest_side=400, shortest_side=224)
    assert image.size == (400, 300) and image.full_size == (1600, 1200)
    assert image.describe()["decoded"] == {"width": 400, "height": 300}
    assert (image.describe()["width"], image.describe()["height"]) == (1600, 1200)
    # The same picture as the full decode shrunk by area averaging, to JPEG's precision.
    assert np.abs(image.pixels.astype(int) - _area_resized(pixels, (400, 300))).mean() < 2


def test_the_models_input_size_wins_over_a_smaller_overlay(tmp_path):
    _photo(tmp_path / "big.jpg")
    image = load_image(tmp_path / "big.jpg", longest_side=100, shortest_side=224)
    assert image.size == (299, 224)  # 1600 x 1200 at 224 / 1200


def test_a_reduced_decode_keeps_the_exif_rotation(tmp_path):
    pixels = _photo(tmp_path / "turned.jpg", orientation=6)  # displayed rotated 90° clockwise
    image = load_image(tmp_path / "turned.jpg", longest_side=400, shortest_side=64)
    assert image.size == (300, 400) and image.full_size == (1200, 1600)
    upright = np.rot90(pixels, k=-1).copy()
    assert np.abs(image.pixels.astype(int) - _area_resized(upright, (300, 400))).mean() < 2


def test_other_formats_are_resized_to_the_overlay_size_and_small_photos_stay(tmp_path):
    Image.fromarray(_gradient(800, 600)).save(tmp_path / "big.png")
    image = load_image(tmp_path / "big.png", longest_side=200)
    assert image.size == (200, 150) and image.full_size == (800, 600)
    small = load_image(tmp_path / "big.png", longest_side=2048)
    assert small.size == (800, 600) and small.file_size is None and "decoded" not in small.describe()


def test_the_pixel_limit_holds_for_a_reduced_decode(tmp_path):
    _photo(tmp_path / "big.jpg")
    with pytest.raises(ImageError, match="too large"):
        load_image(tmp_path / "big.jpg", max_pixels=1_000_000, longest_side=100)
