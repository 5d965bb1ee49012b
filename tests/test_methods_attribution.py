"""Gradient attributions: our maps are Captum's attributions, reduced over colour channels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import correlation

import attnexplain
from attnexplain.explanation import MethodOptions
from attnexplain.images import load_image
from attnexplain.preprocess import Preprocessing, prepare

SIZE = 64


def _batch(photo):
    return prepare(load_image(photo).pixels, Preprocessing(size=(SIZE, SIZE))).tensor


def test_saliency_and_integrated_gradients_equal_captum(small_resnet, photo):
    from captum.attr import IntegratedGradients, Saliency

    result = attnexplain.explain(
        small_resnet, photo, "saliency,integrated_gradients", size=SIZE, options=MethodOptions(steps=8)
    )
    target = result.target.index
    saliency = Saliency(small_resnet).attribute(_batch(photo).requires_grad_(), target=target, abs=True)
    assert correlation(result.maps["saliency"].heatmap, saliency.amax(1)[0].numpy()) >= 0.999
    integrated = IntegratedGradients(small_resnet).attribute(
        _batch(photo).requires_grad_(), baselines=0.0, target=target, n_steps=8
    )
    assert (
        correlation(result.maps["integrated_gradients"].heatmap, integrated.sum(1).abs()[0].detach().numpy()) >= 0.999
    )


def test_occlusion_equals_captum(small_resnet, photo):
    from captum.attr import Occlusion

    # 3 x 3 overlapping windows (a forward each, on both sides): overlaps are averaged as in Captum.
    result = attnexplain.explain(
        small_resnet, photo, "occlusion", size=SIZE, options=MethodOptions(window=24, stride=20)
    )
    reference = Occlusion(small_resnet).attribute(
        _batch(photo), sliding_window_shapes=(3, 24, 24), strides=(3, 20, 20), baselines=0.0, target=result.target.index
    )
    assert correlation(result.heatmap, reference.sum(1)[0].numpy()) >= 0.999


def test_smoothgrad_is_captum_noise_tunnel(small_resnet, photo):
    from captum.attr import NoiseTunnel, Saliency

    torch.manual_seed(0)
    result = attnexplain.explain(small_resnet, photo, "smoothgrad", size=SIZE, options=MethodOptions(samples=4))
    batch = _batch(photo)
    spread = float(batch.max() - batch.min()) * 0.15
    torch.manual_seed(0)
    reference = NoiseTunnel(Saliency(small_resnet)).attribute(
        batch.requires_grad_(),
        nt_type="smoothgrad",
        nt_samples=4,
        nt_samples_batch_size=32,
        stdevs=spread,
        target=result.target.index,
        abs=True,
    )
    assert correlation(result.heatmap, reference.amax(1)[0].numpy()) >= 0.999


def test_guided_gradcam_is_captum_guided_backprop_times_bilinear_gradcam(small_resnet, photo):
    """Captum's GuidedGradCam, but with the Grad-CAM map upsampled bilinearly as in the paper (and
    as our CAM maps are); Captum's own class upsamples nearest-neighbour."""
    from captum.attr import GuidedBackprop, LayerAttribution, LayerGradCam

    result = attnexplain.explain(small_resnet, photo, "guided_gradcam", size=SIZE)
    assert result.layer == "layer4"
    target = result.target.index
    cam = LayerGradCam(small_resnet, small_resnet.layer4).attribute(
        _batch(photo).requires_grad_(), target=target, relu_attributions=True
    )
    cam = LayerAttribution.interpolate(cam, (SIZE, SIZE), interpolate_mode="bilinear")
    guided = GuidedBackprop(small_resnet).attribute(_batch(photo).requires_grad_(), target=target)
    reference = (guided * cam).sum(1).abs()[0].detach().numpy()
    assert correlation(result.heatmap, reference) >= 0.999


@pytest.mark.parametrize("method", ["gradcam", "rollout", "saliency"])
def test_aug_smoothing_averages_mirrored_and_zoomed_copies(small_vit, small_resnet, photo, method):
    model = small_vit if method == "rollout" else small_resnet
    plain = attnexplain.explain(model, photo, method, size=64)
    smoothed = attnexplain.explain(model, photo, method, size=64, options=MethodOptions(aug_smooth=True))
    assert smoothed.heatmap.shape == plain.heatmap.shape
    assert smoothed.target.index == plain.target.index
    assert 0.3 < correlation(smoothed.heatmap, plain.heatmap) < 0.9999  # related, not identical


