"""The newer CAMs of issue #13 against pytorch-grad-cam and torchcam on the same model, layer, target
and image; the seeded ones (randomcam, smoothgradcampp, sscam) by their seeded properties and by
their definitions written out here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import correlation
from torch import nn

import attnexplain
from attnexplain.explanation import MethodOptions
from attnexplain.preprocess import Preprocessing, prepare

SIZE = 64


@pytest.fixture(scope="module")
def pixels():
    from skimage import data

    return data.chelsea()


def _batch(pixels, size=SIZE):
    return prepare(pixels, Preprocessing(size=(size, size))).tensor


def grad_cam_package(model, layers, cam_class, pixels, targets, size=SIZE, reshape=None, **call):
    """pytorch-grad-cam's map; it backpropagates into the parameters, so they need gradients.

    Its EigenGradCAM keeps the sign SVD happens to return; ours makes the larger magnitude positive,
    as its own ``get_2d_projection_with_sign_correction`` does, which it is given here. Its KPCA-CAM
    runs scikit-learn on float32 activations: with γ = 1/C the kernel's variations (about 1e-8 of
    tanh(1) on EfficientNet-B0's 1280 channels) are below float32's resolution; ours is in float64,
    as its own function is given here.
    """
    import pytorch_grad_cam.eigen_grad_cam as eigen_grad_cam
    import pytorch_grad_cam.kpca_cam as kpca_cam
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction

    model.requires_grad_(True)
    originals = eigen_grad_cam.get_2d_projection, kpca_cam.get_2d_projection_kernel
    eigen_grad_cam.get_2d_projection = get_2d_projection_with_sign_correction
    kpca_cam.get_2d_projection_kernel = lambda activations, *args: originals[1](activations.astype(np.float64), *args)
    try:
        with cam_class(model=model, target_layers=layers, reshape_transform=reshape) as cam:
            return cam(input_tensor=_batch(pixels, size), targets=targets, **call)[0]
    finally:
        eigen_grad_cam.get_2d_projection, kpca_cam.get_2d_projection_kernel = originals
        model.requires_grad_(False)
        model.zero_grad(set_to_none=True)


def _target(index):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    return [ClassifierOutputTarget(index)]


class SmallCNN(nn.Module):
    """Few channels, so that the methods that score every channel's mask stay cheap; GELU above
    ``features`` so that the score is not piecewise linear there (Shapley-CAM's Hessian is not 0);
    with ``concatenate``, the head also reads an earlier map, as a DenseNet does."""

    def __init__(self, concatenate: bool = False, classes: int = 5) -> None:
        super().__init__()
        self.concatenate = concatenate
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.features = nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU())
        self.mix = nn.Sequential(
            nn.Conv2d(20 if concatenate else 12, 16, 1), nn.GELU(), nn.Conv2d(16, 16, 1), nn.GELU()
        )
        self.head = nn.Linear(16, classes)
        with torch.no_grad():  # weights large enough for the GELUs to bend and the maps to vary
            for layer in (*self.mix[::2], self.head):
                layer.weight.normal_(0, 1.0)

    def forward(self, x):
        stem = self.stem(x)
        features = self.features(stem)
        if self.concatenate:
            features = torch.cat([features, F.avg_pool2d(stem, 2)], dim=1)
        return self.head(self.mix(features).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def small_cnn():
    from conftest import with_random_batchnorm_statistics

    torch.manual_seed(6)
    return with_random_batchnorm_statistics(SmallCNN().eval())


def test_gradient_cams_from_one_pass_match_pytorch_grad_cam(small_resnet, pixels):
    from pytorch_grad_cam import EigenGradCAM, FinerCAM, GradCAMElementWise, ShapleyCAM

    result = attnexplain.explain(
        small_resnet, pixels, "gradcam_elementwise,eigengradcam,shapleycam,finercam", size=SIZE
    )
    target = result.target.index
    layers = [small_resnet.layer4]
    references = {
        "gradcam_elementwise": grad_cam_package(small_resnet, layers, GradCAMElementWise, pixels, _target(target)),
        "eigengradcam": grad_cam_package(small_resnet, layers, EigenGradCAM, pixels, _target(target)),
        "shapleycam": grad_cam_package(small_resnet, layers, ShapleyCAM, pixels, _target(target)),
        "finercam": grad_cam_package(small_resnet, layers, FinerCAM, pixels, None, target_idx=target),
    }
    for name, reference in references.items():
        assert correlation(result.maps[name].heatmap, reference) >= 0.999, name


def test_shapleycam_uses_the_hessian_where_the_head_is_not_piecewise_linear(small_cnn, pixels):
    from pytorch_grad_cam import ShapleyCAM

    result = attnexplain.explain(small_cnn, pixels, "shapleycam,gradcam", layer="features", size=SIZE)
    reference = grad_cam_package(small_cnn, [small_cnn.features], ShapleyCAM, pixels, _target(result.target.index))
    assert correlation(result.maps["shapleycam"].heatmap, reference) >= 0.999
    # The ½·H·A term changes the map here (through a ReLU head it is 0 and this is Grad-CAM).
    assert correlation(result.maps["shapleycam"].heatmap, result.maps["gradcam"].heatmap) < 0.9999


class AttentionHead(nn.Module):
    """A conv layer, then self-attention over its positions (``F.scaled_dot_product_attention``, as
    ViTs and timm's blocks call it) and a linear head: the Hessian above `features` is not 0."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU())
        self.qkv = nn.Conv2d(8, 24, 1)  # a per-position linear layer on the map itself
        nn.init.normal_(self.qkv.weight)  # peaked attention: its curvature shows in the map
        self.head = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, positions, 3 × 8), laid out as a ViT's tokens (fused kernels need the last dim contiguous)
        tokens = self.qkv(self.features(x)).flatten(2).transpose(1, 2).contiguous()
        q, k, v = (part.unflatten(-1, (2, 4)).transpose(1, 2) for part in tokens.chunk(3, dim=-1))  # 2 heads
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # (B, positions, 8)
        return self.head(attended.mean(dim=1))


def test_shapleycam_differentiates_twice_through_scaled_dot_product_attention(pixels):
    """The fused kernels PyTorch picks for attention (flash on the CPU) have no second derivative;
    ours matches pytorch-grad-cam's ShapleyCAM run with attention on the math kernel."""
    from pytorch_grad_cam import ShapleyCAM
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(4)
    model = AttentionHead().eval()
    result = attnexplain.explain(model, pixels, "shapleycam,gradcam", layer="features", size=SIZE)
    with sdpa_kernel(SDPBackend.MATH):
        reference = grad_cam_package(model, [model.features], ShapleyCAM, pixels, _target(result.target.index))
    assert correlation(result.maps["shapleycam"].heatmap, reference) >= 0.999
    assert correlation(result.maps["shapleycam"].heatmap, result.maps["gradcam"].heatmap) < 0.9999


def test_finercam_compares_with_the_chosen_number_of_similar_classes(small_resnet, pixels):
    from pytorch_grad_cam import FinerCAM

    result = attnexplain.explain(small_resnet, pixels, "finercam", size=SIZE, options=MethodOptions(finer_classes=1))
    reference = grad_cam_package(
        small_resnet,
        [small_resnet.layer4],
        FinerCAM,
        pixels,
        None,
        target_idx=result.target.index,
        comparison_categories=[1],
    )
    assert correlation(result.heatmap, reference) >= 0.999


def test_kpcacam_matches_pytorch_grad_cam(small_resnet, pixels):
    from pytorch_grad_cam import KPCA_CAM

    result = attnexplain.explain(small_resnet, pixels, "kpcacam", size=SIZE)
    reference = grad_cam_package(small_resnet, [small_resnet.layer4], KPCA_CAM, pixels, _target(result.target.index))
    assert correlation(result.heatmap, reference) >= 0.999


def test_ablationcam_matches_pytorch_grad_cam(small_cnn, pixels):
    """The layer's ablated outputs go on from one pass of the image below it, in batches."""
    from pytorch_grad_cam import AblationCAM

    result = attnexplain.explain(
        small_cnn, pixels, "ablationcam", layer="features", size=SIZE, options=MethodOptions(batch_size=5)
    )
    reference = grad_cam_package(small_cnn, [small_cnn.features], AblationCAM, pixels, _target(result.target.index))
    assert correlation(result.heatmap, reference) >= 0.999


def test_ablationcam_runs_copies_of_the_image_where_the_model_concatenates_an_earlier_map(pixels):
    """Handing a batch of ablated outputs on from one image's pass fails at the concatenation: the
    image is then run once per ablation, and the map is the same as the reference's."""
    from conftest import with_random_batchnorm_statistics
    from pytorch_grad_cam import AblationCAM

    torch.manual_seed(6)
    model = with_random_batchnorm_statistics(SmallCNN(concatenate=True).eval())
    result = attnexplain.explain(
        model, pixels, "ablationcam", layer="features", size=SIZE, options=MethodOptions(batch_size=5)
    )
    reference = grad_cam_package(model, [model.features], AblationCAM, pixels, _target(result.target.index))
    assert correlation(result.heatmap, reference) >= 0.999


def test_fullgrad_matches_pytorch_grad_cam(small_resnet, pixels):
    from pytorch_grad_cam import FullGrad

    result = attnexplain.explain(small_resnet, pixels, "fullgrad", size=SIZE)
    assert result.layer is None  # every biased layer, not --layer
    reference = grad_cam_package(small_resnet, [], FullGrad, pixels, _target(result.target.index))
    assert correlation(result.heatmap, reference) >= 0.999


def test_fullgrad_refuses_a_model_without_biased_layers(pixels):
    from attnexplain.errors import MethodError

    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    ).eval()
    with pytest.raises(MethodError, match="bias"):
        attnexplain.explain(model, pixels, "fullgrad", size=SIZE)


