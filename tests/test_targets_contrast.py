"""A contrast (--target cat --versus dog): every map explains score(cat) − score(dog), checked
against Grad-CAM and saliency of that difference computed by hand with plain autograd, through the
Python API and the command line on a model saved to disk."""

from __future__ import annotations

import importlib.util
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
from attnexplain.options import MethodOptions

LABELS = ["cat", "dog", "bird"]
SIZE = 32

NET_SOURCE = """
import torch


class Net(torch.nn.Module):
    def __init__(self, num_classes=3):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.features = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, num_classes)

    def forward(self, x):
        x = torch.relu(self.features(torch.relu(self.stem(x))))
        return self.head(x.mean((2, 3)))
"""


def _net_class(folder: Path):
    path = folder / "net.py"
    path.write_text(NET_SOURCE)
    spec = importlib.util.spec_from_file_location("contrast_net", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Net


@pytest.fixture
def net(tmp_path):
    torch.manual_seed(3)
    return _net_class(tmp_path)().eval()


@pytest.fixture
def picture() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(3, SIZE, SIZE, generator=generator)


def _explain_recording_input(net, picture, method, **kwargs):
    """explain(), and the exact input the model was given (recorded by a hook of the test's own)."""
    seen: list[torch.Tensor] = []
    handle = net.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    try:
        layer = "features" if method == "gradcam" else None
        result = attnexplain.explain(net, picture, method, size=SIZE, labels=LABELS, layer=layer, **kwargs)
    finally:
        handle.remove()
    return result, seen[0]


def _gradcam_by_hand(net, batch: torch.Tensor, score) -> np.ndarray:
    """Grad-CAM (Selvaraju et al.) of ``score(logits)`` on layer ``features`` with plain autograd."""
    captured = {}
    handle = net.features.register_forward_hook(lambda module, args, output: captured.setdefault("a", output))
    try:
        logits = net(batch)
    finally:
        handle.remove()
    activation = captured["a"]
    (gradient,) = torch.autograd.grad(score(logits).sum(), activation)
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * activation).sum(dim=1))[0].detach().numpy()


def test_contrast_gradcam_is_gradcam_of_the_score_difference(net, picture):
    result, batch = _explain_recording_input(net, picture, "gradcam", target="cat", versus="dog")
    expected = _gradcam_by_hand(net, batch, lambda logits: logits[:, 0] - logits[:, 1])
    plain = _gradcam_by_hand(net, batch, lambda logits: logits[:, 0])
    assert not np.allclose(expected, plain, atol=1e-4)  # the contrast is a different map here
    np.testing.assert_allclose(result.heatmap, expected, rtol=1e-4, atol=1e-6)
    assert result.target.label == "cat" and result.versus == 1
    assert result.to_dict()["target"] == {
        "index": 0,
        "label": "cat",
        "versus": {"index": 1, "label": "dog"},
        "explained": "cat rather than dog",
    }


def test_contrast_saliency_is_the_gradient_of_the_difference(net, picture):
    result, batch = _explain_recording_input(net, picture, "saliency", target=0, versus=2)
    leaf = batch.clone().requires_grad_()
    logits = net(leaf)
    (gradient,) = torch.autograd.grad((logits[:, 0] - logits[:, 2]).sum(), leaf)
    np.testing.assert_allclose(result.heatmap, gradient.abs().amax(dim=1)[0].numpy(), rtol=1e-4, atol=1e-7)


def test_contrast_occlusion_is_the_difference_of_the_two_classes_occlusions(net, picture):
    """A perturbation method: occlusion's drop is linear in the score, so the contrast's map is the
    target's map less the other class's."""
    settings = {"options": MethodOptions(window=8, stride=4), "size": SIZE, "labels": LABELS}
    both = attnexplain.explain(net, picture, "occlusion", target="cat", versus="bird", **settings)
    cat = attnexplain.explain(net, picture, "occlusion", target="cat", **settings)
    bird = attnexplain.explain(net, picture, "occlusion", target="bird", **settings)
    assert np.abs(cat.heatmap - bird.heatmap).max() > 1e-4
    np.testing.assert_allclose(both.heatmap, cat.heatmap - bird.heatmap, rtol=1e-4, atol=1e-6)


def test_a_class_contrasted_with_itself_is_refused(net, picture):
    with pytest.raises(MethodError, match="same class"):
        attnexplain.explain(net, picture, "gradcam", target="dog", versus="dog", size=SIZE, labels=LABELS)
    with pytest.raises(MethodError, match="No class is labelled 'wolf'"):
        attnexplain.explain(net, picture, "gradcam", target="dog", versus="wolf", size=SIZE, labels=LABELS)


