"""Vanilla gradient saliency, computed by Captum."""

from __future__ import annotations

from typing import Callable

import torch


def saliency(forward: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor,
             target: torch.Tensor) -> torch.Tensor:
    """|∂ score / ∂ input|, the largest over colour channels → (B, H, W) map."""
    from captum.attr import Saliency

    inputs = batch.detach().clone().requires_grad_(True)
    attribution = Saliency(forward).attribute(inputs, target=target.tolist(), abs=True)
    return attribution.amax(dim=1)
