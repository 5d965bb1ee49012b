"""Figures for papers (attnexplain/figures.py): rendered to PNG and PDF, their pixels checked against
the maps: an overlay panel is hot where its map is high, every panel shows its own map, the attention
grid's cells are its layers × heads. matplotlib stays out of ``import attnexplain``."""

from __future__ import annotations

import dataclasses
import io
import math
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

import attnexplain
from attnexplain.results import MethodMap

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"


@pytest.fixture(scope="module")
def cat_result(sample_resnet_file):
    return attnexplain.explain(str(sample_resnet_file), SAMPLES / "images" / "cat-on-grass.png", "gradcam,layercam")


@pytest.fixture(scope="module")
def vit_results(sample_vit_file):
    return [
        attnexplain.explain(str(sample_vit_file), SAMPLES / "images" / name, "rollout,attention")
        for name in ("rocket-on-brick.png", "cat-on-grass.png")
    ]


def halves_result(result):
    """``result`` with two known maps: one high on the left half of the picture, one on the right."""
    left = np.zeros((64, 64), np.float32)
    left[:, :32] = 1.0
    return dataclasses.replace(
        result, maps={"left": MethodMap("left", left), "right": MethodMap("right", left[:, ::-1])}
    )


def redness(pixels: np.ndarray) -> np.ndarray:
    return pixels[..., 0].astype(np.float64) - pixels[..., 2].astype(np.float64)


def png_pixels(fig) -> np.ndarray:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=fig.dpi)  # at the figure's dpi: axes extents are its pixels
    decoded = cv2.imdecode(np.frombuffer(buffer.getvalue(), np.uint8), cv2.IMREAD_COLOR)
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)


def panel(pixels: np.ndarray, axes, margin: int = 2) -> np.ndarray:
    """The pixels inside ``axes`` in a PNG of its figure (display y runs upwards)."""
    box = axes.get_window_extent()
    height = pixels.shape[0]
    x0, x1 = math.ceil(box.x0) + margin, math.floor(box.x1) - margin
    y0, y1 = height - math.floor(box.y1) + margin, height - math.ceil(box.y0) - margin
    return pixels[y0:y1, x0:x1]


def same_picture(shown: np.ndarray, expected: np.ndarray, side: int = 32) -> float:
    """Mean absolute difference (0–255) of ``shown`` and ``expected``, both shrunk to ``side`` px
    (matplotlib's resampling of fine texture differs from OpenCV's; the picture does not)."""

    def small(pixels: np.ndarray) -> np.ndarray:
        return cv2.resize(pixels, (side, side), interpolation=cv2.INTER_AREA).astype(np.float64)

    return float(np.abs(small(shown) - small(expected)).mean())


def pdf_rgb_images(pdf: bytes) -> list[np.ndarray]:
    """The RGB images a PDF embeds, in order: each Flate stream with PNG predictors is a PNG's IDAT."""
    images = []
    pattern = rb"<<([^>]*?/Subtype /Image[^>]*?/ColorSpace /DeviceRGB.*?)>>\s*stream\r?\n"
    for match in re.finditer(pattern, pdf, re.S):
        header = match.group(1)
        width = int(re.search(rb"/Width (\d+)", header).group(1))
        height = int(re.search(rb"/Height (\d+)", header).group(1))
        assert b"/Predictor 10" in header and b"/FlateDecode" in header
        data = pdf[match.end() : pdf.index(b"endstream", match.end())].rstrip(b"\r\n")

        def chunk(kind: bytes, body: bytes) -> bytes:
            return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

        png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        png += chunk(b"IDAT", data) + chunk(b"IEND", b"")
        decoded = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
        images.append(cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB))
    return images


