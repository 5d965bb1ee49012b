"""The options several commands share, each group a decorator that turns what it parses into the
object the Python API takes: :func:`model_options` the MODEL argument and its loading options into
one :class:`attnexplain.model_spec.ModelSpec`, :func:`method_options` the methods' settings into one
:class:`attnexplain.options.MethodOptions`. A command then receives ``model_spec`` and ``options``
rather than twenty loose values to rebuild by hand.

Values are checked at parse time where the Python API can check them without torch, so that a bad
value is a usage error (exit 2) before anything loads.
"""

from __future__ import annotations

import functools
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

import click

from ..formats import COLORMAP_NAMES, DEFAULT_COLORMAP
from ..model_spec import ModelSpec
from ..options import PRECISIONS, MethodOptions
from ..prompts import PromptError, read_prompts
from ..scoring import SCORE_KINDS


def _numbers(kind: type, count: tuple[int, ...], check: Callable[[list], Any] | None = None):
    """Parse "N" or "A,B,C" (also "HxW"); ``check`` (the Python API's own validation) refuses values
    at parse time, so that a bad value is a usage error (exit 2)."""

    def convert(ctx: click.Context, param: click.Parameter, value: str | None):
        if value is None:
            return None
        try:
            numbers = [kind(part) for part in value.replace("x", ",").split(",") if part.strip()]
        except ValueError:
            raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None
        if len(numbers) not in count:
            raise click.BadParameter(f"expected {' or '.join(map(str, count))} numbers, got {value!r}")
        if check is not None:
            from ..errors import AttnExplainError

            try:
                check(numbers)
            except AttnExplainError as error:
                raise click.BadParameter(str(error)) from None
        return numbers

    return convert


def _checked_size(values: list[int]) -> None:
    from ..preprocess import normalize_size

    normalize_size(values)


def _checked_std(values: list[float]) -> None:
    from ..preprocess import Preprocessing

    Preprocessing().with_overrides(std=values)


def size_option(help_text: str):
    """--size, the model's input size (N or H,W), checked as the Python API checks it."""
    return click.option("--size", callback=_numbers(int, (1, 2), _checked_size), help=help_text)


def json_option(what: str):
    """--json, which prints ``what`` on stdout instead of the terminal's tables."""
    return click.option("--json", "as_json", is_flag=True, help=f"Print {what} on stdout.")


def _with_options(function, options: dict[str, Callable], leave_out: tuple[str, ...]):
    for name, option in reversed(options.items()):
        if name not in leave_out:
            function = option(function)
    return function


def model_options(function):
    """Options that say how to load the model, shared by every command that takes MODEL; the
    command receives them, with MODEL, as one ``model_spec``
    (:class:`attnexplain.model_spec.ModelSpec`)."""

    @functools.wraps(function)
    def with_model_spec(*args: Any, **kwargs: Any) -> Any:
        # Every field of a ModelSpec: the MODEL argument (which the command declares, in its place
        # among the arguments) and the options below; --prompt is a set of one prompt.
        prompt = kwargs.pop("prompt")
        if prompt is not None and kwargs["prompts"] is not None:
            raise click.UsageError("Give --prompt (one prompt) or --prompts (several), not both.")
        kwargs["prompts"] = prompt if prompt is not None else kwargs["prompts"]
        spec = ModelSpec(**{field.name: kwargs.pop(field.name) for field in fields(ModelSpec)})
        return function(*args, model_spec=spec, **kwargs)

    options = dict(
        arch=click.option(
            "--arch",
            help="Architecture of a state_dict file: a torchvision builder name "
            "(resnet50, vit_b_16, ...), any name a plugin provides (one "
            "plugin's: timm:convnext_tiny), or your own class: "
            "path/to/model.py:MyNet or package.module:MyNet (imported).",
        ),
        arch_kwargs=click.option(
            "--arch-kwargs",
            metavar="JSON",
            help="Keyword arguments for the architecture, as a JSON object: '{\"num_classes\": 7}'.",
        ),
        ema=click.option(
            "--ema", is_flag=True, help="Use a training checkpoint's EMA weights (timm train.py's state_dict_ema)."
        ),
        num_classes=click.option(
            "--num-classes",
            type=click.IntRange(min=1),
            help="Number of classes (default: read from the weights' head).",
        ),
        labels=click.option(
            "--labels", type=click.Path(dir_okay=False, path_type=Path), help="Text file with one class name per line."
        ),
        trust_model=click.option(
            "--trust-model",
            is_flag=True,
            help="Allow model files that hold code: a whole pickled model object, "
            "TorchScript, torch.export (.pt2) programs. Loading them runs code from the "
            "file: use only for files you trust.",
        ),
        plugin=click.option("--plugin", help="Use this plugin instead of the most specific one."),
        resize=click.option(
            "--resize",
            type=click.Choice(["crop", "squash"]),
            help="How a photo becomes the model's input. crop: the shorter side resized to 256 × size/224 and "
            "the centre cropped (torchvision's ImageNet evaluation transform; the default when the model says "
            "nothing); squash: the whole photo stretched to the input size, for models trained that way.",
        ),
        device=click.option(
            "--device",
            default="auto",
            show_default=True,
            type=click.Choice(["auto", "cpu", "cuda", "mps"]),
            help="Where to run the model.",
        ),
        prompt=click.option(
            "--prompt",
            metavar="TEXT",
            callback=_checked_prompts,
            help="For a model that compares an image with text (CLIP, SigLIP): explain the image's "
            "similarity to this text.",
        ),
        prompts=click.option(
            "--prompts",
            metavar="TEXTS",
            callback=_checked_prompts,
            help="Texts the model compares the image with, as the classes of a zero-shot classifier: "
            "comma-separated ('a cat,a dog,grass') or @FILE of one per line.",
        ),
        scores=click.option(
            "--scores",
            default="auto",
            show_default=True,
            type=click.Choice(SCORE_KINDS),
            help="How class scores become probabilities: softmax (one class per image), sigmoid "
            '(multi-label: each class its own; also a checkpoint\'s "multilabel": true), auto (the '
            "model's plugin's; a single output shows its value).",
        ),
    )
    return _with_options(with_model_spec, options, leave_out=())


