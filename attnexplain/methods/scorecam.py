"""The Score-CAM family: channels weighted by the target's score on the image masked by each channel.

Score-CAM (Wang et al. 2020) and its smoothed (SS-CAM) and integrated (IS-CAM) variants. Masked images
are scored ``batch_size`` at a time, one sample's (C, H, W) masks at a time, so that memory does not
grow with the number of samples.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .cam import scaled_per_map

#: Noisy masks per channel of SS-CAM, and scaled masks per channel of IS-CAM, when --samples is not
#: given (torchcam's defaults).
SSCAM_SAMPLES = 35
ISCAM_SAMPLES = 10


def scorecam(
    activation: torch.Tensor,
    forward: Callable[[torch.Tensor], torch.Tensor],
    batch: torch.Tensor,
    targets: torch.Tensor,
    batch_size: int = 32,
) -> torch.Tensor:
    """Per-channel contributions (B, C, H, W); costs C masked forward passes, ``batch_size`` at a time.

    Each channel is upsampled to the input, scaled to [0, 1] and multiplied into the image; the
    target's logits on those masked images, softmaxed over channels, weight the channels (the variant
    pytorch-grad-cam implements; the paper uses the target's probability increase).
    """
    with torch.no_grad():
        masks = F.interpolate(activation, size=batch.shape[-2:], mode="bilinear", align_corners=True)
        masks = scaled_per_map(masks)
        weights = [
            torch.softmax(_masked_scores(forward, image, image_masks, target, batch_size), dim=0)
            for image, image_masks, target in zip(batch, masks, targets.tolist())
        ]
        return torch.stack(weights)[:, :, None, None] * activation


def sscam(
    activation: torch.Tensor,
    forward: Callable[[torch.Tensor], torch.Tensor],
    batch: torch.Tensor,
    targets: torch.Tensor,
    samples: int = SSCAM_SAMPLES,
    noise: float = 2.0,
    seed: int = 0,
    batch_size: int = 32,
) -> torch.Tensor:
    """SS-CAM (Wang et al. 2020, "Smoothed Score-CAM"), as torchcam defines it: Score-CAM whose
    weights are the target's logits averaged over ``samples`` masks with Gaussian noise of standard
    deviation ``noise`` added to the [0, 1] masks; costs samples × C masked forwards.

    The noise comes from a generator seeded with ``seed`` on the CPU for each image, one (C, H, W)
    draw per sample: an image's map does not depend on its batch or device.
    """
    with torch.no_grad():
        masks = _input_masks(activation, batch.shape[-2:])
        weights = []
        for image, image_masks, target in zip(batch, masks, targets.tolist()):
            generator = torch.Generator().manual_seed(seed)
            total = torch.zeros(image_masks.shape[0], device=image_masks.device)
            for _ in range(samples):  # one sample's masks at a time: (C, H, W) at input resolution
                draw = torch.randn(image_masks.shape, generator=generator)
                noisy = image_masks + noise * draw.to(image_masks.device, image_masks.dtype)
                total += _masked_scores(forward, image, noisy, target, batch_size)
            weights.append(torch.softmax(total / samples, dim=0))
        return torch.stack(weights)[:, :, None, None] * activation


def iscam(
    activation: torch.Tensor,
    forward: Callable[[torch.Tensor], torch.Tensor],
    batch: torch.Tensor,
    targets: torch.Tensor,
    samples: int = ISCAM_SAMPLES,
    batch_size: int = 32,
) -> torch.Tensor:
    """IS-CAM (Naidu et al. 2020, "Integrated Score-CAM"), as torchcam defines it: Score-CAM whose
    weights are the target's logits averaged over ``samples`` masks scaled by the cumulative
    coefficients Σⱼ₌₁..ᵢ j/N (i = 1..N); costs samples × C masked forwards."""
    coefficients = torch.arange(1, samples + 1, dtype=torch.float64).div(samples).cumsum(0).tolist()
    with torch.no_grad():
        masks = _input_masks(activation, batch.shape[-2:])
        weights = []
        for image, image_masks, target in zip(batch, masks, targets.tolist()):
            total = sum(
                _masked_scores(forward, image, coefficient * image_masks, target, batch_size)
                for coefficient in coefficients
            )
            weights.append(torch.softmax(total / samples, dim=0))
        return torch.stack(weights)[:, :, None, None] * activation


def _input_masks(activation: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """torchcam's masks: each channel scaled to [0, 1] at the layer's resolution, then upsampled."""
    return F.interpolate(scaled_per_map(activation), size=tuple(size), mode="bilinear", align_corners=False)


def _masked_scores(
    forward: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    masks: torch.Tensor,
    target: int,
    batch_size: int,
) -> torch.Tensor:
    """The target's logits (C,) on ``image`` (3, H, W) times each of ``masks`` (C, H, W)."""
    return torch.cat([forward(chunk[:, None] * image[None])[:, target].float() for chunk in masks.split(batch_size)])
