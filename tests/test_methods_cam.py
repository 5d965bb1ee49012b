"""The CAM family against pytorch-grad-cam and torchcam on the same model, layer, target and image."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from conftest import correlation

import attnexplain
from attnexplain.explanation import MethodOptions
from attnexplain.preprocess import Preprocessing, prepare

SIZE = 96


@pytest.fixture(scope="module")
def images():
    """Two real photos from scikit-image (CC0 / public domain)."""
    from skimage import data

    return [data.chelsea(), data.astronaut()]


def _batch(pixels, size=SIZE):
    return prepare(pixels, Preprocessing(size=(size, size))).tensor


def _grad_cam_package(model, layers, cls, pixels, target, size=SIZE, **kwargs):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model.requires_grad_(True)  # pytorch-grad-cam backpropagates into the parameters
    try:
        with cls(model=model, target_layers=layers) as cam:
            return cam(input_tensor=_batch(pixels, size), targets=[ClassifierOutputTarget(target)], **kwargs)[0]
    finally:
        model.requires_grad_(False)
        model.zero_grad(set_to_none=True)


PACKAGE_CLASSES = {
    "gradcam": "GradCAM",
    "gradcampp": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "hirescam": "HiResCAM",
    "scorecam": "ScoreCAM",
}


# Score-CAM runs the model once per layer4 channel (512) on both sides: in the default run, one
# photo at 64 px (a 2 x 2 layer4 map); the heavy run adds the second photo at 96 px (3 x 3).
@pytest.mark.parametrize("photo_index,size", [(0, 64), pytest.param(1, SIZE, marks=pytest.mark.heavy)])
def test_every_cam_method_matches_pytorch_grad_cam_from_one_pass(small_resnet, images, photo_index, size):
    import pytorch_grad_cam

    names = ",".join(PACKAGE_CLASSES)
    for pixels in images[photo_index : photo_index + 1]:
        result = attnexplain.explain(small_resnet, pixels, names, size=size)
        assert list(result.maps) == list(PACKAGE_CLASSES)
        for name, class_name in PACKAGE_CLASSES.items():
            reference = _grad_cam_package(
                small_resnet,
                [small_resnet.layer4],
                getattr(pytorch_grad_cam, class_name),
                pixels,
                result.target.index,
                size=size,
            )
            assert correlation(result.maps[name].heatmap, reference) >= 0.999, name


def test_eigen_smoothing_matches_pytorch_grad_cam(small_resnet, images):
    from pytorch_grad_cam import GradCAM, LayerCAM

    for name, cls in (("gradcam", GradCAM), ("layercam", LayerCAM)):
        result = attnexplain.explain(small_resnet, images[0], name, size=SIZE, options=MethodOptions(eigen_smooth=True))
        reference = _grad_cam_package(
            small_resnet, [small_resnet.layer4], cls, images[0], result.target.index, eigen_smooth=True
        )
        # Their projection keeps SVD's arbitrary sign, ours makes the larger magnitude positive;
        # on these images the two agree (test_eigencam_... checks the corrected sign itself).
        assert correlation(result.heatmap, reference) >= 0.999


def test_eigencam_is_the_sign_corrected_principal_component(small_resnet, images):
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction

    store = {}
    handle = small_resnet.layer4.register_forward_hook(lambda m, i, o: store.update(act=o.detach()))
    with torch.no_grad():
        small_resnet(_batch(images[1]))
    handle.remove()
    projection = np.maximum(get_2d_projection_with_sign_correction(store["act"].numpy())[0], 0)
    reference = cv2.resize(projection, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
    result = attnexplain.explain(small_resnet, images[1], "eigencam", size=SIZE)
    assert correlation(result.heatmap, reference) >= 0.999


def test_layer_fusion_matches_pytorch_grad_cam(small_resnet, images):
    from pytorch_grad_cam import GradCAM

    result = attnexplain.explain(small_resnet, images[0], "gradcam", layer="layer3,layer4", size=SIZE)
    assert result.layer == "layer3,layer4"
    reference = _grad_cam_package(
        small_resnet, [small_resnet.layer3, small_resnet.layer4], GradCAM, images[0], result.target.index
    )
    assert correlation(result.heatmap, reference) >= 0.999


@pytest.mark.parametrize(
    "name,class_name", [("gradcam", "GradCAM"), ("xgradcam", "XGradCAM"), ("layercam", "LayerCAM")]
)
def test_cam_methods_match_torchcam(small_resnet, images, name, class_name):
    """torchcam's Grad-CAM++ and Score-CAM follow other formulas (docs/methods.md says how); the
    rest agree with it."""
    import torch.nn.functional as F
    import torchcam.methods

    result = attnexplain.explain(small_resnet, images[0], name, size=SIZE)
    small_resnet.requires_grad_(True)
    extractor = getattr(torchcam.methods, class_name)(small_resnet, target_layer="layer4")
    try:
        output = small_resnet(_batch(images[0]))
        cam = extractor(result.target.index, output)[0]
    finally:
        extractor.remove_hooks()
        small_resnet.requires_grad_(False)
        small_resnet.zero_grad(set_to_none=True)
    reference = (
        F.interpolate(cam[:, None].float(), size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0, 0]
        .detach()
        .numpy()
    )
    assert correlation(result.heatmap, reference) >= 0.999


def test_gradient_free_methods_skip_the_backward(small_resnet, images, monkeypatch):
    calls = []
    original = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or original(*a, **k))
    attnexplain.explain(small_resnet, images[0], "eigencam", size=64)
    assert calls == []
    attnexplain.explain(small_resnet, images[0], "gradcam,layercam,hirescam", size=64)
    assert calls == [1]  # one backward serves all three


def _vit_tokens_to_map(tensor, side=8):
    """pytorch-grad-cam's documented ViT reshape: drop the class token, tokens → (B, C, h, w)."""
    result = tensor[:, 1:, :].reshape(tensor.size(0), side, side, tensor.size(2))
    return result.transpose(2, 3).transpose(1, 2)


