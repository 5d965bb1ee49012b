"""Learned attention of Swin and MaxViT: the recorded probabilities and positions reproduce what the
model computed, and windowed rollout equals the dense matrix product it stands for."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

import attnexplain
from attnexplain.default_plugins.torchvision_attention import capture_windowed_attention, windowed_attention_modules
from attnexplain.methods.attention import gradient_rollout, raw_attention, rollout
from attnexplain.plugins import WindowedAttention
from attnexplain.render import render_attention_grid


def _record(model, batch):
    """Each attention module's recorded WindowedAttention, its input and its output."""
    names = windowed_attention_modules(model)
    recorded, inputs, outputs = {}, {}, {}
    handles = []

    def keep(name):
        def hook(module, args, output):
            inputs[name], outputs[name] = args[0], output

        return hook

    for name in names:
        handles.append(model.get_submodule(name).register_forward_hook(keep(name)))
    try:
        with torch.no_grad(), capture_windowed_attention(model, names, recorded):
            logits = model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return names, recorded, inputs, outputs, logits


def _mix_by_position(layer: WindowedAttention, values: torch.Tensor, padding_value: torch.Tensor):
    """Σ_k A[q, k] v[position(k)] for every query, with the values looked up on the map by position
    (heads as the second axis of ``values``: (B, positions, heads, head dim))."""
    positions = layer.positions
    padded = torch.cat([values, padding_value.expand(values.shape[0], 1, *values.shape[2:])], dim=1)
    keys = padded[:, torch.where(positions >= 0, positions, values.shape[1])]  # (B, W, T, heads, d)
    return torch.einsum("bwhqk,bwkhd->bwqhd", layer.probabilities, keys)


