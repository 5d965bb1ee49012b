"""Every method gives an image the same map alone as among other images: what `batch` rests on.

Images are independent in every method's definition; the only ways to break it are statistics taken
over the whole batch (SmoothGrad's σ once was) or random draws that depend on an image's position.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_gates import gated_model  # noqa: F401 - the fixture: a MobileNetV3 with non-uniform gates

from attnexplain.explanation import MethodOptions, _as_loaded_model, compute_maps, plan_explanation
from attnexplain.methods import METHODS
from attnexplain.methods.attribution import NOISE_SEED
from attnexplain.preprocess import Preprocessing, prepare

SIZE = 64
#: Few samples and steps: the property does not depend on them, the test's time does.
OPTIONS = MethodOptions(samples=4, steps=8, window=16, stride=8)


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """Three different photos whose pixel ranges differ (a batch-wide range is not any image's)."""
    from skimage import data

    pictures = [data.chelsea(), data.astronaut(), (data.coffee() * 0.4 + 60).astype(np.uint8)]
    return torch.cat([prepare(picture, Preprocessing(size=(SIZE, SIZE))).tensor for picture in pictures])


def _model_for(method: str, small_resnet, small_vit, gated_model, plain_cnn):
    if method in ("deeplift", "lrp"):  # Captum refuses ResNet's shared ReLU for these
        return plain_cnn
    family = METHODS[method].family
    return {"attention": small_vit, "gates": gated_model}.get(family, small_resnet)


#: Forwards per channel and per sample on ResNet-18's layer1 (tens of seconds on a shared CPU): under
#: -m heavy here; tests/test_methods_cam_newer.py checks them by default on a model with 12 channels.
SLOW = ("sscam", "iscam", "ablationcam")


@pytest.mark.parametrize(
    "method", [pytest.param(name, marks=pytest.mark.heavy) if name in SLOW else name for name in METHODS]
)
def test_each_image_gets_the_same_map_alone_as_in_a_batch(
    method, photos, small_resnet, small_vit, gated_model, plain_cnn
):
    loaded = _as_loaded_model(_model_for(method, small_resnet, small_vit, gated_model, plain_cnn))
    # The Score-CAM family and Ablation-CAM cost forwards per channel: a layer with few of them.
    per_channel = method in ("scorecam", "sscam", "iscam", "ablationcam")
    plan = plan_explanation(loaded, method, "layer1" if per_channel else None, size=SIZE)
    options = dataclasses.replace(OPTIONS, samples=2) if per_channel else OPTIONS
    # A different global random state before each call: a method drawing from it would differ.
    torch.manual_seed(123)
    together = compute_maps(loaded, photos, plan.methods, plan.layers, options=options)
    for index in range(len(photos)):
        torch.manual_seed(index)
        alone = compute_maps(loaded, photos[index : index + 1], plan.methods, plan.layers, options=options)
        assert int(alone.targets[0]) == int(together.targets[index])
        expected = alone.maps[method][0].numpy()
        scale = float(np.abs(expected).max()) or 1.0
        np.testing.assert_allclose(
            together.maps[method][index].numpy(),
            expected,
            rtol=1e-4,
            atol=1e-4 * scale,
            err_msg=f"{method}, image {index}",
        )


def test_the_same_image_at_another_position_gets_the_same_smoothgrad(photos, small_resnet):
    loaded = _as_loaded_model(small_resnet)
    plan = plan_explanation(loaded, "smoothgrad", size=SIZE)
    forward = compute_maps(loaded, photos, plan.methods, plan.layers, options=OPTIONS).maps["smoothgrad"]
    backward = (
        compute_maps(loaded, photos.flip(0), plan.methods, plan.layers, options=OPTIONS).maps["smoothgrad"].flip(0)
    )
    np.testing.assert_allclose(backward.numpy(), forward.numpy(), rtol=1e-4, atol=1e-7)


def test_smoothgrad_noise_is_a_share_of_each_images_own_range(photos, small_resnet):
    """By hand: σ = noise × (x_max − x_min) of the image (Smilkov et al. 2017), normal noise from
    a generator seeded for the image, |gradient| averaged over the copies, max over channels."""
    loaded = _as_loaded_model(small_resnet)
    plan = plan_explanation(loaded, "smoothgrad", size=SIZE)
    options = MethodOptions(samples=3, noise=0.2)
    computed = compute_maps(loaded, photos, plan.methods, plan.layers, options=options)
    for index, image in enumerate(photos):
        sigma = 0.2 * float(image.max() - image.min())
        draws = torch.randn((3, *image.shape), generator=torch.Generator().manual_seed(NOISE_SEED))
        noisy = (image + sigma * draws).requires_grad_(True)
        target = int(computed.targets[index])
        small_resnet(noisy)[:, target].sum().backward()
        expected = noisy.grad.abs().mean(dim=0).amax(dim=0)
        np.testing.assert_allclose(computed.maps["smoothgrad"][index].numpy(), expected.numpy(), rtol=1e-4, atol=1e-6)