def test_gradient_attributions_equal_captum(small_resnet, photo):
    """input_x_gradient, guided_backprop, deconvolution: deterministic; gradientshap: Captum's draws
    with the same seed (attnexplain seeds each image with NOISE_SEED)."""
    from captum.attr import Deconvolution, GradientShap, GuidedBackprop, InputXGradient

    from attnexplain.methods.attribution import NOISE_SEED

    methods = "input_x_gradient,guided_backprop,deconvolution,gradientshap"
    result = attnexplain.explain(small_resnet, photo, methods, size=SIZE, options=MethodOptions(samples=4))
    target = result.target.index
    leaf = lambda: _batch(photo).requires_grad_()
    expected = {
        "input_x_gradient": InputXGradient(small_resnet).attribute(leaf(), target=target).sum(1).abs(),
        "guided_backprop": GuidedBackprop(small_resnet).attribute(leaf(), target=target).abs().amax(1),
        "deconvolution": Deconvolution(small_resnet).attribute(leaf(), target=target).abs().amax(1),
    }
    batch = _batch(photo)
    torch.manual_seed(NOISE_SEED)
    np.random.seed(NOISE_SEED)  # Captum draws the points between baseline and image from NumPy
    expected["gradientshap"] = (
        GradientShap(small_resnet)
        .attribute(
            leaf(),
            baselines=torch.zeros_like(batch),
            n_samples=4,
            stdevs=0.15 * float(batch.max() - batch.min()),
            target=target,
        )
        .sum(1)
        .abs()
    )
    for name, reference in expected.items():
        assert correlation(result.maps[name].heatmap, reference[0].detach().numpy()) >= 0.999, name


def test_deeplift_and_lrp_equal_captum_on_a_plain_cnn(plain_cnn, photo):
    from captum.attr import LRP, DeepLift

    result = attnexplain.explain(plain_cnn, photo, "deeplift,lrp", size=SIZE, options=MethodOptions(baseline="black"))
    target = result.target.index
    batch = _batch(photo)
    black = -torch.tensor((0.485, 0.456, 0.406)) / torch.tensor((0.229, 0.224, 0.225))
    deeplift = DeepLift(plain_cnn).attribute(
        batch.clone().requires_grad_(), target=target, baselines=black.reshape(1, 3, 1, 1).expand_as(batch)
    )
    lrp = LRP(plain_cnn).attribute(batch.clone().requires_grad_(), target=target)
    assert correlation(result.maps["deeplift"].heatmap, deeplift.sum(1).abs()[0].detach().numpy()) >= 0.999
    assert correlation(result.maps["lrp"].heatmap, lrp.sum(1).abs()[0].detach().numpy()) >= 0.999


@pytest.mark.parametrize("method", ["deeplift", "lrp"])
def test_deeplift_and_lrp_refuse_a_resnet_in_one_line(small_resnet, photo, method):
    from attnexplain.errors import MethodError

    with pytest.raises(MethodError, match="more than once") as raised:
        attnexplain.explain(small_resnet, photo, method, size=SIZE)
    assert "\n" not in str(raised.value) and method in str(raised.value)


def _captum_on_our_superpixels(model, photo, method, explainer, **kwargs):
    """Our map and Captum's ``explainer`` on the same superpixels, seeds (torch's, NumPy's) and target."""
    from attnexplain.methods.attribution import NOISE_SEED, superpixels

    result = attnexplain.explain(model, photo, method, size=SIZE, options=MethodOptions(samples=24))
    batch = _batch(photo)
    mask = superpixels(batch)
    assert 20 <= int(mask.max()) + 1 <= 80 and mask.shape == (1, 1, SIZE, SIZE)
    torch.manual_seed(NOISE_SEED)
    np.random.seed(NOISE_SEED)
    reference = explainer(model).attribute(
        batch, baselines=0.0, target=result.target.index, feature_mask=mask, **kwargs
    )
    return result.heatmap, reference[0, 0].numpy()


def test_feature_ablation_equals_captum_on_the_same_superpixels(small_resnet, photo):
    from captum.attr import FeatureAblation

    ours, captum = _captum_on_our_superpixels(small_resnet, photo, "feature_ablation", FeatureAblation)
    assert correlation(ours, captum) >= 0.999


@pytest.mark.heavy
@pytest.mark.parametrize("method", ["kernelshap", "lime"])
def test_kernelshap_and_lime_equal_captum_with_the_same_seed_and_superpixels(small_resnet, photo, method):
    """Captum draws their coalitions from the global generators: seeded alike, it gets the same."""
    from captum.attr import KernelShap, Lime

    explainer = {"kernelshap": KernelShap, "lime": Lime}[method]
    ours, captum = _captum_on_our_superpixels(small_resnet, photo, method, explainer, n_samples=24)
    assert correlation(ours, captum) >= 0.999
