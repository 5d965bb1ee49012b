"""The CAM family: maps from one layer's activation A and the gradient G of the target score.

Every method here is written as per-channel *contributions* (B, C, H, W); the map is the ReLU of their
sum over channels, or, with eigen-smoothing, of their first principal component. One forward and one
backward (down to the layer only) serve all of them.
"""

from __future__ import annotations

import torch

_EPS = 1e-7


def gradcam(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017): channels weighted by their position-averaged gradient."""
    return gradient.mean(dim=(2, 3), keepdim=True) * activation


def gradcampp(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhyay et al. 2018, eq. 19): pixel-wise weights α on the positive gradient.

    Higher derivatives are taken as powers of the first, exact for an exponential output
    (the paper's derivation); α is zero where the gradient is.
    """
    squared = gradient.pow(2)
    cubed = squared * gradient
    total = activation.sum(dim=(2, 3), keepdim=True)
    alpha = squared / (2 * squared + total * cubed + 1e-6)
    alpha = torch.where(gradient != 0, alpha, torch.zeros_like(alpha))
    weights = (torch.relu(gradient) * alpha).sum(dim=(2, 3), keepdim=True)
    return weights * activation


def xgradcam(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """XGrad-CAM (Fu et al. 2020): gradient weighted by the activation's share of its channel sum."""
    total = activation.sum(dim=(2, 3), keepdim=True)
    weights = (gradient * activation / (total + _EPS)).sum(dim=(2, 3), keepdim=True)
    return weights * activation


def layercam(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """LayerCAM (Jiang et al. 2021): each position weighted by its own positive gradient."""
    return torch.relu(gradient) * activation


def hirescam(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """HiResCAM (Draelos & Carin 2020): element-wise gradient × activation, no averaging."""
    return gradient * activation


def eigencam(activation: torch.Tensor, gradient: torch.Tensor | None = None) -> torch.Tensor:
    """Eigen-CAM (Muhammad & Yeasin 2020): the activations' first principal component, as a single
    contribution channel; no gradient needed."""
    return principal_projection(activation)[:, None]


def principal_projection(contributions: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H, W): positions projected on the first principal component of the channels.

    SVD leaves the component's sign open; it is chosen so that the larger magnitude is positive
    (Chung & Ying 2025, eq. 13), so that the salient region is the bright one.
    """
    batch, channels, height, width = contributions.shape
    positions = contributions.reshape(batch, channels, height * width).transpose(1, 2).double()
    positions = positions - positions.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(positions, full_matrices=False)
    projection = (positions @ vh[:, 0, :, None])[..., 0]
    flip = projection.amin(dim=1).abs() > projection.amax(dim=1).abs()
    projection = torch.where(flip[:, None], -projection, projection)
    return projection.reshape(batch, height, width).float()


def cam_map(contributions: torch.Tensor, eigen_smooth: bool = False) -> torch.Tensor:
    """Channel contributions → (B, H, W) map: ReLU of their sum, or of their principal projection."""
    if eigen_smooth and contributions.shape[1] > 1:  # one channel is its own principal component
        return torch.relu(principal_projection(contributions))
    return torch.relu(contributions.sum(dim=1))
