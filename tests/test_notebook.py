"""An Explanation in a notebook: each method's own overlay, the inline HTML and PNG that Jupyter and
IPython show (through IPython's own display formatter), escaped and offline."""

from __future__ import annotations

import base64
import dataclasses
import re
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest

import attnexplain
from attnexplain.results import MethodMap

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


@pytest.fixture(scope="module")
def cat_result(sample_resnet_file):
    """The sample ResNet's Grad-CAM and LayerCAM on a held-out composite whose object mask is known."""
    return attnexplain.explain(str(sample_resnet_file), SAMPLES / "images" / "cat-on-grass.png", "gradcam,layercam")


def redness(pixels: np.ndarray) -> np.ndarray:
    return pixels[..., 0].astype(np.float64) - pixels[..., 2].astype(np.float64)


def test_each_methods_map_draws_its_own_overlay(cat_result):
    from attnexplain.render import render_overlay

    photo = cat_result.image.pixels
    for name in ("gradcam", "layercam"):
        own = cat_result.maps[name].overlay(alpha=0.3, colormap="jet")
        expected = render_overlay(photo, cat_result.maps[name].heatmap, cat_result.box, 0.3, "jet")
        assert np.array_equal(own, expected)
        assert np.array_equal(cat_result.overlay(0.3, name, "jet"), own)  # the Explanation's API unchanged
    assert not np.array_equal(cat_result.maps["gradcam"].overlay(), cat_result.maps["layercam"].overlay())
    # The overlay is hot on the cat: redder inside the composite's object mask than outside it.
    mask = cv2.imread(str(SAMPLES / "masks" / "cat-on-grass.png"), cv2.IMREAD_GRAYSCALE) > 127
    colours = redness(cat_result.maps["layercam"].overlay(alpha=1.0, colormap="jet"))
    assert colours[mask].mean() > colours[~mask].mean() + 100


def test_a_map_without_its_photo_says_how_to_draw_it():
    with pytest.raises(ValueError, match="no photo to draw over"):
        MethodMap("gradcam", np.zeros((4, 4), np.float32)).overlay()


def _data_uri_pixels(uri: str) -> np.ndarray:
    kind, payload = re.match(r"data:image/(png|jpeg);base64,(.*)", uri).groups()
    decoded = cv2.imdecode(np.frombuffer(base64.b64decode(payload), np.uint8), cv2.IMREAD_COLOR)
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[dict[str, str]] = []
        self.attributes: list[tuple[str, str]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attributes += [(name, value or "") for name, value in attrs]
        if tag == "img":
            self.images.append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)


def test_html_shows_the_photo_each_overlay_and_the_predictions_inline_without_network_or_script(cat_result):
    html = cat_result._repr_html_()
    page = _Page()
    page.feed(html)
    assert "script" not in page.tags and "link" not in page.tags and "style" not in page.tags
    # Nothing to fetch: every image is a data: URI, no attribute points anywhere else.
    assert all(image["src"].startswith("data:image/") for image in page.images)
    assert not [value for name, value in page.attributes if name in ("href", "src") and not value.startswith("data:")]
    assert "http" not in html
    alts = [image["alt"] for image in page.images]
    assert alts[:2] == ["photo", "gradcam overlay"] and "layercam overlay" in alts
    by_alt = {image["alt"]: image["src"] for image in page.images}
    for name in ("gradcam", "layercam"):  # each its own map, as MethodMap.overlay draws it (JPEG-close)
        shown = _data_uri_pixels(by_alt[f"{name} overlay"]).astype(np.float64)
        expected = cat_result.maps[name].overlay()
        expected = cv2.resize(expected, shown.shape[1::-1], interpolation=cv2.INTER_AREA).astype(np.float64)
        assert np.abs(shown - expected).mean() < 6
    bar = _data_uri_pixels(next(src for alt, src in by_alt.items() if alt.startswith("colour bar")))
    from attnexplain.render import colormap_table

    assert np.array_equal(bar[0], colormap_table())  # the overlays' own colours, low to high
    text = " ".join(" ".join(page.text).split())
    assert "cat" in text and "gradcam" in text and "layercam" in text
    for prediction in cat_result.predictions:  # each prediction and its probability
        assert f"{prediction.prob:.3f}" in text
    assert "positive evidence for cat" in text  # what the colours mean, as report.html says it
    assert f"{float(cat_result.maps['gradcam'].heatmap.max()):.3g}" in text  # the map's range


