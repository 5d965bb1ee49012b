"""attnexplain batch / merge: many images, bad ones among them, interruptions, resume, shards."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from test_gates import gated_model  # noqa: F401 - the fixture: a MobileNetV3 with non-uniform gates

from attnexplain.batch import run_batch
from attnexplain.batch_ledger import EXIT_SOME_FAILED
from attnexplain.batch_stages import BatchSettings
from attnexplain.cli import main
from attnexplain.errors import AttnExplainError
from attnexplain.explanation import MethodOptions
from attnexplain.formats import RESULTS_JSONL
from attnexplain.inputs import collect_inputs, in_shard, parse_shard
from attnexplain.loading import load_model
from attnexplain.records import read_results

HOSTILE = "<img src=x onerror=alert(1)>.png"
BROKEN = {"a/empty.png": "empty", "b/deep/text.jpg": "Not an image", "b/trunc.png": "truncated"}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """206 small images of various sizes in nested folders (same names in different folders),
    three broken files and one with a hostile name."""
    root = tmp_path_factory.mktemp("batch-in") / "photos"
    rng = np.random.default_rng(0)
    for index in range(202):
        folder = root / ("a" if index % 2 else "b") / ("deep" if index % 3 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (16 + index % 7, 20 + index % 5, 3), dtype=np.uint8)
        name = f"img{index // 2:03d}" + (".png" if index % 4 else ".jpg")
        Image.fromarray(pixels).save(folder / name)
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / HOSTILE)
    (root / "a" / "empty.png").write_bytes(b"")
    (root / "b" / "deep" / "text.jpg").write_text("not a picture")
    good = (root / "a" / "img000.png").read_bytes()
    (root / "b" / "trunc.png").write_bytes(good[: len(good) // 2])
    (root / "notes.txt").write_text("ignored: not an image extension")
    return root


def _expected(images: Path) -> set[str]:
    return {p.relative_to(images).as_posix() for p in images.rglob("*") if p.is_file() and p.suffix != ".txt"}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    import torch
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("batch-model") / "resnet18-4.pt"
    torch.save(torchvision.models.resnet18(num_classes=4).eval().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def loaded(model_file):
    return load_model(model_file, arch="resnet18")


def _spec(model_file: Path) -> dict:
    return {"model": str(model_file), "arch": "resnet18"}


SETTINGS = BatchSettings(size=(32, 32), images_per_batch=16, workers=2, options=MethodOptions())


def _comparable(out: Path) -> dict[str, dict]:
    records = read_results(out / RESULTS_JSONL)
    assert len({r["image"] for r in records}) == len(records)
    return {r["image"]: {k: v for k, v in r.items() if k != "timings"} for r in records}


def _assert_same(got: dict[str, dict], want: dict[str, dict]) -> None:
    """Same images, statuses, outputs, targets and top classes; probabilities equal up to float noise
    (a different batch composition changes the order of float sums)."""
    assert set(got) == set(want)
    for name, record in got.items():
        other = want[name]
        for key in set(record) | set(other):
            if key == "predictions":
                assert [p["index"] for p in record[key]] == [p["index"] for p in other[key]], name
                assert np.allclose([p["prob"] for p in record[key]], [p["prob"] for p in other[key]], atol=1e-4), name
            elif key == "target":
                assert record[key]["index"] == other[key]["index"], name
                assert abs(record[key]["prob"] - other[key]["prob"]) < 1e-4, name
            else:
                assert record.get(key) == other.get(key), (name, key)


@pytest.fixture(scope="module")
def full_run(images, model_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("batch-full") / "out"
    result = CliRunner().invoke(
        main,
        [
            "batch",
            str(model_file),
            str(images),
            "--arch",
            "resnet18",
            "--size",
            "32",
            "--images-per-batch",
            "16",
            "--workers",
            "2",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
    )
    return result, out


def test_batch_records_failures_and_mirrors_folders(full_run, images):
    result, out = full_run
    assert result.exit_code == EXIT_SOME_FAILED, result.output
    records = _comparable(out)
    expected = _expected(images)
    assert len(expected) > 200 and set(records) == expected
    failed = {name: r["reason"] for name, r in records.items() if r["status"] == "failed"}
    assert set(failed) == set(BROKEN)
    for name, words in BROKEN.items():
        assert words.lower() in failed[name].lower()
    ok = [r for r in records.values() if r["status"] == "ok"]
    assert len(ok) == len(expected) - len(BROKEN)
    # Same file name in different folders: separate, mirrored output folders.
    names = {}
    for rel in expected - set(BROKEN):
        names.setdefault(Path(rel).name, []).append(rel)
    clashing = next(rels for rels in names.values() if len(rels) > 1)
    for rel in clashing:
        folder = out / "images" / rel
        assert np.load(folder / "heatmap-gradcam.npy").shape == (32, 32)
        overlay = Image.open(folder / "overlay-gradcam.jpg")  # batch's default: JPEG overlays
        assert overlay.format == "JPEG" and not (folder / "overlay-gradcam.png").exists()
        assert overlay.size == Image.open(images / rel).size  # at the image's resolution
        assert records[rel]["output"] == f"images/{rel}"
    report = json.loads((out / "report.json").read_text())
    assert report["totals"] == {"images": len(expected), "ok": len(ok), "failed": len(BROKEN)}
    assert report["run"]["complete"] is True
    assert sum(report["class_histogram"].values()) == len(ok)
    assert {f["image"] for f in report["failures"]} == set(BROKEN)
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert len(rows) == len(expected)
    assert not list(out.rglob("*.tmp"))


def test_gallery_escapes_hostile_names(full_run, images, gallery_images):
    _, out = full_run
    html = (out / "index.html").read_text()
    assert HOSTILE not in html and "<img src=x" not in html
    script = (out / "gallery-data.js").read_text()
    assert "<" not in script and ">" not in script  # nothing can close the script or open a tag
    shown = gallery_images(out)
    assert HOSTILE in shown and len(shown) == len(_expected(images)) - len(BROKEN)
    detail = (out / "images" / HOSTILE / "detail.html").read_text()
    assert "<img src=x" not in detail and "&lt;img src=x" in detail
    assert (out / "images" / HOSTILE / "thumb-gradcam.jpg").is_file()


def test_interrupted_run_resumes_to_the_same_results(full_run, images, loaded, model_file, tmp_path):
    out = tmp_path / "out"

    def stop(batches: int) -> None:
        if batches == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch(
            loaded,
            _spec(model_file),
            [str(images)],
            out,
            SETTINGS,
            quiet=True,
            device="cpu",
            refresh_every=2,
            on_batch=stop,
        )
    partial = read_results(out / RESULTS_JSONL)
    assert 0 < len(partial) < len(_expected(images))
    report = json.loads((out / "report.json").read_text())  # a valid partial report
    assert report["run"]["complete"] is False and report["totals"]["images"] == len(partial)
    assert "partial" in (out / "index.html").read_text()
    # A kill in the middle of a line leaves it truncated: it must be ignored.
    with open(out / RESULTS_JSONL, "a") as handle:
        handle.write('{"image": "b/img999.png", "status": "o')
    resumed = run_batch(loaded, _spec(model_file), [str(images)], out, SETTINGS, quiet=True, device="cpu", resume=True)
    assert resumed.skipped >= len([r for r in partial if r["status"] == "ok"]) > 0
    assert resumed.exit_code == EXIT_SOME_FAILED
    _assert_same(_comparable(out), _comparable(full_run[1]))


NET_PY = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3))) * SCALE


SCALE = 1.0
"""


