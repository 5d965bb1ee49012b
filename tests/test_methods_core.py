"""Each method against an independent, straightforward implementation on the same model and image."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import correlation

from attnexplain import explain
from attnexplain.images import load_image


def _batch(photo, size):
    from attnexplain.preprocess import Preprocessing, prepare

    return prepare(load_image(photo).pixels, Preprocessing(size=(size, size))).tensor


def _reference_gradcam(model, layer, batch, target):
    """Textbook Grad-CAM: forward hook, full autograd backward, channel weights = mean gradient."""
    model = model.requires_grad_(True)
    store = {}
    handle = layer.register_forward_hook(lambda m, i, o: store.update(act=o) or o.retain_grad())
    try:
        output = model(batch)
        output[0, target].backward()
    finally:
        handle.remove()
        model.requires_grad_(False)
        model.zero_grad(set_to_none=True)
    activation, gradient = store["act"].detach(), store["act"].grad
    cam = torch.relu((gradient.mean(dim=(2, 3), keepdim=True) * activation).sum(1, keepdim=True))
    return F.interpolate(cam, size=batch.shape[-2:], mode="bilinear", align_corners=False)[0, 0].numpy()


@pytest.mark.parametrize("target", [None, 3])
def test_gradcam_matches_reference_on_torchvision_resnet(small_resnet, photo, target):
    result = explain(small_resnet, photo, "gradcam", target=target, size=96)
    assert result.layer == "layer4"  # the last layer with a spatial map
    expected_target = target if target is not None else result.predictions[0].index
    assert result.target.index == expected_target
    reference = _reference_gradcam(small_resnet, small_resnet.layer4, _batch(photo, 96), expected_target)
    assert result.heatmap.shape == (96, 96)
    assert correlation(result.heatmap, reference) >= 0.999
    assert np.allclose(result.heatmap, reference, rtol=1e-4, atol=1e-6)


def test_gradcam_on_a_chosen_layer_matches_reference(small_resnet, photo):
    result = explain(small_resnet, photo, "gradcam", layer="layer3.0", size=96)
    reference = _reference_gradcam(small_resnet, small_resnet.layer3[0], _batch(photo, 96), result.target.index)
    assert correlation(result.heatmap, reference) >= 0.999


def test_gradcam_leaves_parameter_flags_and_hooks_as_they_were(small_resnet, photo):
    small_resnet.requires_grad_(True)
    explain(small_resnet, photo, "gradcam", size=64)
    assert all(p.requires_grad for p in small_resnet.parameters())
    assert all(p.grad is None for p in small_resnet.parameters())  # no parameter gradients computed
    assert not any(m._forward_hooks for m in small_resnet.modules())
    small_resnet.requires_grad_(False)


def _reference_rollout(model, batch):
    """Rollout from attention recomputed by hand from each block's input and projection weights."""
    inputs = []
    handles = [
        block.ln_1.register_forward_hook(lambda m, i, o: inputs.append(o.detach())) for block in model.encoder.layers
    ]
    with torch.no_grad():
        model(batch)
    for handle in handles:
        handle.remove()
    tokens = inputs[0].shape[1]
    result = np.eye(tokens)
    for block, x in zip(model.encoder.layers, inputs):
        attention = block.self_attention
        heads, dim = attention.num_heads, attention.embed_dim
        with torch.no_grad():
            q, k, _ = F.linear(x, attention.in_proj_weight, attention.in_proj_bias).chunk(3, dim=-1)
        q = q[0].reshape(tokens, heads, dim // heads).transpose(0, 1)
        k = k[0].reshape(tokens, heads, dim // heads).transpose(0, 1)
        probabilities = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(dim // heads), dim=-1)
        a = probabilities.mean(0).double().numpy() + np.eye(tokens)
        a = a / a.sum(axis=1, keepdims=True)
        result = a @ result
    side = int(math.isqrt(tokens - 1))
    grid = torch.from_numpy(result[0, 1:].reshape(1, 1, side, side)).float()
    return F.interpolate(grid, size=batch.shape[-2:], mode="bilinear", align_corners=False)[0, 0].numpy()


def test_rollout_matches_reference_on_torchvision_vit(small_vit, photo):
    result = explain(small_vit, photo)  # auto → rollout for a ViT
    assert result.method == "rollout" and result.layer is None
    reference = _reference_rollout(small_vit, _batch(photo, 64))
    assert result.heatmap.shape == (64, 64)
    assert correlation(result.heatmap, reference) >= 0.999


def test_capturing_attention_keeps_the_model_output(small_vit, photo):
    batch = _batch(photo, 64)
    with torch.no_grad():
        plain = small_vit(batch)
    result = explain(small_vit, photo, "rollout")
    probabilities = torch.softmax(plain[0], 0)
    assert abs(result.predictions[0].prob - float(probabilities.max())) < 1e-5


def test_saliency_equals_captum_on_the_same_input(small_resnet, photo):
    from captum.attr import Saliency

    result = explain(small_resnet, photo, "saliency", size=64)
    batch = _batch(photo, 64)
    expected = Saliency(small_resnet).attribute(batch.requires_grad_(), target=result.target.index, abs=True)
    assert correlation(result.heatmap, expected.amax(1)[0].numpy()) >= 0.999


@pytest.mark.parametrize("method", ["gradcam", "rollout"])
def test_randomizing_weights_changes_the_map(photo, method):
    """Adebayo et al. 2018: a map that survives weight randomization explains nothing."""
    import torchvision

    def build(seed):
        torch.manual_seed(seed)
        if method == "rollout":
            return torchvision.models.VisionTransformer(
                image_size=64, patch_size=8, num_layers=3, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=5
            ).eval()
        return torchvision.models.resnet18(num_classes=5).eval()

    a = explain(build(0), photo, method, target=0, size=64).heatmap
    b = explain(build(1), photo, method, target=0, size=64).heatmap
    assert correlation(a, b) < 0.9


def test_gradcam_on_an_exported_program_matches_the_eager_model(tmp_path, small_resnet, photo):
    from attnexplain.loading import load_model

    path = tmp_path / "exported.pt2"
    torch.export.save(torch.export.export(small_resnet, (torch.randn(1, 3, 64, 64),)), str(path))
    exported = explain(load_model(path, trust_model=True), photo, "gradcam", layer="layer4")
    eager = explain(small_resnet, photo, "gradcam", layer="layer4", size=64)
    assert exported.heatmap.shape == (64, 64)
    assert correlation(exported.heatmap, eager.heatmap) >= 0.999


def test_batches_give_each_image_its_own_target_and_map(small_resnet, photo):
    """compute_maps on a batch equals explain() image by image (the core the batch command uses)."""
    from skimage import data

    from attnexplain.explanation import compute_maps, resolve_methods
    from attnexplain.loading import LoadedModel
    from attnexplain.plugins import select_plugin
    from attnexplain.preprocess import Preprocessing, prepare

    pictures = [load_image(photo).pixels, data.astronaut(), data.coffee()]
    batch = torch.cat([prepare(p, Preprocessing(size=(64, 64))).tensor for p in pictures])
    loaded = LoadedModel(module=small_resnet, source="test", loader="object", plugin=select_plugin(small_resnet))
    # A layer method and an input-gradient one; every method alone is in test_methods_batch_invariance.
    methods = resolve_methods(loaded, "gradcam,saliency")
    computed = compute_maps(loaded, batch, methods, ["layer4"])
    assert computed.targets.tolist() == computed.probabilities.argmax(1).tolist()
    for index, pixels in enumerate(pictures):
        single = explain(small_resnet, pixels, "gradcam,saliency", size=64)
        assert single.target.index == int(computed.targets[index])
        for name in ("gradcam", "saliency"):
            assert correlation(computed.maps[name][index].numpy(), single.maps[name].heatmap) >= 0.999
