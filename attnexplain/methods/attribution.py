"""Gradient attributions, computed by Captum: we choose settings and reduce channels, Captum does the math.

Every image of a batch is explained on its own terms: its noise, its baseline and its target are its
own, so that an image's map is the same alone and among others (what ``batch`` relies on).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

#: The noise of SmoothGrad is drawn from a generator with this seed for every image: the same image
#: gets the same noisy copies alone, in any batch, at any position, and from one run to the next.
NOISE_SEED = 0

#: What integrated gradients starts from and occlusion fills windows with (``--baseline``).
BASELINES = ("mean", "black", "blur")


def saliency(forward: Callable, batch: torch.Tensor, target: list[int], **_: Any) -> torch.Tensor:
    """|∂ score / ∂ input| (Simonyan et al. 2014), the largest over colour channels."""
    from captum.attr import Saliency

    return Saliency(forward).attribute(_leaf(batch), target=target, abs=True).amax(dim=1)


def integrated_gradients(forward: Callable, batch: torch.Tensor, target: list[int], *,
                         baseline: torch.Tensor, steps: int = 32, batch_size: int = 32,
                         **_: Any) -> torch.Tensor:
    """Integrated Gradients (Sundararajan et al. 2017) from ``baseline`` (see :func:`baseline_images`);
    |sum over channels|."""
    from captum.attr import IntegratedGradients

    attribution = IntegratedGradients(forward).attribute(
        _leaf(batch), baselines=baseline, target=target, n_steps=steps, internal_batch_size=batch_size)
    return attribution.sum(dim=1).abs()


def smoothgrad(forward: Callable, batch: torch.Tensor, target: list[int], *, samples: int = 16,
               noise: float = 0.15, batch_size: int = 32, **_: Any) -> torch.Tensor:
    """SmoothGrad (Smilkov et al. 2017): saliency (Captum's) averaged over noisy copies of each image.

    ``noise`` is the noise's standard deviation as a share of the image's own range
    (x_max − x_min), as in the paper; the noise comes from a generator seeded with
    :data:`NOISE_SEED` for each image, so neither depends on the other images of the batch.
    """
    from captum.attr import Saliency

    attribute = Saliency(forward).attribute
    maps = []
    for image, image_target, noisy in zip(batch, target, noisy_copies(batch, samples, noise).transpose(0, 1)):
        total = torch.zeros_like(image, dtype=torch.float32)
        for chunk in noisy.split(batch_size):
            total += attribute(_leaf(chunk), target=[image_target] * len(chunk), abs=True).float().sum(dim=0)
        maps.append((total / samples).amax(dim=0))
    return torch.stack(maps)


def noisy_copies(batch: torch.Tensor, samples: int, noise: float) -> torch.Tensor:
    """(samples, B, …) noisy copies of each image: Gaussian noise of σ = ``noise`` × the image's own
    range (x_max − x_min), drawn for each image from a generator seeded with :data:`NOISE_SEED` on
    the CPU, so that an image's copies depend neither on its batch nor on the device."""
    copies = []
    for image in batch:
        spread = float(image.max() - image.min()) * noise
        generator = torch.Generator().manual_seed(NOISE_SEED)
        draws = torch.randn((samples, *image.shape), generator=generator)
        copies.append(image + spread * draws.to(device=image.device, dtype=image.dtype))
    return torch.stack(copies, dim=1)


def occlusion(forward: Callable, batch: torch.Tensor, target: list[int], *, baseline: torch.Tensor,
              window: int = 16, stride: int = 8, batch_size: int = 32, **_: Any) -> torch.Tensor:
    """Occlusion (Zeiler & Fergus 2014): the score's drop when a window is replaced by the same window
    of ``baseline`` (see :func:`baseline_images`), summed over channels; positive where hiding a
    region hurts the target."""
    from captum.attr import Occlusion

    channels = batch.shape[1]
    attribution = Occlusion(forward).attribute(
        batch, sliding_window_shapes=(channels, window, window), strides=(channels, stride, stride),
        baselines=baseline, target=target, perturbations_per_eval=batch_size)
    return attribution.sum(dim=1)


def guided_gradcam(forward: Callable, batch: torch.Tensor, target: list[int], *, model: torch.nn.Module,
                   cam: torch.Tensor, **_: Any) -> torch.Tensor:
    """Guided Grad-CAM (Selvaraju et al. 2017): Captum's guided backpropagation × ``cam``, the
    Grad-CAM map already upsampled to the input (bilinear, as in the paper); |sum over channels|.

    Guided backpropagation only changes the backward pass of ``nn.ReLU`` modules; through a model
    without them (a transformer's GELUs) it is the plain input gradient.
    """
    from captum.attr import GuidedBackprop

    guided = GuidedBackprop(_ScoresModule(model, forward)).attribute(_leaf(batch), target=target)
    return (guided * cam[:, None].to(guided.dtype)).sum(dim=1).abs()


def baseline_images(batch: torch.Tensor, kind: str, black: torch.Tensor) -> torch.Tensor:
    """The reference images integrated gradients starts from and occlusion fills in, one per image.

    ``mean``: 0 after normalisation, the dataset's mean colour; ``black``: ``black``, the normalised
    value of pixel 0, per channel; ``blur``: each image blurred by a Gaussian of σ = 1/16 of its
    longer side (reflected at the borders), which keeps its colours and removes its shapes.
    """
    if kind == "mean":
        return torch.zeros_like(batch)
    if kind == "black":
        return black.to(device=batch.device, dtype=batch.dtype).reshape(1, -1, 1, 1).expand_as(batch).clone()
    if kind == "blur":
        from torchvision.transforms.functional import gaussian_blur

        height, width = batch.shape[-2:]
        sigma = max(height, width) / 16
        # Three σ each side, odd, and within what reflection at the border allows.
        sizes = [min(2 * math.ceil(3 * sigma) + 1, 2 * ((side - 1) // 2) + 1) for side in (width, height)]
        return gaussian_blur(batch, kernel_size=sizes, sigma=[sigma, sigma])
    raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, not {kind!r}")


class _ScoresModule(torch.nn.Module):
    """``model`` seen through ``forward`` (its target scores, as its plugin defines them), as the
    module Captum's guided backpropagation hooks the ReLUs of."""

    def __init__(self, model: torch.nn.Module, forward: Callable) -> None:
        super().__init__()
        self.model = model
        self.scores = forward

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.scores(inputs)


def _leaf(batch: torch.Tensor) -> torch.Tensor:
    return batch.detach().clone().requires_grad_(True)
