"""The batch gallery in a real headless browser: it renders, filters, sorts, searches and links, and a
hostile file name stays text. CI installs Debian's chromium (`.ci/run`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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
    result = CliRunner().invoke(main, ["batch", str(sample_resnet_file), str(folder), "--out", str(out),
                                       "--method", "gradcam,saliency", "--quiet"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def page():
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page()
        page.dialogs = []
        page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), dialog.dismiss()))
        yield page
        browser.close()


def _visible(page) -> list[dict]:
    return page.eval_on_selector_all(
        ".card", "cards => cards.filter(c => c.style.display !== 'none')"
                 ".map(c => ({name: c.querySelector('.name').textContent, cls: c.dataset['class'],"
                 " conf: parseFloat(c.dataset.conf)}))")


def test_gallery_renders_every_image_with_loaded_thumbnails(gallery, page):
    page.goto((gallery / "index.html").as_uri())
    assert len(_visible(page)) == 13
    page.mouse.wheel(0, 100000)  # lazy thumbnails load once scrolled to
    page.wait_for_function("Array.from(document.images).every(i => i.complete)")
    widths = page.eval_on_selector_all("img", "images => images.map(i => i.naturalWidth)")
    assert len(widths) == 26 and min(widths) > 0  # two methods per image, every one decoded


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
    assert page.url.endswith("detail.html")
    assert "photo-04.png" in page.content()
    page.wait_for_function("Array.from(document.images).every(i => i.complete)")
    assert min(page.eval_on_selector_all("img", "images => images.map(i => i.naturalWidth)")) > 0


@pytest.fixture(scope="module")
def attention_gallery(tmp_path_factory, sample_vit_file):
    images = Path(__file__).resolve().parents[1] / "samples" / "images"
    out = tmp_path_factory.mktemp("attention-gallery")
    result = CliRunner().invoke(main, ["batch", str(sample_vit_file), str(images), "--out",
                                       str(out), "--method", "rollout,attention", "--quiet"])
    assert result.exit_code == 0, result.output
    return out


def test_detail_page_shows_the_attention_grid(attention_gallery, page):
    page.goto((attention_gallery / "images" / "cat-on-grass.png" / "detail.html").as_uri())
    page.wait_for_function("Array.from(document.images).every(i => i.complete)")
    assert "Learned attention (attention)" in page.content()
    sizes = page.eval_on_selector_all("img.grid", "images => images.map(i => i.naturalWidth)")
    assert len(sizes) == 1 and sizes[0] > 0  # one grid (attention; rollout has none), decoded
