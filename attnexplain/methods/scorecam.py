"""Score-CAM (Wang et al. 2020): channels weighted by how much each, used as a mask, supports the target."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def scorecam(activation: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor],
             batch: torch.Tensor, targets: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Per-channel contributions (B, C, H, W); costs C masked forward passes, ``batch_size`` at a time.

    Each channel is upsampled to the input, scaled to [0, 1] and multiplied into the image; the
    target's logits on those masked images, softmaxed over channels, weight the channels (the variant
    pytorch-grad-cam implements; the paper uses the target's probability increase).
    """
    with torch.no_grad():
        masks = F.interpolate(activation, size=batch.shape[-2:], mode="bilinear", align_corners=True)
        flat = masks.flatten(2)
        low = flat.min(dim=-1).values[..., None, None]
        high = flat.max(dim=-1).values[..., None, None]
        masks = (masks - low) / (high - low + 1e-8)
        weights = []
        for image, image_masks, target in zip(batch, masks, targets.tolist()):
            scores = []
            for start in range(0, image_masks.shape[0], batch_size):
                chunk = image_masks[start:start + batch_size, None] * image[None]
                scores.append(forward(chunk)[:, target].float())
            weights.append(torch.softmax(torch.cat(scores), dim=0))
        return torch.stack(weights)[:, :, None, None] * activation
