"""The CAM family: maps from one layer's activation A and the gradient G of the target score.

Every method here is written as per-channel *contributions* (B, C, H, W); the map is the ReLU of their
sum over channels, or, with eigen-smoothing, of their first principal component. One forward and one
backward (down to the layer only) serve all of them.
"""

from __future__ import annotations

import torch

from ..errors import MethodError, error_line

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
    return _largest_magnitude_positive(projection).reshape(batch, height, width).float()


def scaled_per_map(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Each (…, H, W) map minus its minimum, divided by its range + ``eps``: [0, 1] (0 where it is
    flat). ``eps`` is an absolute floor: a map whose range is near it is scaled down, not up."""
    low = maps.amin(dim=(-2, -1), keepdim=True)
    high = maps.amax(dim=(-2, -1), keepdim=True)
    return (maps - low) / (high - low + eps)


def cam_map(contributions: torch.Tensor, eigen_smooth: bool = False) -> torch.Tensor:
    """Channel contributions → (B, H, W) map: ReLU of their sum, or of their principal projection."""
    if eigen_smooth and contributions.shape[1] > 1:  # one channel is its own principal component
        return torch.relu(principal_projection(contributions))
    return torch.relu(contributions.sum(dim=1))


def gradcam_elementwise(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Grad-CAM element-wise (pytorch-grad-cam): HiResCAM's gradient × activation with each product
    rectified before the channels are summed, so that negative evidence cannot cancel positive."""
    return torch.relu(gradient * activation)


def eigengradcam(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Eigen-Grad-CAM (pytorch-grad-cam; Eigen-CAM of Muhammad & Yeasin 2020 made class-specific):
    the first principal component of gradient × activation."""
    return principal_projection(gradient * activation)[:, None]


def kpcacam(activation: torch.Tensor, gradient: torch.Tensor | None = None) -> torch.Tensor:
    """KPCA-CAM (Karmani et al. 2024): Eigen-CAM with kernel PCA, a sigmoid kernel
    tanh(γ·x·yᵀ + 1) with γ = 1 / channels over the centred positions; no gradient needed."""
    batch, channels, height, width = activation.shape
    positions = activation.reshape(batch, channels, height * width).transpose(1, 2).double()
    positions = positions - positions.mean(dim=1, keepdim=True)
    kernel = torch.tanh(positions @ positions.transpose(1, 2) / channels + 1.0)
    # Centring in feature space: K - 1K - K1 + 1K1, with 1 the (n × n) matrix of 1/n.
    kernel = (
        kernel
        - kernel.mean(dim=1, keepdim=True)
        - kernel.mean(dim=2, keepdim=True)
        + kernel.mean(dim=(1, 2), keepdim=True)
    )
    values, vectors = torch.linalg.eigh(kernel)  # ascending: the last is the first component
    vector = vectors[..., -1]
    # scikit-learn's svd_flip: the first entry of largest magnitude is made positive.
    largest = vector.gather(1, vector.abs().argmax(dim=1, keepdim=True))
    projection = vector * torch.where(largest < 0, -1.0, 1.0).to(vector.dtype)
    projection = projection * values[..., -1:].clamp_min(0).sqrt()
    return projection.reshape(batch, 1, height, width).float()


def _largest_magnitude_positive(projection: torch.Tensor) -> torch.Tensor:
    """(B, N) projections with the sign that an eigen-solver leaves open chosen so that the entry of
    largest magnitude is positive (Chung & Ying 2025, eq. 13; scikit-learn's svd_flip does the same)."""
    flip = projection.amin(dim=1).abs() > projection.amax(dim=1).abs()
    return torch.where(flip[:, None], -projection, projection)


def randomcam(activation: torch.Tensor, gradient: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """Random-CAM, the baseline a CAM must beat (pytorch-grad-cam's RandomCAM): channels weighted by
    uniform draws from [-1, 1].

    The draws come from a generator seeded with ``seed`` on the CPU, the same for every image: an
    image gets the same map alone or in any batch, on any device.
    """
    generator = torch.Generator().manual_seed(seed)
    weights = torch.rand(activation.shape[1], generator=generator, dtype=torch.float64) * 2 - 1
    return weights.to(activation.device, activation.dtype)[None, :, None, None] * activation


def shapleycam(activation: torch.Tensor, gradient: torch.Tensor, hessian_product: torch.Tensor) -> torch.Tensor:
    """Shapley-CAM (Cai et al. 2025, pytorch-grad-cam PR #550): channels weighted by the
    position-average of g − ½·H·A, a second-order estimate of each channel's Shapley value, where
    H·A is the Hessian of the score with respect to the layer times the activation itself.

    Through piecewise-linear heads (ReLU networks above the layer) H·A is 0 and this is Grad-CAM.
    """
    return (gradient - 0.5 * hessian_product).mean(dim=(2, 3), keepdim=True) * activation


def smoothgradcampp(activation: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Smooth Grad-CAM++ (Omeiza et al. 2019): Grad-CAM++ with the first, second and third derivatives
    each averaged over noisy copies of the image, ``gradients`` (samples, B, C, H, W); ``activation``
    is the clean image's."""
    first, second, third = (gradients.mean(dim=0), gradients.pow(2).mean(dim=0), gradients.pow(3).mean(dim=0))
    total = activation.sum(dim=(2, 3), keepdim=True)
    alpha = second / (2 * second + total * third + 1e-6)
    alpha = torch.where(second != 0, alpha, torch.zeros_like(alpha))
    return (torch.relu(first) * alpha).sum(dim=(2, 3), keepdim=True) * activation


def hessian_products(gradients: list[torch.Tensor], activations: list[torch.Tensor]) -> list[torch.Tensor]:
    """H·A per layer: the Hessian of the score with respect to the layer's activation A, times A.

    One more backward through the network above the layer, along the graph that ``gradients`` were
    taken with (``create_graph=True``); 0 where the gradient does not depend on A (a linear head).
    """
    products = []
    for gradient, activation in zip(gradients, activations):
        product = None
        if gradient.requires_grad:
            try:
                product = torch.autograd.grad(
                    gradient, activation, grad_outputs=activation.detach(), retain_graph=True, allow_unused=True
                )[0]
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as error:  # an operation of the model with no second derivative
                raise MethodError(
                    f"shapleycam cannot run on this model: it differentiates the score "
                    f"twice, and PyTorch cannot differentiate one of the model's operations "
                    f"twice ({error_line(error, 300)}). Use gradcam or finercam."
                ) from error
        products.append(torch.zeros_like(activation) if product is None else product)
    return products


def finer_scores(logits: torch.Tensor, targets: torch.Tensor, classes: int = 3, alpha: float = 1.0) -> torch.Tensor:
    """Finer-CAM's target (Zhang et al. 2025): per image, the target's logit y_t against the
    ``classes`` classes whose logits are closest to it, Σⱼ pⱼ·(y_t − α·yⱼ) / Σⱼ pⱼ with pⱼ their
    softmax probabilities (B,)."""
    if logits.shape[1] < 2:
        raise MethodError("finercam compares the target with similar classes; the model has one class.")
    chosen = logits.gather(1, targets[:, None])
    distance = (logits - chosen).abs().detach()
    distance.scatter_(1, targets[:, None], -1.0)  # the target itself sorts first and is skipped
    similar = distance.argsort(dim=1, stable=True)[:, 1 : 1 + classes]
    weights = torch.softmax(logits, dim=1).gather(1, similar)
    compared = (weights * (chosen - alpha * logits.gather(1, similar))).sum(dim=1)
    return compared / (weights.sum(dim=1) + 1e-9)


def finercam(activation: torch.Tensor, gradient: torch.Tensor | None, finer_gradient: torch.Tensor) -> torch.Tensor:
    """Finer-CAM (Zhang et al. 2025): Grad-CAM of :func:`finer_scores`, what sets the target apart
    from the classes the model finds most like it."""
    return gradcam(activation, finer_gradient)
