"""attnexplain batch --engine ray: the same outputs as a local run, resume across engines, a killed
actor, the --out lock, progress, and a clear message without Ray."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import read_gallery_data
from PIL import Image
from test_batch import _assert_same, _comparable, model_file  # noqa: F401 - the fixture

from attnexplain.batch import run_batch
from attnexplain.batch_stages import BatchSettings
from attnexplain.cli import main
from attnexplain.explanation import MethodOptions
from attnexplain.formats import RESULTS_JSONL

REPO = Path(__file__).resolve().parents[1]
BAD = "b/not-a-picture.png"
HOSTILE = "a/<img src=x onerror=alert(1)>.png"
SETTINGS = BatchSettings(size=(32, 32), images_per_batch=4, workers=1, options=MethodOptions())


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance for the module: its start-up costs seconds on two cores."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """24 small images of several sizes in two folders, one file that is not a picture and one with
    a hostile name."""
    root = tmp_path_factory.mktemp("ray-in") / "photos"
    rng = np.random.default_rng(3)
    for index in range(22):
        folder = root / ("a" if index % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (24 + index % 5, 30 + index % 3, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{index:02d}{'.png' if index % 3 else '.jpg'}")
    Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(root / HOSTILE)
    (root / BAD).write_text("not a picture")
    return root


def _cli_batch(model_file: Path, images: Path, out: Path, *extra: str):
    return CliRunner().invoke(
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
            "4",
            "--device",
            "cpu",
            "--out",
            str(out),
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def local_run(images, model_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ray-local") / "out"
    result = _cli_batch(model_file, images, out, "--quiet")
    assert result.exit_code == 3, result.output  # the bad image
    return out


@pytest.fixture(scope="module")
def ray_run(ray_instance, images, model_file, tmp_path_factory):
    """A Ray run through the CLI (it joins the module's Ray instance), its progress on stderr."""
    out = tmp_path_factory.mktemp("ray-run") / "out"
    result = _cli_batch(model_file, images, out, "--engine", "ray", "--workers", "1")
    return result, out


def _npy_files(out: Path) -> dict[str, np.ndarray]:
    return {path.relative_to(out).as_posix(): np.load(path) for path in out.rglob("*.npy")}


def _files(out: Path) -> set[str]:
    return {path.relative_to(out).as_posix() for path in (out / "images").rglob("*") if path.is_file()}


@pytest.mark.heavy  # a local Ray instance takes ~20 s to start: CI runs these with -m heavy
def test_ray_run_writes_the_folders_files_and_records_of_a_local_run(ray_run, local_run):
    result, out = ray_run
    assert result.exit_code == 3, result.output
    assert _files(out) == _files(local_run)
    ray_maps, local_maps = _npy_files(out), _npy_files(local_run)
    assert ray_maps.keys() == local_maps.keys() and len(ray_maps) >= 23
    for name, heatmap in ray_maps.items():
        np.testing.assert_allclose(heatmap, local_maps[name], atol=1e-4, err_msg=name)
    _assert_same(_comparable(out), _comparable(local_run))


@pytest.mark.heavy  # a local Ray instance takes ~20 s to start: CI runs these with -m heavy
def test_ray_run_writes_the_reports_of_a_local_run(ray_run, local_run):
    _, out = ray_run
    ray_report = json.loads((out / "report.json").read_text())
    local_report = json.loads((local_run / "report.json").read_text())
    assert ray_report["totals"] == local_report["totals"]
    assert ray_report["run"]["complete"] is True

    def rows(folder: Path) -> dict[str, dict]:
        with open(folder / "summary.csv", newline="") as handle:
            return {
                row["image"]: {k: v for k, v in row.items() if not k.endswith("_s") and "prob" not in k}
                for row in csv.DictReader(handle)
            }

    assert rows(out) == rows(local_run)
    assert "<img src=x" not in (out / "index.html").read_text()
    shown = read_gallery_data(out)["images"]
    assert sorted(row[0] for row in shown) == sorted(row[0] for row in read_gallery_data(local_run)["images"])
    assert any("<img src=x onerror=alert(1)>" in row[0] for row in shown)


@pytest.mark.heavy  # a local Ray instance takes ~20 s to start: CI runs these with -m heavy
def test_bad_image_is_a_failure_of_that_image_on_ray(ray_run, local_run):
    _, out = ray_run
    records = _comparable(out)
    failed = {name: record["reason"] for name, record in records.items() if record["status"] == "failed"}
    assert set(failed) == {BAD}
    assert failed[BAD] == _comparable(local_run)[BAD]["reason"]


@pytest.mark.heavy  # a local Ray instance takes ~20 s to start: CI runs these with -m heavy
def test_driver_shows_progress_from_the_workers_results(ray_run):
    result, _ = ray_run
    assert "[attnexplain] 24/24 images" in result.stderr
    assert "23 explained (0 from an earlier run), 1 failed" in result.stderr


@pytest.mark.heavy  # a local Ray instance takes ~20 s to start: CI runs these with -m heavy
def test_local_run_resumes_a_ray_run(ray_run, local_run, images, model_file, tmp_path):
    from attnexplain.loading import load_model

    out = tmp_path / "out"
    shutil.copytree(ray_run[1], out)
    lines = (out / RESULTS_JSONL).read_text().splitlines(keepends=True)
    (out / RESULTS_JSONL).write_text("".join(lines[: len(lines) // 2]))  # killed half-way
    kept = sum(json.loads(line)["status"] == "ok" for line in lines[: len(lines) // 2])
    result = run_batch(
        load_model(model_file, arch="resnet18"),
        {"model": str(model_file), "arch": "resnet18"},
        [str(images)],
        out,
        SETTINGS,
        resume=True,
        quiet=True,
        device="cpu",
    )
    assert kept and result.skipped == kept and result.ok + result.failed == 24
    _assert_same(_comparable(out), _comparable(local_run))


@pytest.mark.heavy
def test_ray_run_resumes_a_local_run(ray_instance, local_run, images, model_file, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(local_run, out)
    lines = (out / RESULTS_JSONL).read_text().splitlines(keepends=True)
    (out / RESULTS_JSONL).write_text("".join(lines[: len(lines) // 2]))
    kept = sum(json.loads(line)["status"] == "ok" for line in lines[: len(lines) // 2])
    result = _cli_batch(model_file, images, out, "--engine", "ray", "--resume")  # 1 actor by default
    assert result.exit_code == 3, result.output
    assert f"({kept} from an earlier run)" in result.stderr
    _assert_same(_comparable(out), _comparable(local_run))


def _actor_pids() -> set[int]:
    """Processes of our explaining actors: Ray names each after its class in its command line."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"_ExplainWorker" in command:
                found.add(int(entry.name))
    return found


@pytest.mark.heavy
def test_killed_actor_has_its_images_retried_none_lost_or_twice(ray_instance, images, model_file, local_run, tmp_path):
    from attnexplain.loading import load_model
    from attnexplain.ray_engine import RayCluster

    killed: list[int] = []
    out = tmp_path / "out"

    def kill_the_actor(batches: int) -> None:
        if batches == 1:
            # Most images are still to come: the actor dies with batches queued on it.
            assert len((out / RESULTS_JSONL).read_text().splitlines()) < 12
            pids = _actor_pids()
            assert pids, "no actor process found"
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            killed.extend(pids)

    settings = BatchSettings(size=(32, 32), images_per_batch=1, workers=1, options=MethodOptions())
    result = run_batch(
        load_model(model_file, arch="resnet18"),
        {"model": str(model_file), "arch": "resnet18"},
        [str(images)],
        out,
        settings,
        quiet=True,
        on_batch=kill_the_actor,
        cluster=RayCluster(workers=1),
    )
    assert killed and not _actor_pids() & set(killed)
    lines = [json.loads(line) for line in (out / RESULTS_JSONL).read_text().splitlines()]
    assert sorted(line["image"] for line in lines) == sorted(_comparable(local_run))  # each once
    assert result.ok == 23 and result.failed == 1
    _assert_same(_comparable(out), _comparable(local_run))


@pytest.mark.heavy  # a local Ray instance takes ~20 s to start: CI runs these with -m heavy
def test_out_lock_holds_for_the_ray_driver(ray_instance, images, model_file, tmp_path):
    from attnexplain._lock import OutputInUse, output_lock
    from attnexplain.loading import load_model
    from attnexplain.ray_engine import RayCluster

    out = tmp_path / "out"
    out.mkdir()
    with output_lock(out), pytest.raises(OutputInUse):
        run_batch(
            load_model(model_file, arch="resnet18"),
            {"model": str(model_file), "arch": "resnet18"},
            [str(images)],
            out,
            SETTINGS,
            quiet=True,
            cluster=RayCluster(workers=1),
        )
    assert not (out / RESULTS_JSONL).exists()


@pytest.mark.heavy  # a local Ray instance takes ~20 s to start: CI runs these with -m heavy
def test_too_many_workers_for_the_cluster_is_refused_before_writing(ray_instance, images, model_file, tmp_path):
    out = tmp_path / "out"
    result = _cli_batch(model_file, images, out, "--engine", "ray", "--workers", "2")
    assert result.exit_code == 1
    assert "--workers 2" in result.stderr and "use --workers 1 or fewer" in result.stderr
    assert not out.exists()


# --- without the engine ------------------------------------------------------------------------


def _python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, cwd=REPO)


def test_engine_ray_without_ray_says_how_to_install_it(tmp_path):
    code = (
        "import sys; sys.modules['ray'] = None  # as if Ray were not installed\n"
        "from attnexplain.cli import main\n"
        f"main(['batch', 'model.pt', {str(tmp_path)!r}, '--engine', 'ray', '--out', "
        f"{str(tmp_path / 'out')!r}])"
    )
    done = _python(code)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        "Error: --engine ray needs Ray, an optional extra: pip install 'attnexplain[ray]'."
    ]
    assert not (tmp_path / "out").exists()


def test_import_and_help_never_import_ray():
    code = (
        "import sys, contextlib, io\n"
        "import attnexplain, attnexplain.cli\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    attnexplain.cli.main(['batch', '--help'])\n"
        "print(sorted(name for name in sys.modules if name == 'ray' or name.startswith('ray.')))"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_ray_options_without_the_ray_engine_are_a_usage_error(tmp_path):
    result = CliRunner().invoke(
        main, ["batch", "model.pt", str(tmp_path), "--address", "auto", "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 2
    assert "apply only with --engine ray" in result.output


@pytest.mark.heavy
def test_actors_that_cannot_load_the_model_stop_the_run_with_one_error(ray_instance, images, model_file, tmp_path):
    """The workers load the model from its spec: one they cannot find (not on their filesystem)
    ends the run with the reason, instead of Ray restarting the actors for ever."""
    from attnexplain.errors import AttnExplainError
    from attnexplain.loading import load_model
    from attnexplain.ray_engine import RayCluster

    elsewhere = str(tmp_path / "only-on-the-driver.pt")
    with pytest.raises(AttnExplainError, match=r"The Ray run stopped: .*Model file not found: .*only-on-the-driver"):
        run_batch(
            load_model(model_file, arch="resnet18"),
            {"model": elsewhere, "arch": "resnet18"},
            [str(images)],
            tmp_path / "out",
            SETTINGS,
            quiet=True,
            cluster=RayCluster(workers=1),
        )
    assert json.loads((tmp_path / "out" / "report.json").read_text())["run"]["complete"] is False
