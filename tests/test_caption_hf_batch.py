"""`batch` and `evaluate` on Hugging Face captioners: VisionEncoderDecoderModel folders (ViT + GPT-2,
greedy; ViT + BERT, beam search) built by the transformers plugin's tests from configs with a
tokenizer made there, saved with save_pretrained and loaded from disk as a user would.

Checked independently: every record (caption, probabilities, peaks, each word's α, Grad-CAM and
relevance files) equals what :func:`attnexplain.explain_caption` gives for the same image file; the
gallery's cards show each word's α and relevance; `evaluate` measures the relevance beside α,
Grad-CAM and the random map, its pointing and mass recomputed here from explain_caption's maps and
the word masks. A word of the tokenizer's is one token as it decodes alone: a vocabulary entry that
is markup or a path (`<img src=x onerror=alert(1)>`, `../x`) stays text in every page, never makes a
file name, and never reads a mask outside its image's folder.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import read_gallery_data
from PIL import Image

from attnexplain.cli import main

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "transformers" / "tests"))
from captioner_folders import (  # noqa: E402
    HOSTILE_WORDS,
    SIZE,
    WORDS,
    bert_captioner,
    gpt2_captioner,
    hostile_captioner,
)

MARKUP, PATH = HOSTILE_WORDS[6], HOSTILE_WORDS[7]
PLAIN_NAME = re.compile(r"[A-Za-z0-9._-]+")


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _records(out: Path) -> dict[str, dict]:
    return {r["image"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def write_photo(path: Path, seed: int, height: int = SIZE) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, SIZE, 3), dtype=np.uint8)
    pixels[4:20, 8:28] = [230, 40, 40]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Two photos at the model's size and a taller one (resized by the model's processor)."""
    folder = tmp_path_factory.mktemp("photos")
    for seed in range(3):
        write_photo(folder / f"p{seed}.png", seed, SIZE + 8 * seed)
    return folder


class Folders(dict):
    """Each captioner's folder, saved the first time a test asks for it."""

    def __init__(self, factory):
        super().__init__()
        self.factory = factory

    def __missing__(self, which: str) -> Path:
        build = {"gpt2": gpt2_captioner, "bert": bert_captioner}[which]
        self[which] = build(self.factory.mktemp(f"vit-{which}"))
        return self[which]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Folders:
    return Folders(tmp_path_factory)


@pytest.mark.parametrize("which", ["gpt2", pytest.param("bert", marks=pytest.mark.heavy)])  # beam search: ~20 s
def test_batch_on_a_hugging_face_captioner_writes_what_explain_caption_gives(which, folders, photos, tmp_path):
    from attnexplain.captioning import explain_caption
    from attnexplain.loading import load_model

    folder = folders[which]
    result = _run("batch", folder, photos, "--out", tmp_path, "--quiet")
    assert result.exit_code == 0, result.output
    model = load_model(folder)
    records = _records(tmp_path)
    assert sorted(records) == ["p0.png", "p1.png", "p2.png"]
    rows = {row[0]: row for row in read_gallery_data(tmp_path)["images"]}
    for image, record in records.items():
        reference = explain_caption(model, photos / image)
        expected = reference.to_dict()
        assert record["status"] == "ok" and record["caption"] == reference.text
        assert [w["word"] for w in record["words"]] == reference.caption
        assert all(w in WORDS for w in reference.caption)  # the tokenizer's words, special tokens left out
        np.testing.assert_allclose([w["probability"] for w in record["words"]], reference.probabilities, atol=1e-5)
        assert [w["attention_peak"] for w in record["words"]] == [w["attention_peak"] for w in expected["words"]]
        assert [w["relevance_peak"] for w in record["words"]] == [w["relevance_peak"] for w in expected["words"]]
        assert record["methods"] == ["attention", "gradcam", "relevance"]
        out = tmp_path / record["output"]
        thumbs, labels = [], []
        for word in reference.words:
            files = record["files"][f"word-{word.position + 1}"]
            np.testing.assert_allclose(np.load(out / files["attention_npy"]), word.attention, atol=1e-5)
            np.testing.assert_allclose(np.load(out / files["gradcam_npy"]), word.gradcam, atol=1e-4)
            np.testing.assert_allclose(np.load(out / files["relevance_npy"]), word.relevance, atol=1e-4)
            assert np.load(out / files["layer_attention_npy"]).shape == (2, 2, 4, 4)  # layers, heads, grid
            assert Image.open(out / files["relevance_thumb"]).size[0] <= 160
            thumbs += [files["thumb"], files["relevance_thumb"]]
            labels += [word.word, f"{word.word} · relevance"]
        assert rows[image][6] == thumbs and rows[image][7] == labels  # the card: each word's α, then its relevance
        assert rows[image][10] == reference.text
        detail = (out / "detail.html").read_text()
        assert detail.count('alt="relevance for') == len(reference.words) and "index.html" in detail
    run = json.loads((tmp_path / "report.json").read_text())["run"]
    assert run["task"] == "captioning" and run["methods"] == ["attention", "gradcam", "relevance"]


