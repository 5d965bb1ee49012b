"""`attnexplain batch` on a captioner: every image captioned and explained word by word, its folder
the caption report (leading back to the gallery), its caption in results.jsonl, summary.csv and the
gallery; the same safety as a classifier's batch (an earlier run's records read as hostile input,
Ctrl-C keeping the finished images, options that do not apply refused in one line).

The sample captioner (samples/models/captioner-composites.pt) is loaded from disk as a user would,
and every caption, probability and map is compared with what
:func:`attnexplain.captioning.explain_caption` gives for the same image file.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import read_gallery_data
from PIL import Image

from attnexplain.cli import main

captioner_module = pytest.importorskip("attnexplain_attention_cnn.captioner")

REPO = Path(__file__).resolve().parents[1]
CAPTIONER = REPO / "samples" / "models" / "captioner-composites.pt"
SAMPLE_PHOTOS = ("cat-on-grass.png", "coffee-on-gravel.png", "rocket-on-brick.png")


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _records(out: Path) -> dict[str, dict]:
    return {r["image"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Three sample composites and a non-square photo made here (a composite's middle, stretched)."""
    folder = tmp_path_factory.mktemp("photos")
    for name in SAMPLE_PHOTOS:
        shutil.copy(REPO / "samples" / "images" / name, folder / name)
    wide = Image.open(REPO / "samples" / "images" / "astronaut-on-grass.png").convert("RGB").resize((230, 130))
    (folder / "wide").mkdir()
    wide.save(folder / "wide" / "astronaut-wide.jpg", quality=95)
    return folder


@pytest.fixture(scope="module")
def gallery(photos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gallery")
    result = _run("batch", CAPTIONER, photos, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def references(photos) -> dict:
    """explain_caption on each image file, as `run` and the Python API give it."""
    from attnexplain.captioning import explain_caption
    from attnexplain.loading import load_model

    model = load_model(CAPTIONER)
    return {
        str(path.relative_to(photos)): explain_caption(model, path)
        for path in sorted(photos.rglob("*"))
        if path.is_file()
    }


def test_batch_captions_every_image_as_explain_caption_does(gallery, references):
    records = _records(gallery)
    assert sorted(records) == sorted(references) == sorted([*SAMPLE_PHOTOS, "wide/astronaut-wide.jpg"])
    assert references["cat-on-grass.png"].text == "a cat on grass"  # the sample captions its composites
    for image, reference in references.items():
        record = records[image]
        assert record["status"] == "ok" and record["task"] == "captioning"
        assert record["caption"] == reference.text and record["caption_source"] == "generated"
        assert [w["word"] for w in record["words"]] == reference.caption
        np.testing.assert_allclose([w["probability"] for w in record["words"]], reference.probabilities, atol=1e-5)
        expected = reference.to_dict()
        assert [w["attention_peak"] for w in record["words"]] == [w["attention_peak"] for w in expected["words"]]
        assert record["caption_probability"] == pytest.approx(np.exp(expected["log_probability"]), abs=1e-5)
        folder = gallery / record["output"]
        for word, files in zip(
            reference.words, (record["files"][f"word-{p + 1}"] for p in range(len(reference.words)))
        ):
            np.testing.assert_allclose(np.load(folder / files["attention_npy"]), word.attention, atol=1e-5)
            np.testing.assert_allclose(np.load(folder / files["gradcam_npy"]), word.gradcam, atol=1e-4)
            assert Image.open(folder / files["thumb"]).size[0] <= 160
        for name in ("detail.html", "photo.jpg", "report.json", "attention-strip.png"):
            assert (folder / name).is_file(), name
        assert json.loads((folder / "report.json").read_text())["caption"] == reference.text
    wide = records["wide/astronaut-wide.jpg"]
    assert (wide["image_info"]["width"], wide["image_info"]["height"]) == (230, 130)
    assert Image.open(gallery / wide["output"] / "photo.jpg").size == (230, 130)


def test_summary_csv_and_the_gallery_carry_each_caption(gallery, references):
    rows = {row["image"]: row for row in csv.DictReader((gallery / "summary.csv").open(newline=""))}
    assert {image: row["caption"] for image, row in rows.items()} == {i: r.text for i, r in references.items()}
    assert all(row["status"] == "ok" and row["layer"] == "encoder.block2" for row in rows.values())
    data = read_gallery_data(gallery)
    shown = {row[0]: row for row in data["images"]}
    for image, reference in references.items():
        row = shown[image]
        assert row[2] == row[10] == reference.text  # the card's caption, and the text the search finds
        assert row[7] == reference.caption and len(row[6]) == len(reference.caption)  # a thumbnail per word
        assert all((gallery / row[1] / thumb).is_file() for thumb in row[6])
    report = json.loads((gallery / "report.json").read_text())
    assert report["run"]["task"] == "captioning" and report["run"]["methods"] == ["attention", "gradcam"]
    assert report["class_histogram"] == {r.text: 1 for r in references.values()}
    index = (gallery / "index.html").read_text()
    assert 'placeholder="file name or caption"' in index and ">Caption <select" in index


def test_each_detail_page_is_the_caption_report_leading_back_to_the_gallery(gallery, references):
    page = (gallery / "images" / "wide" / "astronaut-wide.jpg" / "detail.html").read_text()
    assert 'href="../../../index.html"' in page and 'src="../../../gallery-data.js"' in page
    assert '"image": "wide/astronaut-wide.jpg"' in page and 'src="../../../detail.js"' in page
    for word in references["wide/astronaut-wide.jpg"].caption:
        assert f"{word}<small>" in page  # the caption as a row of words


def test_resume_keeps_the_records_and_reads_them_as_hostile_input(photos, tmp_path, references):
    out = tmp_path / "out"
    assert _run("batch", CAPTIONER, photos, "--out", out, "--quiet").exit_code == 0
    records = _records(out)
    # An edited line whose key still stands: its caption is shown as text, a formula neutralised.
    hostile = records["cat-on-grass.png"]
    hostile["words"][1]["word"] = "<img src=x onerror=alert(1)>"
    hostile["words"][0]["word"] = "=HYPERLINK(1)"
    hostile["caption"] = " ".join(w["word"] for w in hostile["words"])
    # Edited lines the reports cannot show are explained again: a caption that is not its words,
    # a probability that is none.
    records["coffee-on-gravel.png"]["caption"] = "a dog on grass"
    records["rocket-on-brick.png"]["words"][0]["probability"] = 7.5
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records.values()))

    result = _run("batch", CAPTIONER, photos, "--out", out, "--resume")
    assert result.exit_code == 0, result.output
    assert "4 explained (2 from an earlier run)" in result.output
    again = _records(out)
    assert again["coffee-on-gravel.png"]["caption"] == references["coffee-on-gravel.png"].text
    assert again["rocket-on-brick.png"]["words"][0]["probability"] <= 1.0
    assert again["cat-on-grass.png"]["caption"] == hostile["caption"]
    script = (out / "gallery-data.js").read_text()
    assert "<img" not in script and "\\u003cimg src=x onerror=alert(1)\\u003e" in script
    assert "<img src=x" not in (out / "index.html").read_text()
    cells = [row["caption"] for row in csv.DictReader((out / "summary.csv").open(newline=""))]
    assert "'=HYPERLINK(1) <img src=x onerror=alert(1)> on grass" in cells


