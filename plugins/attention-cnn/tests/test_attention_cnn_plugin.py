"""Tests of the attention-CNN plugin against the installed attnexplain, on real model outputs.

Run from the repository root: ``.venv/bin/python -m pytest -q plugins/attention-cnn/tests``.
The sample-model tests use ``samples/models/attention-cnn-composites.pt`` (made by
``samples/train.py --only attention-cnn``) and the held-out composites of ``samples/composites.py``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("ATTNEXPLAIN_OFFLINE", "1")  # nothing here may download

from attnexplain_attention_cnn.model import AttentionPoolingCNN  # noqa: E402
from attnexplain_attention_cnn.plugin import plugin as attention_plugin  # noqa: E402

from attnexplain import explain  # noqa: E402
from attnexplain.capture import attention_gradients  # noqa: E402
from attnexplain.errors import MethodError  # noqa: E402
from attnexplain.loading import load_model  # noqa: E402
from attnexplain.plugins import ModelPlugin, discover_plugins, select_plugin  # noqa: E402
from attnexplain.preprocess import Preprocessing, prepare  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
SAMPLES = REPO / "samples"
SAMPLE_MODEL = SAMPLES / "models" / "attention-cnn-composites.pt"
CAT_IMAGE = SAMPLES / "images" / "cat-on-grass.png"

needs_samples = pytest.mark.skipif(
    not SAMPLE_MODEL.is_file(), reason="run from the attnexplain repository, with its samples/"
)


@pytest.fixture(scope="module")
def random_model() -> AttentionPoolingCNN:
    """Fixed random weights with random BatchNorm statistics, so that α is far from uniform."""
    torch.manual_seed(0)
    model = AttentionPoolingCNN(num_classes=5)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
        model.attention.score.weight.mul_(100.0)  # α far sharper than at initialisation
    return model.eval()


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    """A real photo (Chelsea the cat, scikit-image, CC0), not square, as RGB uint8."""
    from skimage import data

    return data.chelsea()[::2, ::2].copy()


@pytest.fixture(scope="module")
def sample_model():
    return load_model(SAMPLE_MODEL)


def _batch(pixels: np.ndarray, size: int = 128) -> torch.Tensor:
    return prepare(pixels, Preprocessing(size=(size, size))).tensor


# --- discovery and selection ------------------------------------------------------------------


def test_discovered_through_its_entry_point_with_distribution_and_version():
    infos = {info.entry_point: info for info in discover_plugins()}
    info = infos["attention-cnn"]
    assert info.error is None
    assert info.distribution == "attnexplain-attention-cnn"
    assert info.version == "0.1.0"
    assert info.name == "attention-cnn"
    assert isinstance(info.plugin, ModelPlugin)
    assert info.plugin.families == (
        "Show-Attend-Tell attention-pooling CNN",
        "CBAM CNN",
        "Show, Attend and Tell captioner",
    )
    assert {"AttentionPoolingCNN", "CBAMCNN", "ShowAttendTell"} <= set(info.plugin.builders())


def test_selected_for_its_model_and_only_for_it(random_model):
    assert select_plugin(random_model) is attention_plugin
    assert attention_plugin.specificity(random_model) == 30
    # Other models are not claimed (a torchvision ResNet, a plain module).
    import torchvision

    resnet = torchvision.models.resnet18(num_classes=3)
    assert attention_plugin.specificity(resnet) is None
    assert select_plugin(resnet) is not attention_plugin
    assert attention_plugin.specificity(torch.nn.Conv2d(3, 3, 1)) is None

    # A subclass may change the forward: it is not claimed.
    class Changed(AttentionPoolingCNN):
        pass

    assert attention_plugin.specificity(Changed(num_classes=2)) is None
    assert select_plugin(Changed(num_classes=2)) is not attention_plugin


def test_named_plugin_overrides_the_most_specific(random_model):
    assert select_plugin(random_model, "torchvision").name == "torchvision"
    assert select_plugin(random_model, "attention-cnn") is attention_plugin


def test_interface_answers(random_model):
    assert attention_plugin.default_method(random_model) == "attention,gradcam"
    assert attention_plugin.default_layer(random_model) == "backbone.block2"
    assert attention_plugin.attention_modules(random_model) == ["attention"]
    grid = attention_plugin.token_grid(random_model, (128, 128))
    assert (grid.prefix_tokens, grid.height, grid.width, grid.query) == (0, 16, 16, 0)
    # The grid follows the input size, including odd sizes (each stride-2 conv rounds up).
    grid = attention_plugin.token_grid(random_model, (100, 161))
    features = random_model.backbone(torch.zeros(1, 3, 100, 161))
    assert (grid.height, grid.width) == tuple(features.shape[-2:]) == (13, 21)
    assert attention_plugin.preprocessing(random_model).size == (128, 128)


def test_builder_takes_json_kwargs():
    builder = attention_plugin.builders()["AttentionPoolingCNN"]
    model = builder(**json.loads('{"channels": [8, 16], "convs_per_stage": 1, "attention_dim": 4, "num_classes": 3}'))
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 3)
    assert model.feature_size((64, 64)) == (16, 16)
    assert model.last_block == "backbone.block1"


# --- the recorded attention -------------------------------------------------------------------


def test_capture_records_alpha_without_changing_the_output(random_model, picture):
    batch = torch.cat([_batch(picture), _batch(picture[:, ::-1].copy())])
    with torch.no_grad():
        plain_logits, plain_alpha = random_model.forward_with_attention(batch)
        sink: dict[str, torch.Tensor] = {}
        with attention_plugin.capture_attention(random_model, ["attention"], sink):
            captured_logits = random_model(batch)
        after = random_model(batch)  # the hook is gone afterwards
    assert torch.equal(captured_logits, plain_logits)
    assert torch.equal(after, plain_logits)
    recorded = sink["attention"]
    assert recorded.shape == (2, 1, 1, 256)
    assert torch.equal(recorded[:, 0, 0], plain_alpha)
    assert torch.allclose(recorded.sum(-1), torch.ones(2, 1, 1))
    assert recorded.max() > 3.0 / 256  # far from uniform: the test would be blind otherwise
    assert not random_model.attention._forward_hooks


def test_capture_refuses_a_module_that_is_not_soft_attention(random_model):
    with pytest.raises(MethodError, match="not a SoftAttentionPooling"):
        with attention_plugin.capture_attention(random_model, ["classifier"], {}):
            pass


def test_gradient_with_respect_to_recorded_alpha_is_the_real_one(random_model, picture):
    """α is what the context is computed from: ∂score/∂α through the recorded tensor equals the
    gradient of a forward written out by hand."""
    batch = _batch(picture).requires_grad_(True)  # gives a graph with the parameters frozen
    for parameter in random_model.parameters():
        parameter.requires_grad_(False)
    try:
        sink: dict[str, torch.Tensor] = {}
        with attention_plugin.capture_attention(random_model, ["attention"], sink):
            logits = random_model(batch)
        target = int(logits.argmax())
        (gradient,) = attention_gradients(logits[0, target], [sink["attention"]])

        features = random_model.backbone(batch).flatten(2).transpose(1, 2)[0]  # (256, C)
        attention = random_model.attention
        scores = attention.score(torch.tanh(attention.project(features)))[:, 0]
        alpha = torch.softmax(scores, dim=0).detach().requires_grad_(True)
        score = random_model.classifier(alpha @ features.detach())[target]
        (expected,) = torch.autograd.grad(score, alpha)
    finally:
        for parameter in random_model.parameters():
            parameter.requires_grad_(True)
    assert gradient.shape == (1, 1, 1, 256)
    # ∂score/∂α_i = classifier_row · a_i: it varies over positions, so this is not a constant.
    assert expected.std() > 0
    torch.testing.assert_close(gradient[0, 0, 0], expected, rtol=1e-4, atol=1e-6)


def test_attention_method_returns_the_models_own_alpha(random_model, picture):
    explanation = explain(random_model, picture, "attention")
    batch = prepare(picture, explanation.preprocessing).tensor
    with torch.no_grad():
        _, alpha = random_model.forward_with_attention(batch)
    result = explanation.maps["attention"]
    assert result.attention_grid.shape == (1, 1, 16, 16)
    np.testing.assert_allclose(result.attention_grid[0, 0], alpha[0].reshape(16, 16).numpy(), rtol=1e-6, atol=1e-8)
    # The heatmap is that grid stretched (bilinearly) over the model's input.
    stretched = torch.nn.functional.interpolate(
        alpha.reshape(1, 1, 16, 16), size=(128, 128), mode="bilinear", align_corners=False
    )[0, 0]
    np.testing.assert_allclose(result.heatmap, stretched.numpy(), rtol=1e-5, atol=1e-9)


def test_auto_gives_attention_and_gradcam(random_model, picture):
    explanation = explain(random_model, picture)
    assert list(explanation.maps) == ["attention", "gradcam"]
    assert explanation.maps["gradcam"].layers == ["backbone.block2"]
    assert explanation.maps["attention"].layers == []
    for result in explanation.maps.values():
        assert result.heatmap.shape == (128, 128)
        assert np.isfinite(result.heatmap).all() and result.heatmap.max() > result.heatmap.min()
    assert explanation.to_dict()["model"]["plugin"] == "attention-cnn"


@pytest.mark.parametrize("method", ["rollout", "chefer"])
def test_self_attention_methods_refused(random_model, picture, method):
    with pytest.raises(MethodError, match=r"1 query token\(s\) onto 256 keys"):
        explain(random_model, picture, method)


# --- the shipped sample model -----------------------------------------------------------------


@needs_samples
def test_sample_checkpoint_loads_through_the_plugin(sample_model):
    assert sample_model.architecture == "AttentionPoolingCNN"
    assert type(sample_model.module) is AttentionPoolingCNN
    assert sample_model.plugin is attention_plugin
    assert sample_model.labels == ["astronaut", "cat", "coffee", "rocket"]
    assert sample_model.preprocessing.size == (128, 128)
    assert sample_model.preprocessing.source == "checkpoint"
    checkpoint = torch.load(SAMPLE_MODEL, weights_only=True)
    assert checkpoint["arch"] == "AttentionPoolingCNN"
    assert all(v.dtype == torch.float16 for v in checkpoint["state_dict"].values() if v.is_floating_point())
    assert checkpoint["metrics"]["test_accuracy"] >= 0.90
    assert SAMPLE_MODEL.stat().st_size <= 1.5e6


@needs_samples
def test_sample_model_looks_at_the_object(sample_model):
    """On held-out composites: accurate, and α's peak falls on the object for most images."""
    sys.path.insert(0, str(SAMPLES))
    from composites import TEST_SEED, make_composites

    images, labels, masks = make_composites(40, TEST_SEED)
    batch = torch.cat([prepare(image, sample_model.preprocessing).tensor for image in images])
    sink: dict[str, torch.Tensor] = {}
    with torch.no_grad(), attention_plugin.capture_attention(sample_model.module, ["attention"], sink):
        logits = sample_model.module(batch)
    accuracy = float((logits.argmax(1).numpy() == labels).mean())
    assert accuracy >= 0.85

    alpha = sink["attention"][:, 0, 0].reshape(-1, 16, 16).numpy()
    hits, chance = 0, 0.0
    for grid, mask in zip(alpha, masks):
        row, column = np.unravel_index(grid.argmax(), grid.shape)
        cell = mask[row * 8 : (row + 1) * 8, column * 8 : (column + 1) * 8]  # 8 px per position
        hits += bool(cell.mean() >= 0.5)  # the peak position is mostly object
        chance += mask.mean()
    assert hits / len(masks) >= 0.75, f"α peak on the object for {hits}/40 images"
    assert chance / len(masks) < 0.35  # so a peak anywhere would not pass