def test_resume_redoes_the_images_when_the_class_file_or_the_plan_changed(images, tmp_path):
    """--arch path/net.py:Net: the class file is part of the fingerprint (an edited forward gives
    other maps), as is what the plan decided (here: the resize kernel a new version chose)."""
    import dataclasses

    from attnexplain.explanation import plan_explanation
    from attnexplain.records import fingerprint

    class_file = tmp_path / "net.py"
    class_file.write_text(NET_PY)
    weights = _saved(class_file, tmp_path / "net.pt")
    loaded = load_model(weights, arch=f"{class_file}:Net")
    spec = {"model": str(weights), "arch": f"{class_file}:Net"}
    inputs, out = [str(images / "a" / "deep")], tmp_path / "out"
    settings = BatchSettings(size=(32, 32), images_per_batch=8, workers=1, options=MethodOptions())
    first = run_batch(loaded, spec, inputs, out, settings, quiet=True)
    again = run_batch(loaded, spec, inputs, out, settings, quiet=True, resume=True)
    assert first.ok > 0 and again.skipped == first.ok  # nothing changed: every image kept
    class_file.write_text(NET_PY.replace("SCALE = 1.0", "SCALE = 2.0"))
    edited = run_batch(loaded, spec, inputs, out, settings, quiet=True, resume=True)
    assert edited.skipped == 0 and edited.ok == first.ok  # the edited class: every image redone

    plan = plan_explanation(loaded, "gradcam", size=(32, 32))
    float_resize = dataclasses.replace(plan, preprocessing=dataclasses.replace(plan.preprocessing, resize_v2=False))
    assert fingerprint(spec, settings, plan) == fingerprint(spec, settings, plan)
    assert fingerprint(spec, settings, plan) != fingerprint(spec, settings, float_resize)