def test_ctrl_c_keeps_the_captioned_images_and_resume_finishes_the_run(photos, tmp_path):
    from attnexplain.batch import run_batch
    from attnexplain.batch_stages import BatchSettings
    from attnexplain.model_spec import ModelSpec

    spec = ModelSpec(model=str(CAPTIONER))
    loaded = spec.load()
    out = tmp_path / "out"

    def interrupt(batches: int) -> None:
        raise KeyboardInterrupt

    settings = BatchSettings(images_per_batch=1, parallel_batches=1)
    with pytest.raises(KeyboardInterrupt):
        run_batch(loaded, spec, [str(photos)], out, settings, quiet=True, on_batch=interrupt)
    kept = _records(out)
    assert len(kept) == 1 and all(r["status"] == "ok" and r["caption"] for r in kept.values())
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["interrupted"] is True and report["totals"]["ok"] == 1
    summary = run_batch(loaded, spec, [str(photos)], out, settings, quiet=True, resume=True)
    assert (summary.ok, summary.skipped, summary.failed) == (4, 1, 0)
    assert all(r["status"] == "ok" for r in _records(out).values()) and len(_records(out)) == 4


def test_shards_of_a_captioners_run_merge_into_one_gallery(photos, tmp_path, references):
    shards = [tmp_path / "shard-1", tmp_path / "shard-2"]
    for number, shard in enumerate(shards, 1):
        result = _run("batch", CAPTIONER, photos, "--out", shard, "--shard", f"{number}/2", "--quiet")
        assert result.exit_code == 0, result.output
    merged = tmp_path / "merged"
    result = _run("merge", *shards, "--out", merged)
    assert result.exit_code == 0, result.output
    records = _records(merged)
    assert {image: r["caption"] for image, r in records.items()} == {i: r.text for i, r in references.items()}
    for record in records.values():
        for files in record["files"].values():
            assert all((merged / record["output"] / name).is_file() for name in files.values())
        assert (merged / record["detail"]).is_file()
    assert json.loads((merged / "report.json").read_text())["run"]["task"] == "captioning"
    assert sorted(row[10] for row in read_gallery_data(merged)["images"]) == sorted(r.text for r in references.values())