def _checked_prompts(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    try:
        return read_prompts(prompt=value) if param.name == "prompt" else read_prompts(prompts=value)
    except PromptError as error:
        raise click.BadParameter(str(error)) from None


def pointing_tolerance_check(ctx: click.Context, param: click.Parameter, value: float) -> float:
    """The API's own check at parse time: a bad tolerance (negative, NaN, inf) is a usage error."""
    from ..errors import AttnExplainError
    from ..metrics import MetricSettings

    try:
        MetricSettings(pointing_tolerance=value)
    except AttnExplainError as error:
        raise click.BadParameter(str(error)) from None
    return value


def background_option(function):
    """``evaluate --background-label``: labels measured against the background (a texture prompt)."""
    return click.option(
        "--background-label",
        "background",
        callback=_checked_prompts,
        help="Labels (prompts) measured against the background: every pixel outside the image's object "
        "mask(s) or boxes, where MASKS/<image>/<label>.png is absent (a texture: 'grass'); "
        "comma-separated as --prompts. Give it the images whose background the label names.",
    )(function)


#: The options of method_options the command receives by name; the others become its ``options``.
_EXPLAIN_ARGUMENTS = ("method", "target", "versus", "layer")


def method_options(function, leave_out: tuple[str, ...] = ()):
    """Options of the explanation methods, shared by every command that explains (less ``leave_out``:
    a command that gives one of them another meaning). The command receives ``method``, ``target``,
    ``versus`` and ``layer`` by name and the methods' settings as one ``options``
    (:class:`attnexplain.options.MethodOptions`; a setting left out keeps its default there)."""

    @functools.wraps(function)
    def with_method_options(*args: Any, **kwargs: Any) -> Any:
        settings = {name: kwargs.pop(name) for name in options if name not in _EXPLAIN_ARGUMENTS + leave_out}
        if "window" in settings:
            settings["stride"] = max(1, settings["window"] // 2)  # occlusion's windows overlap by half
        return function(*args, options=MethodOptions(**settings), **kwargs)

    options = dict(
        method=click.option(
            "--method",
            default="auto",
            show_default=True,
            help="One or more methods, comma-separated (e.g. gradcam,layercam,scorecam); "
            "`attnexplain methods` lists them. auto: rollout for ViTs, gradcam otherwise.",
        ),
        target=click.option(
            "--target",
            help="Class to explain: index or label (default: the top prediction); several comma-separated, a "
            "name that holds a comma quoted as in CSV ('\"a, b\",c'); on a detector, box:N "
            "explains the N-th detected box by score (box:0 the best); for a captioner, one word of the caption; "
            "negative: what lowers a single-output model's value.",
        ),
        versus=click.option(
            "--versus",
            metavar="CLASS",
            help="Contrast: explain score(target) − score(this class), index or label (what makes "
            "it the target rather than this class).",
        ),
        layer=click.option(
            "--layer",
            help="Layer(s) for the CAM family, comma-separated (several are fused; "
            "default: last layer with a spatial map; see `attnexplain layers`).",
        ),
        head_fusion=click.option(
            "--head-fusion",
            default="mean",
            show_default=True,
            type=click.Choice(["mean", "max", "min"]),
            help="rollout: how heads are combined.",
        ),
        discard_ratio=click.option(
            "--discard-ratio",
            default=0.0,
            show_default=True,
            type=click.FloatRange(0, 1, max_open=True),
            help="rollout: share of the weakest attention weights dropped.",
        ),
        eigen_smooth=click.option(
            "--eigen-smooth", is_flag=True, help="CAM family: first principal component of the weighted activations."
        ),
        aug_smooth=click.option(
            "--aug-smooth", is_flag=True, help="Average every map over mirrored and zoomed copies of the image."
        ),
        steps=click.option(
            "--steps",
            default=32,
            show_default=True,
            type=click.IntRange(min=1),
            help="integrated_gradients: interpolation steps.",
        ),
        samples=click.option(
            "--samples",
            type=click.IntRange(min=1),
            help="smoothgrad, smoothgradcampp, gradientshap: noisy copies (default 16); sscam, "
            "iscam: masks per channel (35, 10); rise: random masks (1000); kernelshap, "
            "lime: perturbed samples (256).",
        ),
        window=click.option(
            "--window",
            default=16,
            show_default=True,
            type=click.IntRange(min=1),
            help="occlusion: window side in model-input pixels (stride: half of it).",
        ),
        baseline=click.option(
            "--baseline",
            default="mean",
            show_default=True,
            type=click.Choice(["mean", "black", "blur"]),
            help="integrated_gradients, occlusion: the reference image. mean: the "
            "normalisation's mean colour (0 after normalisation); black: pixel value "
            "0; blur: a Gaussian-blurred copy of the image (sigma 1/16 of its side).",
        ),
        batch_size=click.option(
            "--batch-size",
            default=32,
            show_default=True,
            type=click.IntRange(min=1),
            help="Masked or perturbed images per forward pass (scorecam, sscam, iscam, ablationcam, "
            "occlusion, IG, rise, feature_ablation, kernelshap, lime).",
        ),
        finer_classes=click.option(
            "--finer-classes",
            default=3,
            show_default=True,
            type=click.IntRange(min=1),
            help="finercam: how many of the most similar classes the target is compared with.",
        ),
        precision=click.option(
            "--precision",
            default="auto",
            show_default=True,
            type=click.Choice(PRECISIONS),
            help="The model's forward under autocast: bf16 (CPU, GPU) or fp16 (CUDA GPU); maps stay "
            "float32. auto: fp32 on the CPU, bf16 on a GPU that supports it, else fp16.",
        ),
    )
    return _with_options(with_method_options, options, leave_out)


def image_options(function, leave_out: tuple[str, ...] = ()):
    """How images are read, preprocessed and reported, shared by `run` and `batch`."""
    options = dict(
        size=size_option("Model input size: N or H,W."),
        mean=click.option("--mean", callback=_numbers(float, (1, 3)), help="Normalization mean: R,G,B."),
        std=click.option(
            "--std", callback=_numbers(float, (1, 3), _checked_std), help="Normalization std: R,G,B (positive)."
        ),
        alpha=click.option(
            "--alpha",
            default=0.5,
            show_default=True,
            type=click.FloatRange(0.0, 1.0),
            help="Opacity of the heatmap in the overlays.",
        ),
        colormap=click.option(
            "--colormap",
            default=DEFAULT_COLORMAP,
            show_default=True,
            type=click.Choice(COLORMAP_NAMES),
            help="Colormap of the written overlays (the HTML pages let you switch).",
        ),
        top_k=click.option(
            "--top-k",
            default=5,
            show_default=True,
            type=click.IntRange(min=1),
            help="How many predictions to report per image.",
        ),
        threshold=click.option(
            "--threshold",
            default=0.5,
            show_default=True,
            type=click.FloatRange(0.0, 1.0),
            help="Multi-label models (--scores sigmoid): every class at or above this probability is "
            "reported as present, and shown among the predictions.",
        ),
        max_pixels=click.option(
            "--max-pixels",
            default=100_000_000,
            show_default=True,
            type=click.IntRange(min=1),
            help="Refuse larger images (decompression-bomb guard).",
        ),
    )
    return _with_options(function, options, leave_out)


def overlay_format_option(default: str):
    """--overlay-format, whose default differs: exact PNG for one image, JPEG for many."""
    from ..formats import OVERLAY_FORMATS

    return click.option(
        "--overlay-format",
        default=default,
        show_default=True,
        type=click.Choice(OVERLAY_FORMATS),
        help="File format of the overlays (the raw maps are always .npy).",
    )


def overlay_size_option(default: str):
    """--overlay-size, whose default differs: the photo's own size for one image, capped for many."""

    def parsed(ctx: click.Context, param: click.Parameter, value: str) -> int | None:
        if value.strip().lower() == "full":
            return None
        try:
            side = int(value)
        except ValueError:
            side = 0
        if side < 16:
            raise click.BadParameter(f"give a number of pixels of at least 16, or full (not {value[:40]!r}).")
        return side

    return click.option(
        "--overlay-size",
        default=default,
        show_default=True,
        callback=parsed,
        help="Longest side of the overlays in pixels, or full (the photo's own size). "
        "JPEGs are decoded at the smallest scale that covers it and the model's "
        "input.",
    )
