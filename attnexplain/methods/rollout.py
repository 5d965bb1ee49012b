"""Attention rollout (Abnar & Zuidema 2020)."""

from __future__ import annotations

import torch

from ..plugins import TokenGrid


def rollout(attentions: list[torch.Tensor], grid: TokenGrid) -> torch.Tensor:
    """Per-layer attention probabilities (B, heads, T, T), input first → (B, grid h, grid w) map.

    Heads are averaged; the residual connection is accounted for by mixing in the identity
    (0.5·A + 0.5·I, rows renormalised); layers are chained by matrix product. The map is the rolled-out
    attention of the first prefix token (the class token) to every patch.
    """
    joint = None
    for attention in attentions:
        fused = attention.float().mean(dim=1)
        identity = torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
        mixed = 0.5 * fused + 0.5 * identity
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        joint = mixed if joint is None else mixed @ joint
    to_patches = joint[:, 0, grid.prefix_tokens:]
    expected = grid.height * grid.width
    if to_patches.shape[-1] != expected:
        raise ValueError(f"{to_patches.shape[-1]} patch tokens do not fill a "
                         f"{grid.height}x{grid.width} grid")
    return to_patches.reshape(-1, grid.height, grid.width)
