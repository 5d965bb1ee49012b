"""`attnexplain evaluate` as a run: progress on stderr, a line per image in evaluation.jsonl, a partial
evaluation on SIGTERM, --resume that reuses what an earlier run measured (and only what still holds)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from composites import TEST_SEED, make_composites  # samples/, on sys.path via conftest
from PIL import Image

import attnexplain.evaluation as evaluation_module
from attnexplain import progress
from attnexplain.cli import main
from attnexplain.evaluation import EvaluationSettings, leaves_out
from attnexplain.evaluation_log import EVALUATION_JSONL
from attnexplain.metrics import MetricSettings

REPO = Path(__file__).resolve().parents[1]
#: Small and quick, but every stage: maps, perturbations, localisation and the randomization check.
OPTIONS = [
    "--method",
    "gradcam,saliency",
    "--metrics",
    "deletion,insertion,pointing,randomization",
    "--steps",
    "4",
    "--size",
    "64",
    "--images-per-batch",
    "1",
    "--randomization-images",
    "2",
]
#: Where the lines and masks are what matters: without the randomization check (it costs the most).
NO_RANDOMIZATION = [*OPTIONS, "--method", "gradcam", "--metrics", "deletion,pointing"]


@pytest.fixture
def composites(tmp_path):
    """Four held-out composites and their masks, in folders of the test's own."""
    pixels, _, masks = make_composites(4, TEST_SEED)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i, (image, mask) in enumerate(zip(pixels, masks)):
        Image.fromarray(image).save(tmp_path / "images" / f"c{i}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "masks" / f"c{i}.png")
    return tmp_path


def _args(model, composites, out, *more, options=OPTIONS):
    return [
        "evaluate",
        str(model),
        str(composites / "images"),
        "--masks",
        str(composites / "masks"),
        *options,
        "--out",
        str(out),
        *map(str, more),
    ]


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / EVALUATION_JSONL).read_text().splitlines()]


@pytest.fixture
def computed_images(monkeypatch):
    """The images whose maps the run computes (each chunk's count), counted in this process."""
    counts: list[int] = []
    original = evaluation_module._compute

    def counting(loaded, batch, *args, **kwargs):
        counts.append(len(batch))
        return original(loaded, batch, *args, **kwargs)

    monkeypatch.setattr(evaluation_module, "_compute", counting)
    return counts


# --- progress, a line per image, the randomization check on the first images ------------------------


def test_progress_by_image_and_stage_on_stderr_and_the_randomization_check_on_the_first_images(
    sample_resnet_file, composites, tmp_path, monkeypatch
):
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)  # a line at every step, not every 5 s
    out = tmp_path / "out"
    result = CliRunner().invoke(main, _args(sample_resnet_file, composites, out))
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("[attnexplain]")]
    assert lines[-1].startswith("[attnexplain] 4/4 images, ") and "img/s" in lines[-1]
    for stage in ("maps of image 1", "perturbations of image 2", "randomization of image 2"):
        assert any(line.endswith(stage) for line in lines), (stage, lines)
    assert not any("randomization of image 3" in line for line in lines)  # --randomization-images 2
    assert "[attnexplain]" not in result.stdout
    evaluation = json.loads((out / "evaluation.json").read_text())
    shown = {record["image"]: record for record in evaluation["per_image"]}
    randomized = sorted(name for name, record in shown.items() if "randomization" in record["metrics"]["gradcam"])
    assert randomized == ["c0.png", "c1.png"]
    assert evaluation["methods"]["gradcam"]["randomization"]["images"] == 2
    assert evaluation["settings"]["randomization_images"] == 2
    assert evaluation["complete"] is True and evaluation["reused"] == 0


def test_each_image_has_its_line_in_evaluation_jsonl_and_quiet_prints_no_progress(
    sample_resnet_file, composites, tmp_path, monkeypatch
):
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, _args(sample_resnet_file, composites, out, "--quiet", options=NO_RANDOMIZATION))
    assert result.exit_code == 0, result.output
    assert "[attnexplain]" not in result.stderr
    lines = {line["image"]: line for line in _lines(out)}
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert set(lines) == {f"c{i}.png" for i in range(4)}
    shown = {record["image"]: record for record in evaluation["per_image"]}
    for name, line in lines.items():
        assert line["status"] == "ok" and line["metrics"] == shown[name]["metrics"]
        # what --resume compares: the image's and its mask's bytes
        assert line["key"].split(":")[1] == hashlib.sha256((composites / "images" / name).read_bytes()).hexdigest()
        assert line["mask_sha256"] == hashlib.sha256((composites / "masks" / name).read_bytes()).hexdigest()
        assert "curves" not in shown[name] and "key" not in shown[name]
        assert len(line["curves"]["deletion"]["gradcam"]) == len(line["curves"]["fractions"]) == 5


