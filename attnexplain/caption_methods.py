"""Which of the methods explain a captioner's word, and how each is computed from the word's score.

A word's score is its log-probability given the image and the words before it, a function of the
image under teacher forcing (:func:`attnexplain.caption_passes.teacher_forced`). Two kinds of method
apply to it, computed by the functions the classifiers' passes use (the method registry's rows):

- the CAM family methods that need only a layer's activation and the gradient of the score with
  respect to it (:func:`attnexplain.passes.cam.shares_forward`): Grad-CAM, Grad-CAM++, XGrad-CAM,
  LayerCAM, HiResCAM, Eigen-CAM, ... all from the one partial backward per word that Grad-CAM
  takes, down to the encoder's feature map (or ``--layer``) only;
- Captum's attributions with respect to the input pixels (:data:`INPUT_METHODS`), each called on
  the word's teacher-forced score as a function of the image, at its own cost per word (saliency
  and input × gradient one forward and backward, integrated gradients ``steps`` of them, SmoothGrad
  ``samples``, occlusion and feature ablation one forward per window or superpixel).

The rest are refused in one line: CAMs that need other forwards per channel, a second derivative,
other classes' scores or noisy copies (Score-CAM, Ablation-CAM, Shapley-CAM, Finer-CAM, ...), and
input methods that rewrite the model's modules' backward (DeepLIFT, LRP, guided backpropagation),
need a classifier's probabilities or biases (RISE, FullGrad) or draw from the global generators
(GradientSHAP; KernelSHAP and LIME fit a surrogate on their draws): not carried over here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from .errors import MethodError
from .method_registry import find_method
from .methods import Method
from .methods.attribution import baseline_images
from .methods.cam import cam_map
from .options import MethodOptions
from .passes.cam import layer_map, shares_forward
from .passes.inputs import input_settings

if TYPE_CHECKING:
    from .loading import LoadedModel
    from .plugins import Captioning

#: A word's gradient maps when none are named: Grad-CAM of its log-probability.
DEFAULT_CAPTION_METHODS = ("gradcam",)
#: Captum's input attributions that a word's score can be handed to as a function of the image.
#: The method settings (MethodOptions' fields) that apply to a captioner's word maps.
WORD_METHOD_OPTIONS = ("eigen_smooth", "steps", "samples", "noise", "baseline", "window", "stride", "batch_size")
INPUT_METHODS = (
    "saliency",
    "input_x_gradient",
    "integrated_gradients",
    "smoothgrad",
    "occlusion",
    "feature_ablation",
)


def caption_methods(requested: str | Sequence[str] | None, plugin: Any = None) -> list[Method]:
    """The methods ``requested`` (comma-separated names or a list; None, ``auto`` or ``default``:
    :data:`DEFAULT_CAPTION_METHODS`; ``all``: every one that applies) for a captioner's words, each
    checked to apply to one; a method that does not is refused in one line saying why and which do."""
    names = requested.split(",") if isinstance(requested, str) else list(requested or [])
    names = [name.strip() for name in names if name.strip()]
    if not names or names in (["auto"], ["default"]):
        names = list(DEFAULT_CAPTION_METHODS)
    elif names == ["all"]:  # every one that applies (``evaluate --method all``)
        names = [*word_cam_methods(), *INPUT_METHODS]
    chosen: list[Method] = []
    for name in names:
        method = find_method(name, plugin)
        if not applies_to_words(method):
            raise MethodError(
                f"{name} does not apply to a captioner's word ({_why_not(method)}); the CAM methods of a layer's "
                f"activation and gradient ({', '.join(word_cam_methods())}) and {', '.join(INPUT_METHODS)} do."
            )
        if method not in chosen:
            chosen.append(method)
    return chosen


def unread_options(options: MethodOptions | None) -> list[str]:
    """The options among ``options`` changed from their defaults that no word map reads (rollout's
    head fusion, augmentation, ...), as --flags, for a one-line refusal."""
    from dataclasses import fields

    unchanged = MethodOptions()
    return [
        "--" + field.name.replace("_", "-")
        for field in fields(unchanged)
        if options is not None
        and getattr(options, field.name) != getattr(unchanged, field.name)
        and field.name not in WORD_METHOD_OPTIONS
    ]


def applies_to_words(method: Method) -> bool:
    """Whether ``method`` explains a captioner's word (see the module's docstring)."""
    if method.family == "cam":
        return shares_forward(method)
    return method.family == "input" and method.name in INPUT_METHODS


def word_cam_methods() -> list[str]:
    """The built-in CAM methods that explain a captioner's word."""
    from .methods import METHODS

    return [name for name, method in METHODS.items() if method.family == "cam" and applies_to_words(method)]