def test_target_explains_one_word_and_an_image_without_it_fails_alone(photos, tmp_path):
    out = tmp_path / "out"
    result = _run("batch", CAPTIONER, photos, "--out", out, "--target", "cat", "--quiet")
    assert result.exit_code == 3, result.output
    records = _records(out)
    cat = records["cat-on-grass.png"]
    assert cat["status"] == "ok" and sorted(cat["files"]) == ["caption", "word-2"]
    assert [("attention_peak" in w) for w in cat["words"]] == [False, True, False, False]
    assert records["coffee-on-gravel.png"]["reason"] == "The word 'cat' is not in the caption 'a coffee on gravel'."
    rows = read_gallery_data(out)["images"]
    assert [(row[0], row[7]) for row in rows] == [("cat-on-grass.png", ["cat"])]


@pytest.mark.parametrize(
    "options, named",
    [
        (["--metrics", "deletion"], "--metrics"),
        (["--truth", "folders", "--versus", "cat"], "--versus, --truth do not"),
        (["--versus", "cat"], "--versus"),
        (["--head-fusion", "max"], "--head-fusion"),
        (["--top-k", "3"], "--top-k"),
    ],
)
def test_options_that_do_not_apply_to_a_captioner_are_refused_in_one_line(photos, tmp_path, options, named):
    out = tmp_path / "out"
    result = _run("batch", CAPTIONER, photos, "--out", out, *options)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: A captioner") and named in lines[0], result.output
    assert "Traceback" not in result.output and not out.exists()


def test_ray_is_refused_for_a_captioner_before_anything_is_written(photos, tmp_path):
    from attnexplain.batch import run_batch
    from attnexplain.batch_stages import BatchSettings
    from attnexplain.errors import AttnExplainError
    from attnexplain.model_spec import ModelSpec

    spec = ModelSpec(model=str(CAPTIONER))
    out = tmp_path / "out"
    with pytest.raises(AttnExplainError, match=r"captioner's batch runs on the local engine") as raised:
        run_batch(spec.load(), spec, [str(photos)], out, BatchSettings(), cluster=object())  # never joined
    assert "\n" not in str(raised.value) and not out.exists()


# --- a captioner whose own words are markup and paths ------------------------------------------------

HOSTILE_WORD = "<script>alert(1)</script>"
HOSTILE_VOCABULARY = ["<pad>", "<start>", "<end>", HOSTILE_WORD, "a", "cat"]


@pytest.fixture(scope="module")
def hostile_captioner(tmp_path_factory) -> Path:
    """The sample's architecture with a word of markup in its vocabulary, its output biased so that
    greedy decoding writes it at every step, up to its length."""
    torch.manual_seed(0)
    kwargs = {
        "vocabulary": HOSTILE_VOCABULARY,
        "channels": [8, 16, 24],
        "hidden_size": 32,
        "attention_dim": 16,
        "max_length": 4,
    }
    model = captioner_module.ShowAttendTell(**kwargs)
    with torch.no_grad():
        model.output.bias.fill_(-30.0)
        model.output.bias[HOSTILE_VOCABULARY.index(HOSTILE_WORD)] = 30.0  # every word: the markup
    path = tmp_path_factory.mktemp("hostile") / "hostile-captioner.pt"
    torch.save(
        {
            "arch": "ShowAttendTell",
            "arch_kwargs": kwargs,
            "state_dict": model.eval().state_dict(),
            "preprocessing": {"size": [64, 64], "mean": [0.5] * 3, "std": [0.25] * 3},
        },
        path,
    )
    return path


def test_a_captioners_own_markup_words_are_text_in_the_gallery_and_pages(hostile_captioner, photos, tmp_path):
    out = tmp_path / "out"
    result = _run("batch", hostile_captioner, photos / "cat-on-grass.png", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    (record,) = _records(out).values()
    assert record["caption"] == " ".join([HOSTILE_WORD] * 4)
    script = (out / "gallery-data.js").read_text()
    assert "<script>alert" not in script and "\\u003cscript\\u003ealert(1)\\u003c/script\\u003e" in script
    for page in (out / "index.html", out / record["detail"]):
        text = page.read_text()
        assert "<script>alert(1)" not in text, page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in (out / record["detail"]).read_text()
    written = [p for p in out.rglob("*")]
    assert all(out.resolve() in p.resolve().parents for p in written)
    assert all("<" not in p.name for p in written)
    rows = list(csv.DictReader((out / "summary.csv").open(newline="")))
    assert rows[0]["caption"] == record["caption"]