def test_iscam_matches_torchcam(small_cnn, pixels):
    from torchcam.methods import ISCAM

    options = MethodOptions(samples=3)
    result = attnexplain.explain(small_cnn, pixels, "iscam", layer="features", size=SIZE, options=options)
    reference = _torchcam_map(small_cnn, ISCAM, pixels, result.target.index, num_samples=3)
    assert correlation(result.heatmap, reference) >= 0.999


def test_sscam_matches_torchcam_with_the_same_noise(small_cnn, pixels):
    """torchcam draws each sample's (1, C, H, W) noise from the global generator; ours draws the same
    numbers from a generator seeded with NOISE_SEED for each image."""
    from torchcam.methods import SSCAM

    from attnexplain.methods.attribution import NOISE_SEED

    options = MethodOptions(samples=3, mask_noise=0.5)
    result = attnexplain.explain(small_cnn, pixels, "sscam", layer="features", size=SIZE, options=options)
    torch.manual_seed(NOISE_SEED)
    reference = _torchcam_map(small_cnn, SSCAM, pixels, result.target.index, num_samples=3, std=0.5, seed=NOISE_SEED)
    assert correlation(result.heatmap, reference) >= 0.999


def _torchcam_map(model, cam_class, pixels, target, seed=None, **kwargs):
    model.requires_grad_(True)
    extractor = cam_class(model, target_layer="features", input_shape=(3, SIZE, SIZE), **kwargs)
    try:
        with torch.no_grad():
            output = model(_batch(pixels))
        if seed is not None:
            torch.manual_seed(seed)
        cam = extractor(target, output)[0]
    finally:
        extractor.remove_hooks()
        model.requires_grad_(False)
    return F.interpolate(cam[:, None].float(), size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0, 0].numpy()