def test_cam_on_transformer_blocks_matches_pytorch_grad_cam_reshape_transforms(small_vit, images):
    """A ViT block outputs (B, tokens, C) and a Swin stage (B, H, W, C): the plugin lays them out as
    maps, as pytorch-grad-cam's reshape_transform does."""
    import torchvision
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    swin = torchvision.models.swin_t(num_classes=7).eval()
    cases = [
        (small_vit, "encoder.layers.encoder_layer_1", 64, _vit_tokens_to_map),
        (swin, "features.5", 128, lambda tensor: tensor.permute(0, 3, 1, 2)),
    ]
    for model, layer, size, reshape in cases:
        pixels = images[0]
        result = attnexplain.explain(model, pixels, "gradcam", layer=layer, size=size)
        model.requires_grad_(True)
        try:
            with GradCAM(model=model, target_layers=[model.get_submodule(layer)], reshape_transform=reshape) as cam:
                reference = cam(
                    input_tensor=prepare(pixels, Preprocessing(size=(size, size))).tensor,
                    targets=[ClassifierOutputTarget(result.target.index)],
                )[0]
        finally:
            model.requires_grad_(False)
        assert correlation(result.heatmap, reference) >= 0.999, layer


def test_vit_gradcam_explains_a_block_input_laid_out_on_the_token_grid(small_vit, images):
    """The default layer is a block's first norm (the block at half depth: block 1 of 3, see
    attnexplain.plugins.vit_cam_block), its token sequence laid out as an 8 × 8 map."""
    result = attnexplain.explain(small_vit, images[0], "gradcam", size=64)
    assert len(small_vit.encoder.layers) == 3
    assert result.layer == "encoder.layers.encoder_layer_1.ln_1"
    assert np.ptp(result.heatmap) > 0