# --- SIGTERM, then --resume ----------------------------------------------------------------------------

GATED = textwrap.dedent('''
    """`attnexplain evaluate` that, before the maps of its second image, touches REACHED and waits
    for the file GATE (the first image's line is written by then)."""
    import os, sys, time
    from pathlib import Path

    import attnexplain.evaluation as evaluation
    from attnexplain.cli import main

    original, calls = evaluation._compute, []

    def gated(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            Path(os.environ["REACHED"]).touch()
            deadline = time.monotonic() + 60
            while not Path(os.environ["GATE"]).exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        return original(*args, **kwargs)

    evaluation._compute = gated
    main(sys.argv[1:], prog_name="attnexplain")
''')


@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGHUP, marks=pytest.mark.heavy)])
def test_sigterm_leaves_a_partial_evaluation_and_resume_completes_it_without_recomputing(
    sample_resnet_file, composites, tmp_path, computed_images, signum
):
    out = tmp_path / "out"
    script = tmp_path / "gated_evaluate.py"
    script.write_text(GATED)
    reached = tmp_path / "reached"
    env = dict(
        os.environ,
        ATTNEXPLAIN_OFFLINE="1",
        REACHED=str(reached),
        GATE=str(tmp_path / "gate"),
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )
    process = subprocess.Popen(
        [sys.executable, str(script), *_args(sample_resnet_file, composites, out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not reached.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert reached.exists(), process.communicate(timeout=30)
        assert [line["image"] for line in _lines(out)] == ["c0.png"]  # written as soon as it was measured
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    assert process.returncode == 128 + signum, stderr
    assert f"Stopped by {signal.Signals(signum).name}; the partial evaluation is in" in stderr
    assert "Traceback" not in stderr
    partial = json.loads((out / "evaluation.json").read_text())
    assert partial["complete"] is False
    assert partial["stopped"] == {"by": signal.Signals(signum).name, "images_measured": 1, "images_given": 4}
    assert [record["image"] for record in partial["per_image"]] == ["c0.png"]
    assert partial["methods"]["gradcam"]["deletion"]["images"] == 1
    page = (out / "evaluation.html").read_text()
    assert "Partial" in page and "--resume" in page
    assert len((out / "evaluation.csv").read_text().splitlines()) == 1 + 3  # c0: two methods + random

    resumed = CliRunner().invoke(main, _args(sample_resnet_file, composites, out, "--resume", "--quiet"))
    assert resumed.exit_code == 0, resumed.output
    assert sum(computed_images) == 3  # c0 was reused, not measured again
    complete = json.loads((out / "evaluation.json").read_text())
    assert complete["complete"] is True and complete["reused"] == 1 and "stopped" not in complete
    assert [record["image"] for record in complete["per_image"]] == [f"c{i}.png" for i in range(4)]
    assert complete["per_image"][0] == partial["per_image"][0]
    assert complete["methods"]["gradcam"]["randomization"]["images"] == 2  # c0 (reused) and c1

    fresh = CliRunner().invoke(main, _args(sample_resnet_file, composites, tmp_path / "fresh", "--quiet"))
    assert fresh.exit_code == 0, fresh.output
    whole = json.loads((tmp_path / "fresh" / "evaluation.json").read_text())
    # The resumed run gives the numbers one whole run gives (curves, per-image values, summaries).
    for key in ("per_image", "methods", "curves", "ranking", "verdict"):
        assert complete[key] == whole[key], key


def test_ctrl_c_in_the_api_writes_the_partial_evaluation(sample_resnet_file, composites, tmp_path, monkeypatch):
    from attnexplain.loading import load_model

    original, calls = evaluation_module._compute, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluation_module, "_compute", interrupted)
    settings = EvaluationSettings(
        method="gradcam", metrics=["deletion"], size=64, images_per_batch=1, metric_settings=MetricSettings(steps=4)
    )
    with pytest.raises(KeyboardInterrupt):
        evaluation_module.evaluate(
            load_model(sample_resnet_file), [str(composites / "images")], settings, out=tmp_path / "out"
        )
    partial = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert partial["complete"] is False and partial["stopped"]["by"] == "Ctrl-C"
    assert [record["image"] for record in partial["per_image"]] == ["c0.png", "c1.png"]


# --- --resume reuses only what still holds ---------------------------------------------------------------


def test_resume_measures_again_what_changed_or_was_tampered_with(
    sample_resnet_file, composites, tmp_path, computed_images
):
    out = tmp_path / "out"
    first = CliRunner().invoke(main, _args(sample_resnet_file, composites, out, "--quiet", options=NO_RANDOMIZATION))
    assert first.exit_code == 0, first.output
    lines = {line["image"]: line for line in _lines(out)}
    # c0 stands, but its path and label are this run's; c1: a value this run does not measure; c2: a
    # curve longer than its fractions; c3: its mask changed.
    lines["c0.png"].update(
        path="/etc/passwd", target={"index": lines["c0.png"]["target"]["index"], "label": "<script>"}
    )
    lines["c1.png"]["metrics"]["gradcam"]["bogus"] = 0.5
    lines["c2.png"]["curves"]["deletion"]["gradcam"].append(0.5)
    (out / EVALUATION_JSONL).write_text(
        "".join(json.dumps(line) + "\n" for line in lines.values()) + '{"image": "c0.png", "status": "ok", "garbled\n'
    )
    Image.fromarray(np.zeros((128, 128), np.uint8)).save(composites / "masks" / "c3.png")
    computed_images.clear()
    resumed = CliRunner().invoke(
        main, _args(sample_resnet_file, composites, out, "--resume", "--quiet", options=NO_RANDOMIZATION)
    )
    assert resumed.exit_code == 0, resumed.output
    assert sum(computed_images) == 3  # only c0 stands
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["reused"] == 1
    records = {record["image"]: record for record in evaluation["per_image"]}
    assert records["c0.png"]["path"] == str(composites / "images" / "c0.png")
    assert records["c0.png"]["target"]["label"] in ("astronaut", "cat", "coffee", "rocket")
    assert "bogus" not in records["c1.png"]["metrics"]["gradcam"]
    assert "pointing" not in records["c3.png"]["metrics"]["gradcam"]  # the empty mask, measured anew

    # Other settings (more steps): nothing of the earlier run stands.
    computed_images.clear()
    again = CliRunner().invoke(
        main,
        _args(sample_resnet_file, composites, out, "--resume", "--quiet", "--steps", "5", options=NO_RANDOMIZATION),
    )
    assert again.exit_code == 0, again.output
    assert sum(computed_images) == 4
    assert json.loads((out / "evaluation.json").read_text())["reused"] == 0


def test_a_changed_image_is_measured_once_and_a_resumed_run_judges_as_a_whole_run(
    sample_resnet_file, composites, tmp_path, computed_images
):
    """An image whose bytes changed is measured again and its old line dropped (never counted twice),
    and a resumed run whose reused images are not the first ones still gives a whole run's verdict:
    the records are in input order whatever was measured when (the bootstrap resamples by position)."""
    out, whole = tmp_path / "out", tmp_path / "whole"
    first = CliRunner().invoke(main, _args(sample_resnet_file, composites, out, "--quiet", options=OPTIONS))
    assert first.exit_code == 0, first.output
    changed = composites / "images" / "c0.png"
    pixels = np.array(Image.open(changed))
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(changed)
    computed_images.clear()
    resumed = CliRunner().invoke(
        main, _args(sample_resnet_file, composites, out, "--resume", "--quiet", options=OPTIONS)
    )
    assert resumed.exit_code == 0, resumed.output
    assert sum(computed_images) == 1
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert [record["image"] for record in evaluation["per_image"]] == ["c0.png", "c1.png", "c2.png", "c3.png"]
    assert evaluation["images"]["total"] == 4 and evaluation["reused"] == 3
    assert [line["image"] for line in _lines(out)].count("c0.png") == 1
    again = CliRunner().invoke(main, _args(sample_resnet_file, composites, whole, "--quiet", options=OPTIONS))
    assert again.exit_code == 0, again.output
    expected = json.loads((whole / "evaluation.json").read_text())
    for key in ("methods", "ranking", "pairwise", "against_random", "uninformative", "verdict", "randomization"):
        assert evaluation[key] == expected[key], key


def test_resume_without_an_output_folder_is_refused_in_one_line(sample_resnet_file, composites):
    from attnexplain.errors import AttnExplainError
    from attnexplain.loading import load_model

    with pytest.raises(AttnExplainError, match="Resuming needs the output folder"):
        evaluation_module.evaluate(load_model(sample_resnet_file), [str(composites / "images")], resume=True)


# --- the defaults fit a CPU, and say what they leave out ---------------------------------------------------


def test_the_default_leaves_out_road_and_says_how_to_ask_for_it(sample_resnet_file, composites, tmp_path):
    from attnexplain.evaluation import chosen_metrics

    assert "road" not in chosen_metrics(None, has_masks=True)
    assert "road" in chosen_metrics("all", has_masks=True)
    assert "pointing" not in chosen_metrics("all", has_masks=False)
    said = " ".join(leaves_out(EvaluationSettings()))
    for advice in ("--method all", "--metrics all", "--randomization-images", "--steps 100"):
        assert advice in said
    assert leaves_out(EvaluationSettings(method="all", metrics="all", metric_settings=MetricSettings(steps=100)))[
        0
    ].startswith("the randomization check beyond")
    help_text = CliRunner().invoke(main, ["evaluate", "--help"]).output
    assert "ROAD (--metrics all)" in help_text and "--resume" in help_text


def test_the_cli_defaults_are_the_metric_settings_defaults():
    command = main.commands["evaluate"]
    defaults = {option.name: option.default for option in command.params}
    assert defaults["steps"] == MetricSettings.steps
    assert defaults["randomization_images"] == MetricSettings.randomization_images


def test_the_fingerprint_follows_the_boxes_and_settings_and_a_fifo_mask_is_never_opened(tmp_path):
    from attnexplain.evaluation_log import mask_digest, run_fingerprint

    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"a.png": [[0, 0, 4, 4]]}))
    spec, settings = {"model": "torchvision:resnet18"}, EvaluationSettings()
    first = run_fingerprint(spec, settings, None, ["deletion", "pointing"], boxes)
    assert run_fingerprint(spec, settings, None, ["deletion", "pointing"], boxes) == first
    assert run_fingerprint(spec, settings, None, ["deletion"], boxes) != first
    assert (
        run_fingerprint(
            spec, EvaluationSettings(metric_settings=MetricSettings(steps=11)), None, ["deletion", "pointing"], boxes
        )
        != first
    )
    # how many copies go through the model at once does not change a number
    assert (
        run_fingerprint(
            spec,
            EvaluationSettings(metric_settings=MetricSettings(batch_size=7)),
            None,
            ["deletion", "pointing"],
            boxes,
        )
        == first
    )
    boxes.write_text(json.dumps({"a.png": [[0, 0, 5, 4]]}))
    assert run_fingerprint(spec, settings, None, ["deletion", "pointing"], boxes) != first

    masks = tmp_path / "masks"
    masks.mkdir()
    os.mkfifo(masks / "a.png")  # reading it would block the run forever
    assert mask_digest(masks, "a.png") is None and mask_digest(masks, "missing.png") is None
    (masks / "b.png").write_bytes(b"mask")
    assert mask_digest(masks, "b.jpg") == hashlib.sha256(b"mask").hexdigest()


