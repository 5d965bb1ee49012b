"""The evaluation page in a real headless browser: ranking, curves, examples render from disk with no
network request, and a hostile file name stays text. CI installs Debian's chromium (`.ci/run`)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from PIL import Image
from test_gallery_browser import CHROMIUM, HOSTILE, page  # noqa: F401 - the same browser page fixture

from attnexplain.cli import main

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (CI installs it)")


@pytest.fixture(scope="module")
def evaluation_page(tmp_path_factory, sample_resnet_file):
    from composites import TEST_SEED, make_composites

    folder = tmp_path_factory.mktemp("photos")
    pixels, _, _ = make_composites(3, TEST_SEED)
    for index, image in enumerate(pixels[:2]):
        Image.fromarray(image).save(folder / f"photo-{index}.png")
    Image.fromarray(pixels[2]).save(folder / HOSTILE)
    out = tmp_path_factory.mktemp("evaluation")
    result = CliRunner().invoke(
        main,
        [
            "evaluate",
            str(sample_resnet_file),
            str(folder),
            "--out",
            str(out),
            "--method",
            "gradcam,saliency",
            "--metrics",
            "deletion,insertion",
            "--steps",
            "8",
            "--size",
            "64",
        ],
    )
    assert result.exit_code == 0, result.output
    return out


def test_evaluation_page_ranks_methods_and_draws_the_curves(evaluation_page, page):
    evaluation = json.loads((evaluation_page / "evaluation.json").read_text())
    page.goto((evaluation_page / "evaluation.html").as_uri())
    rows = page.eval_on_selector_all("#ranking tbody tr", "rows => rows.map(r => r.cells[0].textContent.trim())")
    assert rows == [row["method"] for row in evaluation["ranking"]]
    assert page.text_content("#verdict").strip() == evaluation["verdict"]
    curves = page.eval_on_selector_all(
        "polyline.curve",
        "lines => lines.map(l => [l.dataset.method, l.points.numberOfItems, l.getBoundingClientRect().width])",
    )
    assert len(curves) == 2 * 3  # deletion and insertion, two methods and the random map
    assert all(points == 9 and width > 100 for _, points, width in curves)
    assert {method for method, _, _ in curves} == {"gradcam", "saliency", "random"}
    page.wait_for_function("Array.from(document.images).every(i => i.complete)")
    widths = page.eval_on_selector_all(".examples img", "images => images.map(i => i.naturalWidth)")
    assert len(widths) == 3 * 3 and min(widths) > 0


def test_evaluation_page_makes_no_request_and_keeps_hostile_names_as_text(evaluation_page, page):
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto((evaluation_page / "evaluation.html").as_uri())
    page.wait_for_load_state("networkidle")
    assert requests and all(url.startswith(("file:", "data:")) for url in requests), requests
    assert HOSTILE in page.text_content(".examples")
    assert page.dialogs == []
    assert page.eval_on_selector_all("img[src='x']", "images => images.length") == 0
