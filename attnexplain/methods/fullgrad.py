"""FullGrad (Srinivas & Fleuret 2019): the input gradient × input plus the bias gradients of every
spatial layer, each rectified, scaled and summed; one forward and one backward down to the input."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..capture import capture_activations, frozen_parameters
from ..errors import MethodError
from .cam import scaled_per_map

#: pytorch-grad-cam's floor under each map's range. It is absolute: a layer whose bias gradients span
#: less than it (deep layers of a random EfficientNet) weighs less in the sum; a smaller floor changes
#: the map (r = 0.93 on EfficientNet-B0 with 1e-8).
_EPS = 1e-7


def fullgrad(forward: Callable, batch: torch.Tensor, target: list[int], *, model: nn.Module, **_: Any) -> torch.Tensor:
    """(B, H, W): Σ over the input and every layer with a 2-D bias of ψ(|bias × ∂score/∂output|),
    ψ scaling each channel to [0, 1] and upsampling it to the input (pytorch-grad-cam's FullGrad;
    the bias of an inference-mode BatchNorm is β − μ·γ/√(σ² + ε), as in the authors' code)."""
    biases = _spatial_biases(model)
    if not biases:
        raise MethodError(
            "fullgrad needs layers with a bias over a 2-D map (Conv2d or BatchNorm2d); this model has none."
        )
    names = list(biases)
    captured: dict[str, torch.Tensor] = {}
    inputs = batch.detach().requires_grad_(True)
    with frozen_parameters(model), capture_activations(model, names, captured), torch.enable_grad():
        scores = forward(inputs)
        chosen = scores.gather(1, torch.tensor(target, device=scores.device)[:, None]).sum()
        ran = [name for name in names if name in captured]
        gradients = torch.autograd.grad(chosen, [inputs] + [captured[name] for name in ran], allow_unused=True)
    size = tuple(batch.shape[-2:])
    total = scaled_per_map((gradients[0] * batch).abs(), _EPS).sum(dim=1)
    for name, gradient in zip(ran, gradients[1:]):
        if gradient is None or gradient.dim() != 4:
            continue  # a layer that does not feed the score, or not a (B, C, H, W) map
        bias = biases[name].to(gradient.device, gradient.dtype)[None, :, None, None]
        layer_map = scaled_per_map((bias * gradient).abs(), _EPS).sum(dim=1, keepdim=True)
        # Upsampling is linear: the sum of upsampled channels is the upsampled sum.
        total = total + F.interpolate(layer_map, size=size, mode="bilinear", align_corners=False)[:, 0]
    return total.detach()


def _spatial_biases(model: nn.Module) -> dict[str, torch.Tensor]:
    """Layer name → the bias it adds to each channel of its (B, C, H, W) output."""
    biases = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.bias is not None:
            biases[name] = module.bias.detach()
        elif isinstance(module, nn.BatchNorm2d) and module.bias is not None and module.running_mean is not None:
            scale = module.weight / torch.sqrt(module.running_var + module.eps)
            biases[name] = (module.bias - module.running_mean * scale).detach()
    return biases
