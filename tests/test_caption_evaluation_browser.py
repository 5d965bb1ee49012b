"""`evaluate` on a captioner, its page in a real headless browser: the verdict and a line per map,
the maps ranked, a row per word, the mean curves drawn, a hostile file name kept as text, nothing
sticking out at a phone's or a wide screen's width (screenshots kept in test-artifacts/screenshots/).
CI installs Debian's chromium (`.ci/run`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_gallery_browser import CHROMIUM, HOSTILE, page  # noqa: F401 - the same browser page fixture

from attnexplain.cli import main

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (CI installs it)")
REPO = Path(__file__).resolve().parents[1]
CAPTIONER = REPO / "samples" / "models" / "captioner-composites.pt"
ARTIFACTS = REPO / "test-artifacts" / "screenshots"
STEPS = 4


@pytest.fixture(scope="module")
def evaluation_page(tmp_path_factory) -> Path:
    pytest.importorskip("attnexplain_attention_cnn")
    from composites import TEST_SEED, write_caption_composites

    folder = tmp_path_factory.mktemp("composites")
    write_caption_composites(folder, 2, TEST_SEED, 64)
    (folder / "images" / "0001.png").rename(folder / "images" / HOSTILE)  # a name that is markup
    (folder / "masks" / "0001").rename(folder / "masks" / Path(HOSTILE).stem)
    out = tmp_path_factory.mktemp("evaluation")
    result = CliRunner().invoke(
        main,
        [
            "evaluate", str(CAPTIONER), str(folder / "images"), "--masks", str(folder / "masks"),
            "--size", "64", "--steps", str(STEPS), "--out", str(out), "--quiet",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def test_caption_evaluation_page_shows_the_verdicts_the_maps_and_each_word(evaluation_page, page):
    evaluation = json.loads((evaluation_page / "evaluation.json").read_text())
    page.goto((evaluation_page / "evaluation.html").as_uri())
    assert page.text_content("#verdict").strip() == evaluation["verdict"]
    lines = page.eval_on_selector_all("#map-verdicts li", "items => items.map(i => i.textContent.trim())")
    assert lines == list(evaluation["map_verdicts"].values())
    rows = page.eval_on_selector_all("#ranking tbody tr", "rows => rows.map(r => r.cells[0].textContent.trim())")
    assert rows == [row["method"] for row in evaluation["ranking"]]
    words = page.eval_on_selector_all("#by-word tbody tr", "rows => rows.map(r => r.cells[0].textContent.trim())")
    assert [word for word in words if word] == list(evaluation["by_word"])
    curves = page.eval_on_selector_all(
        "polyline.curve",
        "lines => lines.map(l => [l.dataset.method, l.points.numberOfItems, l.getBoundingClientRect().width])",
    )
    assert sorted(method for method, _, _ in curves) == sorted(["attention", "gradcam", "random"] * 2)
    assert all(points == STEPS + 1 and width > 100 for _, points, width in curves)
    images = page.text_content("#images")
    assert HOSTILE in images and all(record["caption"] in images for record in evaluation["per_image"])
    assert not page.dialogs and page.eval_on_selector_all("img[src='x']", "images => images.length") == 0
    page.wait_for_function("Array.from(document.images).every(i => i.complete)")
    shown = page.eval_on_selector_all(".examples img", "images => images.map(i => [i.alt, i.naturalWidth])")
    measured = [w["word"] for record in evaluation["per_image"] for w in record["words"]]
    assert len(shown) == 3 * len(measured) and all(width > 0 for _, width in shown)  # α, Grad-CAM, random
    assert "examples" not in evaluation  # the pictures live in the page only
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for width in (420, 1920):
        page.set_viewport_size({"width": width, "height": 1000})
        page.wait_for_timeout(100)
        assert page.evaluate("document.documentElement.scrollWidth") <= width + 1  # the tables scroll inside
        page.screenshot(path=str(ARTIFACTS / f"caption-evaluation-{width}.png"), full_page=True)
