"""Rendering: overlays at the photo's resolution, in the region the model saw."""

from __future__ import annotations

import cv2
import numpy as np

from attnexplain.render import colorize, normalize_heatmap, render_overlay


def test_normalize_scales_to_unit_range_and_handles_constant_maps():
    assert normalize_heatmap(np.array([[2.0, 4.0], [6.0, 10.0]])).tolist() == [[0, 0.25], [0.5, 1.0]]
    assert not normalize_heatmap(np.full((3, 3), 7.0)).any()


def test_jet_colormap_runs_blue_to_red():
    colors = colorize(np.array([[0.0, 1.0]]), "jet")
    assert colors[0, 0, 2] > 100 and colors[0, 0, 0] < 50  # low → blue
    assert colors[0, 1, 0] > 100 and colors[0, 1, 2] < 50  # high → red


def test_default_colormap_is_perceptually_uniform_and_its_table_matches_opencv():
    from attnexplain.render import COLORMAPS, DEFAULT_COLORMAP, colormap_table

    assert DEFAULT_COLORMAP != "jet"
    for name, code in COLORMAPS.items():
        expected = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], code)[:, 0, ::-1]
        np.testing.assert_array_equal(colormap_table(name), expected)
    levels = np.array([0.0, 0.31, 1.0])
    np.testing.assert_array_equal(
        colorize(levels, "inferno"), colormap_table("inferno")[np.round(levels * 255).astype(int)]
    )


def test_overlay_puts_the_hot_spot_where_the_model_saw_it():
    photo = np.full((100, 200, 3), 128, dtype=np.uint8)
    heatmap = np.zeros((10, 10), dtype=np.float32)
    heatmap[0:3, 7:10] = 1.0  # top-right corner of what the model saw
    overlay = render_overlay(photo, heatmap, box=(50.0, 0.0, 150.0, 100.0), alpha=0.6)
    assert overlay.shape == photo.shape
    red = overlay[..., 0].astype(int) - overlay[..., 2].astype(int)
    assert red[10, 140] > 50  # inside the box, top right: hot
    assert red[90, 60] < 0  # inside the box, elsewhere: cold (blue)
    assert (overlay[:, :50] < 128).all() and (overlay[:, 150:] < 128).all()  # outside: dimmed


def test_overlay_is_the_alpha_blend_of_photo_and_colormap():
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    heatmap = rng.random((7, 7)).astype(np.float32)
    overlay = render_overlay(photo, heatmap, box=(0.0, 0.0, 90.0, 60.0), alpha=0.35)
    stretched = cv2.resize(normalize_heatmap(heatmap), (90, 60), interpolation=cv2.INTER_LINEAR)
    expected = 0.65 * photo.astype(np.float64) + 0.35 * colorize(stretched).astype(np.float64)
    assert np.abs(overlay.astype(np.float64) - expected).max() <= 0.5 + 1e-6  # rounded to nearest


def test_downscale_shrinks_a_decoded_photo_like_area_averaging():
    """Previews (photo.jpg, thumbnails) shrink with torchvision's 8-bit antialiased kernel: what a
    reader sees must match area averaging (OpenCV's INTER_AREA, the previous way) to within a grey
    level or two, from a read-only decoded photo, without torch warning about it."""
    import io
    import warnings

    from PIL import Image
    from skimage import data

    from attnexplain.render import downscale

    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((1100, 733)).save(buffer, "JPEG", quality=90)
    photo = np.asarray(Image.open(io.BytesIO(buffer.getvalue())))  # read-only, as decoding gives it
    assert not photo.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small = downscale(photo, 512)
    assert small.shape == (341, 512, 3) and small.dtype == np.uint8 and small.flags.c_contiguous
    area = cv2.resize(photo, (512, 341), interpolation=cv2.INTER_AREA)
    assert np.abs(small.astype(int) - area.astype(int)).mean() < 0.7  # plain bilinear: 0.82
    # Antialiased: a one-pixel checkerboard shrinks to flat grey, not to a moiré of its samples.
    checkerboard = (np.indices((733, 1100)).sum(axis=0) % 2 * 255).astype(np.uint8)
    grey = downscale(np.repeat(checkerboard[:, :, None], 3, axis=2), 512)
    assert np.abs(grey[2:-2, 2:-2].astype(int) - 127).max() <= 3
    assert downscale(photo, 2000) is photo  # never enlarged