def test_resume_explains_again_a_record_whose_relevance_peak_is_not_a_cell(folders, photos, tmp_path):
    """results.jsonl is plain text anyone can edit: a record read back is checked, its relevance peak
    included, and an image whose record fails is explained again; the others are reused."""
    result = _run("batch", folders["gpt2"], photos, "--out", tmp_path, "--quiet")
    assert result.exit_code == 0, result.output
    records = _records(tmp_path)
    broken = dict(records["p1.png"])
    broken["words"] = [{**broken["words"][0], "relevance_peak": [1, "<b>"]}, *broken["words"][1:]]
    lines = [json.dumps(broken if image == "p1.png" else record) for image, record in records.items()]
    (tmp_path / "results.jsonl").write_text("\n".join(lines) + "\n")
    result = _run("batch", folders["gpt2"], photos, "--out", tmp_path, "--resume")
    assert result.exit_code == 0, result.output
    assert "3 explained (2 from an earlier run)" in result.output
    assert _records(tmp_path)["p1.png"]["words"] == records["p1.png"]["words"]


def _masks(folder: Path, images: list[str]) -> Path:
    """Per image a mask per word of the vocabulary, each word a different region (its own block of
    columns and rows), so that pointing and mass differ from word to word."""
    for image in images:
        for k, word in enumerate(WORDS[4:]):
            mask = np.zeros((SIZE, SIZE), np.uint8)
            top, left = 8 * (k % 3), 6 * (k % 4)
            mask[top : top + 14, left : left + 12] = 255
            path = folder / Path(image).stem / f"{word}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(path)
    return folder


def test_evaluate_measures_the_relevance_beside_attention_gradcam_and_the_random_map(folders, tmp_path):
    from attnexplain.captioning import explain_caption
    from attnexplain.loading import load_model

    images = tmp_path / "images"
    for seed in (0, 3, 4):
        write_photo(images / f"q{seed}.png", seed)  # the model's size: its frame is the photo's
    masks = _masks(tmp_path / "masks", ["q0.png", "q3.png", "q4.png"])
    out = tmp_path / "evaluation"
    result = _run(
        "evaluate", folders["gpt2"], images, "--masks", masks, "--metrics", "pointing,mass",
        "--pointing-tolerance", "0", "--out", out, "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["settings"]["maps"] == ["attention", "gradcam", "relevance"]
    assert list(evaluation["methods"]) == ["attention", "gradcam", "relevance", "random"]
    assert evaluation["map_verdicts"]["relevance"].startswith("relevance: pointing ")
    model = load_model(folders["gpt2"])
    measured = 0
    for record in evaluation["per_image"]:
        reference = explain_caption(model, images / record["image"])
        assert record["caption"] == reference.text
        for word in record["words"]:
            explained = reference.words[word["position"]]
            mask = np.array(Image.open(masks / Path(record["image"]).stem / f"{word['word']}.png")) > 127
            for name, heatmap in (("relevance", explained.relevance), ("attention", explained.attention)):
                values = word["metrics"][name]
                assert values["pointing"] == float(mask[heatmap == heatmap.max()].any()), (record["image"], word)
                positive = heatmap.clip(0)
                assert values["mass"] == pytest.approx(positive[mask].sum() / positive.sum(), abs=1e-4)
            measured += 1
    assert measured == evaluation["words"]["measured"] > 0
    page = (out / "evaluation.html").read_text()
    assert "Chefer et al. 2021b" in page


def test_a_token_that_is_markup_or_a_path_stays_text_and_never_names_a_file(photos, tmp_path):
    folder = hostile_captioner(tmp_path / "hostile")
    out = tmp_path / "gallery"
    result = _run("batch", folder, photos, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    records = _records(out)
    words = {w["word"] for r in records.values() for w in r["words"]}
    assert words == {MARKUP, PATH}  # the tokenizer's words, as generated
    for record in records.values():
        for files in record["files"].values():
            assert all(PLAIN_NAME.fullmatch(name) for name in files.values()), files
        detail = (out / record["output"] / "detail.html").read_text()
        assert "<img src=x" not in detail
        assert ("&lt;img src=x onerror=alert(1)&gt;" in detail) == (MARKUP in record["caption"])
    written = [p.relative_to(out) for p in out.rglob("*")]
    assert all(p.parts[0] == "images" or len(p.parts) == 1 for p in written) and not (tmp_path / "x").exists()
    assert "<img" not in (out / "gallery-data.js").read_text()

    image = next(image for image, r in records.items() if MARKUP in r["caption"] and PATH in r["caption"])
    masks, size = tmp_path / "masks", Image.open(photos / image).size
    (masks / Path(image).stem).mkdir(parents=True)
    Image.new("L", size, 255).save(masks / Path(image).stem / f"{MARKUP}.png")  # the token names its mask
    Image.new("L", size, 255).save(masks / "x.png")  # where ../x would lead
    evaluated = tmp_path / "evaluation"
    result = _run("evaluate", folder, photos / image, "--masks", masks, "--out", evaluated, "--quiet")
    assert result.exit_code == 0, result.output
    evaluation = json.loads((evaluated / "evaluation.json").read_text())
    (record,) = evaluation["per_image"]
    assert len(evaluation["curves"]["deletion"]["relevance"]) == len(evaluation["curves"]["fractions"])
    # scored again from the caption's own ids: its text does not tokenize back into its tokens
    assert {w["word"] for w in record["words"]} == {MARKUP} and PATH in record["unmasked"]
    page = (evaluated / "evaluation.html").read_text()
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