def test_an_earlier_line_stands_only_with_this_runs_key_images_methods_and_finite_numbers():
    from attnexplain.evaluation_log import line_problem
    from attnexplain.randomization import SIMILARITIES

    names, values = ["gradcam", "random"], {"deletion", "randomization"}
    good = {
        "image": "a.png",
        "path": "/x/a.png",
        "status": "ok",
        "key": "abc:123",
        "target": {"index": 1, "label": "cat"},
        "probability": 0.9,
        "metrics": {"gradcam": {"deletion": 0.2}, "random": {"deletion": 0.5}},
        "randomization": {name: {measure: [0.5, None, 0.1] for measure in SIMILARITIES} for name in names},
        "curves": {"fractions": [0.0, 0.5, 1.0], "deletion": {"gradcam": [0.9, 0.4, 0.1]}},
    }
    assert line_problem(good, "abc", {"a.png"}, names, values, 3) is None
    hostile = [
        {"key": "other:123"},
        {"status": "failed"},
        {"image": "../b.png"},
        {"target": {"index": True, "label": None}},
        {"probability": float("inf")},
        {"metrics": {"lrp": {"deletion": 0.1}}},
        {"metrics": {"gradcam": {"road": 0.1}}},
        {"mask_error": "x" * 10_000},
        {"randomization": {"gradcam": {"spearman": ["0.5"]}}},
        {"randomization": {"evil": {}}},
        # What the summary could not average must not stand either (one rule for both): a method or a
        # measure missing, a step too few, a similarity beyond [-1, 1].
        {"randomization": {"gradcam": good["randomization"]["gradcam"]}},
        {"randomization": {**good["randomization"], "gradcam": {"spearman": [0.5, None, 0.1]}}},
        {"randomization": {**good["randomization"], "random": {m: [0.5, 0.1] for m in SIMILARITIES}}},
        {"randomization": {**good["randomization"], "random": {m: [0.5, 2.0, 0.1] for m in SIMILARITIES}}},
        {"curves": {"deletion": {"gradcam": [0.9, 0.4]}, "fractions": [0.0, 0.5, 1.0]}},
        {"curves": {"fractions": [0.0, float("nan")], "deletion": {}}},
        {"curves": []},
    ]
    for change in hostile:
        assert line_problem({**good, **change}, "abc", {"a.png"}, names, values, 3) is not None, change
