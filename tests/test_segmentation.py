"""Segmentation models: a target is a class's pixels; checked against pytorch-grad-cam's own target."""

from __future__ import annotations

import pytest
import torch
from conftest import correlation

import attnexplain
from attnexplain.errors import MethodError
from attnexplain.loading import load_model
from attnexplain.preprocess import Preprocessing, prepare


@pytest.fixture(scope="module")
def segmenter():
    torch.manual_seed(0)
    return load_model("torchvision:lraspp_mobilenet_v3_large")


def test_gradcam_for_a_class_matches_pytorch_grad_cam(segmenter):
    from pytorch_grad_cam import GradCAM
    from skimage import data

    image = data.astronaut()
    result = attnexplain.explain(segmenter, image, "gradcam", size=96)
    assert result.layer == "backbone.16"
    target = result.target.index
    model = segmenter.module

    class OutWrapper(torch.nn.Module):  # pytorch-grad-cam's tutorial wraps dict outputs this way
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)["out"]

    batch = prepare(image, Preprocessing(size=(96, 96))).tensor
    with torch.no_grad():
        mask = (model(batch)["out"][0].argmax(0) == target).float()

    class PixelsOf:  # the semantics of pytorch_grad_cam.utils.model_targets.SemanticSegmentationTarget
        def __call__(self, output):
            return (output[target] * mask).sum()

    model.requires_grad_(True)
    try:
        with GradCAM(model=OutWrapper(model), target_layers=[model.get_submodule("backbone.16")]) as cam:
            reference = cam(input_tensor=batch, targets=[PixelsOf()])[0]
    finally:
        model.requires_grad_(False)
    assert correlation(result.heatmap, reference) >= 0.999
    share = float(mask.mean())
    assert abs(result.target.prob - share) < 1e-6  # a class's "probability" is its pixel share


def test_a_class_with_no_pixels_is_refused(segmenter):
    from skimage import data

    result = attnexplain.explain(segmenter, data.coffee(), "gradcam", size=96)
    shares = {p.index: p.prob for p in result.predictions}
    absent = next(index for index in range(21) if shares.get(index, 0.0) == 0.0)
    with pytest.raises(MethodError, match="not in this image"):
        attnexplain.explain(segmenter, data.coffee(), "gradcam", size=96, target=absent)