def _saved(class_file: Path, weights: Path) -> Path:
    """``Net``'s random weights as a state_dict file, as its author would save them."""
    import importlib.util

    import torch

    module_spec = importlib.util.spec_from_file_location("net_for_weights", class_file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    torch.manual_seed(0)
    torch.save(module.Net().state_dict(), weights)
    return weights


# A whole subprocess killed mid-run (~4 s); kill and resume stay in the fast suite through
# test_hostile_batch's SIGKILL test.
@pytest.mark.heavy
def test_killed_subprocess_then_resume(images, model_file, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, ATTNEXPLAIN_OFFLINE="1")
    command = [
        sys.executable,
        "-m",
        "attnexplain",
        "batch",
        str(model_file),
        str(images / "a"),
        "--arch",
        "resnet18",
        "--size",
        "32",
        "--images-per-batch",
        "4",
        "--workers",
        "1",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        str(out),
    ]
    process = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + 60
    results = out / RESULTS_JSONL
    while time.monotonic() < deadline and process.poll() is None:
        if results.exists() and results.read_text().count("\n") >= 8:
            break
        time.sleep(0.02)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL  # really interrupted midway
    before = len(read_results(results))
    assert 8 <= before < len([rel for rel in _expected(images) if rel.startswith("a/")])
    result = CliRunner().invoke(main, command[3:] + ["--resume"])
    assert result.exit_code == EXIT_SOME_FAILED, result.output
    records = _comparable(out)
    assert set(records) == {rel[2:] for rel in _expected(images) if rel.startswith("a/")}
    assert json.loads((out / "report.json").read_text())["run"]["complete"] is True


def test_shards_merge_to_the_single_run(full_run, images, loaded, model_file, tmp_path, gallery_images):
    outs = []
    for index in (1, 2):
        out = tmp_path / f"shard{index}"
        run_batch(loaded, _spec(model_file), [str(images)], out, SETTINGS, quiet=True, device="cpu", shard=(index, 2))
        outs.append(out)
    first, second = _comparable(outs[0]), _comparable(outs[1])
    assert first and second and not set(first) & set(second)
    merged = tmp_path / "merged"
    result = CliRunner().invoke(main, ["merge", *map(str, outs), "--out", str(merged)])
    assert result.exit_code == EXIT_SOME_FAILED, result.output
    _assert_same(_comparable(merged), _comparable(full_run[1]))
    report = json.loads((merged / "report.json").read_text())
    assert report["totals"]["images"] == len(_expected(images))
    assert (merged / "images/a/img000.png/overlay-gradcam.jpg").is_file()
    assert len(gallery_images(merged)) == len(_expected(images)) - len(BROKEN)


def test_shards_count_from_one_and_split_the_inputs(images):
    assert parse_shard("1/2") == (1, 2) and parse_shard("2/2") == (2, 2) and parse_shard("1/1") == (1, 1)
    with pytest.raises(AttnExplainError, match=r"shards count from 1 \(1/2 to 2/2\)"):
        parse_shard("0/2")
    names = [item.relative for item in collect_inputs([str(images)]).images]
    first = {name for name in names if in_shard(name, (1, 2))}
    second = {name for name in names if in_shard(name, (2, 2))}
    assert first and second and not first & second and first | second == set(names)


def test_shard_zero_is_refused_saying_shards_count_from_one(model_file, images, tmp_path):
    result = CliRunner().invoke(
        main, ["batch", str(model_file), str(images), "--shard", "0/3", "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 2 and "shards count from 1 (1/3 to 3/3)" in result.output


def test_list_file_and_glob_inputs(images, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(
        f"{images / 'a' / 'img000.png'}\n# a comment\n{images / 'b' / 'trunc.png'}\n{images / 'missing.png'}\n"
    )
    found = collect_inputs([f"@{listing}", str(images / "b" / "deep" / "*.jpg")])
    names = [item.relative for item in found.images]
    assert "a/img000.png" in names and "b/trunc.png" in names
    assert any(name.startswith("b/deep/") for name in names)
    assert all(not name.startswith("a/") or name == "a/img000.png" for name in names)
    assert [spec for spec, _ in found.missing] == [str(images / "missing.png")]


def test_list_and_glob_from_the_cli(images, model_file, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{images / 'a' / 'img000.png'}\n{images / 'a' / 'img002.png'}\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        [
            "batch",
            str(model_file),
            f"@{listing}",
            str(images / "b" / "img00*.png"),
            "--arch",
            "resnet18",
            "--size",
            "32",
            "--device",
            "cpu",
            "--quiet",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    records = _comparable(out)
    assert {"a/img000.png", "a/img002.png"} <= set(records)
    assert all(r["status"] == "ok" for r in records.values())
    assert any(name.startswith("b/") for name in records)


def test_batch_help_documents_exit_codes():
    result = CliRunner().invoke(main, ["batch", "--help"])
    assert result.exit_code == 0 and "3 some images failed" in result.output


# --- the same per-method files as `attnexplain run` ------------------------------------------------

SAMPLE_IMAGES = Path(__file__).resolve().parents[1] / "samples" / "images"


def _method_files(folder: Path) -> set[str]:
    """The files one image's folder holds, without those only one of run / batch writes."""
    only_one = {"report.json", "report.html", "detail.html", "photo.jpg"}
    return {p.name for p in folder.iterdir() if p.name not in only_one and not p.name.startswith("thumb-")}


def _run_and_batch(tmp_path: Path, model_args: list[str], image: str) -> tuple[Path, Path, dict]:
    """`run` on one sample image and `batch` on all of them, same model and options (PNG overlays, as
    `run` writes): the run's folder, the batch's folder for that image and its record."""
    run = CliRunner().invoke(main, ["run", *model_args, str(SAMPLE_IMAGES / image), "--out", str(tmp_path / "run")])
    assert run.exit_code == 0, run.output
    batch = CliRunner().invoke(
        main,
        [
            "batch",
            *model_args,
            str(SAMPLE_IMAGES),
            "--out",
            str(tmp_path / "batch"),
            "--quiet",
            "--overlay-format",
            "png",
        ],
    )
    assert batch.exit_code == 0, batch.output
    records = {r["image"]: r for r in read_results(tmp_path / "batch" / RESULTS_JSONL)}
    assert len(records) == len(list(SAMPLE_IMAGES.iterdir()))
    return tmp_path / "run" / Path(image).stem, tmp_path / "batch" / "images" / image, records[image]


def test_batch_writes_the_attention_grid_per_image_like_run(tmp_path, sample_vit_file):
    run_folder, folder, record = _run_and_batch(
        tmp_path, [str(sample_vit_file), "--method", "attention,rollout", "--device", "cpu"], "cat-on-grass.png"
    )
    assert _method_files(folder) == _method_files(run_folder)
    assert {"attention-grid-attention.png", "attention-grid-attention.npy"} <= _method_files(folder)
    grid = np.load(folder / "attention-grid-attention.npy")
    assert grid.ndim == 4 and np.allclose(grid, np.load(run_folder / "attention-grid-attention.npy"), atol=1e-5)
    assert record["files"]["attention"]["attention_grid"] == "attention-grid-attention.png"
    assert record["files"]["attention"]["attention_grid_npy"] == "attention-grid-attention.npy"
    assert record["maps"]["attention"]["grid_shape"] == list(grid.shape[:2])
    assert "attention_grid" not in record["files"]["rollout"]
    detail = (folder / "detail.html").read_text()
    assert "Learned attention (attention)" in detail and 'src="attention-grid-attention.png"' in detail
    for image in SAMPLE_IMAGES.iterdir():  # every image, not only the one compared
        assert (tmp_path / "batch" / "images" / image.name / "attention-grid-attention.png").is_file()


def test_batch_writes_the_gate_maps_per_image_like_run(tmp_path, gated_model):
    import torch

    path = tmp_path / "mobilenet.pt"
    torch.save(gated_model.state_dict(), path)
    run_folder, folder, record = _run_and_batch(
        tmp_path,
        [str(path), "--arch", "mobilenet_v3_small", "--size", "64", "--method", "gates,gradcam", "--device", "cpu"],
        "coffee-on-gravel.png",
    )
    assert _method_files(folder) == _method_files(run_folder)
    assert "gate-maps-gates.png" in _method_files(folder)
    assert record["files"]["gates"]["gate_maps"] == "gate-maps-gates.png"
    report = json.loads((run_folder / "report.json").read_text())
    assert [b["block"] for b in record["maps"]["gates"]["gates"]] == [
        b["block"] for b in report["maps"]["gates"]["gates"]
    ]
    assert record["maps"]["gates"]["layers"] == report["maps"]["gates"]["layers"]
    detail = (folder / "detail.html").read_text()
    assert "Learned channel gates (gates)" in detail and 'src="gate-maps-gates.png"' in detail
    assert detail.count("Learned channel gates") == 1  # for gates only, not for gradcam


# --- progress ----------------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_shows_rate_and_eta(images, loaded, model_file, tmp_path, monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setenv("COLUMNS", "140")
    summary = run_batch(
        loaded, _spec(model_file), [str(images / "b" / "deep")], tmp_path / "out", SETTINGS, device="cpu"
    )
    shown = terminal.getvalue()
    assert summary.total > 10 and summary.exit_code == EXIT_SOME_FAILED  # text.jpg is broken
    assert "\x1b[" in shown  # drawn by Rich, not the plain lines
    assert "img/s" in shown and "ETA" in shown
    assert f"{summary.total}/{summary.total}" in shown
