"""Attention methods over per-layer attention probabilities (B, heads, tokens, tokens), input first."""

from __future__ import annotations

import torch

from ..plugins import TokenGrid


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


def rollout(attentions: list[torch.Tensor], grid: TokenGrid, head_fusion: str = "mean",
            discard_ratio: float = 0.0) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) → (B, grid h, grid w).

    Heads are fused; the residual connection is accounted for by mixing in the identity
    (0.5·A + 0.5·I, rows renormalised); layers are chained by matrix product, and the map is the
    query token's (the class token's) row over the patches.
    """
    joint = None
    for attention in attentions:
        _require_self_attention(attention)
        fused = discard_lowest(fuse_heads(attention.float(), head_fusion), discard_ratio)
        identity = torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
        mixed = 0.5 * fused + 0.5 * identity
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        joint = mixed if joint is None else mixed @ joint
    return to_grid(joint, grid)


def gradient_rollout(attentions: list[torch.Tensor], gradients: list[torch.Tensor],
                     grid: TokenGrid) -> torch.Tensor:
    """Gradient-weighted attention rollout (Chefer et al. 2021, "Generic Attention-model
    Explainability"): R ← R + Ē·R with Ē = mean over heads of relu(∇A ⊙ A), R starting at I."""
    relevance = None
    for attention, gradient in zip(attentions, gradients):
        _require_self_attention(attention)
        weighted = torch.relu(gradient.float() * attention.float()).mean(dim=1)
        if relevance is None:
            relevance = torch.eye(weighted.shape[-1], dtype=weighted.dtype,
                                  device=weighted.device).expand_as(weighted)
        relevance = relevance + weighted @ relevance
    return to_grid(relevance, grid)


def raw_attention(attentions: list[torch.Tensor], grid: TokenGrid) -> torch.Tensor:
    """Every layer's and head's attention from the query token to the patches →
    (B, layers, heads, grid h, grid w)."""
    maps = [to_grid(attention.float().flatten(0, 1), grid).reshape(
        attention.shape[0], attention.shape[1], grid.height, grid.width) for attention in attentions]
    return torch.stack(maps, dim=1)


def to_grid(matrix: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
    """The query token's row over the patch tokens, as (B, grid h, grid w)."""
    row = matrix[:, grid.query, grid.prefix_tokens:]
    expected = grid.height * grid.width
    if row.shape[-1] != expected:
        raise ValueError(f"{row.shape[-1]} patch tokens do not fill a {grid.height}x{grid.width} grid")
    return row.reshape(-1, grid.height, grid.width)


def _require_self_attention(attention: torch.Tensor) -> None:
    if attention.shape[-1] != attention.shape[-2]:
        raise ValueError("it chains self-attention matrices through the layers, but this model's "
                         f"attention maps {attention.shape[-2]} query token(s) onto "
                         f"{attention.shape[-1]} keys; use --method attention for it")