@needs_samples
def test_cli_run_writes_both_methods_and_the_attention_grid(tmp_path):
    from click.testing import CliRunner

    from attnexplain.cli import main

    result = CliRunner().invoke(main, ["run", str(SAMPLE_MODEL), str(CAT_IMAGE), "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["methods"] == ["attention", "gradcam"]
    assert report["model"]["plugin"] == "attention-cnn"
    assert report["model"]["architecture"] == "AttentionPoolingCNN"
    assert report["predictions"][0]["label"] == "cat"
    assert report["maps"]["gradcam"]["layers"] == ["backbone.block2"]
    folder = Path(report["outputs"]["directory"])
    files = report["outputs"]["maps"]
    for method in ("attention", "gradcam"):
        overlay = folder / files[method]["overlay"]
        assert overlay.is_file() and overlay.stat().st_size > 1000
        heatmap = np.load(folder / files[method]["heatmap"])
        assert heatmap.shape == (128, 128) and heatmap.max() > heatmap.min()
    assert (folder / files["attention"]["attention_grid"]).is_file()
    grid = np.load(folder / files["attention"]["attention_grid_npy"])
    assert grid.shape == (1, 1, 16, 16)
    assert grid.sum() == pytest.approx(1.0, abs=1e-4)  # α: one softmax over the 256 positions
    assert "attention_grid" not in files["gradcam"]
    assert (folder / report["outputs"]["report_html"]).is_file()

    # The overlay is an image of the photo's size (the composites are 192×192).
    from PIL import Image

    with Image.open(folder / files["attention"]["overlay"]) as overlay:
        assert overlay.size == (192, 192)


@needs_samples
@pytest.mark.parametrize("method", ["rollout", "chefer"])
def test_cli_rollout_fails_with_one_line(tmp_path, method):
    from click.testing import CliRunner

    from attnexplain.cli import main

    result = CliRunner().invoke(
        main, ["run", str(SAMPLE_MODEL), str(CAT_IMAGE), "--out", str(tmp_path), "--method", method]
    )
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"Error: {method}:")
    assert "self-attention" in lines[0]
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_answers_dont_know_for_other_models():
    """--plugin attention-cnn may hand the plugin any model: it must not fail on one it doesn't know."""
    import torchvision

    resnet = torchvision.models.resnet18(num_classes=3)
    assert attention_plugin.default_method(resnet) is None
    assert attention_plugin.default_layer(resnet) is None
    assert attention_plugin.attention_modules(resnet) == []
    assert attention_plugin.token_grid(resnet, (224, 224)) is None
    assert attention_plugin.preprocessing(resnet) is None


@needs_samples
def test_cli_forcing_this_plugin_on_another_model_falls_back(tmp_path):
    from click.testing import CliRunner

    from attnexplain.cli import main

    result = CliRunner().invoke(
        main,
        [
            "run",
            str(SAMPLES / "models" / "resnet-composites.pt"),
            str(CAT_IMAGE),
            "--out",
            str(tmp_path),
            "--json",
            "--plugin",
            "attention-cnn",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["model"]["plugin"] == "attention-cnn"
    assert report["methods"] == ["gradcam"]  # the core's choice: this plugin said "don't know"
    assert report["predictions"][0]["label"] == "cat"


@needs_samples
def test_cli_plugin_override_changes_auto(tmp_path):
    """--plugin torchvision: that plugin knows no attention here, so auto is Grad-CAM alone."""
    from click.testing import CliRunner

    from attnexplain.cli import main

    result = CliRunner().invoke(
        main, ["run", str(SAMPLE_MODEL), str(CAT_IMAGE), "--out", str(tmp_path), "--json", "--plugin", "torchvision"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["model"]["plugin"] == "torchvision"
    assert report["methods"] == ["gradcam"]
