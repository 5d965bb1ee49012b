"""Attention methods against straightforward references computed from the model's own weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import correlation

import attnexplain
from attnexplain.explanation import MethodOptions
from attnexplain.images import load_image
from attnexplain.preprocess import Preprocessing, prepare


def _batch(photo, size=64):
    return prepare(load_image(photo).pixels, Preprocessing(size=(size, size))).tensor


def _manual_forward(model, batch, tokens=None):
    """The ViT's forward written out by hand, attention softmax explicit, probabilities kept in the graph
    (and each block's output appended to ``tokens`` when given)."""
    x = model._process_input(batch)
    x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], dim=1)
    x = x + model.encoder.pos_embedding
    probabilities = []
    for block in model.encoder.layers:
        attention = block.self_attention
        heads, dim = attention.num_heads, attention.embed_dim
        y = block.ln_1(x)
        q, k, v = F.linear(y, attention.in_proj_weight, attention.in_proj_bias).chunk(3, dim=-1)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, dim // heads).transpose(1, 2)
        weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(dim // heads), dim=-1)
        probabilities.append(weights)
        mixed = (weights @ split(v)).transpose(1, 2).reshape(x.shape)
        x = x + attention.out_proj(mixed)
        x = x + block.mlp(block.ln_2(x))
        if tokens is not None:
            tokens.append(x)
    x = model.encoder.ln(x)
    return model.heads(x[:, 0]), probabilities


def _upsample(grid, size=64):
    side = int(math.isqrt(grid.size))
    tensor = torch.from_numpy(np.asarray(grid, dtype=np.float32).reshape(1, 1, side, side))
    return F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()


def _fuse(a, fusion):
    return {"mean": a.mean(0), "max": a.max(0), "min": a.min(0)}[fusion]


def _reference_rollout(probabilities, fusion="mean", discard=0.0):
    tokens = probabilities[0].shape[-1]
    result = np.eye(tokens)
    for weights in probabilities:
        a = _fuse(weights[0].detach().double().numpy(), fusion)
        if discard:
            flat = a.reshape(-1).copy()
            order = np.argsort(flat, kind="stable")[: int(flat.size * discard)]
            flat[order[order != 0]] = 0
            a = flat.reshape(a.shape)
        a = 0.5 * a + 0.5 * np.eye(tokens)
        a = a / a.sum(axis=1, keepdims=True)
        result = a @ result
    return _upsample(result[0, 1:])


def test_manual_forward_reproduces_the_model(small_vit, photo):
    with torch.no_grad():
        assert torch.allclose(_manual_forward(small_vit, _batch(photo))[0], small_vit(_batch(photo)), atol=1e-5)


@pytest.mark.parametrize("fusion,discard", [("mean", 0.0), ("max", 0.0), ("min", 0.0), ("mean", 0.5)])
def test_rollout_variants_match_reference(small_vit, photo, fusion, discard):
    with torch.no_grad():
        _, probabilities = _manual_forward(small_vit, _batch(photo))
    result = attnexplain.explain(
        small_vit, photo, "rollout", options=MethodOptions(head_fusion=fusion, discard_ratio=discard)
    )
    assert correlation(result.heatmap, _reference_rollout(probabilities, fusion, discard)) >= 0.999


def test_chefer_gradient_rollout_matches_reference(small_vit, photo):
    result = attnexplain.explain(small_vit, photo, "chefer", target=2)
    small_vit.requires_grad_(False)
    logits, probabilities = _manual_forward(small_vit, _batch(photo).requires_grad_(True))
    gradients = torch.autograd.grad(logits[0, 2], probabilities)
    tokens = probabilities[0].shape[-1]
    relevance = np.eye(tokens)
    for weights, gradient in zip(probabilities, gradients):
        e = np.maximum(gradient[0].double().numpy() * weights[0].detach().double().numpy(), 0).mean(0)
        relevance = relevance + e @ relevance
    assert result.target.index == 2
    assert correlation(result.heatmap, _upsample(relevance[0, 1:])) >= 0.999


def test_raw_attention_per_layer_and_head(small_vit, photo):
    with torch.no_grad():
        _, probabilities = _manual_forward(small_vit, _batch(photo))
    result = attnexplain.explain(small_vit, photo, "attention")
    grid = result.maps["attention"].attention_grid
    assert grid.shape == (3, 4, 8, 8)  # layers, heads, 64/8 x 64/8 patches
    for layer, weights in enumerate(probabilities):
        expected = weights[0, :, 0, 1:].reshape(4, 8, 8).numpy()
        assert np.allclose(grid[layer], expected, atol=1e-5)
    last = probabilities[-1][0, :, 0, 1:].mean(0).numpy()
    assert correlation(result.heatmap, _upsample(last)) >= 0.999


def test_attention_methods_share_one_pass_and_keep_the_prediction(small_vit, photo):
    with torch.no_grad():
        plain = torch.softmax(small_vit(_batch(photo))[0], 0)
    result = attnexplain.explain(small_vit, photo, "rollout,attention")
    assert list(result.maps) == ["rollout", "attention"]
    assert abs(result.predictions[0].prob - float(plain.max())) < 1e-5


def test_rollout_per_depth_is_the_rollout_of_the_first_layers(small_vit, photo):
    with torch.no_grad():
        _, probabilities = _manual_forward(small_vit, _batch(photo))
    result = attnexplain.explain(small_vit, photo, "rollout", size=64)
    depths = result.maps["rollout"].depth_maps
    assert depths.shape == (len(probabilities), 8, 8)
    for depth in range(1, len(probabilities) + 1):
        reference = _reference_rollout(probabilities[:depth])
        assert correlation(_upsample(depths[depth - 1]), reference) >= 0.999
    np.testing.assert_allclose(_upsample(depths[-1]), result.heatmap, atol=1e-6)
    assert attnexplain.explain(small_vit, photo, "attention", size=64).maps["attention"].depth_maps is None


def test_legrad_matches_the_authors_formula(small_vit, photo):
    """Bousselham et al. 2024: per layer l, the head (final norm, classifier) on the mean of that
    layer's output tokens gives sˡ; relu(∂sˡ/∂Aˡ) averaged over heads and queries, patch keys; mean
    over layers."""
    result = attnexplain.explain(small_vit, photo, "legrad", target=3)
    small_vit.requires_grad_(False)
    tokens = []
    _, probabilities = _manual_forward(small_vit, _batch(photo).requires_grad_(True), tokens)
    per_layer = []
    for layer_tokens, weights in zip(tokens, probabilities):
        score = small_vit.heads(small_vit.encoder.ln(layer_tokens.mean(dim=1)))[0, 3]
        (gradient,) = torch.autograd.grad(score, weights, retain_graph=True)
        per_layer.append(np.maximum(gradient[0].double().numpy(), 0).mean(axis=(0, 1))[1:])
    assert result.target.index == 3
    assert correlation(result.heatmap, _upsample(np.mean(per_layer, axis=0))) >= 0.999


def test_legrad_agrees_with_torchcam(small_vit, photo):
    from torchcam.methods import LeGrad

    result = attnexplain.explain(small_vit, photo, "legrad", target=1)
    with LeGrad(small_vit, list(small_vit.encoder.layers)) as extractor:
        scores = small_vit(_batch(photo))
        reference = extractor(1, scores)[0][0].detach().numpy()
    assert correlation(result.heatmap, _upsample(reference)) >= 0.999


def test_legrad_is_refused_where_the_plugin_cannot_read_layer_tokens(photo):
    import torchvision

    swin = torchvision.models.swin_t(num_classes=3).eval()
    with pytest.raises(attnexplain.errors.MethodError, match="legrad reads each layer's prediction"):
        attnexplain.explain(swin, photo, "legrad", size=64)


def test_legrad_and_chefer_share_one_pass_and_keep_their_maps(small_vit, photo):
    together = attnexplain.explain(small_vit, photo, "chefer,legrad", target=3)
    for method in ("chefer", "legrad"):
        alone = attnexplain.explain(small_vit, photo, method, target=3)
        np.testing.assert_allclose(together.maps[method].heatmap, alone.heatmap, rtol=1e-5, atol=1e-8)
