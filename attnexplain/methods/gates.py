"""Squeeze-and-excitation gates (Hu et al. 2018): the channel attention a CNN learned."""

from __future__ import annotations

import torch


def gated_map(gates: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """(B, C) gates and the block's (B, C, H, W) input → (B, H, W): where the gated channels fire.

    This is the block's own output summed over channels, through ReLU.
    """
    return torch.relu((gates[:, :, None, None] * inputs).sum(dim=1))


def most_gated(gates: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``count`` largest gates of each image: (values (B, k), channel indices (B, k))."""
    return gates.topk(min(count, gates.shape[1]), dim=1)
