"""Grad-CAM (Selvaraju et al. 2017)."""

from __future__ import annotations

import torch


def gradcam(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) activation and gradient → (B, H, W) map.

    Each channel is weighted by its gradient averaged over positions; the weighted sum is passed
    through ReLU to keep only what speaks for the target.
    """
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * activation).sum(dim=1))
