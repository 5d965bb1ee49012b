"""attnexplain batch against hostile inputs and hostile conditions: FIFOs and devices, symbolic links,
files with equal bytes, two runs on one output folder, signals, kills, long names, spreadsheet
formulas in names and labels, an output folder inside the inputs, umasks, a full disk, damaged
results of an earlier run. Outputs are never lost or half-written; bad input gets one clear line."""

from __future__ import annotations

import csv
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from attnexplain import _atomic
from attnexplain.batch_ledger import EXIT_SOME_FAILED
from attnexplain.cli import main
from attnexplain.errors import AttnExplainError
from attnexplain.formats import RESULTS_JSONL
from attnexplain.records import read_results

REPO = Path(__file__).resolve().parents[1]
OPTIONS = ["--arch", "resnet18", "--size", "32", "--device", "cpu", "--quiet"]


def _image(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _folder(root: Path, count: int) -> Path:
    for index in range(count):
        _image(root / f"img{index:02d}.png", seed=index)
    return root


def _batch(model: Path, *args):
    return CliRunner().invoke(main, ["batch", str(model), *map(str, args), *OPTIONS])


def _records(out: Path) -> dict[str, dict]:
    return {record["image"]: record for record in read_results(out / RESULTS_JSONL)}


def _env() -> dict[str, str]:
    return dict(
        os.environ, ATTNEXPLAIN_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )


def _command(model: Path, *args) -> list[str]:
    return [sys.executable, "-m", "attnexplain", "batch", str(model), *map(str, args), *OPTIONS]


# --- a batch held in the middle of an image: races, signals and kills at a known point -------------

GATED = textwrap.dedent('''
    """`attnexplain batch` whose writer, from its (GATE_AFTER+1)-th image on, waits inside the
    image's staging folder until the file GATE exists (touching REACHED when it gets there)."""
    import os, sys, time
    from pathlib import Path

    import attnexplain.gallery as gallery
    from attnexplain.cli import main

    original, calls = gallery.render_detail, []

    def gated(record, *args, **kwargs):
        calls.append(record["image"])
        if len(calls) > int(os.environ["GATE_AFTER"]):
            Path(os.environ["REACHED"]).touch()
            deadline = time.monotonic() + 60
            while not Path(os.environ["GATE"]).exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        return original(record, *args, **kwargs)

    gallery.render_detail = gated
    main(sys.argv[1:], prog_name="attnexplain")
''')


class _Gated:
    """A real `attnexplain batch` subprocess held while writing its (after+1)-th image."""

    def __init__(self, tmp_path: Path, model: Path, inputs: Path, out: Path, after: int) -> None:
        script = tmp_path / "gated_batch.py"
        script.write_text(GATED)
        self.gate, self.reached = tmp_path / "gate", tmp_path / "reached"
        env = dict(_env(), GATE=str(self.gate), REACHED=str(self.reached), GATE_AFTER=str(after))
        command = [
            sys.executable,
            str(script),
            "batch",
            str(model),
            str(inputs),
            *OPTIONS,
            "--images-per-batch",
            "1",
            "--workers",
            "1",
            "--out",
            str(out),
        ]
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not self.reached.exists() and self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.reached.exists(), self.process.communicate(timeout=30)

    def open_gate(self) -> None:
        self.gate.touch()

    def finish(self) -> tuple[int, str]:
        _, stderr = self.process.communicate(timeout=60)
        return self.process.returncode, stderr

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=30)


@pytest.fixture()
def gated_cleanup():
    started: list[_Gated] = []
    yield started
    for gated in started:
        if gated.process.poll() is None:
            gated.kill()


# --- 9. files with equal bytes ---------------------------------------------------------------------


