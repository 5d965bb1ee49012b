"""A captioner's report in a real headless browser: the caption as a row of words, a click on a
word shows its maps, the strip's pictures load from the page itself, nothing sticks out at a phone's
or a wide screen's width (screenshots kept in test-artifacts/screenshots/), a hostile file name
stays text. CI installs Debian's chromium (`.ci/run`)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_gallery_browser import CHROMIUM, HOSTILE, page  # noqa: F401 - the same browser page fixture

from attnexplain.cli import main

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (CI installs it)")
REPO = Path(__file__).resolve().parents[1]
CAPTIONER = REPO / "samples" / "models" / "captioner-composites.pt"
ARTIFACTS = REPO / "test-artifacts" / "screenshots"


@pytest.fixture(scope="module")
def caption_report(tmp_path_factory) -> Path:
    pytest.importorskip("attnexplain_attention_cnn")
    folder = tmp_path_factory.mktemp("photo")
    photo = folder / HOSTILE
    shutil.copy(REPO / "samples" / "images" / "coffee-on-gravel.png", photo)
    out = tmp_path_factory.mktemp("caption")
    result = CliRunner().invoke(main, ["run", str(CAPTIONER), str(photo), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return Path(json.loads(result.stdout)["outputs"]["directory"])


def test_the_caption_is_a_row_of_words_and_a_click_shows_a_words_maps(caption_report, page):
    report = json.loads((caption_report / "report.json").read_text())
    page.goto((caption_report / "report.html").as_uri())
    words = page.eval_on_selector_all(".caption a", "links => links.map(a => a.firstChild.textContent.trim())")
    assert words == report["caption"].split() == ["a", "coffee", "on", "gravel"]
    page.click(".caption a >> nth=1")
    assert page.evaluate("location.hash") == "#word-1"
    heading = page.text_content("#word-1 h2")
    assert "coffee" in heading and f"{report['words'][1]['probability']:.4f}" in heading
    assert page.evaluate("document.querySelector('#word-1').getBoundingClientRect().top") < 200  # scrolled to it
    loaded = page.eval_on_selector_all("img", "images => images.map(i => i.complete && i.naturalWidth > 0)")
    assert loaded and all(loaded)  # every picture is in the page itself (data: URIs)
    assert page.eval_on_selector_all(".strip figcaption", "c => c.map(x => x.textContent.trim())") == [
        "photo",
        *report["caption"].split(),
    ]
    assert HOSTILE in page.text_content("h1") and not page.dialogs  # the name is text, not markup
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for width in (420, 1920):
        page.set_viewport_size({"width": width, "height": 1000})
        page.wait_for_timeout(100)
        assert page.evaluate("document.documentElement.scrollWidth") <= width + 1  # the strip scrolls inside
        page.screenshot(path=str(ARTIFACTS / f"caption-report-{width}.png"), full_page=True)
    page.set_viewport_size({"width": 1280, "height": 900})


@pytest.fixture(scope="module")
def caption_gallery(tmp_path_factory) -> Path:
    """`batch` on the sample captioner: the sample composites, a non-square photo and a hostile name."""
    pytest.importorskip("attnexplain_attention_cnn")
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    for name in ("astronaut-on-grass.png", "cat-on-grass.png", "rocket-on-brick.png", "chelsea.jpg"):
        shutil.copy(REPO / "samples" / "images" / name, folder / name)
    shutil.copy(REPO / "samples" / "images" / "coffee-on-gravel.png", folder / HOSTILE)
    wide = Image.open(REPO / "samples" / "images" / "cat-on-grass.png").convert("RGB").resize((260, 120))
    wide.save(folder / "wide-cat.jpg")
    out = tmp_path_factory.mktemp("caption-gallery")
    result = CliRunner().invoke(main, ["batch", str(CAPTIONER), str(folder), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out


def _cards(page) -> list[dict]:
    return page.eval_on_selector_all(
        "#cards .card",
        """cards => cards.map(c => ({name: c.querySelector('.name').textContent,
            caption: c.querySelector('.caption strong').textContent,
            words: [...c.querySelectorAll('.words figcaption')].map(f => f.textContent)}))""",
    )


def test_the_gallery_shows_each_caption_with_its_words_attention_and_searches_captions(caption_gallery, page):
    records = {r["image"]: r for r in map(json.loads, (caption_gallery / "results.jsonl").read_text().splitlines())}
    page.goto((caption_gallery / "index.html").as_uri())
    page.wait_for_function(
        "document.querySelectorAll('#cards img').length > 0 && "
        "[...document.querySelectorAll('#cards img')].every(i => i.complete)"
    )
    cards = _cards(page)
    assert {c["name"]: c["caption"] for c in cards} == {name: r["caption"] for name, r in records.items()}
    assert all(c["words"] == c["caption"].split() for c in cards)  # a picture of α for each word
    loaded = page.eval_on_selector_all("#cards img", "images => images.map(i => i.naturalWidth > 0)")
    assert loaded and all(loaded)
    assert not page.dialogs  # the hostile file name is text
    page.fill("#q", "on grass")
    assert sorted(c["name"] for c in _cards(page)) == sorted(
        n for n, r in records.items() if "on grass" in r["caption"]
    )
    assert "q=on+grass" in page.evaluate("location.hash")
    page.fill("#q", "wide")  # file names are still searched
    assert [c["name"] for c in _cards(page)] == ["wide-cat.jpg"]
    page.fill("#q", "")
    page.select_option("#cls", records["chelsea.jpg"]["caption"])  # the captions are the gallery's classes
    assert [c["name"] for c in _cards(page)] == ["chelsea.jpg"]
    page.select_option("#cls", "")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for width in (420, 1920):
        page.set_viewport_size({"width": width, "height": 1000})
        page.wait_for_timeout(100)
        assert page.evaluate("document.documentElement.scrollWidth") <= width + 1
        page.screenshot(path=str(ARTIFACTS / f"caption-gallery-{width}.png"), full_page=True)
    page.set_viewport_size({"width": 1280, "height": 900})


def test_a_card_opens_the_images_caption_report_which_steps_through_the_gallery(caption_gallery, page):
    page.goto((caption_gallery / "index.html").as_uri() + "#q=on+grass")
    first = _cards(page)[0]
    page.click("#cards .card a >> nth=0")
    page.wait_for_load_state()
    assert page.url.endswith("/detail.html#q=on+grass")
    words = page.eval_on_selector_all(".caption a", "links => links.map(a => a.firstChild.textContent.trim())")
    assert words == first["caption"].split()
    assert page.text_content("#position") == f"1 of {len(_shown_on_grass(caption_gallery))}"
    page.click("#next")
    page.wait_for_load_state()
    assert page.text_content("#position").startswith("2 of")
    page.click("#to-index")
    page.wait_for_load_state()
    assert page.url.endswith("/index.html#q=on+grass") and page.input_value("#q") == "on grass"
    for width in (420, 1920):
        page.goto((caption_gallery / "images" / "wide-cat.jpg" / "detail.html").as_uri())
        page.set_viewport_size({"width": width, "height": 1000})
        page.wait_for_timeout(100)
        assert page.evaluate("document.documentElement.scrollWidth") <= width + 1
        page.screenshot(path=str(ARTIFACTS / f"caption-gallery-detail-{width}.png"), full_page=True)
    page.set_viewport_size({"width": 1280, "height": 900})


def _shown_on_grass(out: Path) -> list[str]:
    records = map(json.loads, (out / "results.jsonl").read_text().splitlines())
    return [r["image"] for r in records if "on grass" in r["caption"]]


def test_a_hugging_face_captioners_page_shows_each_words_attention_per_layer_and_head(page, tmp_path):  # noqa: F811
    """A ViT + GPT-2 VisionEncoderDecoderModel folder (built by the transformers plugin's tests):
    every word has a layer × head explorer of its cross-attention and its relevance map, and no
    alignment scores (the page says why), at a phone's and a wide screen's width."""
    pytest.importorskip("transformers")
    sys.path.insert(0, str(REPO / "plugins" / "transformers" / "tests"))
    from captioner_folders import gpt2_captioner

    folder = gpt2_captioner(tmp_path / "vit-gpt2")
    photo = tmp_path / "photo.png"
    shutil.copy(REPO / "samples" / "images" / "coffee-on-gravel.png", photo)
    result = CliRunner().invoke(main, ["run", str(folder), str(photo), "--out", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    out = Path(json.loads(result.stdout)["outputs"]["directory"])
    report = json.loads((out / "report.json").read_text())
    page.goto((out / "report.html").as_uri())
    words = len(report["words"])
    assert page.eval_on_selector_all("table.heads", "t => t.length") == words
    assert page.eval_on_selector_all("table.heads img", "i => i.length") == words * 2 * 2  # 2 layers × 2 heads
    assert page.eval_on_selector_all("img[alt^='relevance for']", "i => i.length") == words
    assert page.eval_on_selector_all("img[alt^='alignment scores']", "i => i.length") == 0
    assert "No alignment scores" in page.text_content("#word-0")
    loaded = page.eval_on_selector_all("img", "images => images.map(i => i.complete && i.naturalWidth > 0)")
    assert loaded and all(loaded)
    _screenshots(page, "caption-report-hf")


@pytest.mark.heavy  # two captioners built and batched: ~40 s
def test_a_hugging_face_captioners_gallery_shows_each_words_attention_and_relevance(page, tmp_path):  # noqa: F811
    """`batch` on ViT + GPT-2 and on a captioner whose tokenizer writes markup and a path: each card
    has every word's α and relevance, its caption stays text (no dialog, no injected image), the
    card opens the word-by-word report; nothing sticks out at a phone's or a wide screen's width."""
    pytest.importorskip("transformers")
    sys.path.insert(0, str(REPO / "plugins" / "transformers" / "tests"))
    from captioner_folders import HOSTILE_WORDS, gpt2_captioner, hostile_captioner
    from test_caption_hf_batch import write_photo

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("coffee-on-gravel.png", "cat-on-grass.png", "chelsea.jpg"):
        shutil.copy(REPO / "samples" / "images" / name, photos / name)
    write_photo(photos / "noise.png", 2, 48)  # the hostile captioner writes its markup word here
    for name, build in (("gpt2", gpt2_captioner), ("hostile", hostile_captioner)):
        result = CliRunner().invoke(
            main, ["batch", str(build(tmp_path / name)), str(photos), "--out", str(tmp_path / f"{name}-out"), "--quiet"]
        )
        assert result.exit_code == 0, result.output
    hostile = tmp_path / "hostile-out"
    records = [json.loads(line) for line in (hostile / "results.jsonl").read_text().splitlines()]
    assert any(HOSTILE_WORDS[6] in r["caption"] for r in records)
    page.goto((hostile / "index.html").as_uri())
    page.wait_for_function("[...document.querySelectorAll('#cards img')].every(i => i.complete)")
    assert sorted(c["caption"] for c in _cards(page)) == sorted(r["caption"] for r in records)  # markup as text
    assert not page.dialogs and page.eval_on_selector_all("img[src='x']", "images => images.length") == 0

    out = tmp_path / "gpt2-out"
    records = {r["image"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    page.goto((out / "index.html").as_uri())
    page.wait_for_function(
        "document.querySelectorAll('#cards img').length > 0 && "
        "[...document.querySelectorAll('#cards img')].every(i => i.complete)"
    )
    cards = _cards(page)
    assert {c["name"]: c["caption"] for c in cards} == {name: r["caption"] for name, r in records.items()}
    for card in cards:  # each word's α, then its relevance
        assert card["words"] == [label for w in card["caption"].split() for label in (w, f"{w} · relevance")]
    loaded = page.eval_on_selector_all("#cards img", "images => images.map(i => i.naturalWidth > 0)")
    assert loaded and all(loaded)
    _screenshots(page, "caption-gallery-hf")
    page.click("#cards .card a >> nth=0")
    page.wait_for_load_state()
    assert page.eval_on_selector_all("img[alt^='relevance for']", "i => i.length") == len(
        page.eval_on_selector_all(".caption a", "links => links")
    )
    _screenshots(page, "caption-gallery-hf-detail")

    evaluated = tmp_path / "evaluation"  # and `evaluate`'s page: the relevance beside α, Grad-CAM, random
    result = CliRunner().invoke(
        main, ["evaluate", str(tmp_path / "gpt2"), str(photos), "--steps", "4", "--out", str(evaluated), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    evaluation = json.loads((evaluated / "evaluation.json").read_text())
    page.goto((evaluated / "evaluation.html").as_uri())
    lines = page.eval_on_selector_all("#map-verdicts li", "items => items.map(i => i.textContent.trim())")
    assert lines == list(evaluation["map_verdicts"].values()) and lines[-1].startswith("relevance: ")
    curves = page.eval_on_selector_all("polyline.curve", "lines => lines.map(l => l.dataset.method)")
    assert sorted(curves) == sorted(["attention", "gradcam", "relevance", "random"] * 2)
    page.wait_for_function("Array.from(document.images).every(i => i.complete)")
    shown = page.eval_on_selector_all(".examples img", "images => images.map(i => i.naturalWidth)")
    measured = sum(len(record["words"]) for record in evaluation["per_image"][:3])
    assert len(shown) == 4 * measured and all(shown)  # α, Grad-CAM, relevance, random per word
    _screenshots(page, "caption-evaluation-hf")


def _screenshots(page, name: str) -> None:
    """At a phone's and a wide screen's width: nothing sticks out; a full-page screenshot of each."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for width in (420, 1920):
        page.set_viewport_size({"width": width, "height": 1000})
        page.wait_for_timeout(100)
        assert page.evaluate("document.documentElement.scrollWidth") <= width + 1
        page.screenshot(path=str(ARTIFACTS / f"{name}-{width}.png"), full_page=True)
    page.set_viewport_size({"width": 1280, "height": 900})


def test_each_chosen_map_of_a_word_is_in_its_section_and_fits_a_phones_width(page, tmp_path):  # noqa: F811
    pytest.importorskip("attnexplain_attention_cnn")
    photo = REPO / "samples" / "images" / "cat-on-grass.png"
    chosen = ["gradcampp", "layercam", "saliency"]
    result = CliRunner().invoke(
        main, ["run", str(CAPTIONER), str(photo), "--method", ",".join(chosen), "--out", str(tmp_path), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    page.goto((Path(report["outputs"]["directory"]) / "report.html").as_uri())
    words = len(report["words"])
    for name in chosen:
        assert page.eval_on_selector_all(f"section.word img[alt^='{name} for']", "i => i.length") == words
    assert page.eval_on_selector_all("img[alt^='Grad-CAM for'], img[alt^='gradcam for']", "i => i.length") == 0
    loaded = page.eval_on_selector_all("img", "images => images.map(i => i.complete && i.naturalWidth > 0)")
    assert loaded and all(loaded)
    assert "saliency of log p(“cat”) with respect to the input’s pixels" in page.text_content("section.word >> nth=1")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for width in (420, 1920):
        page.set_viewport_size({"width": width, "height": 1000})
        page.wait_for_timeout(100)
        assert page.evaluate("document.documentElement.scrollWidth") <= width + 1
        page.screenshot(path=str(ARTIFACTS / f"caption-report-methods-{width}.png"), full_page=True)
    page.set_viewport_size({"width": 1280, "height": 900})
