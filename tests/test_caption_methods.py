"""A captioner's words explained by the methods ``--method`` names, at the layer ``--layer`` names.

The sample captioner (samples/models/captioner-composites.pt) is loaded from disk as a user would.
Each CAM map is checked against the formula written out here on the layer's output and the gradient
of the word's log-probability taken by hand (a forward hook and ``torch.autograd.grad`` on the
model's own teacher-forced forward); each input attribution against Captum called directly on a
module of this test's own whose output is the word's teacher-forced log-probability. ``run``,
``batch`` and ``evaluate`` carry every chosen map (files, records, measured beside α and the random
map); methods that do not apply to a word are refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from attnexplain.captioning import explain_caption
from attnexplain.cli import main

captioner_module = pytest.importorskip("attnexplain_attention_cnn.captioner")

REPO = Path(__file__).resolve().parents[1]
CAPTIONER = REPO / "samples" / "models" / "captioner-composites.pt"
SIZE = 128  # the sample's input: a photo of this size is only normalised
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CAMS = ["gradcam", "gradcampp", "xgradcam", "layercam", "hirescam", "eigencam"]
INPUTS = ["saliency", "input_x_gradient", "integrated_gradients"]


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(result, *words: str) -> str:
    assert result.exit_code != 0
    output = result.output.strip()
    assert "Traceback" not in output and len(output.splitlines()) == 1, output
    assert output.startswith("Error: ") and all(word in output for word in words), output
    return output


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Two sample composites at the model's size."""
    folder = tmp_path_factory.mktemp("photos")
    for name in ("cat-on-grass.png", "rocket-on-brick.png"):
        Image.open(REPO / "samples" / "images" / name).convert("RGB").resize((SIZE, SIZE)).save(folder / name)
    return folder


@pytest.fixture(scope="module")
def loaded():
    """The sample as attnexplain loads it, once for the module's explain_caption calls."""
    from attnexplain.loading import load_model

    return load_model(CAPTIONER)


@pytest.fixture(scope="module")
def model():
    saved = torch.load(CAPTIONER, weights_only=False)
    captioner = captioner_module.ShowAttendTell(**saved["arch_kwargs"])
    captioner.load_state_dict(saved["state_dict"])
    return captioner.eval(), saved["arch_kwargs"]["vocabulary"]


def _tensor(path: Path) -> torch.Tensor:
    x = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 255.0
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _steps(explanation, vocabulary) -> list[int]:
    ids = [vocabulary.index(word) for word in explanation.caption]
    return ids + ([vocabulary.index("<end>")] if explanation.end_probability is not None else [])


