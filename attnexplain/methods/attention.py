"""Attention methods over per-layer attention probabilities, input first.

Two forms of recorded attention:

- global self-attention (ViT): (B, heads, tokens, tokens) tensors whose tokens a :class:`TokenGrid`
  places on the image (a class token first, then the patches row by row);
- windowed self-attention (Swin, MaxViT): :class:`WindowedAttention`, attention inside windows of
  each layer's token map, with every window token's position on that map.

Windowed rollout follows the same definition as the global one, without forming the
(tokens × tokens) matrices: a layer's dense matrix is zero outside its windows, so the product of
the layers is applied to one row vector, from the output back to the input (rows of the product are
all rollout reads). Such models have no class token; their classifier reads the mean of the last
layer's tokens, so the vector starts uniform there. Where the map gets coarser (patch merging, a
strided convolution) each coarse token draws equally on the finer tokens beneath it.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..plugins import SpatialAttention, TokenGrid, WindowedAttention
from .combine import fuse_maps, upsample


def fuse_heads(attention: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """(B, heads, T, T) → (B, T, T) by the mean, max or min over heads."""
    if head_fusion == "mean":
        return attention.mean(dim=1)
    if head_fusion == "max":
        return attention.amax(dim=1)
    if head_fusion == "min":
        return attention.amin(dim=1)
    raise ValueError(f"head fusion must be mean, max or min, not {head_fusion!r}")


def discard_lowest(fused: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the ``ratio`` weakest attention weights of each matrix, never those of the class token's
    self-attention (vit-explain's noise filter)."""
    if ratio <= 0:
        return fused
    batch, tokens, _ = fused.shape
    flat = fused.reshape(batch, -1).clone()
    count = int(flat.shape[1] * ratio)
    if count:
        lowest = flat.topk(count, dim=1, largest=False).indices
        keep_class_token = lowest != 0
        rows = torch.arange(batch, device=fused.device)[:, None].expand_as(lowest)
        flat[rows[keep_class_token], lowest[keep_class_token]] = 0
    return flat.reshape(batch, tokens, tokens)


