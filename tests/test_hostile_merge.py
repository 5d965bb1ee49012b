"""attnexplain merge with hostile or inconsistent sources: nothing outside a source or --out is ever
touched, and a refused merge writes nothing (issue #9, cases 6-8)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from attnexplain.batch_ledger import EXIT_SOME_FAILED
from attnexplain.cli import main
from attnexplain.formats import RESULTS_JSONL
from attnexplain.records import read_results

GOOD = [f"img{i}.png" for i in range(8)] + ["sub/img8.png", "sub/img9.png"]
MISSING = "/nowhere/missing.png"  # an input that does not exist: a failed record with no key
EVERY = set(GOOD) | {"broken.png", MISSING}


def _write_photos(root: Path, names: list[str], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / name)
    return root


def _batch(model: Path, photos: Path, out: Path, *more: str) -> Path:
    result = CliRunner().invoke(
        main,
        ["batch", str(model), str(photos), *more, "--arch", "resnet18", "--size", "32", "--quiet", "--out", str(out)],
    )
    assert result.exit_code in (0, EXIT_SOME_FAILED), result.output
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, resnet_state_dict_file) -> dict[str, Path]:
    """Real batch outputs: model A in two shards, model B (other weights) in shard 1, and model A
    on another folder whose img3.png has other pixels."""
    import torch
    import torchvision

    base = tmp_path_factory.mktemp("merge-runs")
    photos = _write_photos(base / "photos", GOOD, seed=0)
    (photos / "broken.png").write_bytes(b"")  # one failed image: exit code 3
    torch.manual_seed(7)
    other_model = base / "other-resnet18-5.pt"
    torch.save(torchvision.models.resnet18(num_classes=5).eval().state_dict(), other_model)
    other_photos = _write_photos(base / "other-photos", ["img3.png"], seed=1)
    made = {
        "A0": _batch(resnet_state_dict_file, photos, base / "A0", MISSING, "--shard", "1/2"),
        "A1": _batch(resnet_state_dict_file, photos, base / "A1", MISSING, "--shard", "2/2"),
        "B1": _batch(other_model, photos, base / "B1", "--shard", "2/2"),
        "A-other": _batch(resnet_state_dict_file, other_photos, base / "A-other"),
    }
    assert read_results(made["A0"] / RESULTS_JSONL) and read_results(made["A1"] / RESULTS_JSONL)
    return made


@pytest.fixture
def copies(runs, tmp_path):
    """Copies of the runs under tmp_path/sources, free to be edited by the test."""

    def copy(name: str) -> Path:
        return Path(shutil.copytree(runs[name], tmp_path / "sources" / name, symlinks=True))

    return copy


def _merge(*args) -> object:
    return CliRunner().invoke(main, ["merge", *map(str, args)])


def _refused(result, *words: str) -> str:
    """The merge exited 1 with one line 'Error: Cannot merge: ...' holding every word."""
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: Cannot merge"), result.output
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _snapshot(folder: Path) -> dict[str, object]:
    """Every entry under folder: a file's bytes, a link's target, or that it is a folder."""
    found: dict[str, object] = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_symlink():
            found[name] = ("link", os.readlink(path))
        elif path.is_dir():
            found[name] = "folder"
        else:
            found[name] = path.read_bytes()
    return found


def _records(source: Path) -> dict[str, dict]:
    return {record["image"]: record for record in read_results(source / RESULTS_JSONL)}


def _rewrite(source: Path, which: str, **changes) -> None:
    """Replace (or with None, drop) fields of one image's record in source's results.jsonl."""
    records = _records(source)
    record = records[which]
    for name, value in changes.items():
        if value is None:
            record.pop(name, None)
        else:
            record[name] = value
    text = "".join(json.dumps(r) + "\n" for r in records.values())
    (source / RESULTS_JSONL).write_text(text, encoding="utf-8")


def _an_ok_image(source: Path) -> str:
    return next(image for image, record in sorted(_records(source).items()) if record["status"] == "ok")


# --- what a merge gives ------------------------------------------------------------------------------


def test_merged_shards_hold_every_image_hard_linked(copies, tmp_path):
    first, second = copies("A0"), copies("A1")
    merged = tmp_path / "merged"
    result = _merge(first, second, "--out", merged)
    assert result.exit_code == EXIT_SOME_FAILED, result.output
    records = _records(merged)
    assert set(records) == EVERY
    assert records["broken.png"]["status"] == "failed" and records[MISSING]["key"] is None
    image = _an_ok_image(first)
    for name in os.listdir(first / "images" / image):
        assert (merged / "images" / image / name).read_bytes() == (first / "images" / image / name).read_bytes()
    overlay = f"images/{image}/detail.html"
    assert os.stat(merged / overlay).st_ino == os.stat(first / overlay).st_ino  # a hard link
    report = json.loads((merged / "report.json").read_text())
    assert report["run"]["complete"] is True and report["totals"]["ok"] == len(GOOD)
    assert report["run"]["fingerprint"] == json.loads((first / "report.json").read_text())["run"]["fingerprint"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


# --- case 6: a record's paths never lead out of its source or out of --out -----------------------


@pytest.mark.parametrize("escape", ["absolute", "dot-dot"])
def test_an_output_path_out_of_the_source_deletes_nothing(copies, tmp_path, escape):
    first, second = copies("A0"), copies("A1")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    image = _an_ok_image(first)
    _rewrite(first, image, output=str(victim) if escape == "absolute" else "../../victim")
    merged = tmp_path / "out" / "merged"  # merged/../../victim and sources/A0/../../victim: victim
    result = _merge(first, second, "--out", merged)
    assert (victim / "keep.txt").read_text() == "precious"
    assert not merged.exists()
    assert "victim" in _refused(result, str(first), repr(image), "output")


def _escape_through_symlinked_folder(source: Path, image: str, outside: Path) -> str:
    folder = source / "images" / image
    shutil.copytree(folder, outside / "elsewhere")
    shutil.rmtree(folder)
    folder.symlink_to(outside / "elsewhere", target_is_directory=True)
    return "symbolic link"


def _escape_through_symlinked_file(source: Path, image: str, outside: Path) -> str:
    detail = source / "images" / image / "detail.html"
    detail.unlink()
    detail.symlink_to(outside / "victim" / "keep.txt")
    return "symbolic link"


def _escape_through_file_name(source: Path, image: str, outside: Path) -> str:
    files = _records(source)[image]["files"]
    method = next(iter(files))
    files[method]["overlay"] = "../../../../victim/keep.txt"
    _rewrite(source, image, files=files)
    return "not a plain file name"


def _image_out_of_its_folder(source: Path, image: str, outside: Path) -> str:
    _rewrite(source, image, image="../" + image, output="images/../" + image)
    return "not a relative path"


def _no_fingerprint(source: Path, image: str, outside: Path) -> str:
    _rewrite(source, image, key=None)
    return "no fingerprint"


def _predictions_not_a_list(source: Path, image: str, outside: Path) -> str:
    _rewrite(source, image, predictions="cat")
    return "predictions"


def _detail_elsewhere(source: Path, image: str, outside: Path) -> str:
    _rewrite(source, image, detail="javascript:alert(1)")
    return "detail page"


@pytest.mark.parametrize(
    "craft",
    [
        _escape_through_symlinked_folder,
        _escape_through_symlinked_file,
        _escape_through_file_name,
        _image_out_of_its_folder,
        _no_fingerprint,
        _predictions_not_a_list,
        _detail_elsewhere,
    ],
    ids=lambda craft: craft.__name__.strip("_"),
)
def test_a_crafted_record_is_refused_before_anything_is_written(copies, tmp_path, craft):
    first, second = copies("A0"), copies("A1")
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "keep.txt").write_text("precious")
    image = _an_ok_image(first)
    why = craft(first, image, tmp_path)
    merged = tmp_path / "merged"
    result = _merge(first, second, "--out", merged)
    assert (tmp_path / "victim" / "keep.txt").read_text() == "precious"
    assert not merged.exists()
    _refused(result, str(first), why, image)


# --- case 7: everything is checked before --out changes ----------------------------------------------


def test_mismatched_runs_leave_an_existing_output_unchanged(copies, tmp_path):
    first, second, other_model = copies("A0"), copies("A1"), copies("B1")
    existing = tmp_path / "existing"
    assert _merge(first, second, "--out", existing).exit_code == EXIT_SOME_FAILED
    assert len(list((existing / "images").rglob("detail.html"))) == len(GOOD)
    before = _snapshot(existing)
    result = _merge(first, other_model, "--out", existing)
    assert _snapshot(existing) == before
    _refused(result, str(first), str(other_model), "different models or options")
    fresh = tmp_path / "fresh"
    result = _merge(first, other_model, "--out", fresh)
    assert not fresh.exists()
    _refused(result, "different models or options")


# --- case 8: every record's fingerprint, report.json or not ------------------------------------------


def test_a_killed_run_of_another_model_is_refused(copies, tmp_path):
    first, killed = copies("A0"), copies("B1")
    (killed / "report.json").unlink()  # as a full disk or SIGTERM leaves it
    merged = tmp_path / "merged"
    _refused(_merge(first, killed, "--out", merged), str(first), str(killed), "different models")
    assert not merged.exists()


def test_a_killed_run_of_the_same_model_is_merged_as_incomplete(copies, tmp_path):
    first, killed = copies("A0"), copies("A1")
    (killed / "report.json").unlink()
    merged = tmp_path / "merged"
    assert _merge(first, killed, "--out", merged).exit_code == EXIT_SOME_FAILED
    assert set(_records(merged)) == EVERY
    assert json.loads((merged / "report.json").read_text())["run"]["complete"] is False


def test_a_record_of_another_model_inside_a_source_is_refused(copies, tmp_path):
    first, second, other_model = copies("A0"), copies("A1"), copies("B1")
    image = _an_ok_image(second)
    foreign = _records(other_model)[image]  # same image, explained by model B
    records = _records(second)
    records[image] = foreign
    (second / RESULTS_JSONL).write_text("".join(json.dumps(r) + "\n" for r in records.values()))
    shutil.rmtree(second / "images" / image)
    shutil.copytree(other_model / "images" / image, second / "images" / image)
    merged = tmp_path / "merged"
    _refused(_merge(first, second, "--out", merged), str(second), image, "report.json says")
    assert not merged.exists()


# --- --out: what may be replaced ----------------------------------------------------------------------


def test_out_holding_other_files_is_refused(copies, tmp_path):
    first, second = copies("A0"), copies("A1")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    result = _merge(first, second, "--out", mine)
    assert _snapshot(mine) == {"thesis.tex": b"years of work"}
    _refused(result, "not an attnexplain output")


def test_out_holding_a_source_is_refused(copies, tmp_path):
    first, second = copies("A0"), copies("A1")
    before = _snapshot(first.parent)
    result = _merge(first, second, "--out", first.parent)
    assert _snapshot(first.parent) == before
    _refused(result, "holds the source")


def test_out_equal_to_a_source_ends_up_merged(copies, tmp_path):
    first, second = copies("A0"), copies("A1")
    second_before = _snapshot(second)
    assert _merge(first, second, "--out", first).exit_code == EXIT_SOME_FAILED
    assert set(_records(first)) == EVERY
    for image in GOOD:
        assert (first / "images" / image / "detail.html").is_file()
    assert _snapshot(second) == second_before


def test_out_with_explanations_no_source_has_is_refused(copies, tmp_path):
    first, second = copies("A0"), copies("A1")
    before = _snapshot(first)
    result = _merge(second, "--out", first)
    assert _snapshot(first) == before
    _refused(result, "explained image", "Name")


def test_merging_again_replaces_the_earlier_merge(copies, tmp_path):
    first, second = copies("A0"), copies("A1")
    merged = tmp_path / "merged"
    assert _merge(first, second, "--out", merged).exit_code == EXIT_SOME_FAILED
    assert _merge(first, second, "--out", merged).exit_code == EXIT_SOME_FAILED
    assert _merge(merged, first, "--out", tmp_path / "again").exit_code == EXIT_SOME_FAILED
    assert set(_records(tmp_path / "again")) == EVERY


# --- the same image in two sources ------------------------------------------------------------------


def test_one_name_for_two_different_files_is_refused(copies, tmp_path):
    first, second, other_files = copies("A0"), copies("A1"), copies("A-other")
    merged = tmp_path / "merged"
    _refused(_merge(first, second, other_files, "--out", merged), str(other_files), "'img3.png'", "different files")
    assert not merged.exists()


def test_an_ok_record_wins_over_a_failed_one(copies, tmp_path):
    first, second = copies("A0"), copies("A1")
    image = _an_ok_image(first)
    failed = dict(_records(first)[image], status="failed", reason="simulated")
    for name in ("output", "files", "detail"):
        failed.pop(name)
    records = _records(second)
    records[image] = failed
    (second / RESULTS_JSONL).write_text("".join(json.dumps(r) + "\n" for r in records.values()))
    merged = tmp_path / "merged"
    for order in ((first, second), (second, first)):
        assert _merge(*order, "--out", merged).exit_code == EXIT_SOME_FAILED
        assert _records(merged)[image]["status"] == "ok"


# --- the run-level files of a source are untrusted too ------------------------------------------------


@pytest.mark.parametrize("name", [RESULTS_JSONL, "report.json"])
def test_a_fifo_in_place_of_a_source_file_is_refused_without_blocking(copies, tmp_path, name):
    first, second = copies("A0"), copies("A1")
    (second / name).unlink()
    os.mkfifo(second / name)  # opening it would wait for a writer forever
    merged = tmp_path / "merged"
    result = subprocess.run(
        [sys.executable, "-m", "attnexplain", "merge", str(first), str(second), "--out", str(merged)],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])),
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "FIFO" in lines[0] and str(second / name) in lines[0], result.stderr
    assert not merged.exists()


@pytest.mark.parametrize("report", ['{"run": ', '{"run": {"methods": 5}}'], ids=["cut", "malformed"])
def test_a_report_that_is_not_a_batch_report_is_refused(copies, tmp_path, report):
    first, second = copies("A0"), copies("A1")
    (second / "report.json").write_text(report)
    merged = tmp_path / "merged"
    result = _merge(first, second, "--out", merged)
    assert not merged.exists()
    _refused(result, str(second / "report.json"), "not a report")


def test_a_line_whose_image_is_not_a_name_is_skipped_as_garbled(copies, tmp_path):
    # read_results (shared with --resume) skips a line it cannot use, as it skips a cut-short one.
    first, second = copies("A0"), copies("A1")
    with open(second / RESULTS_JSONL, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"image": ["a", "list"], "status": "ok"}) + "\n")
    merged = tmp_path / "merged"
    result = _merge(first, second, "--out", merged)
    assert result.exit_code in (0, 3), result.output
    lines = (merged / RESULTS_JSONL).read_text(encoding="utf-8").splitlines()
    images = [json.loads(line)["image"] for line in lines]
    assert images and all(isinstance(image, str) for image in images)


def test_a_merge_that_cannot_write_leaves_out_as_it_was(copies, tmp_path, monkeypatch):
    from attnexplain.errors import AttnExplainError
    from attnexplain.merge import merge_outputs

    first, second = copies("A0"), copies("A1")
    existing = tmp_path / "existing"
    assert _merge(first, second, "--out", existing).exit_code == EXIT_SOME_FAILED
    before = _snapshot(existing)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "link", disk_full)
    monkeypatch.setattr(shutil, "copyfile", disk_full)
    with pytest.raises(AttnExplainError, match="No space left on device.*--out is unchanged"):
        merge_outputs([first, second], existing)
    assert _snapshot(existing) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "sources"]  # no staging left


@pytest.mark.parametrize("locked", ["source", "out"])
def test_a_folder_a_batch_is_writing_is_not_merged(copies, tmp_path, locked):
    from attnexplain._lock import output_lock

    first, second = copies("A0"), copies("A1")
    out = tmp_path / "merged"
    out.mkdir()
    with output_lock(second if locked == "source" else out):  # as a running batch holds it
        result = _merge(first, second, "--out", out)
    assert result.exit_code == 1, result.output
    line = result.output.strip()
    assert len(line.splitlines()) == 1 and "is being written by another attnexplain run" in line
    assert f"pid {os.getpid()}" in line
    assert not (out / RESULTS_JSONL).exists()
    assert _merge(first, second, "--out", out).exit_code in (0, 3)  # free again once it ends


# --- numbers and lines a record cannot be read from ---------------------------------------------------


def _huge_metric(record: dict) -> dict:
    return {"metrics": {record["methods"][0]: {"deletion": 10**400}}}


def _huge_prob(record: dict) -> dict:
    return {"predictions": [dict(record["predictions"][0], prob=10**400)]}


def _huge_timing(record: dict) -> dict:
    return {"timings": dict(record["timings"], model_s=10**400)}


@pytest.mark.parametrize("change", [_huge_metric, _huge_prob, _huge_timing])
def test_a_number_beyond_a_float_is_refused_naming_the_source_and_image(copies, tmp_path, change):
    first, second = copies("A0"), copies("A1")
    image = _an_ok_image(first)
    _rewrite(first, image, **change(_records(first)[image]))
    merged = tmp_path / "merged"
    _refused(_merge(first, second, "--out", merged), str(first), repr(image))
    assert not merged.exists()


def test_a_wall_time_beyond_a_float_in_a_report_is_not_summed(copies, tmp_path):
    first, second = copies("A0"), copies("A1")
    report = json.loads((first / "report.json").read_text())
    report["run"]["wall_s"] = 10**400
    (first / "report.json").write_text(json.dumps(report))
    merged = tmp_path / "merged"
    assert _merge(first, second, "--out", merged).exit_code == EXIT_SOME_FAILED
    assert json.loads((merged / "report.json").read_text())["run"]["wall_s"] < 1e6


def test_lines_no_record_can_be_read_from_are_said_on_stderr_and_in_the_report(copies, tmp_path):
    first, second = copies("A0"), copies("A1")
    image = _an_ok_image(second)
    lines = (second / RESULTS_JSONL).read_text(encoding="utf-8").splitlines(keepends=True)
    garbled = next(number for number, line in enumerate(lines, start=1) if f'"{image}"' in line)
    lines[garbled - 1] = lines[garbled - 1][:40] + "\n"  # that image's record, damaged
    (second / RESULTS_JSONL).write_text("".join(lines) + '{"image": "cut-short.png", "sta', encoding="utf-8")
    merged = tmp_path / "merged"
    result = _merge(first, second, "--out", merged)
    assert result.exit_code == EXIT_SOME_FAILED, result.output
    assert "Warning: lines of the sources' results.jsonl that are no record were left out" in result.output
    assert f"{second / RESULTS_JSONL} line {garbled}: not JSON" in result.output
    run = json.loads((merged / "report.json").read_text())["run"]
    assert run["dropped_records"] == [
        f"{second / RESULTS_JSONL} line {garbled}: not JSON",
        f"{second / RESULTS_JSONL} line {len(lines) + 1}: cut short (no newline at its end: an interrupted write)",
    ]
    assert run["complete"] is False and image not in _records(merged)


def test_an_out_holding_lines_no_record_can_be_read_from_is_not_replaced(copies, tmp_path):
    first, second = copies("A0"), copies("A1")
    merged = tmp_path / "merged"
    assert _merge(first, second, "--out", merged).exit_code == EXIT_SOME_FAILED
    with open(merged / RESULTS_JSONL, "a", encoding="utf-8") as handle:
        handle.write("{damaged\n")
    before = _snapshot(merged)
    _refused(_merge(first, second, "--out", merged), "line", "not JSON", "Name")
    assert _snapshot(merged) == before


def test_a_record_of_several_mebibytes_is_merged_not_dropped(resnet_state_dict_file, tmp_path):
    # Five classes named with a mebibyte each: every record of this real run is over 5 MiB, as a
    # large --top-k over a model with tens of thousands of classes makes it.
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"class {index} " + "n" * (1 << 20) + "\n" for index in range(5)))
    photos = _write_photos(tmp_path / "photos", ["big.png"], seed=3)
    source = _batch(resnet_state_dict_file, photos, tmp_path / "source", "--labels", str(labels), "--top-k", "5")
    assert (source / RESULTS_JSONL).stat().st_size > 5 << 20
    merged = tmp_path / "merged"
    result = _merge(source, "--out", merged)
    assert result.exit_code == 0, result.output
    assert "1 explained, 0 failed" in result.output
    assert len(_records(merged)["big.png"]["predictions"]) == 5


@pytest.mark.parametrize(
    "run",
    [
        {"methods": ["gradcam"], "preprocessing": {"mean": [10**400, 0, 0]}},
        {"methods": ["gradcam"], "model": "a name, not a table"},
        {"methods": [["nested"]]},
    ],
    ids=["huge-mean", "model-text", "methods-nested"],
)
def test_a_report_whose_run_the_pages_cannot_show_is_refused(copies, tmp_path, run):
    first, second = copies("A0"), copies("A1")
    report = json.loads((first / "report.json").read_text())
    report["run"].update(run)
    (first / "report.json").write_text(json.dumps(report))
    merged = tmp_path / "merged"
    _refused(_merge(first, second, "--out", merged), str(first / "report.json"), "not a report")
    assert not merged.exists()


def test_a_report_nested_too_deep_to_parse_is_refused(copies, tmp_path):
    first, second = copies("A0"), copies("A1")
    (first / "report.json").write_text('{"run": ' + "[" * 100_000 + "]" * 100_000 + "}")
    _refused(_merge(first, second, "--out", tmp_path / "merged"), str(first / "report.json"), "not a report")