@pytest.mark.parametrize("method", ["sscam", "iscam", "ablationcam"])
def test_masking_cams_give_an_image_the_same_map_alone_as_in_a_batch(small_cnn, method):
    from skimage import data

    from attnexplain.explanation import _as_loaded_model, compute_maps, plan_explanation

    loaded = _as_loaded_model(small_cnn)
    photos = torch.cat([_batch(picture) for picture in (data.chelsea(), data.astronaut(), data.coffee())])
    plan = plan_explanation(loaded, method, "features", size=SIZE)
    options = MethodOptions(samples=2, batch_size=7)
    torch.manual_seed(123)  # another global random state for each call: it must not matter
    together = compute_maps(loaded, photos, plan.methods, plan.layers, options=options)
    for index in range(len(photos)):
        torch.manual_seed(index)
        alone = compute_maps(loaded, photos[index : index + 1], plan.methods, plan.layers, options=options)
        expected = alone.maps[method][0].numpy()
        np.testing.assert_allclose(
            together.maps[method][index].numpy(),
            expected,
            rtol=1e-4,
            atol=1e-4 * (float(np.abs(expected).max()) or 1.0),
        )


def test_sscam_is_the_same_for_the_same_seed_and_smooths_with_more_noise(small_cnn, pixels):
    def sscam(noise):
        return attnexplain.explain(
            small_cnn, pixels, "sscam", layer="features", size=SIZE, options=MethodOptions(samples=2, mask_noise=noise)
        ).heatmap

    first, again = sscam(0.5), sscam(0.5)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, sscam(1.0))


