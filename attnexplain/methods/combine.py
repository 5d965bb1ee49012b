"""Maps made comparable: resized to the input, and several fused into one."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def upsample(grid_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) → (B, H, W), bilinear."""
    return F.interpolate(grid_map[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def fuse_maps(per_layer: list[torch.Tensor]) -> torch.Tensor:
    """One layer: its map as is. Several: the mean of each layer's map scaled to [0, 1] per image,
    so that no layer dominates by the size of its values."""
    if len(per_layer) == 1:
        return per_layer[0]
    scaled = []
    for layer_map in per_layer:
        flat = layer_map.flatten(1)
        low = flat.amin(dim=1)[:, None, None]
        span = (flat.amax(dim=1) - flat.amin(dim=1))[:, None, None]
        scaled.append(torch.where(span > 0, (layer_map - low) / span.clamp_min(1e-12), torch.zeros_like(layer_map)))
    return torch.stack(scaled).mean(dim=0)