def rollout(
    attentions: list[torch.Tensor], grid: TokenGrid, head_fusion: str = "mean", discard_ratio: float = 0.0
) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) → (B, grid h, grid w).

    Heads are fused; the residual connection is accounted for by mixing in the identity
    (0.5·A + 0.5·I, rows renormalised); layers are chained by matrix product, and the map is the
    query token's (the class token's) row over the patches. Windowed attention: see the module's
    docstring; the map lies on the first attention layer's token map.
    """
    if _is_windowed(attentions):
        return _windowed_rollout(attentions, head_fusion, discard_ratio)
    return to_grid(_rollout_products(attentions, head_fusion, discard_ratio)[-1], grid)


def rollout_by_depth(
    attentions: list[torch.Tensor], grid: TokenGrid, head_fusion: str = "mean", discard_ratio: float = 0.0
) -> torch.Tensor:
    """Rollout through the first 1, 2, … L layers → (B, L, grid h, grid w): how the class token's
    attention flow spreads as depth grows (the last is :func:`rollout`). Global attention only."""
    products = _rollout_products(attentions, head_fusion, discard_ratio)
    return torch.stack([to_grid(joint, grid) for joint in products], dim=1)


def _rollout_products(attentions: list[torch.Tensor], head_fusion: str, discard_ratio: float) -> list[torch.Tensor]:
    """The rollout matrix after each layer, input first."""
    products: list[torch.Tensor] = []
    for attention in attentions:
        _require_self_attention(attention)
        fused = discard_lowest(fuse_heads(attention.float(), head_fusion), discard_ratio)
        identity = torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
        mixed = 0.5 * fused + 0.5 * identity
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        products.append(mixed if not products else mixed @ products[-1])
    return products


def gradient_rollout(attentions: list[torch.Tensor], gradients: list[torch.Tensor], grid: TokenGrid) -> torch.Tensor:
    """Gradient-weighted attention rollout (Chefer et al. 2021, "Generic Attention-model
    Explainability"): R ← R + Ē·R with Ē = mean over heads of relu(∇A ⊙ A), R starting at I."""
    if _is_windowed(attentions):
        return _windowed_gradient_rollout(attentions, gradients)
    relevance = None
    for attention, gradient in zip(attentions, gradients):
        _require_self_attention(attention)
        weighted = torch.relu(gradient.float() * attention.float()).mean(dim=1)
        if relevance is None:
            relevance = torch.eye(weighted.shape[-1], dtype=weighted.dtype, device=weighted.device).expand_as(weighted)
        relevance = relevance + weighted @ relevance
    return to_grid(relevance, grid)


#: LeGrad's authors' correction for SigLIP: the target's map is zeroed where an empty prompt's map,
#: scaled to [0, 1], is above this.
REFERENCE_THRESHOLD = 0.8


def legrad(
    layer_gradients: list[torch.Tensor], grid: TokenGrid, reference_gradients: list[torch.Tensor] | None = None
) -> torch.Tensor:
    """LeGrad (Bousselham et al. 2024) → (B, grid h, grid w).

    ``layer_gradients[l]`` is ∂sˡ/∂Aˡ (B, heads, T, T): the gradient of layer l's own score for the
    target (the model's head read off that layer's tokens) with respect to that layer's attention
    (or the attention of a pooling head applied to them). Each layer's map is relu of it averaged
    over heads and queries, at the patch keys; the map is their mean over layers. Attention values
    themselves are not multiplied in. ``reference_gradients``, the same for an empty prompt: its
    map, min-max scaled per image, zeroes the target's where above :data:`REFERENCE_THRESHOLD`.
    """
    heatmap = _legrad_mean(layer_gradients, grid)
    if reference_gradients:
        reference = _legrad_mean(reference_gradients, grid).flatten(1)
        low, high = reference.min(dim=1, keepdim=True).values, reference.max(dim=1, keepdim=True).values
        scaled = ((reference - low) / (high - low).clamp_min(torch.finfo(reference.dtype).tiny)).view_as(heatmap)
        heatmap = heatmap.masked_fill(scaled > REFERENCE_THRESHOLD, 0.0)
    return heatmap


def _legrad_mean(layer_gradients: list[torch.Tensor], grid: TokenGrid) -> torch.Tensor:
    maps = []
    for gradient in layer_gradients:
        _require_self_attention(gradient)
        keys = torch.relu(gradient.float()).mean(dim=(1, 2))[:, grid.prefix_tokens :]
        if keys.shape[-1] != grid.height * grid.width:
            raise ValueError(f"{keys.shape[-1]} patch tokens do not fill a {grid.height}x{grid.width} grid")
        maps.append(keys.reshape(-1, grid.height, grid.width))
    return torch.stack(maps).mean(dim=0)


def raw_attention(attentions: list[torch.Tensor], grid: TokenGrid) -> torch.Tensor:
    """Every layer's and head's attention from the query token to the patches →
    (B, layers, heads, grid h, grid w).

    Windowed attention has no query token: a position's value is the attention it receives, the
    mean over the queries of its window. Layers on coarser maps are repeated up to the first
    layer's map, and layers with fewer heads than the most are NaN in the missing heads.
    """
    if _is_windowed(attentions):
        return _windowed_raw_attention(attentions)
    maps = [
        to_grid(attention.float().flatten(0, 1), grid).reshape(
            attention.shape[0], attention.shape[1], grid.height, grid.width
        )
        for attention in attentions
    ]
    return torch.stack(maps, dim=1)


def to_grid(matrix: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
    """The query token's row over the patch tokens, as (B, grid h, grid w)."""
    row = matrix[:, grid.query, grid.prefix_tokens :]
    expected = grid.height * grid.width
    if row.shape[-1] != expected:
        raise ValueError(f"{row.shape[-1]} patch tokens do not fill a {grid.height}x{grid.width} grid")
    return row.reshape(-1, grid.height, grid.width)


def _require_self_attention(attention: torch.Tensor) -> None:
    if attention.shape[-1] != attention.shape[-2]:
        raise ValueError(
            "it chains self-attention matrices through the layers, but this model's "
            f"attention maps {attention.shape[-2]} query token(s) onto "
            f"{attention.shape[-1]} keys; use --method attention for it"
        )


# --- windowed attention -----------------------------------------------------------------------


def _is_windowed(attentions: Sequence[object]) -> bool:
    return bool(attentions) and isinstance(attentions[0], WindowedAttention)


def attention_received(layer: WindowedAttention) -> torch.Tensor:
    """(B, heads, height, width): per position, the attention it receives from its window's queries
    (their mean); padding tokens neither give nor receive."""
    real = (layer.positions >= 0).to(torch.float32)  # (windows, tokens)
    query_weights = real / real.sum(dim=1, keepdim=True).clamp_min(1)
    received = torch.einsum("wq,bwhqk->bwhk", query_weights, layer.probabilities.float())
    batch, windows, heads, tokens = received.shape
    by_position = _scatter_keys(received.permute(0, 2, 1, 3).reshape(batch * heads, windows, tokens), layer)
    return by_position.reshape(batch, heads, layer.height, layer.width)


def _windowed_raw_attention(layers: Sequence[WindowedAttention]) -> torch.Tensor:
    first = layers[0]
    most_heads = max(layer.probabilities.shape[2] for layer in layers)
    per_layer = []
    for layer in layers:
        received = attention_received(layer)
        if (layer.height, layer.width) != (first.height, first.width):
            received = F.interpolate(received, size=(first.height, first.width), mode="nearest")
        missing = most_heads - received.shape[1]
        if missing:
            received = torch.cat(
                [received, received.new_full((received.shape[0], missing, *received.shape[2:]), float("nan"))], 1
            )
        per_layer.append(received)
    return torch.stack(per_layer, dim=1)


def _windowed_rollout(layers: Sequence[WindowedAttention], head_fusion: str, discard_ratio: float) -> torch.Tensor:
    def mix(relevance: torch.Tensor, layer: WindowedAttention, index: int) -> torch.Tensor:
        batch, windows, _, tokens, _ = layer.probabilities.shape
        fused = fuse_heads(layer.probabilities.float().flatten(0, 1), head_fusion)  # (B·windows, T, T)
        fused = _discard_lowest_windowed(fused.reshape(batch, -1), discard_ratio)
        fused = fused.reshape(batch, windows, tokens, tokens) * _real_keys(layer)
        # Rows of 0.5·A + 0.5·I, renormalised (padding keys and discarded weights leave them short).
        row_sums = 0.5 * fused.sum(dim=-1) + 0.5
        queries = _gather_queries(relevance, layer) / row_sums
        to_keys = 0.5 * torch.einsum("bwq,bwqk->bwk", queries, fused) + 0.5 * queries
        return _scatter_keys(to_keys, layer)

    return _propagate(layers, mix)


def _windowed_gradient_rollout(layers: Sequence[WindowedAttention], gradients: Sequence[torch.Tensor]) -> torch.Tensor:
    def mix(relevance: torch.Tensor, layer: WindowedAttention, index: int) -> torch.Tensor:
        weighted = torch.relu(gradients[index].float() * layer.probabilities.float()).mean(dim=2)
        weighted = weighted * _real_keys(layer)
        to_keys = torch.einsum("bwq,bwqk->bwk", _gather_queries(relevance, layer), weighted)
        return relevance + _scatter_keys(to_keys, layer)  # r·(I + Ē)

    return _propagate(layers, mix)


def _propagate(
    layers: Sequence[WindowedAttention], mix: Callable[[torch.Tensor, WindowedAttention, int], torch.Tensor]
) -> torch.Tensor:
    """Carry a row vector over positions from the last layer's output back to the first layer's
    input: ``mix`` applies one layer; between maps of different sizes, coarse → fine."""
    last = layers[-1]
    batch = last.probabilities.shape[0]
    count = last.height * last.width
    relevance = torch.full((batch, count), 1.0 / count, device=last.probabilities.device)
    shape = (last.height, last.width)
    for index in range(len(layers) - 1, -1, -1):
        layer = layers[index]
        if (layer.height, layer.width) != shape:
            relevance = _to_finer_map(relevance, shape, (layer.height, layer.width))
            shape = (layer.height, layer.width)
        relevance = mix(relevance, layer, index)
    return relevance.reshape(batch, *shape)


def _to_finer_map(relevance: torch.Tensor, coarse: tuple[int, int], fine: tuple[int, int]) -> torch.Tensor:
    """Share each coarse position's value equally among the fine positions beneath it."""
    device = relevance.device
    rows = torch.arange(fine[0], device=device) * coarse[0] // fine[0]
    columns = torch.arange(fine[1], device=device) * coarse[1] // fine[1]
    parents = (rows[:, None] * coarse[1] + columns[None, :]).flatten()
    children = torch.bincount(parents, minlength=coarse[0] * coarse[1]).clamp_min(1)
    return relevance[:, parents] / children[parents]


def _real_keys(layer: WindowedAttention) -> torch.Tensor:
    """(1, windows, 1, tokens) 1 for the tokens that are positions on the map, 0 for padding."""
    return (layer.positions >= 0).to(torch.float32)[None, :, None, :]


def _gather_queries(relevance: torch.Tensor, layer: WindowedAttention) -> torch.Tensor:
    """(B, positions) → (B, windows, tokens); padding tokens (position -1) read the appended 0."""
    return F.pad(relevance, (0, 1))[:, layer.positions]


def _scatter_keys(values: torch.Tensor, layer: WindowedAttention) -> torch.Tensor:
    """(B, windows, tokens) → (B, positions), summing what lands on the same position; padding dropped."""
    real = layer.positions >= 0
    summed = values.new_zeros(values.shape[0], layer.height * layer.width)
    return summed.index_add_(1, layer.positions[real], values[:, real])


def _discard_lowest_windowed(fused: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the ``ratio`` weakest weights of each image's windows (there is no class token to spare)."""
    count = int(fused.shape[1] * ratio)
    if ratio <= 0 or not count:
        return fused
    lowest = fused.topk(count, dim=1, largest=False).indices
    return fused.scatter(1, lowest, 0.0)


# --- per-layer spatial attention --------------------------------------------------------------


def spatial_attention(layers: Sequence[SpatialAttention], size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) at ``size`` from attention recorded per layer on its own grid: each layer's weights
    (heads averaged) resized to ``size``; one layer as it is, several the mean of each scaled to
    [0, 1] per image (:func:`~attnexplain.methods.combine.fuse_maps`), so that a layer whose
    weights are spread over more positions (smaller values) weighs as much as one with fewer."""
    return fuse_maps([upsample(_heads_of(layer).mean(dim=1), size) for layer in layers])


def spatial_attention_grid(layers: Sequence[SpatialAttention]) -> torch.Tensor:
    """(B, layers, heads, h, w) for the report: every layer resized to the finest layer's grid,
    NaN in the heads a layer does not have."""
    height = max(layer.height for layer in layers)
    width = max(layer.width for layer in layers)
    heads = max(_heads_of(layer).shape[1] for layer in layers)
    grids = []
    for layer in layers:
        weights = _heads_of(layer).float()
        resized = F.interpolate(weights, size=(height, width), mode="bilinear", align_corners=False)
        missing = heads - resized.shape[1]
        if missing:
            resized = torch.cat(
                [resized, resized.new_full((resized.shape[0], missing, height, width), float("nan"))], dim=1
            )
        grids.append(resized)
    return torch.stack(grids, dim=1)


def _heads_of(layer: SpatialAttention) -> torch.Tensor:
    weights = layer.weights
    if weights.dim() == 3:
        weights = weights[:, None]
    if weights.dim() != 4 or tuple(weights.shape[-2:]) != (layer.height, layer.width):
        raise ValueError(
            f"spatial attention of shape {tuple(layer.weights.shape)} is not (batch, "
            f"[heads,] {layer.height}, {layer.width})"
        )
    return weights