def _upsampled(grid: torch.Tensor) -> np.ndarray:
    return F.interpolate(grid[None, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0, 0].numpy()


def _cams_by_hand(activation: torch.Tensor, gradient: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each CAM of one word on its (C, h, w) layer output and gradient, as the papers write them."""
    a, g = activation.double(), gradient.double()
    total = a.sum(dim=(1, 2), keepdim=True)
    alpha = g**2 / (2 * g**2 + total * g**3 + 1e-6)
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    positions = a.reshape(a.shape[0], -1).t()
    positions = positions - positions.mean(dim=0)
    projection = positions @ torch.linalg.svd(positions, full_matrices=False)[2][0]
    projection = -projection if projection.min().abs() > projection.max().abs() else projection
    weighted = {
        "gradcam": g.mean(dim=(1, 2), keepdim=True) * a,
        "gradcampp": (F.relu(g) * alpha).sum(dim=(1, 2), keepdim=True) * a,
        "xgradcam": (g * a / (total + 1e-7)).sum(dim=(1, 2), keepdim=True) * a,
        "layercam": F.relu(g) * a,
        "hirescam": g * a,
        "eigencam": projection.reshape(1, *a.shape[1:]),
    }
    return {name: F.relu(value.sum(dim=0)).float() for name, value in weighted.items()}


def _layer_and_gradients(model, x: torch.Tensor, steps: list[int], layer: str):
    """The layer's output and each word's gradient of its log-probability there, by hand."""
    kept = []
    handle = model.get_submodule(layer).register_forward_hook(lambda _m, _a, output: kept.append(output))
    try:
        with torch.enable_grad():
            logits, _ = model(x, torch.tensor([steps]))
    finally:
        handle.remove()
    log_probs = torch.log_softmax(logits[0], dim=-1)
    gradients = [torch.autograd.grad(log_probs[t, w], kept[0], retain_graph=True)[0][0] for t, w in enumerate(steps)]
    return kept[0][0].detach(), gradients


class _WordScore(torch.nn.Module):
    """The captioner's log-probability of word ``t`` of ``steps`` under teacher forcing, per image."""

    def __init__(self, model, steps: list[int], t: int) -> None:
        super().__init__()
        self.model, self.steps, self.t = model, torch.tensor([steps]), t

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits, _ = self.model(images, self.steps.expand(len(images), -1))
        return torch.log_softmax(logits[:, self.t], dim=-1)[:, self.steps[0, self.t]]


@pytest.mark.parametrize("layer", [None, "encoder.block1"])
def test_each_cam_of_a_word_is_its_formula_on_the_layer_and_the_words_own_gradient(loaded, model, photos, layer):
    captioner, vocabulary = model
    path = photos / "cat-on-grass.png"
    explanation = explain_caption(loaded, path, methods=",".join(CAMS), layer=layer)
    assert explanation.methods == CAMS and explanation.to_dict()["cam_layer"] == (layer or "encoder.block2")
    steps = _steps(explanation, vocabulary)
    activation, gradients = _layer_and_gradients(captioner, _tensor(path), steps, layer or captioner.last_block)
    lit = set()
    for word in explanation.words:
        expected = _cams_by_hand(activation, gradients[word.position])
        assert list(word.maps) == CAMS
        for name in CAMS:
            lit |= {name} if expected[name].max() > 0 else set()
            np.testing.assert_allclose(word.maps[name], _upsampled(expected[name]), rtol=1e-3, atol=1e-6, err_msg=name)
    assert lit == set(CAMS)  # every map has something to compare on some word
    # A class-specific CAM differs from word to word; Eigen-CAM, the layer's own component, does not.
    first, last = explanation.words[0], explanation.words[-1]
    assert not np.allclose(first.maps["gradcam"], last.maps["gradcam"], atol=1e-6)
    np.testing.assert_allclose(first.maps["eigencam"], last.maps["eigencam"], atol=1e-6)


def test_the_method_names_a_captioner_takes():
    from attnexplain.caption_methods import INPUT_METHODS, caption_methods

    assert [m.name for m in caption_methods(None)] == [m.name for m in caption_methods("default")] == ["gradcam"]
    every = [m.name for m in caption_methods("all")]
    assert set(CAMS) <= set(every) and set(INPUT_METHODS) <= set(every)
    assert not {"scorecam", "ablationcam", "shapleycam", "finercam", "rollout", "deeplift", "rise"} & set(every)
    assert [m.name for m in caption_methods(" layercam , saliency,layercam")] == ["layercam", "saliency"]


def test_every_cam_of_a_word_comes_from_one_backward(loaded, photos, monkeypatch):
    backwards = []
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *args, **kwargs: backwards.append(1) or grad(*args, **kwargs))
    explanation = explain_caption(loaded, photos / "cat-on-grass.png", methods=CAMS)
    assert len(explanation.words) > 1 and len(backwards) == len(explanation.words)
    backwards.clear()
    explain_caption(loaded, photos / "cat-on-grass.png", methods="eigencam,kpcacam")  # no gradient: no backward
    assert backwards == []


def test_each_input_attribution_of_a_word_is_captums_on_its_teacher_forced_score(loaded, model, photos):
    from captum.attr import InputXGradient, IntegratedGradients, Saliency

    captioner, vocabulary = model
    path = photos / "rocket-on-brick.png"
    from attnexplain.options import MethodOptions

    explanation = explain_caption(loaded, path, methods=INPUTS, target="on", options=MethodOptions(steps=8))
    steps = _steps(explanation, vocabulary)
    x = _tensor(path)
    (word,) = explanation.words
    score = _WordScore(captioner, steps, word.position)
    expected = {
        "saliency": Saliency(score).attribute(x.clone().requires_grad_(), abs=True).amax(dim=1),
        "input_x_gradient": InputXGradient(score).attribute(x.clone().requires_grad_()).sum(dim=1).abs(),
        "integrated_gradients": IntegratedGradients(score)
        .attribute(x.clone().requires_grad_(), baselines=torch.zeros_like(x), n_steps=8)
        .sum(dim=1)
        .abs(),
    }
    assert list(word.maps) == INPUTS and word.gradcam is None
    for name in INPUTS:
        assert expected[name].max() > 0
        np.testing.assert_allclose(word.maps[name], expected[name][0].detach().numpy(), rtol=1e-3, atol=1e-6)


@pytest.mark.heavy  # a forward per window and superpixel; evaluate's curves per word
def test_perturbation_and_noise_attributions_of_a_word_are_captums_on_its_teacher_forced_score(loaded, model, photos):
    from captum.attr import FeatureAblation, Occlusion, Saliency

    from attnexplain.methods.attribution import superpixels
    from attnexplain.options import MethodOptions

    captioner, vocabulary = model
    path = photos / "cat-on-grass.png"
    options = MethodOptions(samples=3, window=32, stride=16)
    chosen = ["smoothgrad", "occlusion", "feature_ablation"]
    explanation = explain_caption(loaded, path, methods=chosen, target="cat", options=options)
    (word,) = explanation.words
    x = _tensor(path)
    score = _WordScore(captioner, _steps(explanation, vocabulary), word.position)
    # SmoothGrad's noise: σ = 0.15 × the image's range, drawn from a generator seeded with 0.
    draws = torch.randn((3, *x.shape[1:]), generator=torch.Generator().manual_seed(0))
    noisy = x[0] + float(x.max() - x.min()) * 0.15 * draws
    smooth = torch.stack([Saliency(score).attribute(copy[None].requires_grad_(), abs=True)[0] for copy in noisy])
    expected = {
        "smoothgrad": smooth.mean(dim=0).amax(dim=0),
        "occlusion": Occlusion(score)
        .attribute(x, sliding_window_shapes=(3, 32, 32), strides=(3, 16, 16), baselines=torch.zeros_like(x))
        .sum(dim=1)[0],
        "feature_ablation": FeatureAblation(score).attribute(
            x, baselines=torch.zeros_like(x), feature_mask=superpixels(x)
        )[0, 0],
    }
    assert list(word.maps) == chosen
    for name in chosen:
        assert expected[name].abs().max() > 0, name
        np.testing.assert_allclose(word.maps[name], expected[name].detach().numpy(), rtol=1e-3, atol=1e-5, err_msg=name)


def test_run_writes_every_chosen_map_per_word_and_names_them_on_the_page(loaded, photos, tmp_path):
    path = photos / "cat-on-grass.png"
    chosen = "layercam,saliency"
    result = _run("run", CAPTIONER, path, "--method", chosen, "--layer", "encoder.block1", "--out", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["methods"] == ["layercam", "saliency"] and report["cam_layer"] == "encoder.block1"
    reference = explain_caption(loaded, path, methods=chosen, layer="encoder.block1")
    folder = Path(report["outputs"]["directory"])
    for entry, word in zip(report["words"], reference.words):
        for name in ("layercam", "saliency"):
            np.testing.assert_allclose(np.load(folder / entry["files"][f"{name}_npy"]), word.maps[name], atol=1e-5)
            assert (folder / entry["files"][name]).stat().st_size > 0
        assert "gradcam" not in entry["files"] and "attention_npy" in entry["files"]
    page = (folder / "report.html").read_text(encoding="utf-8")
    assert "layercam of log p" in page and "saliency of log p" in page and "encoder.block1" in page


def test_batch_records_carry_each_words_chosen_maps(loaded, photos, tmp_path):
    out = tmp_path / "out"
    chosen = ["--method", "hirescam,input_x_gradient", "--layer", "encoder.block1"]
    result = _run("batch", CAPTIONER, photos, *chosen, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["methods"] == ["attention", "hirescam", "input_x_gradient"]
    for record in records:
        assert (
            record["methods"] == ["attention", "hirescam", "input_x_gradient"] and record["layer"] == "encoder.block1"
        )
        reference = explain_caption(
            loaded, photos / record["image"], methods="hirescam,input_x_gradient", layer="encoder.block1"
        )
        for word in reference.words:
            files = record["files"][f"word-{word.position + 1}"]
            folder = out / record["output"]
            np.testing.assert_allclose(np.load(folder / files["hirescam_npy"]), word.maps["hirescam"], atol=1e-5)
            np.testing.assert_allclose(
                np.load(folder / files["input_x_gradient_npy"]), word.maps["input_x_gradient"], atol=1e-5
            )


@pytest.mark.heavy  # deletion and insertion curves for every word of two images
def test_evaluate_measures_every_chosen_map_beside_attention_and_the_random_map(photos, tmp_path):
    out = tmp_path / "out"
    result = _run(
        "evaluate", CAPTIONER, photos, "--method", "layercam,saliency", "--metrics", "deletion,insertion",
        "--out", out, "--quiet", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    evaluation = json.loads(result.output)
    maps = ["attention", "layercam", "saliency", "random"]
    assert evaluation["settings"]["maps"] == maps[:-1]
    assert list(evaluation["methods"]) == maps
    assert set(evaluation["map_verdicts"]) == set(maps[:-1])
    words = [word for record in evaluation["per_image"] for word in record["words"]]
    assert words and all(list(word["metrics"]) == maps for word in words)
    assert all({"deletion", "insertion"} <= set(word["metrics"]["saliency"]) for word in words)
    # A word's deletion and insertion of its own probability differ between maps that differ.
    assert any(w["metrics"]["saliency"]["deletion"] != w["metrics"]["layercam"]["deletion"] for w in words)
    page = (out / "evaluation.html").read_text(encoding="utf-8")
    assert 'data-method="layercam"' in page and 'data-method="saliency"' in page


def test_evaluate_on_one_image_measures_the_chosen_map_per_word(photos, tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    (one / "cat.png").write_bytes((photos / "cat-on-grass.png").read_bytes())
    result = _run(
        "evaluate", CAPTIONER, one, "--method", "hirescam", "--metrics", "deletion", "--steps", "4",
        "--out", tmp_path / "out", "--quiet", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    evaluation = json.loads(result.output)
    assert evaluation["settings"]["maps"] == ["attention", "hirescam"]
    (record,) = evaluation["per_image"]
    assert record["words"] and all(list(w["metrics"]) == ["attention", "hirescam", "random"] for w in record["words"])
    assert "hirescam" in evaluation["map_verdicts"]["hirescam"]


@pytest.mark.parametrize(
    "command, method, named",
    [
        ("run", "scorecam", "scorecam does not apply to a captioner's word"),
        ("run", "deeplift", "deeplift does not apply"),
        ("batch", "ablationcam", "ablationcam does not apply"),
        ("batch", "rollout", "rollout does not apply"),
        ("evaluate", "finercam", "finercam does not apply"),
        ("evaluate", "nosuch", "Unknown method"),
    ],
)
def test_methods_that_do_not_apply_to_a_word_are_refused_in_one_line(photos, tmp_path, command, method, named):
    out = tmp_path / "out"
    target = photos / "cat-on-grass.png" if command == "run" else photos
    _one_line_error(_run(command, CAPTIONER, target, "--method", method, "--out", out), named)
    assert not out.exists() or not any(out.iterdir())


def test_a_layer_that_is_no_map_or_not_in_the_model_is_refused_in_one_line(photos, tmp_path):
    path = photos / "cat-on-grass.png"
    _one_line_error(_run("run", CAPTIONER, path, "--layer", "nowhere", "--out", tmp_path), "'nowhere'")
    _one_line_error(_run("run", CAPTIONER, path, "--layer", "attention.score", "--out", tmp_path), "attention.score")
    assert not any(tmp_path.iterdir())
