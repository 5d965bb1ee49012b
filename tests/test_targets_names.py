"""Naming several targets in one --target: comma-separated, a label that holds a comma (or a quote)
quoted as a CSV field is; a malformed list is one line of error. Checked through run and evaluate
on a model saved to disk, each map against Grad-CAM of its class computed by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import attnexplain
from attnexplain.cli import main
from attnexplain.errors import MethodError
from attnexplain.images import load_image
from attnexplain.loading import load_model
from attnexplain.planning import plan_preprocessing
from attnexplain.preprocess import prepare
from attnexplain.target_names import target_names

SIZE = 24
LABELS = ["a, b", "c", 'say "hi"']
NET_SOURCE = """
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.relu(self.features(x)).mean((2, 3)))
"""


@pytest.fixture
def saved(tmp_path) -> tuple[Path, Path, list[str]]:
    source = tmp_path / "net.py"
    source.write_text(NET_SOURCE)
    namespace: dict = {}
    exec(compile(NET_SOURCE, str(source), "exec"), namespace)
    torch.manual_seed(7)
    weights = tmp_path / "net.pt"
    torch.save({"state_dict": namespace["Net"]().state_dict(), "labels": LABELS}, weights)
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(photo)
    return weights, photo, ["--arch", f"{source}:Net", "--size", str(SIZE), "--layer", "features"]


def _gradcam(weights: Path, photo: Path, arch: str, index: int) -> np.ndarray:
    loaded = load_model(weights, arch=arch)
    batch = prepare(load_image(photo).pixels, plan_preprocessing(loaded, size=SIZE)).tensor.requires_grad_()
    captured = {}
    handle = loaded.module.features.register_forward_hook(lambda m, args, output: captured.setdefault("a", output))
    logits = loaded.module(batch)
    handle.remove()
    (gradient,) = torch.autograd.grad(logits[0, index], captured["a"])
    return torch.relu((gradient.mean(dim=(2, 3), keepdim=True) * captured["a"]).sum(dim=1))[0].detach().numpy()


def _run(tmp_path: Path, weights: Path, photo: Path, options: list[str], target: str, name: str = "out"):
    out = tmp_path / name
    result = CliRunner().invoke(
        main, [str(a) for a in ["run", weights, photo, *options, "--target", target, "--out", out, "--json"]]
    )
    return result, out


def test_a_quoted_label_with_a_comma_is_one_of_several_targets(tmp_path, saved):
    weights, photo, options = saved
    result, out = _run(tmp_path, weights, photo, options, '"a, b",c')
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert list(report["outputs"]["maps"]) == ["gradcam@a, b", "gradcam@c"]
    for key, index in (("gradcam@a, b", 0), ("gradcam@c", 1)):
        heatmap = np.load(out / "photo" / report["outputs"]["maps"][key]["heatmap"])
        np.testing.assert_allclose(heatmap, _gradcam(weights, photo, options[1], index), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("target", "index"), [('"a, b"', 0), ('"say ""hi"""', 2), ("c", 1)])
def test_one_quoted_target_names_its_label(tmp_path, saved, target, index):
    weights, photo, options = saved
    result, _ = _run(tmp_path, weights, photo, options, target)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["target"]["index"] == index


def test_evaluate_takes_quoted_targets(tmp_path, saved):
    weights, photo, options = saved
    out = tmp_path / "eval"
    command = ["evaluate", weights, photo, *options, "--method", "gradcam", "--metrics", "drop"]
    result = CliRunner().invoke(main, [str(a) for a in command + ["--target", '"a, b",c', "--out", out, "--quiet"]])
    assert result.exit_code == 0, result.output
    line = json.loads((out / "evaluation.jsonl").read_text().splitlines()[-1])
    assert set(line["metrics"]) == {"gradcam@a, b", "random@a, b", "gradcam@c", "random@c"}
    assert [t["index"] for t in line["targets"]] == [0, 1]


@pytest.mark.parametrize(
    ("target", "says"),
    [
        ('"a, b', "unexpected end of data"),
        ('"a, b" ,c', "',' expected after"),
        ('"' + "x" * 200_000, "over 100,000 characters"),
        ('"a, b"x', "',' expected after"),
    ],
)
def test_a_malformed_target_list_is_one_line_of_error(tmp_path, saved, target, says):
    weights, photo, options = saved
    result, _ = _run(tmp_path, weights, photo, options, target)
    assert result.exit_code == 1 and says in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and len(result.output) < 1000


def test_the_python_api_takes_a_list_of_labels_with_commas(saved):
    weights, photo, options = saved
    loaded = load_model(weights, arch=options[1])
    result = attnexplain.explain(loaded, photo, "gradcam", target=["a, b", 'say "hi"'], size=SIZE, layer="features")
    assert list(result.maps) == ["gradcam@a, b", 'gradcam@say "hi"']
    np.testing.assert_allclose(
        result.maps['gradcam@say "hi"'].heatmap, _gradcam(weights, photo, options[1], 2), rtol=1e-4, atol=1e-6
    )


def test_target_names_read_csv_quoting():
    assert target_names(" cat , dog,,") == ["cat", "dog"]
    assert target_names('"a, b",c') == ["a, b", "c"]
    assert target_names('"say ""hi""", x') == ['say "hi"', "x"]
    with pytest.raises(MethodError, match="quoted as in CSV"):
        target_names('"open')
