"""batch --truth: each image's true class from its folder or a CSV file, accuracy and the confusion
table in the reports, and hostile truth files refused in one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from attnexplain.cli import main
from attnexplain.gallery import accuracy_and_confusion
from attnexplain.records import ok_record_problem
from attnexplain.truth import TruthError, read_truth


def _write(path: Path, content: bytes | str) -> Path:
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def test_csv_matches_by_path_then_by_file_name(tmp_path):
    truth = read_truth(str(_write(tmp_path / "t.csv", "\ufeffImage,Class\na/cat.png,cat\ndog.png,dog\n\n")))
    assert truth.label_for("a/cat.png") == "cat"
    assert truth.label_for("b/dog.png") == "dog"  # by file name
    assert truth.label_for("b/cat.png") is None


def test_folders_take_the_parent_folder_name(tmp_path):
    truth = read_truth("folders")
    assert truth.label_for("cat/1.png", tmp_path / "photos" / "cat" / "1.png") == "cat"
    assert truth.label_for("dog/2.png") == "dog"


@pytest.mark.parametrize(
    "content, message",
    [
        (b"image,class\nok.png,\xff\xfe\n", "is not UTF-8 text (line 2)"),
        ("name,size\na.png,3\n", "needs a header with an image column"),
        ("image,class\na.png\n", "Line 2 of the --truth file"),
        ("image,class\na.png,cat\na.png,dog\n", "an earlier line 'cat'"),
        ("image,class\na.png," + "x" * 500 + "\n", "not a name"),
        ("image,class\na.png,cat\x07\n", "not a name"),
        ("image,class\n", "has no image,class rows"),
    ],
)
def test_hostile_truth_files_are_refused_in_one_line(tmp_path, content, message):
    with pytest.raises(TruthError) as raised:
        read_truth(str(_write(tmp_path / "t.csv", content)))
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_huge_truth_file_is_refused_without_reading_it_all(tmp_path, monkeypatch):
    import attnexplain.truth as truth_module

    monkeypatch.setattr(truth_module, "MAX_TRUTH_BYTES", 1000)
    with pytest.raises(TruthError, match="is over"):
        read_truth(str(_write(tmp_path / "t.csv", "image,class\n" + "a.png,cat\n" * 200)))


def test_accuracy_and_confusion_count_every_judged_image():
    def record(truth, predicted, index=0):
        return {"status": "ok", "truth": truth, "predictions": [{"index": index, "label": predicted, "prob": 0.9}]}

    records = [
        record("cat", "cat"),
        record("cat", "dog"),
        record("dog", "dog"),
        record("dog", "dog"),
        {"status": "ok", "predictions": [{"index": 1, "label": None, "prob": 0.5}], "truth": "1"},
        {"status": "failed", "truth": "cat"},
        record(None, "cat"),
    ]
    judged = accuracy_and_confusion(records)
    assert (judged["judged"], judged["correct"]) == (5, 4)
    assert judged["accuracy"] == pytest.approx(0.8)
    assert judged["confusion"]["cat"] == {"cat": 1, "dog": 1}
    assert judged["confusion"]["dog"] == {"dog": 2}
    assert accuracy_and_confusion([record(None, "cat")]) is None


def test_record_keys_from_truth_and_metrics_are_validated():
    good = {
        "image": "a.png",
        "output": "images/a.png",
        "detail": "images/a.png/detail.html",
        "predictions": [{"index": 0, "label": "cat", "prob": 0.5}],
        "target": {"index": 0, "label": "cat", "prob": 0.5},
        "methods": ["gradcam"],
        "files": {"gradcam": {"overlay": "overlay-gradcam.jpg"}},
        "photo": "photo.jpg",
        "truth": "cat",
        "metrics": {"gradcam": {"deletion": 0.25}},
    }
    assert ok_record_problem(good) is None
    for change in (
        {"truth": 3},
        {"truth": "x" * 1000},
        {"metrics": {"gradcam": {"deletion": "high"}}},
        {"metrics": ["gradcam"]},
        {"photo": "../../etc/passwd"},
    ):
        assert ok_record_problem({**good, **change}) is not None, change


@pytest.fixture(scope="module")
def truth_run(tmp_path_factory, sample_resnet_file):
    """The sample ResNet on 8 composites in ImageFolder layout, the folder named by true class, and
    one formula-like class name from a CSV."""
    from composites import LABELS, TEST_SEED, make_composites

    pixels, labels, _ = make_composites(8, TEST_SEED)
    photos = tmp_path_factory.mktemp("photos")
    truth = {}
    for index, (image, label) in enumerate(zip(pixels, labels)):
        (photos / LABELS[label]).mkdir(exist_ok=True)
        Image.fromarray(image).save(photos / LABELS[label] / f"{index}.png")
        truth[f"{LABELS[label]}/{index}.png"] = LABELS[label]
    outs = {}
    for name, spec in (("folders", "folders"), ("csv", None)):
        if spec is None:
            rows = [("image", "class")] + [
                (image, '=HYPERLINK("x")' if i == 0 else label)
                for i, (image, label) in enumerate(sorted(truth.items()))
            ]
            table = tmp_path_factory.mktemp("truth") / "truth.csv"
            with table.open("w", newline="", encoding="utf-8") as handle:
                csv.writer(handle).writerows(rows)
            spec = str(table)
        out = tmp_path_factory.mktemp(name)
        result = CliRunner().invoke(
            main,
            [
                "batch",
                str(sample_resnet_file),
                str(photos),
                "--out",
                str(out),
                "--method",
                "gradcam",
                "--truth",
                spec,
                "--quiet",
            ],
        )
        assert result.exit_code == 0, result.output
        outs[name] = out
    return truth, outs


def test_truth_from_folders_gives_accuracy_and_confusion(truth_run):
    truth, outs = truth_run
    records = [json.loads(line) for line in (outs["folders"] / "results.jsonl").read_text().splitlines()]
    assert {r["image"]: r["truth"] for r in records} == truth
    right = sum(r["predictions"][0]["label"] == r["truth"] for r in records)
    report = json.loads((outs["folders"] / "report.json").read_text())
    assert report["truth"]["judged"] == len(truth) and report["truth"]["correct"] == right
    assert sum(sum(row.values()) for row in report["truth"]["confusion"].values()) == len(truth)
    rows = list(csv.DictReader((outs["folders"] / "summary.csv").open(newline="")))
    assert sum(row["correct"] == "yes" for row in rows) == right
    page = (outs["folders"] / "index.html").read_text()
    assert "Accuracy" in page and 'id="correct"' in page and "Confusion table" in page


def test_formula_class_from_a_csv_stays_text(truth_run):
    _, outs = truth_run
    cells = [cell for row in csv.reader((outs["csv"] / "summary.csv").open(newline="")) for cell in row]
    assert '\'=HYPERLINK("x")' in cells and '=HYPERLINK("x")' not in cells
    page = (outs["csv"] / "index.html").read_text()
    assert '=HYPERLINK("x")' not in page and "=HYPERLINK(&#34;x&#34;)" in page


def test_bad_truth_file_stops_the_batch_before_anything_is_written(tmp_path, sample_resnet_file):
    photo = tmp_path / "photos" / "a.png"
    photo.parent.mkdir()
    Image.new("RGB", (32, 32)).save(photo)
    table = _write(tmp_path / "t.csv", b"image,class\na.png,\xff\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["batch", str(sample_resnet_file), str(photo.parent), "--out", str(out), "--truth", str(table)]
    )
    assert result.exit_code == 1 and "not UTF-8" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()