def _gradcampp_definition(model, layer, batch, target, noisy_batches):
    """Smooth Grad-CAM++ written out: Grad-CAM++'s α from the derivatives averaged over copies."""
    store = {}

    def hook(module, args, output):
        output.register_hook(lambda grad: store.setdefault("gradients", []).append(grad))
        store["activation"] = output.detach()

    handle = layer.register_forward_hook(hook)
    try:
        clean_activation = None
        for copy in [batch, *noisy_batches]:
            copy = copy.clone().requires_grad_(True)
            model(copy)[0, target].backward()
            if clean_activation is None:
                clean_activation = store["activation"]
                store["gradients"].clear()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    gradients = torch.stack(store["gradients"]).double()
    d1, d2, d3 = gradients.mean(0), gradients.pow(2).mean(0), gradients.pow(3).mean(0)
    activation = clean_activation.double()
    alpha = d2 / (2 * d2 + activation.sum(dim=(2, 3), keepdim=True) * d3 + 1e-6)
    weights = (alpha * torch.relu(d1)).sum(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activation).sum(dim=1))
    return F.interpolate(cam[:, None].float(), size=batch.shape[-2:], mode="bilinear", align_corners=False)[
        0, 0
    ].numpy()


def test_smoothgradcampp_is_the_definition_over_seeded_noise(small_resnet, pixels):
    from attnexplain.methods.attribution import NOISE_SEED

    options = MethodOptions(samples=3, noise=0.1)
    result = attnexplain.explain(small_resnet, pixels, "smoothgradcampp", size=SIZE, options=options)
    batch = _batch(pixels)
    generator = torch.Generator().manual_seed(NOISE_SEED)
    spread = float(batch.max() - batch.min()) * 0.1
    draws = torch.randn((3, *batch.shape[1:]), generator=generator)
    noisy = [batch + spread * draw[None] for draw in draws]
    small_resnet.requires_grad_(True)
    try:
        reference = _gradcampp_definition(small_resnet, small_resnet.layer4, batch, result.target.index, noisy)
    finally:
        small_resnet.requires_grad_(False)
    assert correlation(result.heatmap, reference) >= 0.999
    again = attnexplain.explain(small_resnet, pixels, "smoothgradcampp", size=SIZE, options=options)
    np.testing.assert_array_equal(result.heatmap, again.heatmap)


def test_smoothgradcampp_without_noise_is_gradcampp(small_resnet, pixels):
    result = attnexplain.explain(
        small_resnet, pixels, "smoothgradcampp,gradcampp", size=SIZE, options=MethodOptions(samples=2, noise=0.0)
    )
    np.testing.assert_allclose(
        result.maps["smoothgradcampp"].heatmap, result.maps["gradcampp"].heatmap, rtol=1e-4, atol=1e-6
    )


def test_randomcam_weights_are_seeded_uniform_draws_shared_by_every_image():
    from attnexplain.methods.cam import randomcam

    channels = 4000
    one_hot = torch.eye(channels).reshape(1, channels, 1, channels)  # channel c lights position c only
    weights = randomcam(one_hot.expand(2, -1, -1, -1)).sum(dim=1)[:, 0]  # (2, channels)
    np.testing.assert_array_equal(weights[0].numpy(), weights[1].numpy())  # every image alike
    np.testing.assert_array_equal(weights[0].numpy(), randomcam(one_hot).sum(dim=1)[0, 0].numpy())
    values = weights[0].double()
    assert float(values.min()) >= -1.0 and float(values.max()) <= 1.0
    # Uniform on [-1, 1]: mean 0, standard deviation 1/√3, a quarter below -0.5.
    assert abs(float(values.mean())) < 0.05
    assert abs(float(values.std()) - 3**-0.5) < 0.02
    assert abs(float((values < -0.5).double().mean()) - 0.25) < 0.03
    other = randomcam(one_hot, seed=1).sum(dim=1)[0, 0]
    assert correlation(other.numpy(), values.numpy()) < 0.1