def test_html_escapes_labels_and_file_names(sample_resnet_file, tmp_path):
    hostile = "<img src=x onerror=alert(1)>"
    photo = tmp_path / "<script>alert('name')&.png"
    photo.write_bytes((SAMPLES / "images" / "cat-on-grass.png").read_bytes())
    labels = [hostile, "<b>cat</b>", "coffee & <i>tea</i>", "rocket"]
    result = attnexplain.explain(str(sample_resnet_file), photo, "gradcam", labels=labels)
    html = result._repr_html_()
    page = _Page()
    page.feed(html)
    assert page.tags.count("img") == 3  # photo, overlay, colour bar: no injected image
    assert "script" not in page.tags and "b" not in page.tags and "i" not in page.tags
    assert "onerror" not in [name for name, _ in page.attributes]
    text = "".join(page.text)
    assert "<b>cat</b>" in text and "<script>alert('name')&.png" in text and hostile in text


def test_png_is_the_photo_and_each_overlay_in_a_row(cat_result):
    from attnexplain.notebook import ROW_HEIGHT

    png = cat_result._repr_png_()
    assert png.startswith(b"\x89PNG")
    picture = cv2.cvtColor(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    side = ROW_HEIGHT  # the square photo's tiles
    assert picture.shape[1] == 3 * side + 2 * 6
    tiles = [picture[:side, index * (side + 6) : index * (side + 6) + side].astype(np.float64) for index in range(3)]
    expected = [cat_result.image.pixels, cat_result.maps["gradcam"].overlay(), cat_result.maps["layercam"].overlay()]
    for tile, reference in zip(tiles, expected):
        reference = cv2.resize(reference, (side, side), interpolation=cv2.INTER_AREA).astype(np.float64)
        assert np.abs(tile - reference).mean() < 2


def test_ipython_displays_an_explanation_as_html_and_png(cat_result):
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    data, _ = shell.display_formatter.format(cat_result)
    assert data["text/html"] == cat_result._repr_html_()
    assert data["image/png"] == cat_result._repr_png_()
    # A cell whose value is the result goes through the display hook as a notebook's last line does.
    shown = []
    shell.displayhook.write_format_data = lambda format_dict, md_dict=None: shown.append(format_dict)
    shell.user_ns["result"] = cat_result
    shell.run_cell("result", store_history=False)
    assert shown and "text/html" in shown[0] and shown[0]["image/png"].startswith(b"\x89PNG")


def test_a_replaced_map_set_draws_over_the_same_photo(cat_result):
    """dataclasses.replace (how a result is copied with other maps) hands the new maps the photo."""
    heatmap = np.zeros((64, 64), np.float32)
    heatmap[:, :32] = 1.0
    copy = dataclasses.replace(cat_result, maps={"left": MethodMap("left", heatmap)})
    colours = redness(copy.maps["left"].overlay(alpha=1.0, colormap="jet"))
    half = colours.shape[1] // 2
    assert colours[:, : half - 4].mean() > colours[:, half + 4 :].mean() + 150


@pytest.mark.heavy
def test_docs_notebook_runs_in_ipython_and_shows_the_result(tmp_path, monkeypatch):
    """docs/notebook.md's cells, run one by one in an IPython shell as a notebook runs them: the
    first cell's value is displayed as HTML and PNG, the figures it saves are written."""
    from IPython.core.interactiveshell import InteractiveShell

    page = (Path(__file__).resolve().parents[1] / "docs" / "notebook.md").read_text(encoding="utf-8")
    cells = re.findall(r"```python\n(.*?)```", page, re.S)
    assert len(cells) >= 5
    (tmp_path / "samples").symlink_to(SAMPLES)
    monkeypatch.chdir(tmp_path)
    shell = InteractiveShell.instance()
    shown = []
    monkeypatch.setattr(shell.displayhook, "write_format_data", lambda data, metadata=None: shown.append(data))
    for cell in cells:
        outcome = shell.run_cell(cell, store_history=False)
        assert outcome.success, (cell, outcome.error_in_exec)
    assert "text/html" in shown[0] and "gradcam overlay" in shown[0]["text/html"]
    assert shown[0]["image/png"].startswith(b"\x89PNG")
    for name in ("cat.pdf", "cat.png", "grid.pdf", "rollout-by-depth.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name
    assert (tmp_path / "cat.pdf").read_bytes().startswith(b"%PDF")


def test_a_console_shows_a_one_line_summary_not_arrays(cat_result):
    text = repr(cat_result)
    assert "\n" not in text and "array(" not in text and len(text) < 300
    assert "cat-on-grass.png" in text and "gradcam, layercam" in text and "'cat'" in text and "p=1.000" in text
