"""Defects an independent audit found against the peer libraries (issue #15), each checked against a
computation written out here: Guided Grad-CAM on transformers, DenseNet's rectified features, and
the baselines of integrated gradients and occlusion."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F
import torchvision
from click.testing import CliRunner
from conftest import correlation, with_random_batchnorm_statistics

import attnexplain
from attnexplain.cli import main
from attnexplain.errors import MethodError
from attnexplain.explanation import MethodOptions
from attnexplain.images import load_image
from attnexplain.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, prepare

SIZE = 64


def _input(photo, size: int = SIZE) -> torch.Tensor:
    return prepare(load_image(photo).pixels, Preprocessing(size=(size, size))).tensor


def _hooked_gradcam_and_input_gradient(model, layer, to_map, inputs, target):
    """Grad-CAM on ``layer`` (its output laid out by ``to_map``), upsampled bilinearly, and the
    input gradient, from one plain hook and one backward."""
    store = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: store.update(out=o))
    inputs = inputs.clone().requires_grad_(True)
    try:
        score = model(inputs)[0, target]
    finally:
        handle.remove()
    gradient, input_gradient = torch.autograd.grad(score, [store["out"], inputs])
    activation, gradient = to_map(store["out"].detach()), to_map(gradient)
    cam = torch.relu((gradient.mean(dim=(2, 3), keepdim=True) * activation).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=inputs.shape[-2:], mode="bilinear", align_corners=False)
    return cam[0, 0], input_gradient[0]


# --- 1. guided_gradcam through the plugin's layer layout ---------------------------------------


def _tiny_swin():
    torch.manual_seed(2)
    return torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[4, 4], num_classes=5
    ).eval()


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_guided_gradcam_on_a_transformer_is_guided_backprop_times_its_gradcam(family, small_vit, photo):
    if family == "vit":  # the token sequence of the last block's first norm
        model, layer = small_vit, "encoder.layers.encoder_layer_2.ln_1"

        def to_map(tokens):
            side = SIZE // 8
            return tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)
    else:  # Swin's channels-last (B, H, W, C) last stage
        model, layer = _tiny_swin(), "features.3"

        def to_map(channels_last):
            return channels_last.permute(0, 3, 1, 2)

    # Guided backpropagation changes only nn.ReLU gradients; these models have none (GELU), so it
    # is the plain input gradient here.
    assert not any(isinstance(module, torch.nn.ReLU) for module in model.modules())
    result = attnexplain.explain(model, photo, "guided_gradcam", layer=layer, size=SIZE)
    assert result.maps["guided_gradcam"].layers == [layer]
    cam, input_gradient = _hooked_gradcam_and_input_gradient(model, layer, to_map, _input(photo), result.target.index)
    expected = (input_gradient * cam).sum(dim=0).abs().numpy()
    assert float(np.abs(expected).max()) > 0
    np.testing.assert_allclose(result.heatmap, expected, rtol=1e-3, atol=1e-4 * float(expected.max()))


def test_guided_gradcam_refuses_a_layer_it_cannot_lay_out(small_vit, photo):
    with pytest.raises(MethodError, match="not a \\(batch, channels, height, width\\) map"):
        attnexplain.explain(small_vit, photo, "guided_gradcam", layer="heads", size=SIZE)


def test_guided_gradcam_on_a_vit_from_the_command_line(tmp_path, small_vit, photo):
    path = tmp_path / "vit.pt"
    torch.save(small_vit.state_dict(), path)
    arch_kwargs = dict(image_size=64, patch_size=8, num_layers=3, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=6)
    torch.save({"state_dict": small_vit.state_dict(), "arch": "VisionTransformer", "arch_kwargs": arch_kwargs}, path)
    result = CliRunner().invoke(
        main, ["run", str(path), str(photo), "--method", "guided_gradcam", "--out", str(tmp_path / "out"), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    # the default layer: the input of the block at half depth (block 1 of 3)
    assert report["maps"]["guided_gradcam"]["layers"] == ["encoder.layers.encoder_layer_1.ln_1"]
    assert report["maps"]["guided_gradcam"]["max"] > 0


# --- 3. DenseNet: the rectified features its classifier reads -----------------------------------


@pytest.fixture(scope="module")
def densenet():
    """densenet121 as `--arch densenet121` builds it, 5 classes, random BatchNorm statistics."""
    from attnexplain.plugins import find_builder

    torch.manual_seed(3)
    return with_random_batchnorm_statistics(find_builder("densenet121")[1](num_classes=5).eval())


def test_densenet_default_layer_is_the_rectified_features_and_its_gradcam_is_the_cam(densenet, photo):
    """Global average pooling then a linear classifier read relu(features): the gradient of the score
    with respect to them is W[target]/positions everywhere, so Grad-CAM, XGrad-CAM and HiResCAM on
    them are Zhou et al.'s CAM, Σ_c W[target, c]·relu(features)_c, by hand here."""
    result = attnexplain.explain(densenet, photo, "gradcam,xgradcam,hirescam", size=SIZE)
    assert result.layer == "rectified"
    store = {}
    handle = densenet.features.register_forward_hook(lambda m, i, o: store.update(out=o.clone()))
    with torch.no_grad():
        logits = densenet(_input(photo))
    handle.remove()
    target = result.target.index
    assert target == int(logits.argmax())
    features = store["out"]
    assert float((features < 0).float().mean()) > 0.2  # the pre-ReLU map is signed
    weights = densenet.classifier.weight.detach()[target][None, :, None, None]
    cam = torch.relu((weights * torch.relu(features)).sum(dim=1, keepdim=True)) / features[0, 0].numel()
    expected = F.interpolate(cam, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0, 0].numpy()
    for method in ("gradcam", "xgradcam", "hirescam"):
        np.testing.assert_allclose(
            result.maps[method].heatmap, expected, rtol=1e-4, atol=1e-5 * float(expected.max()), err_msg=method
        )