def test_new_cams_are_listed_with_paper_and_cost():
    from attnexplain.methods import METHODS

    for name in (
        "gradcam_elementwise",
        "eigengradcam",
        "kpcacam",
        "ablationcam",
        "fullgrad",
        "shapleycam",
        "finercam",
        "smoothgradcampp",
        "sscam",
        "iscam",
        "randomcam",
    ):
        method = METHODS[name]
        assert method.paper and method.cost and method.summary, name
    assert "Hessian" in METHODS["shapleycam"].cost


# --- every deterministic new CAM on every architecture family (slow: -m heavy) -------------------


def _channels_last(tensor):
    return tensor.permute(0, 3, 1, 2)


def _architecture(name):
    """(model, layer, input size, pytorch-grad-cam reshape): random weights, 5 classes."""
    import torchvision
    from conftest import with_random_batchnorm_statistics

    from attnexplain.default_plugins.torchvision_densenet import with_rectified_features

    torch.manual_seed(0)
    builders = {
        "resnet18": (lambda: torchvision.models.resnet18(num_classes=5), "layer4", 64, None),
        "densenet121": (
            lambda: with_rectified_features(torchvision.models.densenet121(num_classes=5)),
            "rectified",
            64,
            None,
        ),
        "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=5), "features", 64, None),
        "convnext_tiny": (lambda: torchvision.models.convnext_tiny(num_classes=5), "features", 64, None),
        "vgg11_bn": (lambda: torchvision.models.vgg11_bn(num_classes=5), "features", 64, None),
        "inception_v3": (
            lambda: torchvision.models.inception_v3(num_classes=5, aux_logits=False, init_weights=True),
            "Mixed_7c",
            160,
            None,
        ),
        "swin_t": (lambda: torchvision.models.swin_t(num_classes=5), "features.5", 128, _channels_last),
    }
    build, layer, size, reshape = builders[name]
    return with_random_batchnorm_statistics(build().eval()), layer, size, reshape


ARCHITECTURES = ["resnet18", "densenet121", "efficientnet_b0", "convnext_tiny", "vgg11_bn", "inception_v3", "swin_t"]
#: pytorch-grad-cam ablates to 0 only where the whole layer's minimum is 0, else to min − 10⁷ (the
#: paper, and we, always to 0): compared where the layer is rectified.
RECTIFIED = ("resnet18", "densenet121", "vgg11_bn", "inception_v3")


@pytest.mark.heavy
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_new_cams_match_pytorch_grad_cam_on_every_architecture(architecture, pixels):
    from pytorch_grad_cam import KPCA_CAM, AblationCAM, EigenGradCAM, FinerCAM, FullGrad, GradCAMElementWise, ShapleyCAM

    model, layer, size, reshape = _architecture(architecture)
    names = ["gradcam_elementwise", "eigengradcam", "kpcacam", "finercam"]
    if reshape is None:  # pytorch-grad-cam's ShapleyCAM skips reshape_transform on its activations
        names.append("shapleycam")
    if architecture in RECTIFIED:
        names.append("ablationcam")
    result = attnexplain.explain(model, pixels, ",".join(names), layer=layer, size=size)
    target = result.target.index
    layers = [model.get_submodule(layer)]
    classes = {
        "gradcam_elementwise": GradCAMElementWise,
        "eigengradcam": EigenGradCAM,
        "kpcacam": KPCA_CAM,
        "shapleycam": ShapleyCAM,
        "ablationcam": AblationCAM,
    }
    for name in names:
        if name == "finercam":
            reference = grad_cam_package(model, layers, FinerCAM, pixels, None, size, reshape, target_idx=target)
        else:
            reference = grad_cam_package(model, layers, classes[name], pixels, _target(target), size, reshape)
        if np.ptp(reference) == 0:  # every weight negative (Finer-CAM on the random Inception): both 0
            assert np.ptp(result.maps[name].heatmap) == 0, name
            continue
        assert correlation(result.maps[name].heatmap, reference) >= 0.999, name
    fullgrad = attnexplain.explain(model, pixels, "fullgrad", size=size)
    reference = grad_cam_package(model, [], FullGrad, pixels, _target(fullgrad.target.index), size)
    assert correlation(fullgrad.heatmap, reference) >= 0.999, "fullgrad"


# --- DenseNet: the in-place ReLU after `features` (docs/methods.md) ------------------------------