def _saved_model(tmp_path: Path) -> tuple[Path, Path, Path]:
    torch.manual_seed(3)
    model = _net_class(tmp_path)().eval()
    weights = tmp_path / "net.pt"
    torch.save(model.state_dict(), weights)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    photo = tmp_path / "photo.png"
    generator = np.random.default_rng(0)
    Image.fromarray(generator.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(photo)
    return weights, labels, photo


def test_run_from_disk_explains_cat_rather_than_dog(tmp_path):
    weights, labels, photo = _saved_model(tmp_path)
    common = ["--arch", f"{tmp_path / 'net.py'}:Net", "--labels", labels, "--size", SIZE, "--layer", "features"]
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        [
            str(v)
            for v in ["run", weights, photo, *common, "--target", "cat", "--versus", "dog", "--out", out, "--json"]
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["target"]["explained"] == "cat rather than dog"
    assert report["target"]["versus"] == {"index": 1, "label": "dog"}
    contrast = np.load(out / "photo" / report["outputs"]["maps"]["gradcam"]["heatmap"])
    plain_out = tmp_path / "plain"
    plain = CliRunner().invoke(
        main, [str(v) for v in ["run", weights, photo, *common, "--target", "cat", "--out", plain_out, "--json"]]
    )
    assert plain.exit_code == 0, plain.output
    assert not np.allclose(contrast, np.load(plain_out / "photo" / json.loads(plain.output)["outputs"]["heatmap"]))
    printed = CliRunner().invoke(
        main,
        [str(v) for v in ["run", weights, photo, *common, "--target", "cat", "--versus", "dog", "--out", out]],
    )
    assert printed.exit_code == 0 and "Explained cat rather than dog with gradcam" in printed.output


def test_batch_records_the_contrast_for_each_image(tmp_path):
    weights, labels, photo = _saved_model(tmp_path)
    out = tmp_path / "batch"
    result = CliRunner().invoke(
        main,
        [
            str(v)
            for v in [
                "batch",
                weights,
                photo,
                "--arch",
                f"{tmp_path / 'net.py'}:Net",
                "--labels",
                labels,
                "--size",
                SIZE,
                "--target",
                "bird",
                "--versus",
                "cat",
                "--out",
                out,
                "--quiet",
            ]
        ],
    )
    assert result.exit_code == 0, result.output
    record = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert record["target"]["explained"] == "bird rather than cat"
    assert record["target"]["versus"] == {"index": 0, "label": "cat"}
    assert "bird rather than cat" in next((out / "images").rglob("*.html")).read_text()


def test_versus_on_the_command_line_names_an_unknown_class_in_one_line(tmp_path):
    weights, labels, photo = _saved_model(tmp_path)
    result = CliRunner().invoke(
        main,
        [
            str(v)
            for v in ["run", weights, photo, "--arch", f"{tmp_path / 'net.py'}:Net", "--labels", labels]
            + ["--size", SIZE, "--target", "cat", "--versus", "wolf", "--out", tmp_path / "o"]
        ],
    )
    assert result.exit_code == 1
    assert result.output.strip() == "Error: No class is labelled 'wolf'."


def test_class_agnostic_maps_are_not_said_to_explain_a_class(tmp_path, sample_vit_file):
    """Rollout shows where the model looks whatever its head says: the same map for a class and for
    a contrast, and run's header says so instead of "Explained class ..."."""
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(photo)
    maps = {}
    for name, extra in (("plain", []), ("contrast", ["--target", "0", "--versus", "1"])):
        out = tmp_path / name
        result = CliRunner().invoke(
            main, [str(v) for v in ["run", sample_vit_file, photo, "--method", "rollout", *extra, "--out", out]]
        )
        assert result.exit_code == 0, result.output
        assert "Mapped rollout: not class-specific (the same map for every class)" in result.output
        assert "Explained" not in result.output
        report = json.loads((out / "photo" / "report.json").read_text())
        assert report["class_agnostic"] == ["rollout"]
        maps[name] = np.load(out / "photo" / report["outputs"]["heatmap"])
    np.testing.assert_array_equal(maps["plain"], maps["contrast"])
    both = CliRunner().invoke(
        main, [str(v) for v in ["run", sample_vit_file, photo, "--method", "rollout,saliency", "--out", tmp_path / "b"]]
    )
    assert both.exit_code == 0 and "Explained class" in both.output and "; rollout not class-specific" in both.output
