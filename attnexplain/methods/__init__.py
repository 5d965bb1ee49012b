"""Every explanation method, as a small function over what a forward (and backward) pass captured.

Families, by what they need:

- ``cam``: one layer's activation (and, for most, the gradient of the target score with respect to
  it): one forward and one backward down to that layer serve every CAM method requested;
- ``attention``: the attention probabilities of every attention layer (and their gradients for
  ``chefer``; for ``legrad`` each layer's own prediction's gradient), recorded in one forward;
- ``gates``: the channel gates of squeeze-and-excitation blocks, recorded in one forward;
- ``input``: the model as a function of its input; Captum computes these, except ``rise``
  (:mod:`.rise`), which only needs forward passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping

from ..errors import MethodError
from . import ablation, attention, attribution, cam, fullgrad, gates, rise, scorecam


if TYPE_CHECKING:
    from ..plugins import ModelPlugin

@dataclass(frozen=True)
class Method:
    name: str
    family: str  # "cam" | "attention" | "gates" | "input": the pass that computes it (attnexplain.passes)
    needs_gradient: bool
    summary: str
    applies_to: str
    cost: str
    paper: str
    compute: Callable
    #: What the colour scale shows, from low to high ("{target}": the explained class), for the
    #: colour bar of every page.
    scale: str = "relative importance for {target}"
    #: Rewrites the backward of the model's own modules (Captum's hooks), so needs them (not TorchScript).
    needs_modules: bool = False
    #: Costs many forwards per image (one per channel, window, mask, step or sample): left out of
    #: ``attnexplain evaluate``'s default, whose perturbation metrics multiply every map's cost.
    many_forwards: bool = False


_CNN = "CNNs: any layer with a (B, C, H, W) output"
_VIT = "transformers whose plugin exposes attention (ViT, Swin, MaxViT)"
_ANY = "any differentiable model, TorchScript too"
_BLACK_BOX = "any model, TorchScript too (forward passes only)"
_ONCE = "models that call each module once (VGG, AlexNet, MobileNet, EfficientNet; not ResNet)"
_RELUS = "models whose ReLUs are nn.ReLU modules (elsewhere: the plain input gradient)"

METHODS: dict[str, Method] = {method.name: method for method in (
    Method("gradcam", "cam", True, "A layer's channels weighted by their mean gradient.", _CNN,
           "1 forward + backward to the layer", "Selvaraju et al. 2017, Grad-CAM", cam.gradcam, scale="positive evidence for {target} in the layer"),
    Method("gradcampp", "cam", True, "Grad-CAM with pixel-wise weights on positive gradients; "
           "better for several instances.", _CNN, "1 forward + backward to the layer",
           "Chattopadhyay et al. 2018, Grad-CAM++", cam.gradcampp, scale="positive evidence for {target} in the layer"),
    Method("xgradcam", "cam", True, "Gradients weighted by normalised activations (axiom-based).",
           _CNN, "1 forward + backward to the layer", "Fu et al. 2020, Axiom-based Grad-CAM",
           cam.xgradcam, scale="positive evidence for {target} in the layer"),
    Method("layercam", "cam", True, "Each position weighted by its own positive gradient; "
           "finer maps, also on early layers.", _CNN, "1 forward + backward to the layer",
           "Jiang et al. 2021, LayerCAM", cam.layercam, scale="positive evidence for {target} at each position"),
    Method("hirescam", "cam", True, "Element-wise gradient × activation: provably the locations "
           "the score used.", _CNN, "1 forward + backward to the layer",
           "Draelos & Carin 2020, HiResCAM", cam.hirescam, scale="positive evidence for {target} at each position"),
    Method("eigencam", "cam", False, "First principal component of the activations; "
           "class-agnostic, no gradients.", _CNN, "1 forward", "Muhammad & Yeasin 2020, Eigen-CAM",
           cam.eigencam, scale="strength of the layer's main activation pattern (any class)"),
    Method("scorecam", "cam", False, "Channels weighted by the target's score on the image masked "
           "by each; gradient-free.", _CNN, "1 forward + one forward per channel (batched)",
           "Wang et al. 2020, Score-CAM", scorecam.scorecam, scale="rise of {target}'s score when only that region is kept", many_forwards=True),
    Method("gradcam_elementwise", "cam", True, "Gradient × activation rectified element by element, "
           "then summed: negative evidence cannot cancel positive.", _CNN,
           "1 forward + backward to the layer", "Gildenblat et al., pytorch-grad-cam (GradCAMElementWise)",
           cam.gradcam_elementwise),
    Method("eigengradcam", "cam", True, "First principal component of gradient × activation: "
           "Eigen-CAM made class-specific.", _CNN, "1 forward + backward to the layer",
           "Gildenblat et al., pytorch-grad-cam (EigenGradCAM), after Muhammad & Yeasin 2020",
           cam.eigengradcam),
    Method("kpcacam", "cam", False, "First kernel principal component (sigmoid kernel) of the "
           "activations; class-agnostic, no gradients.", _CNN,
           "1 forward + an eigendecomposition of a (positions × positions) kernel per image",
           "Karmani et al. 2024, KPCA-CAM", cam.kpcacam),
    Method("ablationcam", "cam", False, "Channels weighted by the target's relative score drop when "
           "each is zeroed; gradient-free.", _CNN, "1 forward + C forwards of the network above "
           "the layer (batched, --batch-size at a time)",
           "Desai & Ramaswamy 2020, Ablation-CAM", ablation.ablationcam, many_forwards=True),
    Method("shapleycam", "cam", True, "Channels weighted by a second-order Shapley-value estimate: "
           "mean of g − ½·H·A (Hessian-vector product).", _CNN,
           "1 forward + backward to the layer with its graph kept + 1 Hessian-vector product "
           "(a second backward above the layer): about 2× Grad-CAM's backward",
           "Cai et al. 2025, CAMs as Shapley Value-based Explainers", cam.shapleycam),
    Method("finercam", "cam", True, "Grad-CAM of the target's logit against its most similar classes "
           "(--finer-classes): what sets it apart from them.", _CNN,
           "1 forward + 2 backwards to the layer", "Zhang et al. 2025, Finer-CAM", cam.finercam),
    Method("smoothgradcampp", "cam", True, "Grad-CAM++ with derivatives averaged over noisy copies "
           "of the image (--samples, --noise).", _CNN, "1 forward + samples × (forward + backward "
           "to the layer)", "Omeiza et al. 2019, Smooth Grad-CAM++", cam.smoothgradcampp, many_forwards=True),
    Method("sscam", "cam", False, "Score-CAM averaged over masks with Gaussian noise (--samples); "
           "gradient-free.", _CNN, "1 forward + samples × C masked forwards (batched)",
           "Wang et al. 2020, SS-CAM: Smoothed Score-CAM", scorecam.sscam, many_forwards=True),
    Method("iscam", "cam", False, "Score-CAM integrated over masks scaled up in --samples steps; "
           "gradient-free.", _CNN, "1 forward + samples × C masked forwards (batched)",
           "Naidu et al. 2020, IS-CAM: Integrated Score-CAM", scorecam.iscam, many_forwards=True),
    Method("randomcam", "cam", False, "Channels weighted by seeded uniform draws from [-1, 1]: the "
           "baseline a CAM must beat.", _CNN, "1 forward",
           "Gildenblat et al., pytorch-grad-cam (RandomCAM), a sanity baseline", cam.randomcam),
    Method("rollout", "attention", False, "Attention flow from the class token to every patch "
           "through all layers.", _VIT, "1 forward", "Abnar & Zuidema 2020, Quantifying Attention "
           "Flow in Transformers", attention.rollout, scale="share of the class token's attention flow, all layers"),
    Method("chefer", "attention", True, "Attention rollout weighted by the gradient of the target: "
           "class-specific.", _VIT, "1 forward + 1 backward",
           "Chefer et al. 2021, Generic Attention-model Explainability", attention.gradient_rollout, scale="attention flow that raises {target}'s score"),
    Method("attention", "attention", False, "The raw learned attention of the class token, per "
           "layer and head (map: last layer, heads averaged).", _VIT, "1 forward",
           "Vaswani et al. 2017 / Dosovitskiy et al. 2021", attention.raw_attention, scale="class token's attention, last layer, mean of the heads"),
    Method("gates", "gates", False, "Learned squeeze-and-excitation channel gates: the most-gated "
           "channels of each block and where they fire (map: the last block's gated sum).",
           "CNNs with squeeze-and-excitation (EfficientNet, MobileNetV3, RegNetY)", "1 forward",
           "Hu et al. 2018, Squeeze-and-Excitation Networks", gates.gated_map, scale="gated activation of the last block"),
    Method("saliency", "input", True, "Absolute input gradient of the target score.", _ANY,
           "1 forward + 1 backward", "Simonyan et al. 2014, Deep Inside Convolutional Networks",
           attribution.saliency, scale="size of {target}'s score gradient per pixel"),
    Method("integrated_gradients", "input", True, "Gradients integrated along a path from a baseline "
           "image (--baseline: the dataset's mean colour, black or a blurred copy; Captum).", _ANY, "steps × (forward + backward)",
           "Sundararajan et al. 2017, Axiomatic Attribution", attribution.integrated_gradients, scale="attribution to {target} along the path from the baseline", many_forwards=True),
    Method("smoothgrad", "input", True, "Saliency averaged over noisy copies of the image (noise σ: "
           "a share of the image's range; the same noise for every image).", _ANY, "samples × (forward + backward)",
           "Smilkov et al. 2017, SmoothGrad", attribution.smoothgrad, scale="size of {target}'s score gradient, averaged over noisy copies", many_forwards=True),
    Method("occlusion", "input", False, "How much the score drops when each window is replaced by "
           "the baseline (--baseline: the dataset's mean colour, black or blurred; Captum).", _ANY, "one forward per window position (batched)",
           "Zeiler & Fergus 2014, Visualizing and Understanding CNNs", attribution.occlusion, scale="drop of {target}'s score when the window is hidden", many_forwards=True),
    Method("fullgrad", "input", True, "Input gradient × input plus the bias gradients of every "
           "convolution and batch norm, each rectified and scaled.", "CNNs with biased Conv2d or "
           "BatchNorm2d layers", "1 forward + 1 backward to the input",
           "Srinivas & Fleuret 2019, Full-Gradient Representation", fullgrad.fullgrad),
    Method("guided_gradcam", "input", True, "Guided backpropagation × Grad-CAM: fine detail of "
           "the class evidence (Captum's guided backpropagation).", _CNN + "; transformers through "
           "their plugin's layer layout, as the CAMs", "2 × (forward + backward)",
           "Selvaraju et al. 2017, Grad-CAM", attribution.guided_gradcam, scale="fine detail of the evidence for {target}"),
    Method("legrad", "attention", True, "Positive gradients of each layer's own prediction (the "
           "head on its tokens) with respect to its attention, averaged over heads, queries and "
           "layers.", "ViTs whose plugin says how to read a block's tokens (torchvision, timm)",
           "1 forward + 1 backward per layer (each down to its layer)",
           "Bousselham et al. 2024, LeGrad", attention.legrad),
    Method("rise", "input", False, "Random masks weighted by the target's probability on the image "
           "seen through each (--samples masks, seeded: the same for every image).", _BLACK_BOX,
           "samples forwards per image (batched), no backward",
           "Petsiuk et al. 2018, RISE: Randomized Input Sampling", rise.rise, many_forwards=True),
    Method("input_x_gradient", "input", True, "The input times its gradient (Captum).", _ANY,
           "1 forward + 1 backward", "Shrikumar et al. 2016, Not Just a Black Box",
           attribution.input_x_gradient),
    Method("deeplift", "input", True, "Each unit's difference from the --baseline image, propagated "
           "back by the rescale rule (Captum).", _ONCE, "1 forward + 1 backward (image and "
           "baseline together)", "Shrikumar et al. 2017, Learning Important Features (DeepLIFT)",
           attribution.deeplift, needs_modules=True),
    Method("gradientshap", "input", True, "Gradients at random points between the --baseline and "
           "noisy copies of the image, times image − baseline (Captum; --samples, seeded).", _ANY,
           "samples × (forward + backward)", "Lundberg & Lee 2017, A Unified Approach (SHAP)",
           attribution.gradientshap, many_forwards=True),
    Method("guided_backprop", "input", True, "The input gradient with negative gradients stopped "
           "at every ReLU on the way back (Captum).", _RELUS,
           "1 forward + 1 backward", "Springenberg et al. 2015, Striving for Simplicity",
           attribution.guided_backprop, needs_modules=True),
    Method("deconvolution", "input", True, "The gradient passed back through ReLUs applied to the "
           "gradient itself (Captum).", _RELUS,
           "1 forward + 1 backward", "Zeiler & Fergus 2014, Visualizing and Understanding CNNs",
           attribution.deconvolution, needs_modules=True),
    Method("lrp", "input", True, "Layer-wise relevance propagation, ε rule (Captum); others refused.",
           "plain CNNs Captum has rules for (VGG, AlexNet)", "1 forward + 1 backward",
           "Bach et al. 2015, Layer-wise Relevance Propagation", attribution.lrp, needs_modules=True),
    Method("feature_ablation", "input", False, "The score's drop when each superpixel is replaced by "
           "the --baseline (Captum).", _BLACK_BOX, "one forward per superpixel (batched)",
           "Zeiler & Fergus 2014, over SLIC superpixels (Achanta et al. 2012)",
           attribution.feature_ablation, many_forwards=True),
    Method("kernelshap", "input", False, "Shapley values of superpixels, estimated from --samples "
           "coalitions by kernel-weighted regression (Captum; seeded).", _BLACK_BOX,
           "samples forwards per image (batched) + a linear fit",
           "Lundberg & Lee 2017, A Unified Approach (Kernel SHAP)", attribution.kernelshap, many_forwards=True),
    Method("lime", "input", False, "A sparse linear model of the score over superpixels, fitted on "
           "--samples perturbations near the image (Captum; seeded).", _BLACK_BOX,
           "samples forwards per image (batched) + a Lasso fit",
           "Ribeiro et al. 2016, \"Why Should I Trust You?\" (LIME)", attribution.lime, many_forwards=True),
)}



def plugin_methods() -> dict[str, tuple["ModelPlugin", Method]]:
    """Every method an installed plugin adds under its own name, with that plugin (see
    :meth:`attnexplain.plugins.ModelPlugin.methods`). A plugin whose methods cannot be registered
    adds none: :func:`refused_plugin_methods` says why."""
    return _plugin_methods()[0]


def refused_plugin_methods() -> dict[str, str]:
    """Plugin name → why its methods are left out (:func:`method_clashes`, or methods() raised)."""
    return _plugin_methods()[1]


def _plugin_methods() -> tuple[dict[str, tuple["ModelPlugin", Method]], dict[str, str]]:
    # Checked here, when methods are first needed, not at plugin discovery: the check needs the
    # built-in methods, which import torch, and listings (`attnexplain plugins`, `models`) must not.
    from ..plugins import installed_plugins

    found: dict[str, tuple[ModelPlugin, Method]] = {}
    refused: dict[str, str] = {}
    for plugin in installed_plugins():
        added, problem = _registered_methods(plugin, taken=found)
        if problem is not None:
            refused[plugin.name] = problem
        for method in added:
            found[method.name] = (plugin, method)
    return found, refused


def find_method(name: str, plugin: "ModelPlugin | None" = None) -> Method:
    """The method called ``name``: a built-in one, or one a plugin adds under its own name.

    With ``plugin`` (the model's), only that plugin's own methods count: a name another installed
    plugin adds is refused, naming the plugin that provides it. Without, any installed plugin's
    (for describing a map already made). Unknown names are refused with the known ones. Planning,
    the CLI, ``evaluate`` and the pages all look methods up here.
    """
    if name in METHODS:
        return METHODS[name]
    if plugin is None:
        provided = plugin_methods()
        own = {method_name: method for method_name, (_, method) in provided.items()}
    else:  # the model's plugin, installed or handed to the API in memory
        own = {method.name: method for method in _registered_methods(plugin)[0]}
    if name in own:
        return own[name]
    if plugin is not None:
        provided = plugin_methods()
        if name in provided:
            raise MethodError(f"{name} is provided by plugin {provided[name][0].name} for its models; "
                              f"this model's plugin is {plugin.name}.")
    known = ", ".join([*METHODS, *own])
    raise MethodError(f"Unknown method {name!r}; `attnexplain methods` lists them (auto, {known}).")


def method_clashes(plugin: "ModelPlugin",
                   taken: "Mapping[str, tuple[ModelPlugin, Method]] | None" = None) -> str | None:
    """Why ``plugin``'s own methods cannot be registered (a name taken by a built-in method or by
    another plugin's, ``taken``; a method of no known family), or None."""
    return _registered_methods(plugin, taken)[1]


def _registered_methods(plugin: "ModelPlugin", taken: "Mapping[str, tuple[ModelPlugin, Method]] | None" = None
                        ) -> tuple[list[Method], str | None]:
    """``plugin``'s own methods, asked once, and why they cannot be registered (then none are)."""
    from ..errors import error_line
    from ..passes import PASSES  # the families are the passes registered

    try:
        methods = list(plugin.methods())
    except Exception as error:  # a broken plugin must not break the others
        return [], f"its methods() raised {error_line(error)}"[:300]
    for method in methods:
        if not isinstance(method, Method):
            return [], f"its methods() returned {type(method).__name__}, not attnexplain.methods.Method"
        if method.name in METHODS or method.name == "auto":
            return [], f"its method {method.name!r} has the name of a built-in method"
        if taken and method.name in taken:
            return [], f"its method {method.name!r} is plugin {taken[method.name][0].name}'s already"
        if method.family not in PASSES:
            return [], (f"its method {method.name!r} is of family {method.family!r}, not one of "
                        f"{', '.join(PASSES)}")
    return methods, None


__all__ = ["METHODS", "Method", "find_method", "method_clashes", "plugin_methods", "refused_plugin_methods"]