def test_densenet_keeps_its_output_and_weights(densenet):
    assert isinstance(densenet, torchvision.models.DenseNet)
    assert all(key.startswith(("features.", "classifier.")) for key in densenet.state_dict())
    inputs = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():  # torchvision's own forward, on the same weights
        assert torch.allclose(torchvision.models.DenseNet.forward(densenet, inputs), densenet(inputs), atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_densenet_map_is_the_same_on_cpu_and_cuda(densenet, photo):
    import copy

    on_cpu = attnexplain.explain(densenet, photo, "gradcam,gradcampp,xgradcam", size=SIZE)
    on_cuda = attnexplain.explain(copy.deepcopy(densenet).cuda(), photo, "gradcam,gradcampp,xgradcam", size=SIZE)
    for method in ("gradcam", "gradcampp", "xgradcam"):
        assert correlation(on_cpu.maps[method].heatmap, on_cuda.maps[method].heatmap) >= 0.9999, method


# --- 5. baselines of integrated gradients and occlusion ----------------------------------------

BASELINE_SIZE = 32  # small: the baseline tests run every baseline through two methods


def _baseline_by_hand(inputs: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "mean":  # the normalisation's mean colour is 0 once normalised
        return torch.zeros_like(inputs)
    if kind == "black":  # pixel value 0, normalised
        black = -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)
        return black[None, :, None, None].expand_as(inputs).clone()
    # blur: a Gaussian of σ = side/16, radius 3σ, mirrored at the borders; normalisation is affine
    # per channel, so blurring the normalised image is blurring the photo.
    sigma = inputs.shape[-1] / 16
    blurred = scipy.ndimage.gaussian_filter(inputs.numpy(), sigma=(0, 0, sigma, sigma), mode="mirror", truncate=3.0)
    return torch.from_numpy(blurred)


@pytest.mark.parametrize("baseline", ["mean", "black", "blur"])
def test_integrated_gradients_and_occlusion_start_from_the_chosen_baseline(baseline, small_resnet, photo):
    from captum.attr import IntegratedGradients, Occlusion

    options = MethodOptions(steps=8, window=16, stride=8, baseline=baseline)
    result = attnexplain.explain(
        small_resnet, photo, "integrated_gradients,occlusion", size=BASELINE_SIZE, options=options
    )
    inputs, target = _input(photo, BASELINE_SIZE), result.target.index
    reference = _baseline_by_hand(inputs, baseline)
    integrated = IntegratedGradients(small_resnet).attribute(
        inputs.clone().requires_grad_(), baselines=reference, target=target, n_steps=8
    )
    np.testing.assert_allclose(
        result.maps["integrated_gradients"].heatmap, integrated.sum(1).abs()[0].detach().numpy(), rtol=1e-3, atol=1e-5
    )
    occluded = Occlusion(small_resnet).attribute(
        inputs, sliding_window_shapes=(3, 16, 16), strides=(3, 8, 8), baselines=reference, target=target
    )
    np.testing.assert_allclose(result.maps["occlusion"].heatmap, occluded.sum(1)[0].numpy(), rtol=1e-3, atol=1e-5)


def test_baselines_differ_from_each_other(small_resnet, photo):
    maps = {
        baseline: attnexplain.explain(
            small_resnet,
            photo,
            "integrated_gradients",
            size=BASELINE_SIZE,
            options=MethodOptions(steps=8, baseline=baseline),
        ).heatmap
        for baseline in ("mean", "black", "blur")
    }
    assert correlation(maps["mean"], maps["black"]) < 0.999
    assert correlation(maps["mean"], maps["blur"]) < 0.999


def test_baseline_option_reaches_the_report_and_refuses_unknown_values(tmp_path, resnet_state_dict_file, photo):
    common = [
        "run",
        str(resnet_state_dict_file),
        str(photo),
        "--arch",
        "resnet18",
        "--size",
        "32",
        "--method",
        "occlusion",
        "--window",
        "8",
        "--out",
        str(tmp_path / "out"),
    ]
    result = CliRunner().invoke(main, common + ["--baseline", "blur", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["options"]["baseline"] == "blur"
    refused = CliRunner().invoke(main, common + ["--baseline", "grey"])
    assert refused.exit_code == 2 and "'grey' is not one of 'mean', 'black', 'blur'" in refused.output
    with pytest.raises(MethodError, match="baseline must be one of mean, black, blur"):
        MethodOptions(baseline="grey")