def test_resume_keeps_every_image_whose_bytes_equal_another(resnet_state_dict_file, tmp_path, gallery_images):
    photos = tmp_path / "photos"
    original = _image(photos / "chelsea.png", seed=1)
    shutil.copyfile(original, photos / "cat.png")
    (photos / "copies").mkdir()
    shutil.copyfile(original, photos / "copies" / "cat.png")
    _image(photos / "other.png", seed=2)
    out = tmp_path / "out"
    assert _batch(resnet_state_dict_file, photos, "--out", out).exit_code == 0
    resumed = _batch(resnet_state_dict_file, photos, "--out", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    names = {"chelsea.png", "cat.png", "copies/cat.png", "other.png"}
    records = _records(out)
    assert set(records) == names and all(r["status"] == "ok" for r in records.values())
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert {row["image"] for row in rows} == names
    assert set(gallery_images(out)) == names


# --- 10. FIFOs, devices, symbolic link loops -----------------------------------------------------------


def test_fifo_and_device_named_explicitly_are_refused_without_reading(resnet_state_dict_file, tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    zero = tmp_path / "x.jpg"
    zero.symlink_to("/dev/zero")
    list_fifo = tmp_path / "list-fifo.txt"
    os.mkfifo(list_fifo)
    list_zero = tmp_path / "list-zero.txt"
    list_zero.symlink_to("/dev/zero")
    good = _image(tmp_path / "good.png")
    out = tmp_path / "out"
    # A subprocess: the unfixed batch blocks on a FIFO forever; the timeout makes that a failure.
    done = subprocess.run(
        _command(resnet_state_dict_file, fifo, zero, f"@{list_fifo}", f"@{list_zero}", good, "--out", out),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == EXIT_SOME_FAILED, done.stderr
    records = _records(out)
    assert records["good.png"]["status"] == "ok"
    assert records[str(fifo)]["reason"] == f"{fifo} is a FIFO (named pipe), not a file."
    assert records[str(zero)]["reason"] == f"{zero} is a device, not a file."
    assert "is a FIFO" in records[f"@{list_fifo}"]["reason"]
    assert "is a device" in records[f"@{list_zero}"]["reason"]


def test_list_file_naming_itself_is_not_an_input(resnet_state_dict_file, tmp_path):
    _image(tmp_path / "a.png")
    listing = tmp_path / "list.txt"
    listing.write_text("list.txt\na.png\n")
    out = tmp_path / "out"
    result = _batch(resnet_state_dict_file, f"@{listing}", "--out", out)
    assert result.exit_code == 0, result.output
    assert set(_records(out)) == {"a.png"}


def test_folder_entries_that_are_not_regular_files_are_listed_with_their_reason(resnet_state_dict_file, tmp_path):
    photos = _folder(tmp_path / "photos", 2)
    os.mkfifo(photos / "pipe.jpg")
    (photos / "zero.jpg").symlink_to("/dev/zero")
    (photos / "loop.jpg").symlink_to(photos / "loop.jpg")
    (photos / "up").symlink_to(photos)
    out = tmp_path / "out"
    result = _batch(resnet_state_dict_file, photos, "--out", out)
    assert result.exit_code == 0, result.output
    assert set(_records(out)) == {"img00.png", "img01.png"}
    skipped = {
        Path(entry["path"]).name: entry["reason"]
        for entry in json.loads((out / "report.json").read_text())["run"]["skipped_inputs"]
    }
    assert skipped == {
        "pipe.jpg": "is a FIFO (named pipe), not a file",
        "zero.jpg": "is a device, not a file",
        "loop.jpg": "is a symbolic link loop",
        "up": "is a symbolic link to a folder (not followed)",
    }
    assert "Skipped 4 entries" in result.output and "pipe.jpg is a FIFO" in result.output


def test_recursive_glob_does_not_follow_symlink_loops(tmp_path):
    photos = _folder(tmp_path / "photos", 2)
    (photos / "again").symlink_to(".")
    (photos / "once-more").symlink_to(".")
    # A subprocess: glob.glob follows both links 40 levels deep (2**40 paths) and never ends.
    code = (
        f"from attnexplain.inputs import collect_inputs; "
        f"print(sorted(i.relative for i in collect_inputs([{str(photos / '**' / '*.png')!r}]).images))"
    )
    done = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['img00.png', 'img01.png']"


# --- 11. two runs on one --out -------------------------------------------------------------------------


def test_second_batch_on_the_same_out_is_refused_while_the_first_runs(resnet_state_dict_file, tmp_path, gated_cleanup):
    photos = _folder(tmp_path / "photos", 6)
    out = tmp_path / "out"
    first = _Gated(tmp_path, resnet_state_dict_file, photos, out, after=2)
    gated_cleanup.append(first)
    second = _batch(resnet_state_dict_file, photos, "--out", out)  # in this process: a second one
    first.open_gate()
    code, stderr = first.finish()
    assert second.exit_code == 1, second.output
    line = second.output.strip()
    assert line.startswith("Error: ") and "\n" not in line
    assert "in use by another attnexplain run" in line and f"pid {first.process.pid}" in line
    assert code == 0, stderr
    assert set(_records(out)) == {f"img{index:02d}.png" for index in range(6)}
    assert json.loads((out / "report.json").read_text())["totals"]["ok"] == 6


# --- 12. SIGTERM and SIGHUP ------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGHUP, marks=pytest.mark.heavy)])
def test_sigterm_and_sighup_leave_a_valid_partial_report(resnet_state_dict_file, tmp_path, signum, gated_cleanup):
    # While the 3rd image's write is held, the model may explain 3 more (the writes it may queue),
    # however fast it is, and a batch another replica has finished is written all the same (one image
    # a batch here): 8 images, of which at most 6 + (parallel batches - 1) can be recorded when the
    # signal stops it.
    photos = _folder(tmp_path / "photos", 8)
    out = tmp_path / "out"
    run = _Gated(tmp_path, resnet_state_dict_file, photos, out, after=2)
    gated_cleanup.append(run)
    run.process.send_signal(signum)
    time.sleep(0.2)
    run.open_gate()  # the image being written is finished and recorded
    code, stderr = run.finish()
    assert code == 128 + signum, stderr  # 143 / 129, as a shell reports them
    assert f"Stopped by {signal.Signals(signum).name}" in stderr
    report = json.loads((out / "report.json").read_text())
    records = _records(out)
    assert report["run"]["complete"] is False and report["run"]["interrupted"] is True
    assert 2 <= report["totals"]["images"] == len(records) <= 6 + report["run"]["parallel_batches"] - 1 < 8
    assert len(list(csv.DictReader((out / "summary.csv").open()))) == len(records)
    assert "partial" in (out / "index.html").read_text()
    resumed = _batch(resnet_state_dict_file, photos, "--out", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert len(_records(out)) == 8


# --- 13. long file names -----------------------------------------------------------------------------------


def test_file_names_of_250_bytes_work_in_batch_and_run(resnet_state_dict_file, tmp_path):
    name = "a" * 246 + ".png"
    assert len(name.encode()) == 250
    image = _image(tmp_path / "photos" / name)
    out = tmp_path / "out"
    result = _batch(resnet_state_dict_file, image, "--out", out)
    assert result.exit_code == 0, result.output
    assert _records(out)[name]["status"] == "ok"
    assert (out / "images" / name / "overlay-gradcam.jpg").is_file()
    single = CliRunner().invoke(
        main, ["run", str(resnet_state_dict_file), str(image), *OPTIONS[:-1], "--out", str(tmp_path / "run")]
    )
    assert single.exit_code == 0, single.output
    assert len(list((tmp_path / "run").glob("*/report.json"))) == 1


# --- 14. spreadsheet formulas in summary.csv ---------------------------------------------------------------


def test_summary_csv_neutralises_formulas_in_names_and_labels(resnet_state_dict_file, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f'=HYPERLINK("http://evil.example/{i}","c{i}")\n' for i in range(5)))
    photos = tmp_path / "photos"
    names = ["=1+2.png", "+cmd.png", "-2.png", "@SUM(A1).png", "\tx.png", "plain.png"]
    for index, name in enumerate(names):
        _image(photos / name, seed=index)
    out = tmp_path / "out"
    result = _batch(resnet_state_dict_file, photos, "--labels", labels, "--out", out)
    assert result.exit_code == 0, result.output
    rows = {row["image"]: row for row in csv.DictReader((out / "summary.csv").open(newline=""))}
    assert set(rows) == {"'" + name for name in names[:-1]} | {"plain.png"}
    for row in rows.values():
        assert row["top1_label"].startswith("'=HYPERLINK(") and row["target_label"].startswith("'=")
        assert row["output"] == "images/" + row["image"].lstrip("'")  # a safe cell is unchanged
    for cell in (c for row in csv.reader((out / "summary.csv").open(newline="")) for c in row):
        assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), cell


# --- 15. staging folders of a killed run ----------------------------------------------------------------


def test_resume_after_sigkill_removes_stale_staging_and_is_not_locked_out(
    resnet_state_dict_file, tmp_path, gated_cleanup
):
    photos = _folder(tmp_path / "photos", 5)
    out = tmp_path / "out"
    run = _Gated(tmp_path, resnet_state_dict_file, photos, out, after=2)
    gated_cleanup.append(run)
    run.kill()  # inside the third image's staging folder

    def hidden() -> list[Path]:
        return [p for p in out.rglob(".*") if p.name != ".attnexplain.lock"]

    assert hidden(), "the kill left no staging folder: the test did not hit its moment"
    resumed = _batch(resnet_state_dict_file, photos, "--out", out, "--resume")
    assert resumed.exit_code == 0, resumed.output  # a dead run's lock never blocks
    assert hidden() == []
    assert set(_records(out)) == {f"img{index:02d}.png" for index in range(5)}


def test_stale_staging_cleanup_removes_only_our_names(tmp_path):
    (tmp_path / ".attnexplain-abc_1234.tmp").mkdir()
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / ".attnexplain-zz99zz99.old").mkdir()
    (tmp_path / ".attnexplain-q1w2e3r4.tmp").write_text("half a report")
    keep = [
        tmp_path / ".attnexplain-abc.tmp",
        tmp_path / ".photo.png.abcd1234.tmp",
        tmp_path / "deep" / "attnexplain-abcd1234.tmp",
    ]
    for path in keep:
        path.write_text("not ours")
    (tmp_path / ".attnexplain-link0000.tmp").symlink_to(tmp_path / "deep")
    removed = _atomic.remove_stale_staging(tmp_path)
    assert len(removed) == 3
    assert all(path.exists() for path in keep) and (tmp_path / "deep").is_dir()
    assert (tmp_path / ".attnexplain-link0000.tmp").is_symlink()


# --- 16. --out inside an input folder -----------------------------------------------------------------------


def test_out_inside_the_input_folder_is_not_read_as_input(resnet_state_dict_file, tmp_path):
    photos = _folder(tmp_path / "photos", 3)
    out = photos / "explained"
    for again in ([], ["--overwrite"]):
        result = _batch(resnet_state_dict_file, photos, "--out", out, *again)
        assert result.exit_code == 0, result.output
        assert set(_records(out)) == {"img00.png", "img01.png", "img02.png"}
    # Named explicitly, an output is not an input either.
    again = _batch(
        resnet_state_dict_file,
        photos,
        out / "images" / "img00.png" / "overlay-gradcam.jpg",
        "--out",
        out,
        "--overwrite",
    )
    assert again.exit_code == 0, again.output
    assert len(_records(out)) == 3


# --- 17. symbolic links out of an input folder --------------------------------------------------------------


def test_symlink_out_of_the_input_folder_keeps_the_mirrored_layout(resnet_state_dict_file, tmp_path):
    photos = tmp_path / "deep" / "photos"
    _image(photos / "a.png", seed=1)
    _image(photos / "sub" / "b.png", seed=2)
    elsewhere = _image(tmp_path / "elsewhere" / "c.png", seed=3)
    (photos / "link.png").symlink_to(elsewhere)
    out = tmp_path / "out"
    # The folder and one of its files named twice: the same file, one row.
    result = _batch(resnet_state_dict_file, photos, photos / "a.png", "--out", out)
    assert result.exit_code == 0, result.output
    assert set(_records(out)) == {"a.png", "sub/b.png", "link.png"}
    assert (out / "images" / "link.png" / "overlay-gradcam.jpg").is_file()
    assert json.loads((out / "report.json").read_text())["run"]["root"] == str(photos)


# --- 22. permissions follow the umask -------------------------------------------------------------------


@pytest.fixture()
def umask(monkeypatch):
    def set_umask(value: int) -> None:
        monkeypatch.setattr(_atomic, "_umask", None, raising=False)  # read once per process: again
        previous = os.umask(value)
        restore.append(previous)

    restore: list[int] = []
    yield set_umask
    if restore:
        os.umask(restore[0])


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_outputs_follow_the_umask(resnet_state_dict_file, tmp_path, umask, mask):
    umask(mask)
    photos = _folder(tmp_path / "photos", 2)
    out = tmp_path / "out"
    assert _batch(resnet_state_dict_file, photos, "--out", out).exit_code == 0
    single = CliRunner().invoke(
        main,
        ["run", str(resnet_state_dict_file), str(photos / "img00.png"), *OPTIONS[:-1], "--out", str(tmp_path / "run")],
    )
    assert single.exit_code == 0, single.output
    for path in [*out.rglob("*"), *(tmp_path / "run").rglob("*")]:
        expected = (0o777 if path.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


# --- exit codes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shard", ["abc", "3/2", "1/0", "-1/2", "0/2"])
def test_bad_shard_is_a_usage_error(resnet_state_dict_file, tmp_path, shard):
    result = _batch(resnet_state_dict_file, tmp_path, "--shard", shard, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--shard'" in result.output


def test_no_image_found_is_an_error_with_one_line(resnet_state_dict_file, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    os.mkfifo(empty / "pipe.jpg")
    out = tmp_path / "out"
    result = _batch(resnet_state_dict_file, empty, "--out", out)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: No image found in")
    assert "pipe.jpg is a FIFO" in lines[0]
    assert not out.exists()  # nothing written for a run that could not start


@pytest.mark.heavy  # a whole subprocess on a full tmpfs (~5 s)
def test_full_disk_records_the_failed_images_and_exits_3(resnet_state_dict_file, tmp_path):
    photos = _folder(tmp_path / "photos", 12)
    out = tmp_path / "out"

    def small_files() -> None:  # in the child: every file it writes stops at 9000 bytes (EFBIG):
        # an image's files (its detail page is ~6 kB) fit, results.jsonl outgrows it mid-run
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (9000, 9000))

    done = subprocess.run(
        _command(resnet_state_dict_file, photos, "--out", out),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=small_files,
    )
    assert done.returncode == EXIT_SOME_FAILED, done.stderr
    assert "Traceback" not in done.stderr
    records = _records(out)  # every line complete: no half-written record
    assert 0 < len(records) < 12 and all(r["status"] == "ok" for r in records.values())
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert len(rows) == 12
    failed = [row for row in rows if row["status"] == "failed"]
    assert failed and all("File too large" in row["reason"] for row in failed)
    report = json.loads((out / "report.json").read_text())
    assert report["totals"] == {"images": 12, "ok": len(records), "failed": len(failed)}


# --- #23.5: a thin image is that image's failure ----------------------------------------------------------


def test_a_thin_image_fails_alone_with_its_aspect_ratio(resnet_state_dict_file, tmp_path):
    photos = _folder(tmp_path / "photos", 1)
    # 1×5000 pixels, a few hundred bytes: resized to a shorter side of 256 it would take 3.8 GB
    Image.fromarray(np.zeros((1, 5000, 3), np.uint8)).save(photos / "thin.png")
    out = tmp_path / "out"
    result = _batch(resnet_state_dict_file, photos, "--out", out)
    assert result.exit_code == EXIT_SOME_FAILED, result.output
    assert "Traceback" not in result.output
    records = _records(out)
    assert records["img00.png"]["status"] == "ok"
    assert records["thin.png"]["status"] == "failed"
    assert "5000x1 pixels, an aspect ratio beyond 1:50" in records["thin.png"]["reason"]


# --- #23.16: scores that do not change with the image ------------------------------------------------------


def test_a_model_whose_scores_are_all_equal_fails_each_image_saying_why(tmp_path):
    import hostile_modules

    model = hostile_modules.save("zero-head", tmp_path / "zero-head.pt")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        [
            "batch",
            str(model),
            str(_folder(tmp_path / "photos", 2)),
            "--out",
            str(out),
            "--trust-model",
            "--size",
            "32",
            "--quiet",
        ],
    )
    assert result.exit_code == EXIT_SOME_FAILED, result.output
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert len(rows) == 2 and all(row["status"] == "failed" for row in rows)
    assert all("the model's scores do not change with this image" in row["reason"] for row in rows)


# --- results.jsonl of an earlier run is data, not trusted ----------------------------------------------------


def test_resume_never_trusts_output_paths_outside_out(resnet_state_dict_file, tmp_path):
    photos = _folder(tmp_path / "photos", 2)
    out = tmp_path / "out"
    assert _batch(resnet_state_dict_file, photos, "--out", out).exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(out / "images" / "img00.png", elsewhere / "img00.png")
    shutil.copytree(out / "images" / "img01.png", tmp_path / "x")
    records = _records(out)
    records["img00.png"].update(
        output=str(elsewhere / "img00.png"), detail=str(elsewhere / "img00.png" / "detail.html")
    )
    records["img01.png"].update(output="../x", detail="../x/detail.html")
    (out / RESULTS_JSONL).write_text("".join(json.dumps(r) + "\n" for r in records.values()))
    resumed = _batch(resnet_state_dict_file, photos, "--out", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert {name: r["output"] for name, r in _records(out).items()} == {
        "img00.png": "images/img00.png",
        "img01.png": "images/img01.png",
    }
    assert str(elsewhere) not in (out / "index.html").read_text()


def test_results_with_deeply_nested_or_overlong_lines_are_read(tmp_path):
    path = tmp_path / RESULTS_JSONL
    good = json.dumps({"image": "a.png", "status": "ok"})
    path.write_text(
        good
        + "\n"
        + "[" * 100_000
        + "\n"
        + "x" * (5 << 20)
        + "\n"
        + json.dumps({"image": "b.png", "status": "ok"})
        + "\n"
    )
    assert {r["image"] for r in read_results(path)} == {"a.png", "b.png"}


def test_lines_no_record_can_be_read_from_are_said_each_up_to_a_bound(tmp_path):
    from attnexplain.records import MAX_DROPPED_SAID, read_records

    path = tmp_path / RESULTS_JSONL
    path.write_text(json.dumps({"image": "a.png", "status": "ok"}) + "\n" + "{garbled\n" * 250 + "\n")
    found = read_records(path)
    assert [r["image"] for r in found.records] == ["a.png"]
    assert found.dropped[:2] == ["line 2: not JSON", "line 3: not JSON"]
    assert len(found.dropped) == MAX_DROPPED_SAID + 1
    assert found.dropped[-1] == f"and {250 - MAX_DROPPED_SAID} more lines that are no record"


@pytest.mark.heavy
def test_resume_with_a_fifo_for_results_fails_with_one_line(resnet_state_dict_file, tmp_path):
    photos = _folder(tmp_path / "photos", 1)
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / RESULTS_JSONL)
    done = subprocess.run(
        _command(resnet_state_dict_file, photos, "--out", out, "--resume"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [f"Error: {out / RESULTS_JSONL} is a FIFO (named pipe), not a file."]
    with pytest.raises(AttnExplainError):
        read_results(out / RESULTS_JSONL)


def _edit_records(out: Path, **per_image) -> None:
    """Rewrite results.jsonl with per image (name=callable) a change applied to its record."""
    records = _records(out)
    for image, change in per_image.items():
        change(records[image])
    (out / RESULTS_JSONL).write_text("".join(json.dumps(r) + "\n" for r in records.values()))


def test_resume_re_explains_images_whose_records_hold_numbers_beyond_a_float(resnet_state_dict_file, tmp_path):
    photos = _folder(tmp_path / "photos", 3)
    out = tmp_path / "out"
    assert _batch(resnet_state_dict_file, photos, "--out", out).exit_code == 0
    huge = 10**400  # JSON holds it; float() and math.isfinite() raise OverflowError on it

    def metric(record):
        record["metrics"] = {record["methods"][0]: {"deletion": huge}}

    def prob(record):
        record["predictions"][0]["prob"] = huge

    def timing(record):
        record["timings"]["model_s"] = 1e308  # finite, but two of them sum to infinity

    _edit_records(out, **{"img00.png": metric, "img01.png": prob, "img02.png": timing})
    resumed = _batch(resnet_state_dict_file, photos, "--out", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    records = _records(out)
    assert set(records) == {"img00.png", "img01.png", "img02.png"}
    assert all(
        r["status"] == "ok"
        and "metrics" not in r
        and r["predictions"][0]["prob"] <= 1
        and r["timings"]["model_s"] < 1e6
        for r in records.values()
    )
    report = json.loads((out / "report.json").read_text())  # strict JSON: no Infinity
    assert report["totals"]["ok"] == 3 and all(v < 1e6 for v in report["timings_total_s"].values())


def test_resume_never_reuses_a_record_whose_folder_is_a_link_out_of_out(resnet_state_dict_file, tmp_path):
    photos = _folder(tmp_path / "photos", 2)
    out = tmp_path / "out"
    assert _batch(resnet_state_dict_file, photos, "--out", out).exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(out / "images" / "img00.png", elsewhere / "img00.png")
    (out / "images" / "img00.png").symlink_to(elsewhere / "img00.png", target_is_directory=True)
    before = {path.name: path.read_bytes() for path in (elsewhere / "img00.png").iterdir()}
    resumed = CliRunner().invoke(
        main,
        [
            "batch",
            str(resnet_state_dict_file),
            str(photos),
            "--out",
            str(out),
            "--resume",
            "--arch",
            "resnet18",
            "--size",
            "32",
            "--device",
            "cpu",
        ],
    )
    assert resumed.exit_code == 0, resumed.output
    # img00.png explained again (merge refuses the same record); img01.png's record still stands
    assert "2 explained (1 from an earlier run)" in resumed.output
    assert not (out / "images" / "img00.png").is_symlink()
    assert (out / "images" / "img00.png" / "detail.html").is_file()
    assert {path.name: path.read_bytes() for path in (elsewhere / "img00.png").iterdir()} == before


def test_a_second_batch_into_a_finished_run_is_refused_without_resume_or_overwrite(resnet_state_dict_file, tmp_path):
    first, second = _folder(tmp_path / "first", 2), _folder(tmp_path / "second", 1)
    out = tmp_path / "out"
    assert _batch(resnet_state_dict_file, first, "--out", out).exit_code == 0
    kept = (out / RESULTS_JSONL).read_bytes()
    # Refused before the model loads: a model file that does not exist is not even looked at.
    refused = _batch(tmp_path / "no-such-model.pt", second, "--out", out)
    assert refused.exit_code == 1, refused.output
    line = refused.output.strip()
    assert "\n" not in line and line.startswith("Error: ") and "2 explained image(s)" in line
    assert "--resume" in line and "--overwrite" in line
    assert (out / RESULTS_JSONL).read_bytes() == kept
    both = _batch(resnet_state_dict_file, second, "--out", out, "--resume", "--overwrite")
    assert both.exit_code == 2 and "give one of them" in both.output
    # The API refuses the same, under the run's lock.
    from attnexplain.batch import EarlierRun, run_batch
    from attnexplain.batch_stages import BatchSettings
    from attnexplain.loading import load_model

    loaded = load_model(resnet_state_dict_file, arch="resnet18")
    with pytest.raises(EarlierRun, match="--overwrite"):
        run_batch(
            loaded,
            {"model": str(resnet_state_dict_file), "arch": "resnet18"},
            [str(second)],
            out,
            BatchSettings(size=(32, 32)),
            quiet=True,
        )
    assert (out / RESULTS_JSONL).read_bytes() == kept
    replaced = _batch(resnet_state_dict_file, second, "--out", out, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert set(_records(out)) == {"img00.png"} and len(read_results(out / RESULTS_JSONL)) == 1


def test_a_record_longer_than_a_results_line_may_be_fails_its_image_only(resnet_state_dict_file, tmp_path, monkeypatch):
    from attnexplain import records

    photos = _folder(tmp_path / "photos", 2)
    out = tmp_path / "out"
    labels = tmp_path / "labels.txt"  # five classes of 400 characters: a record of over 2,400 bytes
    labels.write_text("".join(f"{index}{'n' * 399}\n" for index in range(5)))
    monkeypatch.setattr(records, "MAX_RECORD_BYTES", 1500)
    result = _batch(resnet_state_dict_file, photos, "--out", out, "--top-k", "5", "--labels", labels)
    assert result.exit_code == EXIT_SOME_FAILED, result.output
    records = _records(out)  # every line written can be read back: none dropped
    assert set(records) == {"img00.png", "img01.png"}
    assert all(
        r["status"] == "failed" and "over the 1,500 a record may take; ask for fewer classes (--top-k)" in r["reason"]
        for r in records.values()
    )


def test_a_truth_file_that_is_a_fifo_is_refused_in_one_line_without_blocking(resnet_state_dict_file, tmp_path):
    from conftest import without_blocking

    photos = _folder(tmp_path / "photos", 1)
    fifo = tmp_path / "truth.csv"
    os.mkfifo(fifo)
    result = without_blocking(
        lambda: _batch(resnet_state_dict_file, photos, "--truth", fifo, "--out", tmp_path / "out"), fifo
    )
    assert result.exit_code == 1, result.output
    assert result.output.strip() == f"Error: The --truth file {fifo} is a FIFO (named pipe), not a file."


@pytest.mark.parametrize(
    "note", ['{"pid": Infinity, "host": "h", "started": "t"}', "[" * 3000], ids=["pid-infinity", "nested"]
)
def test_a_held_lock_whose_note_is_hostile_still_says_the_folder_is_in_use(tmp_path, note):
    import fcntl

    from attnexplain._lock import LOCK_NAME, OutputInUse, output_lock

    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(note)
    with open(out / LOCK_NAME, "rb") as held:  # another run holds the lock
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(OutputInUse, match="in use by another attnexplain run .holder unknown."):
            with output_lock(out):
                pass