@pytest.fixture(scope="module")
def plain_densenet():
    """torchvision's own DenseNet-121 class, as built in Python: its default layer is `features`,
    which its forward rectifies in place after the hook has seen it."""
    import torchvision
    from conftest import with_random_batchnorm_statistics

    torch.manual_seed(3)
    return with_random_batchnorm_statistics(torchvision.models.densenet121(num_classes=5).eval())


DENSENET_METHODS = ["gradcam", "shapleycam", "finercam"]


def test_densenet_features_use_the_modules_own_output_and_its_gradient(plain_densenet, pixels):
    """Ours is what pytorch-grad-cam computes where its stored activation is a copy (on CUDA, which
    a copying reshape gives on the CPU too); on the CPU its stored activation is rectified by the
    in-place ReLU while its gradient is not, so its map differs there and ours does not.

    pytorch-grad-cam's ShapleyCAM keeps the live output (to differentiate it again), rectified on
    every device: not comparable here. Above `features` DenseNet is ReLU, pooling and a linear layer,
    whose Hessian is 0: Shapley-CAM is Grad-CAM there."""
    from pytorch_grad_cam import FinerCAM, GradCAM

    result = attnexplain.explain(plain_densenet, pixels, ",".join(DENSENET_METHODS), size=SIZE)
    assert result.layer == "features"
    target = result.target.index
    layers = [plain_densenet.features]
    copied = lambda tensor: tensor.clone()  # noqa: E731 - what `.cpu()` does on CUDA
    np.testing.assert_allclose(
        result.maps["shapleycam"].heatmap,
        result.maps["gradcam"].heatmap,
        rtol=1e-4,
        atol=1e-6 * float(result.maps["gradcam"].heatmap.max()),
    )
    for name, cls in (("gradcam", GradCAM), ("finercam", FinerCAM)):
        targets, call = (None, {"target_idx": target}) if name == "finercam" else (_target(target), {})
        reference = grad_cam_package(plain_densenet, layers, cls, pixels, targets, reshape=copied, **call)
        assert correlation(result.maps[name].heatmap, reference) >= 0.999, name
    mixed = grad_cam_package(plain_densenet, layers, GradCAM, pixels, _target(target))
    assert correlation(result.maps["gradcam"].heatmap, mixed) < 0.99


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_densenet_new_cams_are_the_same_on_cpu_and_cuda(plain_densenet, pixels):
    import copy

    names = ",".join(DENSENET_METHODS + ["eigengradcam", "kpcacam", "ablationcam"])
    on_cpu = attnexplain.explain(plain_densenet, pixels, names, size=SIZE)
    on_cuda = attnexplain.explain(copy.deepcopy(plain_densenet).cuda(), pixels, names, size=SIZE)
    for name in on_cpu.maps:
        assert correlation(on_cpu.maps[name].heatmap, on_cuda.maps[name].heatmap) >= 0.9999, name


def test_ablation_zeroes_a_map_channel_in_the_layers_own_layout(small_vit):
    """A ViT block's (B, tokens, C) output: zeroing map channel c in the token layout zeroes that
    channel of the map and nothing else; a layout that computes new values is refused."""
    from attnexplain.errors import MethodError
    from attnexplain.explanation import _as_loaded_model
    from attnexplain.methods.ablation import _channel_positions
    from attnexplain.passes.cam import layer_map as _layer_map

    loaded = _as_loaded_model(small_vit)
    name = "encoder.layers.encoder_layer_1"
    captured = {}
    handle = small_vit.get_submodule(name).register_forward_hook(lambda m, i, o: captured.update(out=o))
    with torch.no_grad():
        small_vit(torch.randn(1, 3, SIZE, SIZE))
    handle.remove()
    output = captured["out"]  # (1, 1 + 64 tokens, 32)
    as_map = _layer_map(loaded, name, output, (SIZE, SIZE))
    positions = _channel_positions(output, as_map)
    assert positions.shape == (32, 64)
    for channel in (0, 17):
        ablated = output.reshape(-1).clone()
        ablated[positions[channel]] = 0
        laid_out, original = as_map(ablated.reshape(output.shape)), as_map(output)
        assert bool((laid_out[0, channel] == 0).all())
        others = [c for c in range(32) if c != channel]
        assert torch.equal(laid_out[0, others], original[0, others])
    with pytest.raises(MethodError, match="rearranges"):
        _channel_positions(output, lambda tensor: as_map(tensor) * 0.5)
