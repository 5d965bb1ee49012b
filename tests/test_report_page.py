"""report.html and the detail pages as a reader meets them: the photo's name as title, what each
colour means, the raw maps embedded so the page redraws them, timings in units, metrics when given."""

from __future__ import annotations

import base64
import html as html_module
import json
import re

import cv2
import numpy as np
import pytest

import attnexplain
from attnexplain.render import normalize_heatmap
from attnexplain.viewer import REPORT_MAP_SIDE, human_duration


def _viewer(page: str) -> dict:
    found = re.search(r'<script type="application/json" id="viewer-data">(.*?)</script>', page, re.S)
    return json.loads(found.group(1))


def _levels(text: str, shape) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=np.uint8).reshape(shape)


@pytest.fixture(scope="module")
def vit_report(tmp_path_factory, sample_vit_file):
    image = sample_vit_file.parents[1] / "images" / "cat-on-grass.png"
    explanation = attnexplain.explain(str(sample_vit_file), image, "rollout,attention")
    folder = tmp_path_factory.mktemp("report") / "cat"
    report = explanation.save(folder, colormap="inferno")
    return explanation, report, (folder / "report.html").read_text(encoding="utf-8"), folder


def test_title_is_the_file_name_and_timings_have_units(vit_report):
    _, report, page, _ = vit_report
    assert "<title>cat-on-grass.png · attnexplain</title>" in page
    assert "<h1>Where the model looks: cat-on-grass.png</h1>" in page
    assert "_s<" not in page and "explain</th><td>" in page
    assert re.search(r"explain</th><td>\d+(\.\d+)? (ms|s)</td>", page)


def test_embedded_maps_are_the_raw_heatmaps_in_8_bits(vit_report):
    explanation, report, page, folder = vit_report
    data = _viewer(page)
    assert [m["method"] for m in data["methods"]] == ["rollout", "attention"]
    for entry in data["methods"]:
        raw = np.load(folder / report["outputs"]["maps"][entry["method"]]["heatmap"])
        assert raw.shape[0] <= REPORT_MAP_SIDE  # the sample ViT's 128 px: embedded whole
        levels = _levels(entry["levels"], (entry["height"], entry["width"]))
        expected = np.round(normalize_heatmap(raw) * 255)
        assert np.abs(levels.astype(int) - expected).max() <= 1
        assert entry["min"] == pytest.approx(float(raw.min())) and entry["max"] == pytest.approx(float(raw.max()))
    assert data["colormap"] == "inferno" and data["box"] == [0.0, 0.0, 1.0, 1.0]
    tables = json.loads(re.search(r"var colormaps = (\{.*?\});", page).group(1))
    table = _levels(tables["inferno"], (256, 3))
    np.testing.assert_array_equal(
        table, cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_INFERNO)[:, 0, ::-1]
    )
    assert set(tables) >= {"turbo", "inferno", "jet"}


def test_written_overlay_uses_the_chosen_colormap(vit_report):
    explanation, report, _, folder = vit_report
    written = cv2.imread(str(folder / report["outputs"]["maps"]["rollout"]["overlay"]))[..., ::-1]
    np.testing.assert_array_equal(written, explanation.overlay(0.5, "rollout", "inferno"))
    assert (written != explanation.overlay(0.5, "rollout", "jet")).any()


def test_attention_explorer_holds_every_layer_and_head_and_rollout_every_depth(vit_report):
    explanation, _, page, _ = vit_report
    data = _viewer(page)
    attention = data["methods"][1]["attention"]
    grid = explanation.maps["attention"].attention_grid
    assert (attention["layers"], attention["heads"]) == grid.shape[:2]
    levels = _levels(attention["levels"], grid.shape)
    for layer in range(grid.shape[0]):
        for head in range(grid.shape[1]):
            expected = np.round(normalize_heatmap(grid[layer, head]) * 255)
            assert np.abs(levels[layer, head].astype(int) - expected).max() <= 1
    depths = data["methods"][0]["depths"]
    rollout = explanation.maps["rollout"].depth_maps
    assert depths["depths"] == grid.shape[0] == rollout.shape[0]
    last = _levels(depths["levels"], rollout.shape)[-1]
    assert np.abs(last.astype(int) - np.round(normalize_heatmap(rollout[-1]) * 255)).max() <= 1
    for label in ("layer 1 (input side)", "head 4", "mean of the heads", "Through layer"):
        assert label in page


def test_colour_bar_says_what_low_and_high_mean_with_the_paper(vit_report):
    explanation, _, page, _ = vit_report
    text = html_module.unescape(page)
    assert (
        "low → high = share of the attention flow to the class token (or all tokens), all layers (any class) "
        "(min–max per image)"
    ) in text
    assert "Abnar &amp; Zuidema 2020" in page  # the method's paper, escaped
    assert text.count('class="colorbar"') == 2
    assert "What the model saw (128×128)" in text


def test_metrics_are_shown_when_the_report_has_them(vit_report):
    from attnexplain.report import render_html

    explanation, report, _, _ = vit_report
    with_metrics = dict(report, metrics={"rollout": {"deletion_auc": 0.123456, "<b>insertion</b>": 0.5}})
    page = render_html(with_metrics, explanation, [])
    assert "<h2>Metrics</h2>" in page and "0.123" in page and "0.500" in page
    assert "<b>insertion</b>" not in page and "&lt;b&gt;insertion&lt;/b&gt;" in page
    assert "<h2>Metrics</h2>" not in render_html(report, explanation, [])


def test_durations_read_in_human_units():
    assert human_duration(0.0123) == "12.3 ms"
    assert human_duration(0.00004) == "0.0 ms"
    assert human_duration(2.5) == "2.50 s"
    assert human_duration(125) == "2 min 5 s"
    assert human_duration(float("nan")) == "—"


def test_model_view_is_the_crop_the_model_saw():
    from attnexplain.preprocess import Preprocessing, prepare
    from attnexplain.render import render_model_view

    rows, columns = np.mgrid[0:90, 0:150]
    photo = np.stack([rows * 2.5, columns * 1.5, (rows + columns) % 256], axis=-1).astype(np.uint8)
    for preprocessing in (Preprocessing(size=(32, 32), resize=40), Preprocessing(size=(32, 32), letterbox=True)):
        prepared = prepare(photo, preprocessing)
        mean, std = np.array(preprocessing.mean), np.array(preprocessing.std)
        seen = (prepared.tensor[0].numpy().transpose(1, 2, 0) * std + mean) * 255
        view = render_model_view(photo, prepared.box, preprocessing.size, tuple(255 * mean))
        assert view.shape == (32, 32, 3)
        assert np.abs(view.astype(float) - seen).mean() < 6  # resampling differs, the content not