def test_import_attnexplain_does_not_import_matplotlib():
    code = (
        "import sys, attnexplain; attnexplain.figure; import attnexplain.figures, attnexplain.notebook; "
        "print('matplotlib' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


def test_without_matplotlib_a_figure_is_a_one_line_error_naming_the_extra(cat_result, monkeypatch):
    from attnexplain.figures import MatplotlibMissing

    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    with pytest.raises(MatplotlibMissing) as raised:
        cat_result.figure()
    assert "\n" not in str(raised.value) and "pip install 'attnexplain[figures]'" in str(raised.value)


def test_png_overlay_panel_is_hot_where_the_map_is_high(cat_result):
    fig = halves_result(cat_result).figure(colormap="jet", alpha=0.6, colorbar=False)
    pixels = png_pixels(fig)
    photo_axes, left_axes, right_axes = fig.axes
    for axes, hot_side in ((left_axes, "left"), (right_axes, "right")):
        colours = redness(panel(pixels, axes))
        half = colours.shape[1] // 2
        left, right = colours[:, : half - 3].mean(), colours[:, half + 3 :].mean()
        assert (left - right if hot_side == "left" else right - left) > 150, (hot_side, left, right)
    assert same_picture(panel(pixels, photo_axes), cat_result.image.pixels) < 8  # the photo, unchanged


def test_pdf_embeds_each_overlay_hot_where_its_map_is_high(cat_result):
    fig = halves_result(cat_result).figure(colormap="jet", alpha=0.6, colorbar=False, photo=False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="pdf")
    pdf = buffer.getvalue()
    assert pdf.startswith(b"%PDF")
    images = pdf_rgb_images(pdf)
    assert len(images) == 2  # the two overlays; titles are text, not pictures
    for image, hot_side in zip(images, ("left", "right")):
        colours = redness(image)
        half = colours.shape[1] // 2
        left, right = colours[:, : half - 3].mean(), colours[:, half + 3 :].mean()
        assert (left - right if hot_side == "left" else right - left) > 150


def test_a_figure_shows_each_methods_own_overlay_with_its_colour_bar(cat_result):
    fig = cat_result.figure()
    pixels = png_pixels(fig)
    image_axes = [axes for axes in fig.axes if axes.get_images()]
    bars = [axes for axes in fig.axes if axes not in image_axes or axes.get_label() == "<colorbar>"]
    assert [axes.get_title() for axes in image_axes[1:]] == ["gradcam", "layercam"]
    assert image_axes[0].get_title().startswith("cat")
    for axes, name in zip(image_axes[1:], ("gradcam", "layercam")):
        own = same_picture(panel(pixels, axes), cat_result.maps[name].overlay())
        assert own < 8
    # Each overlay's colour bar spans its map's own range, ticked at its min and max.
    assert len(bars) == 2
    for bar, name in zip(bars, ("gradcam", "layercam")):
        heatmap = cat_result.maps[name].heatmap
        assert np.allclose(bar.get_xticks(), [heatmap.min(), heatmap.max()], rtol=1e-5)
        assert "for cat" in bar.get_xlabel()


def test_a_grid_of_several_images_puts_each_result_in_its_row(vit_results):
    fig = attnexplain.figure(vit_results, colorbar=False)
    pixels = png_pixels(fig)
    image_axes = [axes for axes in fig.axes if axes.get_images()]
    assert len(image_axes) == 2 * 3
    for row, result in enumerate(vit_results):
        photo, rollout, attention = image_axes[3 * row : 3 * row + 3]
        assert same_picture(panel(pixels, photo), result.image.pixels) < 8
        assert same_picture(panel(pixels, rollout), result.maps["rollout"].overlay()) < 8
        assert same_picture(panel(pixels, attention), result.maps["attention"].overlay()) < 8
    # The two rows differ: each shows its own photo and maps.
    assert same_picture(panel(pixels, image_axes[1]), vit_results[1].maps["rollout"].overlay()) > 15
    with pytest.raises(ValueError, match="has no 'gradcam' map"):
        attnexplain.figure(vit_results, methods="rollout,gradcam")


def test_attention_grid_figure_cells_are_each_layer_and_head(vit_results):
    from attnexplain.render import colorize, normalize_each

    result = vit_results[0]
    grid = result.maps["attention"].attention_grid
    layers, heads, rows, columns = grid.shape
    fig = result.attention_figure()
    pixels = png_pixels(fig)
    cells = [axes for axes in fig.axes if axes.get_images()]
    assert len(cells) == layers * heads
    expected = colorize(normalize_each(grid))
    for index, axes in enumerate(cells):
        layer, head = divmod(index, heads)
        shown = panel(pixels, axes, margin=0)
        # The centre of each grid position's square is that position's colour.
        ys = ((np.arange(rows) + 0.5) * shown.shape[0] / rows).astype(int)
        xs = ((np.arange(columns) + 0.5) * shown.shape[1] / columns).astype(int)
        centres = shown[ys][:, xs].astype(np.int64)
        assert np.abs(centres - expected[layer, head]).max() <= 3, (layer, head)
    with pytest.raises(ValueError, match="The rollout map has no attention grid"):
        result.attention_figure("rollout")


def test_depth_figure_shows_rollout_through_each_depth(vit_results):
    from attnexplain.render import render_overlay

    result = vit_results[0]
    depths = result.maps["rollout"].depth_maps
    fig = result.depth_figure()
    pixels = png_pixels(fig)
    panels = [axes for axes in fig.axes if axes.get_images()]
    assert [axes.get_title() for axes in panels] == ["1 layer"] + [f"{n} layers" for n in range(2, len(depths) + 1)]
    for axes, depth_map in zip(panels, depths):
        expected = render_overlay(result.image.pixels, depth_map, result.box, 0.5)
        assert same_picture(panel(pixels, axes), expected) < 8
