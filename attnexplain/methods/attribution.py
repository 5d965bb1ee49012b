"""Gradient attributions, computed by Captum: we choose settings and reduce channels, Captum does the math."""

from __future__ import annotations

from typing import Any, Callable

import torch


def saliency(forward: Callable, batch: torch.Tensor, target: list[int], **_: Any) -> torch.Tensor:
    """|∂ score / ∂ input| (Simonyan et al. 2014), the largest over colour channels."""
    from captum.attr import Saliency

    return Saliency(forward).attribute(_leaf(batch), target=target, abs=True).amax(dim=1)


def integrated_gradients(forward: Callable, batch: torch.Tensor, target: list[int], *, steps: int = 32,
                         batch_size: int = 32, **_: Any) -> torch.Tensor:
    """Integrated Gradients (Sundararajan et al. 2017) from a black (zero) baseline; |sum over channels|."""
    from captum.attr import IntegratedGradients

    attribution = IntegratedGradients(forward).attribute(
        _leaf(batch), baselines=torch.zeros_like(batch), target=target, n_steps=steps,
        internal_batch_size=batch_size)
    return attribution.sum(dim=1).abs()


def smoothgrad(forward: Callable, batch: torch.Tensor, target: list[int], *, samples: int = 16,
               noise: float = 0.15, batch_size: int = 32, **_: Any) -> torch.Tensor:
    """SmoothGrad (Smilkov et al. 2017): saliency averaged over noisy copies (Captum NoiseTunnel).

    ``noise`` is the noise's standard deviation as a fraction of the input's range, as in the paper.
    """
    from captum.attr import NoiseTunnel, Saliency

    spread = float(batch.max() - batch.min()) * noise
    attribution = NoiseTunnel(Saliency(forward)).attribute(
        _leaf(batch), nt_type="smoothgrad", nt_samples=samples,
        nt_samples_batch_size=batch_size, stdevs=spread, target=target, abs=True)
    return attribution.amax(dim=1)


def occlusion(forward: Callable, batch: torch.Tensor, target: list[int], *, window: int = 16,
              stride: int = 8, batch_size: int = 32, **_: Any) -> torch.Tensor:
    """Occlusion (Zeiler & Fergus 2014): the score's drop when a window is blacked out, summed over
    channels; positive where hiding a region hurts the target."""
    from captum.attr import Occlusion

    channels = batch.shape[1]
    attribution = Occlusion(forward).attribute(
        batch, sliding_window_shapes=(channels, window, window), strides=(channels, stride, stride),
        baselines=0.0, target=target, perturbations_per_eval=batch_size)
    return attribution.sum(dim=1)


def guided_gradcam(forward: Callable, batch: torch.Tensor, target: list[int], *, model: torch.nn.Module,
                   layer: str, **_: Any) -> torch.Tensor:
    """Guided Grad-CAM (Selvaraju et al. 2017): guided backpropagation × upsampled Grad-CAM, Captum's
    GuidedGradCam on the same layer; |sum over channels|."""
    from captum.attr import GuidedGradCam

    attribution = GuidedGradCam(model, model.get_submodule(layer)).attribute(
        _leaf(batch), target=target)
    return attribution.sum(dim=1).abs()


def _leaf(batch: torch.Tensor) -> torch.Tensor:
    return batch.detach().clone().requires_grad_(True)
