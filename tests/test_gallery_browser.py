"""The pages in a real headless browser: the gallery renders, filters, sorts, searches, pages and
links; the report and detail pages redraw their maps (opacity, colormap, values under the pointer,
the attention explorer); no page asks the network for anything; hostile names and labels stay
text. Screenshots at two widths are kept in test-artifacts/screenshots/. CI installs Debian's
chromium (`.ci/run`)."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from attnexplain.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HOSTILE = "<img src=x onerror=alert(1)>.png"

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (CI installs it)")


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, sample_resnet_file):
    from composites import TEST_SEED, make_composites

    folder = tmp_path_factory.mktemp("photos")
    pixels, _, _ = make_composites(12, TEST_SEED)
    for index, image in enumerate(pixels):
        subfolder = folder / ("a" if index % 2 else "b")
        subfolder.mkdir(exist_ok=True)
        Image.fromarray(image).save(subfolder / f"photo-{index:02d}.png")
    Image.fromarray(pixels[0]).save(folder / HOSTILE)
    out = tmp_path_factory.mktemp("gallery")
    result = CliRunner().invoke(
        main,
        ["batch", str(sample_resnet_file), str(folder), "--out", str(out), "--method", "gradcam,saliency", "--quiet"],
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def page():
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            # file:// pages are each their own origin: reading a canvas that drew photo.jpg back
            # (as these tests do, never the pages) needs file access treated as one origin.
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--allow-file-access-from-files",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        page = browser.new_page()
        page.dialogs = []
        page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), dialog.dismiss()))
        page.requests = []
        page.on("request", lambda request: page.requests.append(request.url))
        yield page
        # Every page of every test opened from disk alone: files and embedded data, no network.
        assert page.requests and all(url.startswith(("file:", "data:")) for url in page.requests), [
            url for url in page.requests if not url.startswith(("file:", "data:"))
        ]
        browser.close()


def _visible(page) -> list[dict]:
    return page.eval_on_selector_all(
        ".card",
        "cards => cards.filter(c => c.style.display !== 'none')"
        ".map(c => ({name: c.querySelector('.name').textContent, cls: c.dataset['class'],"
        " conf: parseFloat(c.dataset.conf)}))",
    )


def test_gallery_renders_every_image_with_loaded_thumbnails(gallery, page):
    page.goto((gallery / "index.html").as_uri())
    assert len(_visible(page)) == 13
    page.mouse.wheel(0, 100000)  # lazy thumbnails load once scrolled to
    page.wait_for_function("Array.from(document.images).every(i => i.complete)")
    widths = page.eval_on_selector_all("img", "images => images.map(i => i.naturalWidth)")
    assert len(widths) == 39 and min(widths) > 0  # the photo and two methods per image, all decoded


def test_hostile_file_name_is_shown_as_text(gallery, page):
    page.goto((gallery / "index.html").as_uri())
    names = [card["name"] for card in _visible(page)]
    assert HOSTILE in names
    assert page.dialogs == []
    assert page.eval_on_selector_all("img[src='x']", "images => images.length") == 0


def test_filter_sort_and_search(gallery, page):
    report = json.loads((gallery / "report.json").read_text())
    page.goto((gallery / "index.html").as_uri())
    classes = page.eval_on_selector_all("#cls option", "options => options.map(o => o.value)")
    chosen = next(value for value in classes if value)
    page.select_option("#cls", chosen)
    shown = _visible(page)
    assert shown and all(card["cls"] == chosen for card in shown)
    assert len(shown) == report["class_histogram"][chosen]
    page.select_option("#cls", "")
    page.select_option("#sort", "conf-asc")
    confidences = [card["conf"] for card in _visible(page)]
    assert confidences == sorted(confidences)
    page.fill("#q", "photo-03")
    assert [card["name"] for card in _visible(page)] == ["a/photo-03.png"]


def test_cards_link_to_detail_pages(gallery, page):
    page.goto((gallery / "index.html").as_uri())
    page.fill("#q", "photo-04")
    page.locator(".card", has_text="photo-04").locator("a").click()
    page.wait_for_load_state()
    assert page.url.split("#")[0].endswith("detail.html")
    assert "photo-04.png" in page.content()
    page.wait_for_function("Array.from(document.images).every(i => i.complete)")
    assert min(page.eval_on_selector_all("img", "images => images.map(i => i.naturalWidth)")) > 0


@pytest.fixture(scope="module")
def attention_gallery(tmp_path_factory, sample_vit_file):
    images = Path(__file__).resolve().parents[1] / "samples" / "images"
    out = tmp_path_factory.mktemp("attention-gallery")
    result = CliRunner().invoke(
        main,
        ["batch", str(sample_vit_file), str(images), "--out", str(out), "--method", "rollout,attention", "--quiet"],
    )
    assert result.exit_code == 0, result.output
    return out


def test_detail_page_shows_the_attention_grid(attention_gallery, page):
    page.goto((attention_gallery / "images" / "cat-on-grass.png" / "detail.html").as_uri())
    page.wait_for_function("document.body.dataset.drawn === 'yes'")
    assert "Learned attention (attention)" in page.content()
    sizes = page.eval_on_selector_all("img.grid", "images => images.map(i => i.naturalWidth)")
    assert len(sizes) == 1 and sizes[0] > 0  # one grid (attention; rollout has none), decoded


ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "screenshots"


def _screenshots(page, name: str) -> None:
    """The page at a phone's and a wide screen's width, kept as test artifacts."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for width in (420, 1920):
        page.set_viewport_size({"width": width, "height": 1000})
        page.wait_for_timeout(100)
        assert page.evaluate("document.documentElement.scrollWidth") <= width + 1  # nothing sticks out
        page.screenshot(path=str(ARTIFACTS / f"{name}-{width}.png"), full_page=True)
    page.set_viewport_size({"width": 1280, "height": 900})