def _why_not(method: Method) -> str:
    if method.family == "cam":
        return "it needs more than the layer's activation and the word's gradient: other forwards or scores"
    if method.family == "input":
        return "it rewrites the model's backward, needs a classifier's own outputs or draws from the global generators"
    return f"a {method.family} method reads a classifier's own {method.family}"


def cam_word_maps(
    methods: Sequence[Method], activation: torch.Tensor, gradient: torch.Tensor | None, eigen_smooth: bool = False
) -> dict[str, torch.Tensor]:
    """Each CAM method's (1, h, w) map of one word from the layer's (1, C, h, w) ``activation`` and
    the gradient of the word's score there (one gradient for all of them)."""
    return {
        method.name: cam_map(method.compute(activation, gradient if method.needs_gradient else None), eigen_smooth)
        for method in methods
    }


def word_scores(captioning: "Captioning", steps: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Images (N, 3, H, W) → (N, T) each word's log-probability of the caption ``steps`` given the
    image and the words before it (teacher forcing): what Captum attributes, ``target`` a word."""

    def scores(images: torch.Tensor) -> torch.Tensor:
        words = torch.tensor([list(steps)], dtype=torch.long, device=images.device).expand(len(images), -1)
        return captioning.score(images, words).gather(2, words[..., None])[..., 0]

    return scores


def input_word_maps(
    methods: Sequence[Method],
    forward: Callable[[torch.Tensor], torch.Tensor],
    batch: torch.Tensor,
    position: int,
    black: torch.Tensor,
    options: MethodOptions,
) -> dict[str, torch.Tensor]:
    """Each input method's (1, H, W) attribution of word ``position``'s score (``forward``:
    :func:`word_scores`) to the pixels of ``batch`` (1, 3, H, W), computed by Captum."""
    baseline = baseline_images(batch, options.baseline, black)
    maps = {}
    with torch.enable_grad():
        for method in methods:
            maps[method.name] = method.compute(forward, batch, [position], **input_settings(options, baseline)).detach()
    return maps


def cam_layer_map(
    loaded: "LoadedModel",
    captioning: "Captioning",
    layer: str,
    output: torch.Tensor,
    tokens: torch.Tensor,
    batch: torch.Tensor,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """How ``layer``'s ``output`` (and its gradient) becomes a (B, C, h, w) map: the feature layer's
    and a token map of as many tokens as its (``tokens``) by the captioner's own grid; any other as a
    classifier's layer is read (the plugin's layout, torch's own layers, the input's shape)."""
    from .caption_passes import feature_map

    same_tokens = output.dim() == 3 and tokens.dim() == 3 and tuple(output.shape[:2]) == tuple(tokens.shape[:2])
    if layer == captioning.feature_layer or (same_tokens and captioning.feature_grid is not None):
        return lambda tensor: feature_map(captioning, tensor)
    return layer_map(loaded, layer, output, (int(batch.shape[-2]), int(batch.shape[-1])), batch)


__all__ = [
    "DEFAULT_CAPTION_METHODS",
    "INPUT_METHODS",
    "WORD_METHOD_OPTIONS",
    "unread_options",
    "applies_to_words",
    "cam_layer_map",
    "cam_word_maps",
    "caption_methods",
    "input_word_maps",
    "word_cam_methods",
    "word_scores",
]
