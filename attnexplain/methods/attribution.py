"""Gradient attributions, computed by Captum: we choose settings and reduce channels, Captum does the math.

Every image of a batch is explained on its own terms: its noise, its baseline and its target are its
own, so that an image's map is the same alone and among others (what ``batch`` relies on).
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from ..options import BASELINES

#: The noise of SmoothGrad is drawn from a generator with this seed for every image: the same image
#: gets the same noisy copies alone, in any batch, at any position, and from one run to the next.
NOISE_SEED = 0
#: Held while a seeded section draws from the global generators: batches explained at once on
#: replicas (attnexplain.replicas) would otherwise interleave their draws and each get other noise.
_GLOBAL_GENERATORS = threading.Lock()
#: Noisy copies per image of smoothgrad, smoothgradcampp and gradientshap when --samples is not given.
NOISY_COPIES = 16
#: Coalitions (kernelshap) or perturbations (lime) per image when --samples is not given.
PERTURBATIONS = 256


def saliency(forward: Callable, batch: torch.Tensor, target: list[int], **_: Any) -> torch.Tensor:
    """|∂ score / ∂ input| (Simonyan et al. 2014), the largest over colour channels."""
    from captum.attr import Saliency

    return Saliency(forward).attribute(_leaf(batch), target=target, abs=True).amax(dim=1)


def integrated_gradients(
    forward: Callable,
    batch: torch.Tensor,
    target: list[int],
    *,
    baseline: torch.Tensor,
    steps: int = 32,
    batch_size: int = 32,
    **_: Any,
) -> torch.Tensor:
    """Integrated Gradients (Sundararajan et al. 2017) from ``baseline`` (see :func:`baseline_images`);
    |sum over channels|."""
    from captum.attr import IntegratedGradients

    attribution = IntegratedGradients(forward).attribute(
        _leaf(batch), baselines=baseline, target=target, n_steps=steps, internal_batch_size=batch_size
    )
    return attribution.sum(dim=1).abs()


def smoothgrad(
    forward: Callable,
    batch: torch.Tensor,
    target: list[int],
    *,
    samples: int = NOISY_COPIES,
    noise: float = 0.15,
    batch_size: int = 32,
    **_: Any,
) -> torch.Tensor:
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


def occlusion(
    forward: Callable,
    batch: torch.Tensor,
    target: list[int],
    *,
    baseline: torch.Tensor,
    window: int = 16,
    stride: int = 8,
    batch_size: int = 32,
    **_: Any,
) -> torch.Tensor:
    """Occlusion (Zeiler & Fergus 2014): the score's drop when a window is replaced by the same window
    of ``baseline`` (see :func:`baseline_images`), summed over channels; positive where hiding a
    region hurts the target."""
    from captum.attr import Occlusion

    channels = batch.shape[1]
    attribution = Occlusion(forward).attribute(
        batch,
        sliding_window_shapes=(channels, window, window),
        strides=(channels, stride, stride),
        baselines=baseline,
        target=target,
        perturbations_per_eval=batch_size,
    )
    return attribution.sum(dim=1)


def guided_gradcam(
    forward: Callable, batch: torch.Tensor, target: list[int], *, model: torch.nn.Module, cam: torch.Tensor, **_: Any
) -> torch.Tensor:
    """Guided Grad-CAM (Selvaraju et al. 2017): Captum's guided backpropagation × ``cam``, the
    Grad-CAM map already upsampled to the input (bilinear, as in the paper); |sum over channels|.

    Guided backpropagation only changes the backward pass of ``nn.ReLU`` modules; through a model
    without them (a transformer's GELUs) it is the plain input gradient.
    """
    from captum.attr import GuidedBackprop

    guided = GuidedBackprop(_ScoresModule(model, forward)).attribute(_leaf(batch), target=target)
    return (guided * cam[:, None].to(guided.dtype)).sum(dim=1).abs()


def input_x_gradient(forward: Callable, batch: torch.Tensor, target: list[int], **_: Any) -> torch.Tensor:
    """Input × gradient (Shrikumar et al. 2016; Captum's InputXGradient); |sum over channels|."""
    from captum.attr import InputXGradient

    return InputXGradient(forward).attribute(_leaf(batch), target=target).sum(dim=1).abs()


def deeplift(
    forward: Callable,
    batch: torch.Tensor,
    target: list[int],
    *,
    model: torch.nn.Module,
    baseline: torch.Tensor,
    **_: Any,
) -> torch.Tensor:
    """DeepLIFT, rescale rule (Shrikumar et al. 2017; Captum's DeepLift) from ``baseline``;
    |sum over channels|. Captum overrides the backward of the model's nonlinear modules, which it
    cannot do for a module called more than once (ResNet's shared ReLU): refused with that reason."""
    from captum.attr import DeepLift

    with _module_rules("deeplift"):
        attribution = DeepLift(_ScoresModule(model, forward)).attribute(_leaf(batch), baselines=baseline, target=target)
    return attribution.sum(dim=1).abs()


def gradientshap(
    forward: Callable,
    batch: torch.Tensor,
    target: list[int],
    *,
    baseline: torch.Tensor,
    samples: int = NOISY_COPIES,
    noise: float = 0.15,
    **_: Any,
) -> torch.Tensor:
    """GradientSHAP (Lundberg & Lee 2017; Captum's GradientShap): gradients at random points between
    ``baseline`` and noisy copies of the image (σ as SmoothGrad's), times (image − baseline), over
    ``samples`` draws; |sum over channels|. Draws are seeded per image (:data:`NOISE_SEED`)."""
    from captum.attr import GradientShap

    attribute = GradientShap(forward).attribute
    maps = []
    for image, reference, image_target in zip(batch, baseline, target):
        spread = float(image.max() - image.min()) * noise
        with _seeded(image.device):
            attribution = attribute(
                _leaf(image[None]), baselines=reference[None], n_samples=samples, stdevs=spread, target=image_target
            )
        maps.append(attribution[0].sum(dim=0).abs())
    return torch.stack(maps)


def guided_backprop(
    forward: Callable, batch: torch.Tensor, target: list[int], *, model: torch.nn.Module, **_: Any
) -> torch.Tensor:
    """Guided backpropagation (Springenberg et al. 2015; Captum's GuidedBackprop): ReLU gradients
    clipped at zero on the way back; the largest |value| over colour channels, as saliency."""
    from captum.attr import GuidedBackprop

    guided = GuidedBackprop(_ScoresModule(model, forward)).attribute(_leaf(batch), target=target)
    return guided.abs().amax(dim=1)


def deconvolution(
    forward: Callable, batch: torch.Tensor, target: list[int], *, model: torch.nn.Module, **_: Any
) -> torch.Tensor:
    """Deconvolution (Zeiler & Fergus 2014; Captum's Deconvolution): ReLUs applied to the gradient
    on the way back; the largest |value| over colour channels, as saliency."""
    from captum.attr import Deconvolution

    deconvolved = Deconvolution(_ScoresModule(model, forward)).attribute(_leaf(batch), target=target)
    return deconvolved.abs().amax(dim=1)


def lrp(forward: Callable, batch: torch.Tensor, target: list[int], *, model: torch.nn.Module, **_: Any) -> torch.Tensor:
    """Layer-wise relevance propagation (Bach et al. 2015; Captum's LRP, its default rules: ε for
    convolutions, linear layers and pooling); |sum over channels|. Captum's LRP knows only plain
    feed-forward CNNs built from modules it has rules for (VGG, AlexNet); others are refused."""
    from captum.attr import LRP

    _refuse_reused_modules(model, forward, batch[:1], "lrp")
    with _module_rules("lrp"):
        relevance = LRP(_ScoresModule(model, forward)).attribute(_leaf(batch), target=target)
    return relevance.sum(dim=1).abs()


#: Superpixels per image for the perturbation methods (SLIC's target; it may return a few fewer).
SUPERPIXELS = 50


def superpixels(batch: torch.Tensor, count: int = SUPERPIXELS) -> torch.Tensor:
    """(B, 1, H, W) long SLIC superpixel labels (Achanta et al. 2012, scikit-image), 0-based per image,
    computed on each image's own colours (scaled to [0, 1]), so on nothing else of the batch."""
    import numpy as np
    from skimage.segmentation import slic

    labels = []
    for image in batch.detach().float().cpu():
        pixels = image.permute(1, 2, 0).numpy()
        low, high = pixels.min(), pixels.max()
        pixels = (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)
        segments = slic(pixels, n_segments=count, compactness=10, start_label=0, channel_axis=-1)
        labels.append(torch.from_numpy(np.unique(segments, return_inverse=True)[1].reshape(segments.shape)))
    return torch.stack(labels)[:, None].to(batch.device)


def feature_ablation(
    forward: Callable, batch: torch.Tensor, target: list[int], *, baseline: torch.Tensor, batch_size: int = 32, **_: Any
) -> torch.Tensor:
    """Feature ablation over SLIC superpixels (Captum's FeatureAblation): the score's drop when a
    superpixel is replaced by ``baseline``; one forward per superpixel (batched)."""
    from captum.attr import FeatureAblation

    ablation = FeatureAblation(forward)
    maps = []
    for image, reference, image_target, mask in zip(batch, baseline, target, superpixels(batch)):
        attribution = ablation.attribute(
            image[None],
            baselines=reference[None],
            target=image_target,
            feature_mask=mask[None],
            perturbations_per_eval=batch_size,
        )
        maps.append(attribution[0, 0])  # every channel of a superpixel holds its one value
    return torch.stack(maps)


def kernelshap(
    forward: Callable,
    batch: torch.Tensor,
    target: list[int],
    *,
    baseline: torch.Tensor,
    samples: int = PERTURBATIONS,
    batch_size: int = 32,
    **_: Any,
) -> torch.Tensor:
    """Kernel SHAP over SLIC superpixels (Lundberg & Lee 2017; Captum's KernelShap): ``samples``
    coalitions of superpixels (the others set to ``baseline``), seeded per image (:data:`NOISE_SEED`),
    fitted by the Shapley-kernel-weighted linear regression."""
    from captum.attr import KernelShap

    return _surrogate_fit(KernelShap(forward), batch, target, baseline, samples, batch_size)


def lime(
    forward: Callable,
    batch: torch.Tensor,
    target: list[int],
    *,
    baseline: torch.Tensor,
    samples: int = PERTURBATIONS,
    batch_size: int = 32,
    **_: Any,
) -> torch.Tensor:
    """LIME over SLIC superpixels (Ribeiro et al. 2016; Captum's Lime, its defaults: a Lasso fitted
    with an exponential cosine-distance kernel): ``samples`` perturbations seeded per image."""
    from captum.attr import Lime

    return _surrogate_fit(Lime(forward), batch, target, baseline, samples, batch_size)


def _surrogate_fit(
    explainer: Any, batch: torch.Tensor, target: list[int], baseline: torch.Tensor, samples: int, batch_size: int
) -> torch.Tensor:
    maps = []
    for image, reference, image_target, mask in zip(batch, baseline, target, superpixels(batch)):
        with _seeded(image.device):
            attribution = explainer.attribute(
                image[None],
                baselines=reference[None],
                target=image_target,
                feature_mask=mask[None],
                n_samples=samples,
                perturbations_per_eval=batch_size,
            )
        maps.append(attribution[0, 0])
    return torch.stack(maps)


@contextmanager
def _seeded(device: torch.device) -> Iterator[None]:
    """Random draws inside seeded with :data:`NOISE_SEED`, torch's and NumPy's (Captum draws
    GradientSHAP's path points from NumPy's global generator); the caller's states restored after.
    One thread at a time in the process: the generators are global."""
    import numpy as np

    devices = [device] if device.type == "cuda" else []
    with _GLOBAL_GENERATORS:
        numpy_state = np.random.get_state()
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(NOISE_SEED)
                np.random.seed(NOISE_SEED)
                yield
        finally:
            np.random.set_state(numpy_state)


def _refuse_reused_modules(model: torch.nn.Module, forward: Callable, probe: torch.Tensor, method: str) -> None:
    """Refuse a model that calls a module more than once in a forward pass (ResNet's shared ReLU):
    a rule per module cannot propagate relevance through two uses. Costs one forward of ``probe``."""
    from ..errors import MethodError

    calls: dict[str, int] = {}
    handles = [
        module.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
        for name, module in model.named_modules()
        if name and not list(module.children())
    ]
    try:
        with torch.no_grad():
            forward(probe)
    finally:
        for handle in handles:
            handle.remove()
    reused = [name for name, count in calls.items() if count > 1]
    if reused:
        raise MethodError(
            f"{method} cannot run on this model: it calls module {reused[0]!r} more than "
            f"once per forward pass (as ResNet's blocks share their ReLU), which "
            f"Captum's rules cannot follow. Use deeplift or integrated_gradients."
        )


@contextmanager
def _module_rules(method: str) -> Iterator[None]:
    """Captum's refusals of a model whose modules it cannot rewrite the backward of, in one line."""
    from ..errors import MethodError

    try:
        yield
    except (RuntimeError, TypeError) as error:
        text = " ".join(str(error).split())
        if "used more than once" in text:
            raise MethodError(
                f"{method} cannot run on this model: Captum replaces the backward of each "
                f"nonlinear module, and this model calls one module more than once (e.g. "
                f"ResNet's shared ReLU). Use integrated_gradients or input_x_gradient."
            ) from None
        if "no rule defined" in text:
            kind = text.split("type ", 1)[-1].split(" has", 1)[0].strip("<>'").rsplit(".", 1)[-1]
            raise MethodError(
                f"{method} cannot run on this model: Captum's LRP has no rule for its "
                f"{kind} layers; it supports plain CNNs such as VGG and AlexNet. Use "
                f"deeplift or integrated_gradients."
            ) from None
        raise


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