def _pixels(page, selector: str) -> np.ndarray:
    """What a canvas shows, RGB (read back as a PNG: one string over the wire, not a list)."""
    import base64

    import cv2

    uri = page.eval_on_selector(selector, "c => c.toDataURL('image/png')")
    encoded = np.frombuffer(base64.b64decode(uri.split(",", 1)[1]), np.uint8)
    return cv2.imdecode(encoded, cv2.IMREAD_COLOR)[..., ::-1].reshape(-1, 3)


def _set_range(page, selector: str, value: int) -> None:
    page.eval_on_selector(selector, f"e => {{ e.value = {value}; e.dispatchEvent(new Event('input')); }}")


@pytest.fixture(scope="module")
def vit_report(tmp_path_factory, sample_vit_file):
    image = sample_vit_file.parents[1] / "images" / "cat-on-grass.png"
    out = tmp_path_factory.mktemp("report")
    result = CliRunner().invoke(
        main, ["run", str(sample_vit_file), str(image), "--out", str(out), "--method", "rollout,attention", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    return out / "cat-on-grass", report


def test_report_slider_colormap_and_focus_redraw_the_overlays(vit_report, page):
    folder, _ = vit_report
    page.goto((folder / "report.html").as_uri())
    page.wait_for_function("document.body.dataset.drawn === 'yes'")
    photo = _pixels(page, ".pictures canvas[data-index='-1']")
    overlay = ".pictures canvas[data-index='0']"
    half = _pixels(page, overlay)
    assert np.abs(half.astype(int) - photo).mean() > 5  # the map is drawn over the photo
    _set_range(page, "#opacity", 0)
    np.testing.assert_array_equal(_pixels(page, overlay), photo)  # opacity 0: the photo alone
    _set_range(page, "#opacity", 100)
    opaque = _pixels(page, overlay)
    assert page.text_content("#opacity-value") == "100%"
    page.select_option("#colormap", "jet")
    jet = _pixels(page, overlay)
    assert np.abs(jet.astype(int) - opaque).mean() > 10  # redrawn in another colormap
    bar = page.eval_on_selector("canvas.bar", "c => Array.from(c.getContext('2d').getImageData(0, 0, 1, 1).data)")
    assert bar[:3] == [0, 0, 128]  # jet's lowest colour, OpenCV's table
    page.click("figure.method[data-index='1']")
    assert page.is_visible("#focus") and page.text_content("#focus-title") == "attention"
    _screenshots(page, "report")


def test_report_hover_shows_each_map_value_there(vit_report, page):
    folder, report = vit_report
    page.goto((folder / "report.html").as_uri())
    page.wait_for_function("document.body.dataset.drawn === 'yes'")
    canvas = page.locator(".pictures canvas[data-index='0']")
    box = canvas.bounding_box()
    u, v = 0.3, 0.6
    page.mouse.move(box["x"] + u * box["width"], box["y"] + v * box["height"])
    text = page.text_content("#hover-values")
    value = float(re.search(r"rollout (\S+)", text).group(1))
    heatmap = np.load(folder / report["outputs"]["maps"]["rollout"]["heatmap"])
    row, column = int(v * heatmap.shape[0]), int(u * heatmap.shape[1])
    near = heatmap[max(0, row - 2) : row + 3, max(0, column - 2) : column + 3]
    step = (heatmap.max() - heatmap.min()) / 255
    assert near.min() - step <= value <= near.max() + step
    assert re.search(r"attention \S+", text)


def test_attention_explorer_switches_layer_head_and_depth(vit_report, page):
    folder, _ = vit_report
    page.goto((folder / "report.html").as_uri())
    page.wait_for_function("document.body.dataset.drawn === 'yes'")
    explorer = "section.explorer canvas"
    last_mean = _pixels(page, explorer)
    page.select_option("section.explorer .layer", "0")
    first_mean = _pixels(page, explorer)
    page.select_option("section.explorer .head", "1")
    first_head = _pixels(page, explorer)
    assert page.text_content("section.explorer .explorer-caption").startswith("layer 1, head 2")
    assert np.abs(first_mean.astype(int) - last_mean).mean() > 1
    assert np.abs(first_head.astype(int) - first_mean).mean() > 1
    deepest = _pixels(page, "section.depths canvas")
    _set_range(page, "section.depths .depth", 1)
    assert page.text_content("section.depths .depth-value") == "1 of 4"
    assert np.abs(_pixels(page, "section.depths canvas").astype(int) - deepest).mean() > 1


HOSTILE_LABEL = "<img src=x onerror=alert(2)>"


@pytest.fixture(scope="module")
def judged_gallery(tmp_path_factory, sample_resnet_file):
    """12 composites with a --truth CSV that is wrong on purpose for a third of them (one of those
    with a hostile class name)."""
    from composites import LABELS, TEST_SEED, make_composites

    pixels, labels, _ = make_composites(12, TEST_SEED)
    folder = tmp_path_factory.mktemp("judged-photos")
    rows = [("image", "class")]
    for index, (image, label) in enumerate(zip(pixels, labels)):
        Image.fromarray(image).save(folder / f"photo-{index:02d}.png")
        truth = LABELS[label] if index % 3 else (HOSTILE_LABEL if index == 0 else LABELS[(label + 1) % 4])
        rows.append((f"photo-{index:02d}.png", truth))
    table = folder.parent / "truth.csv"
    with table.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)
    out = tmp_path_factory.mktemp("judged")
    result = CliRunner().invoke(
        main,
        [
            "batch",
            str(sample_resnet_file),
            str(folder),
            "--out",
            str(out),
            "--method",
            "gradcam",
            "--truth",
            str(table),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    return out


def _shown_names(page) -> list[str]:
    return page.eval_on_selector_all(".card .name", "names => names.map(n => n.textContent)")


def test_gallery_filters_to_the_misclassified_images(judged_gallery, page):
    records = [json.loads(line) for line in (judged_gallery / "results.jsonl").read_text().splitlines()]
    wrong = sorted(r["image"] for r in records if r["predictions"][0]["label"] != r["truth"])
    assert wrong
    page.goto((judged_gallery / "index.html").as_uri())
    page.select_option("#correct", "incorrect")
    assert _shown_names(page) == wrong
    assert "correct=incorrect" in page.url
    page.select_option("#correct", "correct")
    assert sorted(_shown_names(page)) == sorted(set(r["image"] for r in records) - set(wrong))
    page.select_option("#correct", "")
    page.click("#show-misclassified")  # a link to #correct=incorrect: the page redraws on hashchange, later
    page.wait_for_function(f"document.getElementById('shown').textContent === '{len(wrong)} shown'")
    assert _shown_names(page) == wrong
    assert page.dialogs == [] and page.eval_on_selector_all("img[src='x']", "i => i.length") == 0
    _screenshots(page, "gallery")


def test_detail_pages_step_through_the_gallery_order(judged_gallery, page):
    page.goto((judged_gallery / "index.html").as_uri())
    page.select_option("#sort", "conf-desc")
    order = _shown_names(page)
    page.locator(".card").first.locator("a").click()
    page.wait_for_function("document.body.dataset.drawn === 'yes'")
    assert page.text_content("h1") == order[0] and "sort=conf-desc" in page.url
    assert page.text_content("#position") == f"1 of {len(order)}"
    page.click("#next")
    page.wait_for_function("document.body.dataset.drawn === 'yes'")
    assert page.text_content("h1") == order[1]
    page.keyboard.press("ArrowRight")
    page.wait_for_function(f"document.querySelector('h1').textContent === {json.dumps(order[2])}")
    page.keyboard.press("ArrowLeft")
    page.wait_for_function(f"document.querySelector('h1').textContent === {json.dumps(order[1])}")
    assert page.locator("#model-facts").text_content().startswith("Model resnet-composites.pt")
    before = _pixels(page, ".pictures canvas[data-index='0']")
    _set_range(page, "#opacity", 0)
    np.testing.assert_array_equal(
        _pixels(page, ".pictures canvas[data-index='0']"), _pixels(page, ".pictures canvas[data-index='-1']")
    )
    assert np.abs(before.astype(int) - _pixels(page, ".pictures canvas[data-index='-1']")).mean() > 5
    _screenshots(page, "detail")
    page.click("#to-index")
    page.wait_for_load_state()
    assert page.input_value("#sort") == "conf-desc" and _shown_names(page) == order[:60]


def test_gallery_of_ten_thousand_images_opens_one_page(tmp_path, page):
    """10,000 records written the way batch writes its reports, no model run: the page builds one
    page of cards. Its opening time is kept beside the screenshots (no timed assert: see
    benchmarks/gallery_open.py for the figure)."""
    from attnexplain.gallery import write_reports

    records = [
        {
            "image": f"class-{i % 7}/img{i:05d}.jpg",
            "status": "ok",
            "output": f"images/class-{i % 7}/img{i:05d}.jpg",
            "detail": f"images/class-{i % 7}/img{i:05d}.jpg/detail.html",
            "photo": "photo.jpg",
            "files": {"gradcam": {"overlay": "overlay-gradcam.jpg", "thumb": "thumb-gradcam.jpg"}},
            "methods": ["gradcam"],
            "truth": f"c{i % 7}",
            "predictions": [{"index": i % 5, "label": f"c{i % 5}", "prob": (i % 997) / 997}],
            "target": {"index": i % 5, "label": f"c{i % 5}", "prob": (i % 997) / 997},
        }
        for i in range(10_000)
    ]
    write_reports(tmp_path, records, {"methods": ["gradcam"], "complete": True})
    page.goto((tmp_path / "index.html").as_uri())
    page.wait_for_function("document.querySelectorAll('.card').length > 0")
    opened_ms = page.evaluate("performance.now()")
    assert page.eval_on_selector_all(".card", "c => c.length") == 60
    assert page.text_content("#shown") == "10000 shown" and page.text_content("#page") == "page 1 of 167"
    page.select_option("#correct", "incorrect")
    assert page.text_content("#shown") == f"{sum(r['truth'] != r['predictions'][0]['label'] for r in records)} shown"
    page.click("#next-page")
    assert page.text_content("#page").startswith("page 2 of")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "gallery-10000-open-ms.txt").write_text(f"{opened_ms:.0f}\n")


def test_gallery_sorts_by_a_metric_of_its_records(tmp_path, page):
    """Records with --metrics values: the gallery offers each (method, metric) as a sort, images
    without the value last."""
    from attnexplain.gallery import write_reports

    deletion = {"a.jpg": 0.4, "b.jpg": 0.1, "c.jpg": None, "d.jpg": 0.7}
    records = [
        {
            "image": name,
            "status": "ok",
            "output": f"images/{name}",
            "detail": f"images/{name}/detail.html",
            "photo": "photo.jpg",
            "files": {"gradcam": {"overlay": "overlay-gradcam.jpg", "thumb": "thumb-gradcam.jpg"}},
            "methods": ["gradcam"],
            **({"metrics": {"gradcam": {"deletion": value, "insertion": 0.5}}} if value is not None else {}),
            "predictions": [{"index": 0, "label": "c0", "prob": 0.5}],
            "target": {"index": 0, "label": "c0", "prob": 0.5},
        }
        for name, value in deletion.items()
    ]
    write_reports(tmp_path, records, {"methods": ["gradcam"], "complete": True})
    page.goto((tmp_path / "index.html").as_uri())
    options = page.eval_on_selector_all("#sort option", "options => options.map(o => [o.value, o.textContent])")
    assert ["metric-0-asc", "gradcam deletion ↑"] in options and ["metric-1-desc", "gradcam insertion ↓"] in options
    page.select_option("#sort", "metric-0-asc")
    assert _shown_names(page) == ["b.jpg", "a.jpg", "d.jpg", "c.jpg"]
    page.select_option("#sort", "metric-0-desc")
    assert _shown_names(page) == ["d.jpg", "a.jpg", "b.jpg", "c.jpg"]
    assert "sort=metric-0-desc" in page.url