def test_swin_attention_and_positions_reproduce_each_layer():
    torch.manual_seed(0)
    model = torchvision.models.swin_t().eval()
    # 128 px: maps of 32, 16, 8 and 4 positions a side, none a multiple of the 7-wide windows, so
    # padding, cyclic shifts and a shift dropped for a single window all occur.
    names, recorded, inputs, outputs, _ = _record(model, torch.randn(1, 3, 128, 128))
    assert len(names) == 12
    for name in names:
        module, layer = model.get_submodule(name), recorded[name]
        x = inputs[name]
        batch, height, width, channels = x.shape
        heads = module.num_heads
        assert (layer.height, layer.width) == (height, width)
        assert sorted(layer.positions[layer.positions >= 0].tolist()) == list(range(height * width))
        weight, bias = module.qkv.weight[2 * channels :], module.qkv.bias[2 * channels :]
        values = F.linear(x.reshape(batch, -1, channels), weight, bias).reshape(batch, -1, heads, channels // heads)
        # Padding tokens are zero features: their value is the bias alone.
        mixed = _mix_by_position(layer, values, bias.reshape(1, 1, heads, channels // heads))
        rebuilt = module.proj(mixed.flatten(-2))  # (B, W, T, C)
        real = layer.positions >= 0
        expected = outputs[name].reshape(batch, -1, channels)[:, layer.positions[real]]
        torch.testing.assert_close(rebuilt[:, real], expected, atol=1e-4, rtol=1e-4)


def test_maxvit_window_and_grid_attention_positions_reproduce_each_layer():
    torch.manual_seed(0)
    model = torchvision.models.maxvit_t().eval()
    names, recorded, inputs, outputs, _ = _record(model, torch.randn(1, 3, 224, 224))
    assert len(names) == 2 * sum(len(block.layers) for block in model.blocks)
    checked = set()
    for name in names:
        module, layer = model.get_submodule(name), recorded[name]
        partition = model.get_submodule(name.rsplit(".", 2)[0])
        kind = partition.partition_type
        # Rebuild the layer's normalised tokens on the map, independently of the model's partition.
        normalised = inputs[name]  # (B, G, P, D) as the model grouped them
        batch, _, _, channels = normalised.shape
        on_map = normalised.new_zeros(batch, layer.height * layer.width, channels)
        on_map[:, layer.positions.flatten()] = normalised.reshape(batch, -1, channels)
        heads = module.n_heads
        values = module.to_qkv(on_map).chunk(3, dim=-1)[2].reshape(batch, -1, heads, channels // heads)
        mixed = _mix_by_position(layer, values, values.new_zeros(1, 1, heads, channels // heads))
        rebuilt = module.merge(mixed.flatten(-2))
        torch.testing.assert_close(rebuilt, outputs[name], atol=1e-4, rtol=1e-4)
        # Grid attention groups positions a fixed stride apart; window attention, a square block.
        rows, columns = layer.positions[0] // layer.width, layer.positions[0] % layer.width
        if kind == "grid":
            stride = layer.height // model.partition_size
            assert set(np.diff(sorted(set(rows.tolist())))) == {stride}
            assert set(np.diff(sorted(set(columns.tolist())))) == {stride}
        else:
            assert rows.max() - rows.min() == model.partition_size - 1
            assert columns.max() - columns.min() == model.partition_size - 1
        checked.add(kind)
    assert checked == {"window", "grid"}


def _dense(layer: WindowedAttention, matrices: torch.Tensor) -> np.ndarray:
    """(windows, T, T) per-window matrices of one image as the dense positions × positions matrix."""
    count = layer.height * layer.width
    dense = np.zeros((count, count))
    for window, tokens in enumerate(layer.positions.tolist()):
        for q, query in enumerate(tokens):
            for k, key in enumerate(tokens):
                if query >= 0 and key >= 0:
                    dense[query, key] += float(matrices[window, q, k])
    return dense


def _pooling(fine: tuple[int, int], coarse: tuple[int, int]) -> np.ndarray:
    """(coarse, fine): each coarse position the mean of the 2 × 2 fine positions under it."""
    matrix = np.zeros((coarse[0] * coarse[1], fine[0] * fine[1]))
    for row in range(fine[0]):
        for column in range(fine[1]):
            matrix[(row // 2) * coarse[1] + column // 2, row * fine[1] + column] = 1
    return matrix / matrix.sum(axis=1, keepdims=True)


def _synthetic_layers(seed=0):
    """Two 3×3 layers in 2×2 windows of a map padded to 4×4 (the second's windows rolled by one, as
    Swin does), then one 2×2 layer; every position a query exactly once per layer."""
    generator = torch.Generator().manual_seed(seed)
    padded = F.pad(torch.arange(9).reshape(1, 3, 3), (0, 1, 0, 1), value=-1)[0]
    partition = lambda grid: grid.reshape(2, 2, 2, 2).permute(0, 2, 1, 3).reshape(4, 4)
    layers = []
    for positions, side in (
        (partition(padded), 3),
        (partition(torch.roll(padded, shifts=(-1, -1), dims=(0, 1))), 3),
        (torch.tensor([[0, 1, 2, 3]]), 2),
    ):
        windows, tokens = positions.shape
        probabilities = torch.softmax(torch.randn(2, windows, 3, tokens, tokens, generator=generator) * 2, -1)
        layers.append(WindowedAttention(probabilities, positions, side, side))
    return layers


@pytest.mark.parametrize("fusion", ["mean", "max"])
def test_windowed_rollout_equals_the_dense_product(fusion):
    layers = _synthetic_layers()
    result = rollout(layers, None, fusion)
    for image in range(2):
        joint = np.full((1, 4), 1 / 4)  # the classifier's mean over the last tokens
        for index in (2, 1, 0):
            layer = layers[index]
            fused = layer.probabilities[image].amax(1) if fusion == "max" else layer.probabilities[image].mean(1)
            dense = _dense(layer, fused)
            mixed = 0.5 * dense + 0.5 * np.eye(len(dense))
            mixed /= mixed.sum(axis=1, keepdims=True)
            joint = joint @ mixed
            if index == 2:
                joint = joint @ _pooling((3, 3), (2, 2))
        np.testing.assert_allclose(result[image].flatten().numpy(), joint[0], rtol=1e-5, atol=1e-7)


def test_windowed_chefer_equals_the_dense_product():
    layers = _synthetic_layers()
    generator = torch.Generator().manual_seed(1)
    gradients = [torch.randn(layer.probabilities.shape, generator=generator) for layer in layers]
    result = gradient_rollout(layers, gradients, None)
    for image in range(2):
        relevance = np.full((1, 4), 1 / 4)
        for index in (2, 1, 0):
            weighted = torch.relu(gradients[index][image] * layers[index].probabilities[image]).mean(1)
            dense = _dense(layers[index], weighted)
            relevance = relevance @ (np.eye(len(dense)) + dense)
            if index == 2:
                relevance = relevance @ _pooling((3, 3), (2, 2))
        np.testing.assert_allclose(result[image].flatten().numpy(), relevance[0], rtol=1e-5, atol=1e-7)


def test_windowed_raw_attention_is_the_attention_each_position_receives():
    layers = _synthetic_layers()
    grid = raw_attention(layers, None)
    assert grid.shape == (2, 3, 3, 3, 3)
    dense = _dense(layers[0], layers[0].probabilities[1, :, 2])  # image 1, head 2
    queries = np.bincount(
        [w for w, tokens in enumerate(layers[0].positions.tolist()) for token in tokens if token >= 0], minlength=4
    )
    window_of = {token: w for w, tokens in enumerate(layers[0].positions.tolist()) for token in tokens}
    received = [dense[:, key].sum() / queries[window_of[key]] for key in range(9)]
    np.testing.assert_allclose(grid[1, 0, 2].flatten().numpy(), received, rtol=1e-5)
    # The coarse layer is repeated up to the first layer's 3×3 map.
    assert torch.equal(grid[:, 2, :, 0, 0], grid[:, 2, :, 1, 1])


# MaxViT's recorded attention is checked layer by layer above; explaining it end to end takes seconds.
@pytest.mark.parametrize(
    "name, size", [("swin_t", 128), ("swin_v2_t", 128), pytest.param("maxvit_t", 224, marks=pytest.mark.heavy)]
)
def test_swin_and_maxvit_explain_with_learned_attention(name, size, photo):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval()
    batch = torch.randn(1, 3, size, size)
    with torch.no_grad():
        plain = model(batch)
    explanation = attnexplain.explain(model, photo, "auto,attention,chefer", size=size)
    assert list(explanation.maps) == ["rollout", "attention", "chefer"]  # auto is rollout
    for result in explanation.maps.values():
        assert result.heatmap.shape == (size, size)
        assert np.isfinite(result.heatmap).all() and np.ptp(result.heatmap) > 0
    grid = explanation.maps["attention"].attention_grid
    assert grid.shape[0] == len(windowed_attention_modules(model))
    if name.startswith("swin"):  # 3 heads in the first stage, 24 in the last
        assert np.isnan(grid[0, 3:]).all() and not np.isnan(grid[-1]).any()
        mosaic = render_attention_grid(grid, cell=8, gap=0)
        assert (mosaic[:8, 3 * 8 :] == 255).all() and not (mosaic[-8:] == 255).all()
    with torch.no_grad():  # recording left the model as it was
        torch.testing.assert_close(model(batch), plain)


def test_windowed_attention_of_a_batch_is_each_image_s_own():
    torch.manual_seed(0)
    model = torchvision.models.swin_t(num_classes=5).eval()
    loaded = attnexplain.explanation._as_loaded_model(model)
    methods = attnexplain.explanation.resolve_methods(loaded, "rollout,attention")
    images = torch.randn(2, 3, 96, 96)
    together = attnexplain.explanation.compute_maps(loaded, images, methods, [])
    for index in range(2):
        alone = attnexplain.explanation.compute_maps(loaded, images[index : index + 1], methods, [])
        for name in ("rollout", "attention"):
            torch.testing.assert_close(together.maps[name][index], alone.maps[name][0], atol=1e-5, rtol=1e-4)


def test_raw_windowed_attention_of_a_half_precision_model():
    layers = [
        WindowedAttention(layer.probabilities.half(), layer.positions, layer.height, layer.width)
        for layer in _synthetic_layers()
    ]
    grid = raw_attention(layers, None)
    assert grid.dtype == torch.float32 and torch.isfinite(grid[:, :, :3]).all()
