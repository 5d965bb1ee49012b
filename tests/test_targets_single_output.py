"""A single-output model (regression, one binary logit): the target is the output itself, the
report shows its value (not a softmax of 1.0), and --target negative explains what lowers it.
The model is saved with torch.save and run from disk through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from attnexplain.cli import main
from attnexplain.images import load_image
from attnexplain.loading import load_model
from attnexplain.planning import plan_preprocessing
from attnexplain.preprocess import prepare

SIZE = 32

NET_SOURCE = """
import torch


class Regressor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.features = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, x):
        x = torch.relu(self.features(torch.relu(self.stem(x))))
        return self.head(x.mean((2, 3)))
"""


@pytest.fixture
def saved(tmp_path) -> tuple[Path, Path, list[str]]:
    source = tmp_path / "regressor.py"
    source.write_text(NET_SOURCE)
    namespace: dict = {}
    exec(compile(NET_SOURCE, str(source), "exec"), namespace)
    torch.manual_seed(11)
    weights = tmp_path / "regressor.pt"
    torch.save(namespace["Regressor"]().state_dict(), weights)
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(photo)
    return weights, photo, ["--arch", f"{source}:Regressor", "--size", str(SIZE), "--layer", "features"]


def _run(*args) -> tuple[dict, Path]:
    out = Path(args[args.index("--out") + 1])
    result = CliRunner().invoke(main, [str(a) for a in args] + ["--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output), out


def _by_hand(weights: Path, photo: Path, options: list[str], sign: float) -> tuple[float, np.ndarray]:
    """The output's value and Grad-CAM of ``sign`` × output on layer ``features``, with plain autograd."""
    loaded = load_model(weights, arch=options[1])
    batch = prepare(load_image(photo).pixels, plan_preprocessing(loaded, size=SIZE)).tensor.requires_grad_()
    captured = {}
    net = loaded.module
    handle = net.features.register_forward_hook(lambda module, args, output: captured.setdefault("a", output))
    output = net(batch)
    handle.remove()
    (gradient,) = torch.autograd.grad(sign * output[0, 0], captured["a"])
    weights_ = gradient.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights_ * captured["a"]).sum(dim=1))[0]
    return float(output[0, 0]), cam.detach().numpy()


def test_a_single_output_reports_its_value_and_explains_what_raises_it(tmp_path, saved):
    weights, photo, options = saved
    report, out = _run("run", weights, photo, *options, "--out", tmp_path / "up")
    value, expected = _by_hand(weights, photo, options, 1.0)
    assert report["predictions"] == [{"index": 0, "label": None, "prob": None, "value": pytest.approx(value, rel=1e-5)}]
    assert report["target"] == {"index": 0, "label": None, "explained": "class 0"}
    heatmap = np.load(out / "photo" / report["outputs"]["heatmap"])
    np.testing.assert_allclose(heatmap, expected, rtol=1e-4, atol=1e-6)
    html = (out / "photo" / "report.html").read_text()
    assert f"value {value:.4g}" in html and "100.0%" not in html


def test_target_negative_explains_what_lowers_the_output(tmp_path, saved):
    weights, photo, options = saved
    report, out = _run("run", weights, photo, *options, "--target", "negative", "--out", tmp_path / "down")
    value, expected = _by_hand(weights, photo, options, -1.0)
    _, raising = _by_hand(weights, photo, options, 1.0)
    assert not np.allclose(expected, raising)
    assert report["target"]["negative"] is True and report["target"]["explained"] == "what lowers the output"
    assert report["predictions"][0]["value"] == pytest.approx(value, rel=1e-5)  # the value itself, not negated
    np.testing.assert_allclose(np.load(out / "photo" / report["outputs"]["heatmap"]), expected, rtol=1e-4, atol=1e-6)
    printed = CliRunner().invoke(
        main, [str(a) for a in ["run", weights, photo, *options, "--target", "negative", "--out", tmp_path / "p"]]
    )
    assert printed.exit_code == 0 and "value" in printed.output and "what lowers the output" in printed.output


def test_batch_shows_each_images_value_in_the_gallery(tmp_path, saved):
    weights, photo, options = saved
    out = tmp_path / "batch"
    result = CliRunner().invoke(main, [str(a) for a in ["batch", weights, photo, *options, "--out", out, "--quiet"]])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    value, _ = _by_hand(weights, photo, options, 1.0)
    assert record["predictions"][0]["prob"] is None
    assert record["predictions"][0]["value"] == pytest.approx(value, rel=1e-5)
    assert f"value {value:.4g}" in (out / record["detail"]).read_text()


def test_negative_on_a_classifier_of_several_classes_is_refused_in_one_line(tmp_path, saved):
    weights, photo, options = saved
    several = tmp_path / "three.pt"
    state = torch.load(weights)
    state["head.weight"], state["head.bias"] = torch.randn(3, 8), torch.zeros(3)
    torch.save(state, several)
    source = options[1].replace(":Regressor", "")
    Path(source).write_text(NET_SOURCE.replace("Linear(8, 1)", "Linear(8, 3)"))
    result = CliRunner().invoke(
        main, [str(a) for a in ["run", several, photo, *options, "--target", "negative", "--out", tmp_path / "n"]]
    )
    assert result.exit_code == 1
    assert result.output.startswith("Error: Target 'negative' explains what lowers a single-output model's value")
    assert len(result.output.strip().splitlines()) == 1


def test_run_metrics_of_target_negative_measure_the_negated_output(tmp_path, saved):
    """--metrics drop with --target negative: the score explained is −output, so the average drop
    and increase are those of −output when the input is multiplied by the map scaled to [0, 1]."""
    weights, photo, options = saved
    out = tmp_path / "down"
    report, _ = _run("run", weights, photo, *options, "--target", "negative", "--metrics", "drop", "--out", out)
    heatmap = torch.from_numpy(np.load(out / "photo" / report["outputs"]["heatmap"])).float()
    loaded = load_model(weights, arch=options[1])
    batch = prepare(load_image(photo).pixels, plan_preprocessing(loaded, size=SIZE)).tensor
    scaled = (heatmap - heatmap.min()) / (heatmap.max() - heatmap.min())
    with torch.no_grad():
        before, after = -loaded.module(batch)[0, 0].item(), -loaded.module(batch * scaled)[0, 0].item()
    measured = report["metrics"]["gradcam"]
    assert measured["increase"] == float(after > before)
    assert measured["avg_drop"] == pytest.approx(max(0.0, before - after) / (before + 1e-7), rel=1e-3, abs=1e-4)
    # the output itself (not negated) would give the opposite verdict
    assert float(-after > -before) != measured["increase"]
