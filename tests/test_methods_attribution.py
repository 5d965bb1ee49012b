"""Gradient attributions: our maps are Captum's attributions, reduced over colour channels."""

from __future__ import annotations

import pytest
import torch

import attnexplain
from attnexplain.explanation import MethodOptions
from attnexplain.images import load_image
from attnexplain.preprocess import Preprocessing, prepare

from conftest import correlation

SIZE = 64


def _batch(photo):
    return prepare(load_image(photo).pixels, Preprocessing(size=(SIZE, SIZE))).tensor


def test_saliency_and_integrated_gradients_equal_captum(small_resnet, photo):
    from captum.attr import IntegratedGradients, Saliency

    result = attnexplain.explain(small_resnet, photo, "saliency,integrated_gradients", size=SIZE,
                                 options=MethodOptions(steps=8))
    target = result.target.index
    saliency = Saliency(small_resnet).attribute(_batch(photo).requires_grad_(), target=target, abs=True)
    assert correlation(result.maps["saliency"].heatmap, saliency.amax(1)[0].numpy()) >= 0.999
    integrated = IntegratedGradients(small_resnet).attribute(
        _batch(photo).requires_grad_(), baselines=0.0, target=target, n_steps=8)
    assert correlation(result.maps["integrated_gradients"].heatmap,
                       integrated.sum(1).abs()[0].detach().numpy()) >= 0.999


def test_occlusion_equals_captum(small_resnet, photo):
    from captum.attr import Occlusion

    # 3 x 3 overlapping windows (a forward each, on both sides): overlaps are averaged as in Captum.
    result = attnexplain.explain(small_resnet, photo, "occlusion", size=SIZE,
                                 options=MethodOptions(window=24, stride=20))
    reference = Occlusion(small_resnet).attribute(_batch(photo), sliding_window_shapes=(3, 24, 24),
                                                  strides=(3, 20, 20), baselines=0.0,
                                                  target=result.target.index)
    assert correlation(result.heatmap, reference.sum(1)[0].numpy()) >= 0.999


def test_smoothgrad_is_captum_noise_tunnel(small_resnet, photo):
    from captum.attr import NoiseTunnel, Saliency

    torch.manual_seed(0)
    result = attnexplain.explain(small_resnet, photo, "smoothgrad", size=SIZE,
                                 options=MethodOptions(samples=4))
    batch = _batch(photo)
    spread = float(batch.max() - batch.min()) * 0.15
    torch.manual_seed(0)
    reference = NoiseTunnel(Saliency(small_resnet)).attribute(
        batch.requires_grad_(), nt_type="smoothgrad", nt_samples=4, nt_samples_batch_size=32,
        stdevs=spread, target=result.target.index, abs=True)
    assert correlation(result.heatmap, reference.amax(1)[0].numpy()) >= 0.999


def test_guided_gradcam_is_captum_guided_backprop_times_bilinear_gradcam(small_resnet, photo):
    """Captum's GuidedGradCam, but with the Grad-CAM map upsampled bilinearly as in the paper (and
    as our CAM maps are); Captum's own class upsamples nearest-neighbour."""
    from captum.attr import GuidedBackprop, LayerAttribution, LayerGradCam

    result = attnexplain.explain(small_resnet, photo, "guided_gradcam", size=SIZE)
    assert result.layer == "layer4"
    target = result.target.index
    cam = LayerGradCam(small_resnet, small_resnet.layer4).attribute(
        _batch(photo).requires_grad_(), target=target, relu_attributions=True)
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
