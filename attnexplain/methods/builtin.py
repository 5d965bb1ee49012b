"""The built-in methods, one keyword-argument row each, in the order ``attnexplain methods`` lists
them (and the engine computes a family's methods).

Each row names the function over what its family's pass captured (``compute``, in the modules of
this package) and says what the method needs, costs and shows; :mod:`attnexplain.method_registry`
looks names up among these and the methods plugins add.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .method import Method


class _Deferred:
    """A function of one of this package's modules, imported when first called: the modules import
    torch, and ``attnexplain methods`` lists these rows without it."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(import_module(f"{__package__}.{self.module}"), self.name)(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<{__package__}.{self.module}.{self.name}, imported when called>"


class _DeferredModule:
    """``cam.gradcam`` in a row below: :class:`_Deferred` ``("cam", "gradcam")``."""

    def __init__(self, module: str) -> None:
        self.module = module

    def __getattr__(self, name: str) -> _Deferred:
        return _Deferred(self.module, name)


ablation, attention, attribution, cam, fullgrad, gates, rise, scorecam = map(
    _DeferredModule, ("ablation", "attention", "attribution", "cam", "fullgrad", "gates", "rise", "scorecam")
)

_CNN = "CNNs: any layer with a (B, C, H, W) output"
_VIT = "transformers whose plugin exposes attention (ViT, Swin, MaxViT)"
_ANY = "any differentiable model, TorchScript too"
_BLACK_BOX = "any model, TorchScript too (forward passes only)"
_ONCE = "models that call each module once (VGG, AlexNet, MobileNet, EfficientNet; not ResNet)"
_RELUS = "models whose ReLUs are nn.ReLU modules (elsewhere: the plain input gradient)"

METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method(
            name="gradcam",
            family="cam",
            needs_gradient=True,
            summary="A layer's channels weighted by their mean gradient.",
            applies_to=_CNN,
            cost="1 forward + backward to the layer",
            paper="Selvaraju et al. 2017, Grad-CAM",
            compute=cam.gradcam,
            scale="positive evidence for {target} in the layer",
        ),
        Method(
            name="gradcampp",
            family="cam",
            needs_gradient=True,
            summary="Grad-CAM with pixel-wise weights on positive gradients; better for several instances.",
            applies_to=_CNN,
            cost="1 forward + backward to the layer",
            paper="Chattopadhyay et al. 2018, Grad-CAM++",
            compute=cam.gradcampp,
            scale="positive evidence for {target} in the layer",
        ),
        Method(
            name="xgradcam",
            family="cam",
            needs_gradient=True,
            summary="Gradients weighted by normalised activations (axiom-based).",
            applies_to=_CNN,
            cost="1 forward + backward to the layer",
            paper="Fu et al. 2020, Axiom-based Grad-CAM",
            compute=cam.xgradcam,
            scale="positive evidence for {target} in the layer",
        ),
        Method(
            name="layercam",
            family="cam",
            needs_gradient=True,
            summary="Each position weighted by its own positive gradient; finer maps, also on early layers.",
            applies_to=_CNN,
            cost="1 forward + backward to the layer",
            paper="Jiang et al. 2021, LayerCAM",
            compute=cam.layercam,
            scale="positive evidence for {target} at each position",
        ),
        Method(
            name="hirescam",
            family="cam",
            needs_gradient=True,
            summary="Element-wise gradient × activation: provably the locations the score used.",
            applies_to=_CNN,
            cost="1 forward + backward to the layer",
            paper="Draelos & Carin 2020, HiResCAM",
            compute=cam.hirescam,
            scale="positive evidence for {target} at each position",
        ),
        Method(
            name="eigencam",
            family="cam",
            needs_gradient=False,
            summary="First principal component of the activations; class-agnostic, no gradients.",
            applies_to=_CNN,
            cost="1 forward",
            paper="Muhammad & Yeasin 2020, Eigen-CAM",
            compute=cam.eigencam,
            scale="strength of the layer's main activation pattern (any class)",
        ),
        Method(
            name="scorecam",
            family="cam",
            needs_gradient=False,
            summary="Channels weighted by the target's score on the image masked by each; gradient-free.",
            applies_to=_CNN,
            cost="1 forward + one forward per channel (batched)",
            paper="Wang et al. 2020, Score-CAM",
            compute=scorecam.scorecam,
            scale="rise of {target}'s score when only that region is kept",
            many_forwards=True,
        ),
        Method(
            name="gradcam_elementwise",
            family="cam",
            needs_gradient=True,
            summary=(
                "Gradient × activation rectified element by element, then summed: negative evidence cannot cancel "
                "positive."
            ),
            applies_to=_CNN,
            cost="1 forward + backward to the layer",
            paper="Gildenblat et al., pytorch-grad-cam (GradCAMElementWise)",
            compute=cam.gradcam_elementwise,
        ),
        Method(
            name="eigengradcam",
            family="cam",
            needs_gradient=True,
            summary="First principal component of gradient × activation: Eigen-CAM made class-specific.",
            applies_to=_CNN,
            cost="1 forward + backward to the layer",
            paper="Gildenblat et al., pytorch-grad-cam (EigenGradCAM), after Muhammad & Yeasin 2020",
            compute=cam.eigengradcam,
        ),
        Method(
            name="kpcacam",
            family="cam",
            needs_gradient=False,
            summary=(
                "First kernel principal component (sigmoid kernel) of the activations; class-agnostic, no gradients."
            ),
            applies_to=_CNN,
            cost="1 forward + an eigendecomposition of a (positions × positions) kernel per image",
            paper="Karmani et al. 2024, KPCA-CAM",
            compute=cam.kpcacam,
            scale="strength of the layer's main nonlinear activation pattern (any class)",
        ),
        Method(
            name="ablationcam",
            family="cam",
            needs_gradient=False,
            summary="Channels weighted by the target's relative score drop when each is zeroed; gradient-free.",
            applies_to=_CNN,
            cost=(
                "1 forward + C forwards of the network above the layer (batched, --batch-size at a time); "
                "float32 whatever --precision"
            ),
            paper="Desai & Ramaswamy 2020, Ablation-CAM",
            compute=ablation.ablationcam,
            many_forwards=True,
            full_precision=True,  # score differences of perturbed copies: see attnexplain.precision
        ),
        Method(
            name="shapleycam",
            family="cam",
            needs_gradient=True,
            summary=(
                "Channels weighted by a second-order Shapley-value estimate: mean of g − ½·H·A (Hessian-vector "
                "product)."
            ),
            applies_to=_CNN,
            cost=(
                "1 forward + backward to the layer with its graph kept + 1 Hessian-vector product (a second backward "
                "above the layer): about 2× Grad-CAM's backward"
            ),
            paper="Cai et al. 2025, CAMs as Shapley Value-based Explainers",
            compute=cam.shapleycam,
        ),
        Method(
            name="finercam",
            family="cam",
            needs_gradient=True,
            summary=(
                "Grad-CAM of the target's logit against its most similar classes (--finer-classes): what sets it apart "
                "from them."
            ),
            applies_to=_CNN,
            cost="1 forward + 2 backwards to the layer",
            paper="Zhang et al. 2025, Finer-CAM",
            compute=cam.finercam,
        ),
        Method(
            name="smoothgradcampp",
            family="cam",
            needs_gradient=True,
            summary="Grad-CAM++ with derivatives averaged over noisy copies of the image (--samples, --noise).",
            applies_to=_CNN,
            cost="1 forward + samples × (forward + backward to the layer)",
            paper="Omeiza et al. 2019, Smooth Grad-CAM++",
            compute=cam.smoothgradcampp,
            many_forwards=True,
        ),
        Method(
            name="sscam",
            family="cam",
            needs_gradient=False,
            summary="Score-CAM averaged over masks with Gaussian noise (--samples); gradient-free.",
            applies_to=_CNN,
            cost="1 forward + samples × C masked forwards (batched)",
            paper="Wang et al. 2020, SS-CAM: Smoothed Score-CAM",
            compute=scorecam.sscam,
            many_forwards=True,
        ),
        Method(
            name="iscam",
            family="cam",
            needs_gradient=False,
            summary="Score-CAM integrated over masks scaled up in --samples steps; gradient-free.",
            applies_to=_CNN,
            cost="1 forward + samples × C masked forwards (batched)",
            paper="Naidu et al. 2020, IS-CAM: Integrated Score-CAM",
            compute=scorecam.iscam,
            many_forwards=True,
        ),
        Method(
            name="randomcam",
            family="cam",
            needs_gradient=False,
            summary="Channels weighted by seeded uniform draws from [-1, 1]: the baseline a CAM must beat.",
            applies_to=_CNN,
            cost="1 forward",
            paper="Gildenblat et al., pytorch-grad-cam (RandomCAM), a sanity baseline",
            compute=cam.randomcam,
            scale="randomly weighted activation of the layer (any class)",
        ),
        Method(
            name="rollout",
            family="attention",
            needs_gradient=False,
            summary=(
                "Attention flow through all layers from the class token to every patch (windowed models without "
                "one, Swin, MaxViT: from every token, which the classifier averages); not class-specific."
            ),
            applies_to=_VIT,
            cost="1 forward",
            paper="Abnar & Zuidema 2020, Quantifying Attention Flow in Transformers",
            compute=attention.rollout,
            scale="share of the attention flow to the class token (or all tokens), all layers (any class)",
        ),
        Method(
            name="chefer",
            family="attention",
            needs_gradient=True,
            summary=(
                "Attention rollout weighted by the gradient of the target: class-specific (a DETR: the box's query's "
                "relevance by the encoder–decoder rules)."
            ),
            applies_to=_VIT,
            cost="1 forward + 1 backward",
            paper="Chefer et al. 2021, Generic Attention-model Explainability",
            compute=attention.gradient_rollout,
            scale="attention flow that raises {target}'s score",
        ),
        Method(
            name="attention",
            family="attention",
            needs_gradient=False,
            summary=(
                "The raw learned attention of the class token (windowed models: the attention each position "
                "receives), per layer and head (map: last layer, heads averaged); not class-specific."
            ),
            applies_to=_VIT,
            cost="1 forward",
            paper="Vaswani et al. 2017 / Dosovitskiy et al. 2021",
            compute=attention.raw_attention,
            scale="attention from the class token (or received), last layer, mean of the heads (any class)",
        ),
        Method(
            name="gates",
            family="gates",
            needs_gradient=False,
            summary=(
                "Learned squeeze-and-excitation channel gates: the most-gated channels of each block and where they "
                "fire (map: the last block's gated sum)."
            ),
            applies_to="CNNs with squeeze-and-excitation (EfficientNet, MobileNetV3, RegNetY)",
            cost="1 forward",
            paper="Hu et al. 2018, Squeeze-and-Excitation Networks",
            compute=gates.gated_map,
            scale="gated activation of the last block",
        ),
        Method(
            name="saliency",
            family="input",
            needs_gradient=True,
            summary="Absolute input gradient of the target score.",
            applies_to=_ANY,
            cost="1 forward + 1 backward",
            paper="Simonyan et al. 2014, Deep Inside Convolutional Networks",
            compute=attribution.saliency,
            scale="size of {target}'s score gradient per pixel",
        ),
        Method(
            name="integrated_gradients",
            family="input",
            needs_gradient=True,
            summary=(
                "Gradients integrated along a path from a baseline image (--baseline: the dataset's mean colour, black "
                "or a blurred copy; Captum)."
            ),
            applies_to=_ANY,
            cost="steps × (forward + backward)",
            paper="Sundararajan et al. 2017, Axiomatic Attribution",
            compute=attribution.integrated_gradients,
            scale="attribution to {target} along the path from the baseline",
            many_forwards=True,
        ),
        Method(
            name="smoothgrad",
            family="input",
            needs_gradient=True,
            summary=(
                "Saliency averaged over noisy copies of the image (noise σ: a share of the image's range; the same "
                "noise for every image)."
            ),
            applies_to=_ANY,
            cost="samples × (forward + backward)",
            paper="Smilkov et al. 2017, SmoothGrad",
            compute=attribution.smoothgrad,
            scale="size of {target}'s score gradient, averaged over noisy copies",
            many_forwards=True,
        ),
        Method(
            name="occlusion",
            family="input",
            needs_gradient=False,
            summary=(
                "How much the score drops when each window is replaced by the baseline (--baseline: the dataset's mean "
                "colour, black or blurred; Captum)."
            ),
            applies_to=_ANY,
            cost="one forward per window position (batched); float32 whatever --precision",
            paper="Zeiler & Fergus 2014, Visualizing and Understanding CNNs",
            compute=attribution.occlusion,
            scale="drop of {target}'s score when the window is hidden",
            many_forwards=True,
            full_precision=True,  # score differences of perturbed copies: see attnexplain.precision
        ),
        Method(
            name="fullgrad",
            family="input",
            needs_gradient=True,
            summary=(
                "Input gradient × input plus the bias gradients of every convolution and batch norm, each rectified "
                "and scaled."
            ),
            applies_to="CNNs with biased Conv2d or BatchNorm2d layers",
            cost="1 forward + 1 backward to the input",
            paper="Srinivas & Fleuret 2019, Full-Gradient Representation",
            compute=fullgrad.fullgrad,
        ),
        Method(
            name="guided_gradcam",
            family="input",
            needs_gradient=True,
            summary=(
                "Guided backpropagation × Grad-CAM: fine detail of the class evidence (Captum's guided "
                "backpropagation)."
            ),
            applies_to=_CNN + "; transformers through their plugin's layer layout, as the CAMs",
            cost="2 × (forward + backward)",
            paper="Selvaraju et al. 2017, Grad-CAM",
            compute=attribution.guided_gradcam,
            scale="fine detail of the evidence for {target}",
        ),
        Method(
            name="legrad",
            family="attention",
            needs_gradient=True,
            summary=(
                "Positive gradients of each layer's own prediction (the head on its tokens) with respect to its "
                "attention, averaged over heads, queries and layers."
            ),
            applies_to=(
                "ViTs whose plugin says how to read a block's tokens (torchvision, timm; CLIP, SigLIP with prompts)"
            ),
            cost="1 forward + 1 backward per layer (each down to its layer)",
            paper="Bousselham et al. 2024, LeGrad",
            compute=attention.legrad,
        ),
        Method(
            name="rise",
            family="input",
            needs_gradient=False,
            summary=(
                "Random masks weighted by the target's probability on the image seen through each (--samples masks, "
                "seeded: the same for every image)."
            ),
            applies_to=_BLACK_BOX,
            cost="samples forwards per image (batched), no backward",
            paper="Petsiuk et al. 2018, RISE: Randomized Input Sampling",
            compute=rise.rise,
            many_forwards=True,
        ),
        Method(
            name="input_x_gradient",
            family="input",
            needs_gradient=True,
            summary="The input times its gradient (Captum).",
            applies_to=_ANY,
            cost="1 forward + 1 backward",
            paper="Shrikumar et al. 2016, Not Just a Black Box",
            compute=attribution.input_x_gradient,
        ),
        Method(
            name="deeplift",
            family="input",
            needs_gradient=True,
            summary="Each unit's difference from the --baseline image, propagated back by the rescale rule (Captum).",
            applies_to=_ONCE,
            cost="1 forward + 1 backward (image and baseline together)",
            paper="Shrikumar et al. 2017, Learning Important Features (DeepLIFT)",
            compute=attribution.deeplift,
            needs_modules=True,
        ),
        Method(
            name="gradientshap",
            family="input",
            needs_gradient=True,
            summary=(
                "Gradients at random points between the --baseline and noisy copies of the image, times image − "
                "baseline (Captum; --samples, seeded)."
            ),
            applies_to=_ANY,
            cost="samples × (forward + backward)",
            paper="Lundberg & Lee 2017, A Unified Approach (SHAP)",
            compute=attribution.gradientshap,
            many_forwards=True,
        ),
        Method(
            name="guided_backprop",
            family="input",
            needs_gradient=True,
            summary="The input gradient with negative gradients stopped at every ReLU on the way back (Captum).",
            applies_to=_RELUS,
            cost="1 forward + 1 backward",
            paper="Springenberg et al. 2015, Striving for Simplicity",
            compute=attribution.guided_backprop,
            needs_modules=True,
        ),
        Method(
            name="deconvolution",
            family="input",
            needs_gradient=True,
            summary="The gradient passed back through ReLUs applied to the gradient itself (Captum).",
            applies_to=_RELUS,
            cost="1 forward + 1 backward",
            paper="Zeiler & Fergus 2014, Visualizing and Understanding CNNs",
            compute=attribution.deconvolution,
            needs_modules=True,
        ),
        Method(
            name="lrp",
            family="input",
            needs_gradient=True,
            summary="Layer-wise relevance propagation, ε rule (Captum); others refused.",
            applies_to="plain CNNs Captum has rules for (VGG, AlexNet)",
            cost="1 forward + 1 backward",
            paper="Bach et al. 2015, Layer-wise Relevance Propagation",
            compute=attribution.lrp,
            needs_modules=True,
        ),
        Method(
            name="feature_ablation",
            family="input",
            needs_gradient=False,
            summary="The score's drop when each superpixel is replaced by the --baseline (Captum).",
            applies_to=_BLACK_BOX,
            cost="one forward per superpixel (batched); float32 whatever --precision",
            paper="Zeiler & Fergus 2014, over SLIC superpixels (Achanta et al. 2012)",
            compute=attribution.feature_ablation,
            many_forwards=True,
            full_precision=True,  # score differences of perturbed copies: see attnexplain.precision
        ),
        Method(
            name="kernelshap",
            family="input",
            needs_gradient=False,
            summary=(
                "Shapley values of superpixels, estimated from --samples coalitions by kernel-weighted regression "
                "(Captum; seeded)."
            ),
            applies_to=_BLACK_BOX,
            cost="samples forwards per image (batched) + a linear fit; float32 whatever --precision",
            paper="Lundberg & Lee 2017, A Unified Approach (Kernel SHAP)",
            compute=attribution.kernelshap,
            many_forwards=True,
            full_precision=True,  # score differences of perturbed copies: see attnexplain.precision
        ),
        Method(
            name="lime",
            family="input",
            needs_gradient=False,
            summary=(
                "A sparse linear model of the score over superpixels, fitted on --samples perturbations near the image "
                "(Captum; seeded)."
            ),
            applies_to=_BLACK_BOX,
            cost="samples forwards per image (batched) + a Lasso fit; float32 whatever --precision",
            paper='Ribeiro et al. 2016, "Why Should I Trust You?" (LIME)',
            compute=attribution.lime,
            many_forwards=True,
            full_precision=True,  # score differences of perturbed copies: see attnexplain.precision
        ),
    )
}

__all__ = ["METHODS"]
