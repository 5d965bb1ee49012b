"""explain(): one image, one model, one or more methods → an :class:`Explanation`."""

from __future__ import annotations

import dataclasses
import re
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .capture import (attention_gradients, capture_activations, frozen_parameters,
                      probe_layers, replaced_forward, replaced_output)
from .errors import AttnExplainError, MethodError, ModelRunError, NothingToExplain
from .images import LoadedImage, image_from
from .loading import LoadedModel, load_model
from .methods import METHODS, Method
from .methods.attribution import NOISE_SEED, NOISY_COPIES, baseline_images, noisy_copies
from .formats import DEFAULT_COLORMAP
from .methods.attention import attention_received, raw_attention, rollout_by_depth
from .plugins import Detections, TokenReadout, WindowedAttention
from .methods.cam import cam_map, finer_scores, hessian_products
from .options import MethodOptions
from .preprocess import DEFAULT_SIZE, Preprocessing, prepare


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str | None
    prob: float

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "label": self.label, "prob": self.prob}


@dataclass
class MethodMap:
    """One method's result."""

    method: str
    heatmap: np.ndarray  # (h, w) float32 at the model's input resolution
    layers: list[str] = field(default_factory=list)
    #: Raw attention only: (layers, heads, grid h, grid w) class-token attention.
    attention_grid: np.ndarray | None = None
    #: Gates only: per block, its name, mean gate and most-gated channels; and the last block's
    #: most-gated channels' activation maps (k, h, w).
    gates: list[dict[str, Any]] | None = None
    gate_maps: np.ndarray | None = None
    #: Rollout over global attention only: (layers, grid h, grid w), the rollout through the first
    #: 1, 2, … layers (the last is the map before upsampling).
    depth_maps: np.ndarray | None = None


@dataclass
class Explanation:
    """Where the model looked, for one image: the maps, the predictions and how they were made."""

    image: LoadedImage
    model: LoadedModel
    maps: dict[str, MethodMap]
    target: Prediction
    predictions: list[Prediction]
    box: tuple[float, float, float, float]  # region of the photo the model saw
    preprocessing: Preprocessing
    options: MethodOptions = field(default_factory=MethodOptions)
    timings: dict[str, float] = field(default_factory=dict)
    #: A detector's boxes in photo pixels, best first; the explained one is marked (see
    #: :func:`boxes_on_photo`). None for models that do not detect.
    detections: list[dict[str, Any]] | None = None
    #: ``run --metrics``: per method, per metric, its value (see :mod:`attnexplain.metrics`).
    metrics: dict[str, dict[str, float]] | None = None

    @property
    def method(self) -> str:
        """The first method requested."""
        return next(iter(self.maps))

    @property
    def heatmap(self) -> np.ndarray:
        """The first method's map: (h, w) float32 at the model's input resolution, raw values."""
        return self.maps[self.method].heatmap

    @property
    def layer(self) -> str | None:
        """The first method's layer (comma-joined when several were fused), None for non-layer methods."""
        layers = self.maps[self.method].layers
        return ",".join(layers) if layers else None

    def overlay(self, alpha: float = 0.5, method: str | None = None, colormap: str = DEFAULT_COLORMAP) -> np.ndarray:
        """A method's map blended over the photo, at the photo's resolution (H, W, 3) uint8, in one
        of :data:`attnexplain.render.COLORMAPS`."""
        from .render import render_explained_overlay

        return render_explained_overlay(self.image.pixels, self.maps[method or self.method].heatmap,
                                        self.box, alpha, self.detections, colormap)

    def to_dict(self) -> dict[str, Any]:
        """The report's fields (without output paths: :meth:`save` adds them)."""
        from .report import method_summary, versions

        return {
            "image": {"path": str(self.image.path.resolve()) if self.image.path else None,
                      **self.image.describe()},
            "model": self.model.describe(),
            "method": self.method,
            "methods": list(self.maps),
            "layer": self.layer,
            "target": {"index": self.target.index, "label": self.target.label},
            "predictions": [p.as_dict() for p in self.predictions],
            "preprocessing": self.preprocessing.as_dict(),
            "options": self.options.as_dict(),
            "maps": {name: {**method_summary(result),
                            "height": int(result.heatmap.shape[0]), "width": int(result.heatmap.shape[1]),
                            "min": float(result.heatmap.min()), "max": float(result.heatmap.max())}
                     for name, result in self.maps.items()},
            **({"detections": self.detections} if self.detections is not None else {}),
            **({"metrics": self.metrics} if self.metrics is not None else {}),
            "timings": {key: round(value, 6) for key, value in self.timings.items()},
            "versions": versions(),
        }

    def save(self, directory: str | Path, alpha: float = 0.5, overlay_format: str = "png",
             colormap: str = DEFAULT_COLORMAP) -> dict[str, Any]:
        """Write overlays, heatmaps, report.json and report.html into ``directory``, all or nothing.
        ``colormap`` colours the written pictures (the page lets the reader switch).

        Returns the report (as written to report.json).
        """
        from .report import save_explanation

        return save_explanation(self, Path(directory), alpha, overlay_format, colormap)


def explain(model: LoadedModel | torch.nn.Module | str | Path,
            image: Any, method: str | Sequence[str] = "auto", *,
            target: int | str | None = None, layer: str | Sequence[str] | None = None, top_k: int = 5,
            size: Sequence[int] | int | None = None, mean: Sequence[float] | None = None,
            std: Sequence[float] | None = None, options: MethodOptions | None = None,
            device: str | None = None, labels: str | Path | Sequence[str] | None = None) -> Explanation:
    """Explain ``model``'s prediction on ``image`` with one or more methods.

    ``model`` may be a :class:`LoadedModel`, a plain ``nn.Module`` or anything :func:`load_model`
    accepts. ``image`` may be a :class:`LoadedImage`, a path, a PIL image, a numpy array ((H, W, 3)
    or (H, W): uint8, or floats in [0, 1]) or a torch tensor ((3, H, W) or (1, 3, H, W) in [0, 1], or
    uint8). ``method`` is a name, a
    comma-separated list or a sequence of names (see :data:`attnexplain.METHODS`); ``"auto"`` picks
    attention rollout for models whose plugin knows their attention, Grad-CAM otherwise (saliency where
    inner layers are out of reach). Methods of the same family share their forward and backward pass.
    ``layer`` names the CAM layer(s); several are fused. ``target`` is a class index or label
    (default: the top-1 prediction). ``labels`` (a list of class names or a file of one per line)
    win over those the model carries. ``device`` (cpu, cuda, mps, auto) moves the model there;
    None runs it where it is.
    """
    options = options or MethodOptions()
    timings: dict[str, float] = {}
    started = time.perf_counter()
    picture = image_from(image)
    loaded = _as_loaded_model(model, labels=labels, device=device)
    module = loaded.module
    run_device = _model_device(module)

    plan = plan_explanation(loaded, method, layer, size=size, mean=mean, std=std)
    timings["plan_s"] = time.perf_counter() - started  # methods, layers (the default layer's probe)
    started = time.perf_counter()
    preprocessing = plan.preprocessing
    prepared = prepare(picture.pixels, preprocessing)
    batch = prepared.tensor.to(run_device)
    timings["preprocess_s"] = time.perf_counter() - started

    started = time.perf_counter()
    computed = compute_maps(loaded, batch, plan.methods, plan.layers, target=target, options=options,
                            preprocessing=preprocessing)
    if run_device.type == "cuda":
        torch.cuda.synchronize(run_device)
    timings["explain_s"] = time.perf_counter() - started

    probabilities, target_index = computed.probabilities[0], int(computed.targets[0])
    maps = computed.image_maps()[0]
    chosen_target, predictions = image_outcome(probabilities, target_index, loaded.labels, top_k,
                                               target_given=target is not None)
    detections = None
    if computed.detections is not None:
        detections = boxes_on_photo(computed.detections[0], target_index, loaded.labels,
                                    tuple(batch.shape[-2:]), prepared.box, picture.size)
    return Explanation(image=picture, model=loaded, maps=maps, target=chosen_target,
                       predictions=predictions, box=prepared.box, preprocessing=preprocessing,
                       options=options, timings=timings, detections=detections)


@dataclass(frozen=True)
class Plan:
    """What an explanation will do, decided once before any image is seen."""

    preprocessing: Preprocessing
    methods: list[Method]
    layers: list[str]  # CAM layers (empty when no method needs one)


def plan_explanation(loaded: LoadedModel, method: str | Sequence[str] = "auto",
                     layer: str | Sequence[str] | None = None, *,
                     size: Sequence[int] | int | None = None, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None) -> Plan:
    """Preprocessing, methods and layers for ``loaded``: what :func:`explain` and the batch command
    share. The default layer is found from the input's shape alone."""
    preprocessing = plan_preprocessing(loaded, size=size, mean=mean, std=std)
    methods = resolve_methods(loaded, method)
    layers = _layer_names(layer)
    needs_layer = any(m.family == "cam" or m.name == "guided_gradcam" for m in methods)
    if layers and not needs_layer:
        raise MethodError(f"--layer does not apply to {', '.join(m.name for m in methods)}.")
    if needs_layer and not layers:
        probe = torch.zeros(1, 3, *preprocessing.size, device=_model_device(loaded.module))
        layers = [default_layer(loaded, probe)]
    return Plan(preprocessing, methods, layers)


def plan_preprocessing(loaded: LoadedModel, *, size: Sequence[int] | int | None = None,
                       mean: Sequence[float] | None = None,
                       std: Sequence[float] | None = None) -> Preprocessing:
    """The model's preprocessing (its file's, its plugin's, or the default) with the user's overrides."""
    return (loaded.preprocessing or Preprocessing(size=DEFAULT_SIZE)).with_overrides(
        size=size, mean=mean, std=std)


def image_outcome(probabilities: torch.Tensor, target_index: int, labels: list[str] | None,
                  top_k: int, target_given: bool) -> tuple[Prediction, list[Prediction]]:
    """One image's explained target and top-k predictions from its (classes,) probabilities.

    A target the user asked for that has probability 0 (a segmentation class with no pixels, a
    class no box was detected as) is refused: its map would be empty; so is an image in which no
    class scores above 0 (a detector that found nothing).
    """
    unusable = unusable_scores(probabilities)
    if unusable is not None:
        raise NonFiniteScores(unusable)
    if not bool((probabilities > 0).any()):
        raise NothingToExplain()
    probability = float(probabilities[target_index])
    if target_given and probability == 0.0:
        name = _label(labels, target_index) or target_index
        raise MethodError(f"Class {name} is not in this image (its probability is 0), so there is "
                          f"nothing to explain for it.")
    return (Prediction(target_index, _label(labels, target_index), probability),
            top_predictions(probabilities, labels, top_k))


def boxes_on_photo(detected: Detections, target_index: int, labels: list[str] | None,
                   input_size: tuple[int, int], box: tuple[float, float, float, float],
                   photo_size: tuple[int, int]) -> list[dict[str, Any]]:
    """A detector's boxes in the photo's pixels, best first, for drawing and for the report.

    ``box`` is the region of the photo the model's input covers (beyond the photo where it was
    letterboxed: boxes are clipped to the photo's ``photo_size``, (width, height)). The box explained for
    ``target_index`` is that class's highest-scoring one (how a detector's plugin scores a class)
    and is marked ``explained``.
    """
    left, top, right, bottom = box
    scale_x, scale_y = (right - left) / input_size[1], (bottom - top) / input_size[0]
    order = torch.argsort(detected.scores, descending=True, stable=True).tolist()
    of_target = [i for i in order if int(detected.labels[i]) == target_index]
    explained = of_target[0] if of_target else None
    boxes = []
    for i in order:
        x0, y0, x1, y1 = (float(v) for v in detected.boxes[i])
        label_index = int(detected.labels[i])
        xs = [round(min(max(left + x * scale_x, 0.0), photo_size[0]), 2) for x in (x0, x1)]
        ys = [round(min(max(top + y * scale_y, 0.0), photo_size[1]), 2) for y in (y0, y1)]
        boxes.append({"box": [xs[0], ys[0], xs[1], ys[1]],
                      "index": label_index, "label": _label(labels, label_index),
                      "score": float(detected.scores[i]), "explained": i == explained})
    return boxes


def _gate_summary(recorded: "ChannelGates", image_index: int, shown: int = 5) -> list[dict[str, Any]]:
    from .methods.gates import most_gated

    summary = []
    for block, values in zip(recorded.blocks, recorded.values):
        top_values, top_channels = most_gated(values[image_index:image_index + 1], shown)
        summary.append({"block": block, "channels": int(values.shape[1]),
                        "mean": float(values[image_index].mean()),
                        "top": [{"channel": int(c), "gate": float(v)}
                                for c, v in zip(top_channels[0], top_values[0])]})
    return summary


# --- choosing ----------------------------------------------------------------------------------

def resolve_methods(loaded: LoadedModel, requested: str | Sequence[str]) -> list[Method]:
    """The methods called ``requested`` (``auto`` chooses), checked against what the model allows."""
    names = _split_names(requested)
    if not names:
        raise MethodError("No method was given.")
    has_attention = loaded.inner_layers and bool(loaded.plugin.attention_modules(loaded.module))
    if "auto" in names:
        automatic = loaded.plugin.default_method(loaded.module) if loaded.inner_layers else None
        if not automatic:
            automatic = "rollout" if has_attention else ("gradcam" if loaded.inner_layers else "saliency")
        position = names.index("auto")
        names[position:position + 1] = _split_names(automatic)
    chosen: list[Method] = []
    for name in names:
        if name not in METHODS:
            raise MethodError(f"Unknown method {name!r}; `attnexplain methods` lists them "
                              f"(auto, {', '.join(METHODS)}).")
        method = METHODS[name]
        needs_layers = (method.family != "input" or method.name in ("guided_gradcam", "fullgrad")
                        or method.needs_modules)
        if needs_layers and not loaded.inner_layers:
            raise MethodError(f"{name} needs the model's inner layers, which a {loaded.loader} model "
                              f"does not expose; use --method saliency, or load the weights as a "
                              f"state_dict with --arch.")
        if method.family == "gates" and not loaded.plugin.gate_modules(loaded.module):
            raise MethodError(f"{name} needs squeeze-and-excitation blocks; plugin "
                              f"{loaded.plugin.name} knows none in this {type(loaded.module).__name__}.")
        if method.family == "attention" and not has_attention:
            raise MethodError(f"{name} needs attention layers; plugin {loaded.plugin.name} knows none "
                              f"in this {type(loaded.module).__name__}. Use --method gradcam.")
        if method.name == "legrad":
            _token_readout(loaded)
        if method not in chosen:
            chosen.append(method)
    return chosen


def _split_names(requested: str | Sequence[str]) -> list[str]:
    parts = requested.split(",") if isinstance(requested, str) else [str(part) for part in requested]
    return [part.strip() for part in parts if part.strip()]


def default_layer(loaded: LoadedModel, batch: torch.Tensor) -> str:
    """The plugin's choice, else the last layer to produce a spatial (B, C, H, W) map."""
    chosen = loaded.plugin.default_layer(loaded.module)
    if chosen:
        return chosen
    # The probe depends only on the model and the input's shape: remember it for later calls.
    known = _probed_layers.setdefault(loaded.module, {})
    shape = tuple(batch.shape[1:])
    if shape not in known:
        with model_failures(loaded.module):
            spatial = [info for info in probe_layers(loaded.module, batch) if info.is_spatial]
        known[shape] = spatial[-1].name if spatial else None
    if known[shape] is None:
        raise MethodError("No layer of this model outputs a spatial (batch, channels, height, width) "
                          "map, so the CAM methods have nothing to weight; try --method saliency.")
    return known[shape]


def layer_maps(loaded: LoadedModel, batch: torch.Tensor) -> list[tuple[Any, tuple[int, ...] | None]]:
    """Every layer (see :func:`attnexplain.capture.probe_layers`) with the shape of the (B, C, H, W)
    map the CAM methods would weight, None where its output is none (after the plugin's
    :meth:`~attnexplain.plugins.ModelPlugin.layer_map`, shapes only: nothing is computed)."""
    size = tuple(batch.shape[-2:])
    found = []
    with model_failures(loaded.module):
        probed = probe_layers(loaded.module, batch)
    for info in probed:
        shape = None
        if info.shape is not None:
            laid_out = loaded.plugin.layer_map(loaded.module, info.name,
                                               torch.empty(info.shape, device="meta"), size)
            if laid_out is not None:
                shape = tuple(laid_out.shape)
            elif info.is_spatial:
                shape = info.shape
        found.append((info, shape))
    return found


_probed_layers: "weakref.WeakKeyDictionary[Any, dict[tuple[int, ...], str | None]]" = \
    weakref.WeakKeyDictionary()


def _layer_names(layer: str | Sequence[str] | None) -> list[str]:
    return [] if layer is None else _split_names(layer)


# --- computing ---------------------------------------------------------------------------------

@dataclass
class BatchMaps:
    """Every requested map for a batch of preprocessed images, at the input's resolution."""

    probabilities: torch.Tensor  # (B, classes), as the plugin defines them (softmax for classifiers)
    targets: torch.Tensor  # (B,) the class each map explains
    maps: dict[str, torch.Tensor]  # method → (B, H, W) float32
    layers: dict[str, list[str]]  # method → the layers it used (empty for non-layer methods)
    attention_grids: dict[str, torch.Tensor] = field(default_factory=dict)  # (B, layers, heads, h, w)
    channel_gates: dict[str, "ChannelGates"] = field(default_factory=dict)
    depth_maps: dict[str, torch.Tensor] = field(default_factory=dict)  # (B, layers, h, w), rollout
    detections: list[Detections] | None = None  # a detector's boxes per image, model-input pixels

    def image_maps(self) -> list[dict[str, MethodMap]]:
        """Per image, method → its :class:`MethodMap` (NumPy; attention grid and gates included)."""

        def numpy(tensor: torch.Tensor) -> np.ndarray:
            return tensor.detach().float().cpu().numpy()

        heatmaps = {name: numpy(heatmap) for name, heatmap in self.maps.items()}
        grids = {name: numpy(grid) for name, grid in self.attention_grids.items()}
        gate_maps = {name: numpy(recorded.top_maps) for name, recorded in self.channel_gates.items()}
        depth_maps = {name: numpy(maps) for name, maps in self.depth_maps.items()}
        images = []
        for index in range(len(self.targets)):
            image = {name: MethodMap(name, np.array(values[index]), self.layers[name],
                                     np.array(grids[name][index]) if name in grids else None)
                     for name, values in heatmaps.items()}
            for name, recorded in self.channel_gates.items():
                image[name].gates = _gate_summary(recorded, image_index=index)
                image[name].gate_maps = np.array(gate_maps[name][index])
            for name, maps in depth_maps.items():
                image[name].depth_maps = np.array(maps[index])
            images.append(image)
        return images


#: A pass's view of the model's output: (B, classes) differentiable scores and (B,) targets.
Scorer = Callable[[Any], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class ChannelGates:
    """What the gates method recorded for a batch."""

    blocks: list[str]
    values: list[torch.Tensor]  # per block: (B, C) gates in [0, 1]
    top_channels: torch.Tensor  # (B, k) the last block's most-gated channels
    top_maps: torch.Tensor  # (B, k, h, w) their activation maps


def compute_maps(loaded: LoadedModel, batch: torch.Tensor, methods: list[Method], layers: list[str],
                 *, target: int | str | None = None, options: MethodOptions | None = None,
                 targets: torch.Tensor | None = None,
                 preprocessing: Preprocessing | None = None) -> BatchMaps:
    """Compute ``methods`` on a preprocessed ``batch`` (B, 3, H, W): each family's pass runs once.

    ``target`` (an index or label) is explained for every image; by default each image's top-1
    class. ``targets`` fixes the classes outright. ``layers`` are the CAM layers (see
    :func:`default_layer`). ``preprocessing`` is how ``batch`` was normalised (default: the
    model's), which says what a black pixel is for ``--baseline black``. This is the batch-level
    core that :func:`explain` wraps. Every image's maps are the same as if it were alone.
    """
    options = options or MethodOptions()
    normalised = preprocessing or loaded.preprocessing or Preprocessing(size=DEFAULT_SIZE)
    black = -torch.tensor(normalised.mean) / torch.tensor(normalised.std)  # pixel 0, normalised
    with model_failures(loaded.module):
        computed = _compute_once(loaded, batch, methods, layers, target, options, targets, black)
        if options.aug_smooth:
            computed = _augmentation_smoothing(loaded, batch, methods, layers, options, computed, black)
    return computed


class NonFiniteScores(NothingToExplain):
    """The model's scores for an image are NaN or infinite: an outcome of that image (a batch
    records it and goes on), though usually of the weights."""


def unusable_scores(scores: torch.Tensor) -> str | None:
    """Why a model's scores cannot be explained (NaN or infinite values), or None."""
    values = scores.detach()
    if values.is_floating_point() and not bool(torch.isfinite(values).all()):
        what = "NaN (not a number)" if bool(torch.isnan(values).any()) else "infinite values"
        return (f"The model's scores hold {what}, so there is nothing to explain; its weights are "
                f"probably broken (a training run that diverged saves NaN), or --mean/--std do not "
                f"fit it.")
    return None


@contextmanager
def model_failures(module: torch.nn.Module) -> Iterator[None]:
    """Turn the model's own failures in the block into :class:`ModelRunError` with the cause: an
    exception raised by its forward (named with the input's shape and what to try), and
    ``SystemExit`` from its forward or backward, which would otherwise end the program silently."""

    def guarded(forward, *args, **kwargs):
        try:
            return forward(*args, **kwargs)
        except AttnExplainError:  # ours, raised by a hook inside the forward: already precise
            raise
        except Exception as error:
            raise ModelRunError(_forward_failure(error, args)) from error

    try:
        with replaced_forward(module, guarded):
            yield
    except SystemExit as exiting:
        raise ModelRunError(f"The model's code called exit() (SystemExit({exiting.code!r})) while it "
                            f"ran; a model must return its scores, not end the program.") from None


#: Known causes of a forward pass that fails, by what PyTorch says, and what to do about each.
_FORWARD_HINTS = (
    (re.compile(r"channels", re.I),
     "attnexplain feeds RGB images (3 channels); this model expects another number of channels"),
    (re.compile(r"too small|can't be greater than actual input size|non-positive|size \d+ is too",
                re.I), "the input size may be too small for the model's downsampling: try a larger --size "
                       "(the size it was trained at)"),
    (re.compile(r"wrong image (height|width)|image size|shapes cannot be multiplied|size mismatch|"
                r"must match the size|to be equal to \d+, but got \d+", re.I),
     "the model expects another input size: set --size to the size it was trained at"),
)


def _forward_failure(error: Exception, args: tuple[Any, ...]) -> str:
    shape = f" of shape {tuple(args[0].shape)}" if args and isinstance(args[0], torch.Tensor) else ""
    text = " ".join(str(error).split()) or "(no message)"
    if len(text) > 300:
        text = text[:300] + "..."
    hint = next((hint for pattern, hint in _FORWARD_HINTS if pattern.search(text)),
                "check that --arch, --size, --mean and --std fit the model (--debug shows the traceback)")
    end = "" if text.endswith((".", "!", "?")) else "."
    return f"The model raised {type(error).__name__} on an input{shape}: {text}{end} Hint: {hint}."


def _compute_once(loaded: LoadedModel, batch: torch.Tensor, methods: list[Method], layers: list[str],
                  target: int | str | None, options: MethodOptions,
                  targets: torch.Tensor | None, black: torch.Tensor) -> BatchMaps:
    module = loaded.module
    size = tuple(batch.shape[-2:])
    state: dict[str, Any] = {}

    def score(output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, classes) differentiable target scores and (B,) targets from the model's raw output.
        The first pass's output is the prediction; its targets hold for every later pass."""
        logits, probabilities = loaded.plugin.class_scores(module, output)
        _check_scores(logits, batch.shape[0])
        if "probabilities" not in state:
            state["probabilities"] = probabilities.detach()
            detected = loaded.plugin.detections(module, output)
            if detected is not None:
                state["detections"] = detected
            unusable = unusable_scores(logits)
            if unusable is not None and not bool(torch.isfinite(probabilities).any()):
                raise NonFiniteScores(unusable)  # every image; else each image says it for itself
            if not bool((state["probabilities"] > 0).any()):
                raise NothingToExplain()
        if "targets" not in state:
            state["targets"] = targets.to(probabilities.device) if targets is not None else \
                resolve_targets(target, state["probabilities"], loaded.labels)
        return logits, state["targets"]

    maps: dict[str, torch.Tensor] = {}
    used_layers: dict[str, list[str]] = {}
    grids: dict[str, torch.Tensor] = {}
    depth_maps: dict[str, torch.Tensor] = {}
    cam_methods = [m for m in methods if m.family == "cam"]
    if cam_methods:
        for name, heatmap in _cam_pass(loaded, batch, cam_methods, layers, score, options).items():
            maps[name], used_layers[name] = heatmap, list(layers)
    attention_methods = [m for m in methods if m.family == "attention"]
    if attention_methods:
        attention_maps, grids, depth_maps = _attention_pass(loaded, batch, attention_methods, score,
                                                            options)
        for name, heatmap in attention_maps.items():
            maps[name], used_layers[name] = heatmap, []
    gate_methods = [m for m in methods if m.family == "gates"]
    channel_gates: dict[str, ChannelGates] = {}
    for method in gate_methods:
        maps[method.name], channel_gates[method.name] = _gates_pass(loaded, batch, method, score)
        used_layers[method.name] = channel_gates[method.name].blocks[-1:]
    input_methods = [m for m in methods if m.family == "input"]
    if input_methods:
        forward = _scores_of(loaded)
        if "targets" not in state:
            with torch.no_grad():
                score(module(batch))
        baseline = baseline_images(batch, options.baseline, black)
        for method in input_methods:
            _check_input_method(method, batch, options)
            cam = None
            if method.name == "guided_gradcam":  # its Grad-CAM half: the CAM pass, same layer layout
                cam = maps.get("gradcam")
                if cam is None:
                    cam = _cam_pass(loaded, batch, [METHODS["gradcam"]], layers, score, options)["gradcam"]
            with torch.enable_grad(), _gradient_needed(method.name):
                attribution = method.compute(
                    forward, batch, state["targets"].tolist(), model=module, cam=cam,
                    baseline=baseline, steps=options.steps, noise=options.noise, window=options.window,
                    stride=options.stride, batch_size=options.batch_size,
                    probabilities=_probabilities_of(loaded),
                    **({} if options.samples is None else {"samples": options.samples}))
            maps[method.name] = _upsample(attribution.detach(), size)
            used_layers[method.name] = list(layers) if method.name == "guided_gradcam" else []
    order = [m.name for m in methods]  # as asked for
    return BatchMaps(probabilities=state["probabilities"], targets=state["targets"],
                     maps={name: maps[name] for name in order},
                     layers={name: used_layers[name] for name in order}, attention_grids=grids,
                     channel_gates=channel_gates, depth_maps=depth_maps,
                     detections=state.get("detections"))


def _cam_pass(loaded: LoadedModel, batch: torch.Tensor, methods: list[Method], layers: list[str],
              score: Scorer, options: MethodOptions) -> dict[str, torch.Tensor]:
    module = loaded.module
    size = tuple(batch.shape[-2:])
    captured: dict[str, torch.Tensor] = {}
    names = {m.name for m in methods}
    needs_gradient = any(m.needs_gradient for m in methods)
    extras: dict[str, list[torch.Tensor]] = {}
    with frozen_parameters(module), capture_activations(module, layers, captured), \
            torch.set_grad_enabled(needs_gradient):
        logits, targets = score(module(batch))
        missing = [name for name in layers if name not in captured]
        if missing:
            raise MethodError(f"Layer {missing[0]!r} did not run during the forward pass.")
        activations = [captured[name] for name in layers]
        as_maps = [_layer_map(loaded, name, activation, size)
                   for name, activation in zip(layers, activations)]
        gradients: list[torch.Tensor | None] = [None] * len(layers)
        if needs_gradient:
            # Images are independent, so the gradient of the sum is each image's own gradient.
            score = logits.gather(1, targets[:, None]).sum()
            if not score.requires_grad:
                raise MethodError(_no_gradient(f"layer {layers[0]!r}", "--method eigencam or scorecam "
                                                                      "(gradient-free), or another --layer"))
            # Shapley-CAM differentiates the gradient again: keep its graph.
            gradients = list(torch.autograd.grad(score, activations, allow_unused=True,
                                                 retain_graph=bool(names & {"finercam", "shapleycam"}),
                                                 create_graph="shapleycam" in names))
            for name, gradient in zip(layers, gradients):
                if gradient is None:
                    raise MethodError(f"The model's output does not depend on layer {name!r}.")
            if "shapleycam" in names:
                extras["shapleycam"] = hessian_products(gradients, activations)
                gradients = [gradient.detach() for gradient in gradients]
            if "finercam" in names:
                finer = finer_scores(logits, targets, options.finer_classes).sum()
                extras["finercam"] = list(torch.autograd.grad(finer, activations))
    if "smoothgradcampp" in names:
        extras["smoothgradcampp"] = _noisy_gradients(loaded, batch, layers, targets, options)
    forward = _scores_of(loaded)
    results = {}
    for method in methods:
        per_layer = []
        for index, (name, activation, gradient, as_map) in enumerate(zip(layers, activations, gradients,
                                                                         as_maps)):
            layer_output = activation.detach()
            activation = as_map(layer_output)
            gradient = None if gradient is None else as_map(gradient)
            if method.name in ("scorecam", "sscam", "iscam"):
                settings = {"sscam": {"noise": options.mask_noise, "seed": NOISE_SEED},
                            "iscam": {}}.get(method.name, {})
                if method.name != "scorecam" and options.samples is not None:  # else its own default
                    settings["samples"] = options.samples
                contributions = method.compute(activation, forward, batch, targets,
                                               batch_size=options.batch_size, **settings)
            elif method.name == "ablationcam":
                clean = logits.detach().gather(1, targets[:, None])[:, 0]
                contributions = method.compute(activation, layer_output, as_map,
                                               _with_layer_output(loaded, name), batch, targets, clean,
                                               options.batch_size)
            elif method.name == "randomcam":
                contributions = method.compute(activation, seed=NOISE_SEED)
            elif method.name in ("shapleycam", "finercam"):
                extra = as_map(extras[method.name][index].detach())
                contributions = method.compute(activation, gradient, extra)
            elif method.name == "smoothgradcampp":
                contributions = method.compute(activation, extras[method.name][index])
            else:
                contributions = method.compute(activation, gradient)
            per_layer.append(_upsample(cam_map(contributions, options.eigen_smooth), size))
        results[method.name] = _fuse_layers(per_layer)
    return results


def _with_layer_output(loaded: LoadedModel, name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The model's (k, classes) scores on ``inputs`` with layer ``name``'s output replaced."""

    def run(inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), replaced_output(loaded.module, name, output):
            return loaded.plugin.class_scores(loaded.module, loaded.module(inputs))[0]

    return run


def _noisy_gradients(loaded: LoadedModel, batch: torch.Tensor, layers: list[str], targets: torch.Tensor,
                     options: MethodOptions) -> list[torch.Tensor]:
    """Per layer, (samples, B, …) gradients of the target score on noisy copies of each image, laid
    out as maps (Smooth Grad-CAM++). The noise is SmoothGrad's: σ a share of each image's range,
    drawn per image from the same seeded generator."""
    module = loaded.module
    size = tuple(batch.shape[-2:])
    samples = NOISY_COPIES if options.samples is None else options.samples
    noisy = noisy_copies(batch, samples, options.noise)  # (samples, B, 3, H, W)
    per_sample: list[list[torch.Tensor]] = [[] for _ in layers]
    for copies in noisy:
        captured: dict[str, torch.Tensor] = {}
        with frozen_parameters(module), capture_activations(module, layers, captured), torch.enable_grad():
            logits = loaded.plugin.class_scores(module, module(copies))[0]
            chosen = logits.gather(1, targets[:, None]).sum()
            outputs = [captured[name] for name in layers]
            gradients = torch.autograd.grad(chosen, outputs)
        for index, (name, output, gradient) in enumerate(zip(layers, outputs, gradients)):
            per_sample[index].append(_layer_map(loaded, name, output, size)(gradient))
    return [torch.stack(gradients) for gradients in per_sample]


def _check_scores(logits: torch.Tensor, batch_size: int) -> None:
    """Refuse scores that cannot be explained, naming why (not a later, puzzling failure)."""
    shape = tuple(logits.shape)
    if logits.dim() != 2:
        raise ModelRunError(f"The model's scores have shape {shape}, not (batch, classes).")
    if shape[0] != batch_size:
        raise ModelRunError(f"The model returned scores for {shape[0]} images from a batch of {batch_size} "
                            f"(shape {shape}): the first dimension of its output must be the batch.")
    if shape[1] == 0:
        raise ModelRunError(f"The model's output has no classes (shape {shape}), so there is nothing to "
                            f"explain; check --num-classes and the model's head.")
    if not logits.is_floating_point():
        raise ModelRunError(f"The model's scores are {str(logits.dtype).removeprefix('torch.')} numbers, "
                            f"not floating point: gradients and probabilities need float scores "
                            f"(logits).")


def _check_input_method(method: Method, batch: torch.Tensor, options: MethodOptions) -> None:
    """Settings an input method cannot work with, refused with the reason before Captum fails."""
    height, width = batch.shape[-2:]
    if method.name == "occlusion" and options.window > min(height, width):
        raise MethodError(f"The occlusion window ({options.window} pixels) is larger than the model's "
                          f"input ({height}x{width}); use --window {min(height, width)} or less.")


def _no_gradient(what: str, alternative: str) -> str:
    return (f"The model's output carries no gradient back to {what}: its forward runs under "
            f"torch.no_grad() or detaches its result, or {what} does not feed the output. "
            f"Use {alternative}.")


@contextmanager
def _gradient_needed(method: str) -> Iterator[None]:
    """Captum's own error for an output without gradient, said as the cause and what to do."""
    try:
        yield
    except RuntimeError as error:
        if "does not require grad" not in str(error):
            raise
        raise MethodError(_no_gradient("the input", f"a method other than {method} (e.g. occlusion, "
                                                    f"which needs no gradient)")) from None


def _layer_map(loaded: LoadedModel, name: str, activation: torch.Tensor,
               size: tuple[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The rearrangement that makes layer ``name``'s output a (B, C, H, W) map (the plugin's, for
    token sequences and channels-last layers), to apply alike to the output and its gradient."""
    if loaded.plugin.layer_map(loaded.module, name, activation.detach(), size) is not None:
        return lambda tensor: loaded.plugin.layer_map(loaded.module, name, tensor, size)
    if activation.dim() != 4:
        raise MethodError(f"Layer {name!r} outputs shape {tuple(activation.shape)}, not a (batch, "
                          f"channels, height, width) map, and plugin {loaded.plugin.name} does not "
                          f"say how to lay it out; choose one that `attnexplain layers` lists.")
    return lambda tensor: tensor


def _fuse_layers(per_layer: list[torch.Tensor]) -> torch.Tensor:
    """One layer: its map as is. Several: the mean of each layer's map scaled to [0, 1] per image,
    so that no layer dominates by the size of its values."""
    if len(per_layer) == 1:
        return per_layer[0]
    scaled = []
    for layer_map in per_layer:
        flat = layer_map.flatten(1)
        low = flat.amin(dim=1)[:, None, None]
        span = (flat.amax(dim=1) - flat.amin(dim=1))[:, None, None]
        scaled.append(torch.where(span > 0, (layer_map - low) / span.clamp_min(1e-12),
                                  torch.zeros_like(layer_map)))
    return torch.stack(scaled).mean(dim=0)


def _attention_pass(loaded: LoadedModel, batch: torch.Tensor, methods: list[Method],
                    score: Scorer, options: MethodOptions):
    module, plugin = loaded.module, loaded.plugin
    names = plugin.attention_modules(module)
    needs_gradient = any(m.needs_gradient for m in methods)
    captured: dict[str, torch.Tensor] = {}
    readout = _token_readout(loaded) if any(m.name == "legrad" for m in methods) else None
    block_tokens: dict[str, torch.Tensor] = {}
    # Gradients with respect to attention need a graph through the attention layers: with every
    # parameter frozen, an input that requires a gradient provides it.
    inputs = batch.detach().requires_grad_(needs_gradient)
    with frozen_parameters(module), plugin.capture_attention(module, names, captured), \
            capture_activations(module, readout.blocks if readout else [], block_tokens), \
            torch.set_grad_enabled(needs_gradient):
        logits, targets = score(module(inputs))
        missing = [name for name in names if name not in captured]
        if missing:
            raise MethodError(f"No attention was recorded for {', '.join(missing)}.")
        attentions = [captured[name] for name in names]
        windowed = isinstance(attentions[0], WindowedAttention)
        probabilities = [a.probabilities if windowed else a for a in attentions]
        gradients = layer_gradients = None
        if needs_gradient:
            if not logits.requires_grad:
                raise MethodError(_no_gradient("the attention layers", "--method rollout or attention "
                                                                        "(gradient-free)"))
            if readout is not None:
                layer_gradients = _layer_score_gradients(readout, block_tokens, probabilities, targets)
            if any(m.needs_gradient and m.name != "legrad" for m in methods):  # legrad has its own
                gradients = attention_gradients(logits.gather(1, targets[:, None]).sum(), probabilities)
    size = tuple(batch.shape[-2:])
    if windowed:
        grid = None  # each layer carries its positions
        attentions = [dataclasses.replace(a, probabilities=a.probabilities.detach()) for a in attentions]
    else:
        grid = plugin.token_grid(module, size)
        if grid is None:
            raise MethodError(f"Plugin {plugin.name} does not say how this model's tokens map to "
                              f"the image.")
        attentions = [attention.detach() for attention in attentions]
    maps, grids, depth_maps = {}, {}, {}
    for method in methods:
        try:
            if method.name == "rollout" and not windowed:  # one pass gives every depth, the last is the map
                depth_maps[method.name] = rollout_by_depth(attentions, grid, options.head_fusion,
                                                           options.discard_ratio)
                maps[method.name] = _upsample(depth_maps[method.name][:, -1], size)
                continue
            maps[method.name], grid_maps = _attention_map(
                method, attentions, layer_gradients if method.name == "legrad" else gradients, grid,
                options, size)
        except ValueError as error:  # the attention's shape does not suit the method
            raise MethodError(f"{method.name}: {error}.") from None
        if grid_maps is not None:
            grids[method.name] = grid_maps
    return maps, grids, depth_maps


def _attention_map(method: Method, attentions: list[torch.Tensor], gradients, grid,
                   options: MethodOptions, size: tuple[int, int]):
    """(B, H, W) map, and for raw attention the (B, layers, heads, h, w) grid kept for the report."""
    if method.name == "rollout":
        return _upsample(method.compute(attentions, grid, options.head_fusion,
                                        options.discard_ratio), size), None
    if method.name == "chefer":
        return _upsample(method.compute(attentions, gradients, grid), size), None
    if method.name == "legrad":
        if grid is None:
            raise ValueError("it needs global attention over a token sequence, not windowed attention")
        return _upsample(method.compute(gradients, grid), size), None
    per_head = raw_attention(attentions, grid)  # the map is the last layer, heads averaged
    if isinstance(attentions[-1], WindowedAttention):  # at the last layer's own resolution
        return _upsample(attention_received(attentions[-1]).mean(dim=1), size), per_head
    return _upsample(per_head[:, -1].mean(dim=1), size), per_head


def _token_readout(loaded: LoadedModel) -> TokenReadout:
    readout = loaded.plugin.token_readout(loaded.module)
    if readout is None:
        raise MethodError(f"legrad reads each layer's prediction off its tokens; plugin "
                          f"{loaded.plugin.name} does not say how for this "
                          f"{type(loaded.module).__name__}. Use --method chefer.")
    return readout


def _layer_score_gradients(readout: TokenReadout, block_tokens: dict[str, torch.Tensor],
                           probabilities: list[torch.Tensor], targets: torch.Tensor) -> list[torch.Tensor]:
    """LeGrad's ∂sˡ/∂Aˡ: per layer, the gradient of the target's score read off that layer's tokens
    with respect to that layer's attention only (one backward each, down to that layer)."""
    missing = [name for name in readout.blocks if name not in block_tokens]
    if missing or len(readout.blocks) != len(probabilities):
        raise MethodError(f"legrad: the plugin's blocks do not match its attention layers "
                          f"({', '.join(missing) or len(readout.blocks)}).")
    gradients = []
    for block, attention in zip(readout.blocks, probabilities):
        layer_score = readout.scores(block_tokens[block]).gather(1, targets[:, None]).sum()
        gradients += attention_gradients(layer_score, [attention], retain_graph=True)
    return gradients


def _gates_pass(loaded: LoadedModel, batch: torch.Tensor, method: Method,
                score: Scorer, shown_maps: int = 8) -> tuple[torch.Tensor, "ChannelGates"]:
    from .methods.gates import most_gated

    module, plugin = loaded.module, loaded.plugin
    names = plugin.gate_modules(module)
    recorded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad(), plugin.capture_gates(module, names, recorded):
        score(module(batch))
    missing = [name for name in names if name not in recorded]
    if missing:
        raise MethodError(f"No gates were recorded for {', '.join(missing)}.")
    gates, inputs = recorded[names[-1]]  # the last block: closest to the decision
    _, channels = most_gated(gates, shown_maps)
    top_maps = torch.gather(inputs, 1, channels[:, :, None, None].expand(-1, -1, *inputs.shape[2:]))
    heatmap = _upsample(method.compute(gates, inputs), tuple(batch.shape[-2:]))
    return heatmap, ChannelGates(blocks=names, values=[recorded[name][0] for name in names],
                                 top_channels=channels, top_maps=top_maps)


def _augmentation_smoothing(loaded: LoadedModel, batch: torch.Tensor, methods: list[Method],
                            layers: list[str], options: MethodOptions, plain: BatchMaps,
                            black: torch.Tensor) -> BatchMaps:
    """Average each map over the image, its mirror image and zoomed-in copies, each mapped back.

    Zooming crops the centre and resizes it back to the input size (the model keeps its input
    size, which transformers need); its map covers only that centre, so the average at each pixel
    is over the copies that saw it. Every copy explains the class found on the plain image (for a
    detector: that class's best box in the copy, which need not be the same object).
    """
    height, width = batch.shape[-2:]
    sums = {name: heatmap.clone() for name, heatmap in plain.maps.items()}
    counts = torch.ones(height, width, device=batch.device)
    for flip in (False, True):
        for zoom in (1.0, 1.2):
            if not flip and zoom == 1.0:
                continue
            augmented, (top, left, crop_h, crop_w) = _augment(batch, flip, zoom)
            try:
                copy = _compute_once(loaded, augmented, methods, layers, None, options, plain.targets,
                                     black)
            except NothingToExplain:  # a detector found nothing in this copy: it has no say
                continue
            for name, heatmap in copy.maps.items():
                restored = heatmap.flip(-1) if flip else heatmap
                shrunk = F.interpolate(restored[:, None], size=(crop_h, crop_w), mode="bilinear",
                                       align_corners=False)[:, 0]
                sums[name][:, top:top + crop_h, left:left + crop_w] += shrunk
            counts[top:top + crop_h, left:left + crop_w] += 1
    return BatchMaps(probabilities=plain.probabilities, targets=plain.targets,
                     maps={name: total / counts for name, total in sums.items()},
                     layers=plain.layers, attention_grids=plain.attention_grids,
                     channel_gates=plain.channel_gates, depth_maps=plain.depth_maps,
                     detections=plain.detections)


def _augment(batch: torch.Tensor, flip: bool, zoom: float):
    height, width = batch.shape[-2:]
    crop_h, crop_w = round(height / zoom), round(width / zoom)
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    augmented = batch[..., top:top + crop_h, left:left + crop_w]
    if zoom != 1.0:
        augmented = F.interpolate(augmented, size=(height, width), mode="bilinear", align_corners=False)
    if flip:
        augmented = augmented.flip(-1)
    return augmented, (top, left, crop_h, crop_w)


def _upsample(grid_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(grid_map[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def _probabilities_of(loaded: LoadedModel) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model as a function from input to (B, classes) probabilities, as its plugin defines them."""
    module, plugin = loaded.module, loaded.plugin
    return lambda inputs: plugin.class_scores(module, module(inputs))[1]


def _scores_of(loaded: LoadedModel) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model as a function from input to (B, classes) target scores, as its plugin defines them."""
    module, plugin = loaded.module, loaded.plugin
    return lambda inputs: plugin.class_scores(module, module(inputs))[0]


def resolve_targets(target: int | str | None, logits: torch.Tensor,
                    labels: list[str] | None) -> torch.Tensor:
    """(B,) class indices: ``target`` (an index or label) for every image, or each one's top-1
    (the largest of ``logits``, which may be any per-class ranking such as probabilities)."""
    num_classes = logits.shape[1]
    if labels is not None and len(labels) != num_classes:
        raise MethodError(f"{len(labels)} labels were given but the model has {num_classes} classes.")
    if target is None:
        return logits.argmax(dim=1)
    index = _target_index(target, num_classes, labels)
    return torch.full((logits.shape[0],), index, dtype=torch.long, device=logits.device)


def _target_index(target: int | str, num_classes: int, labels: list[str] | None) -> int:
    if isinstance(target, str) and not target.strip().lstrip("-").isdigit():
        if labels is None:
            raise MethodError(f"Target {target!r} is a label, but the model has no class names; "
                              f"give a class index or --labels.")
        matches = [i for i, label in enumerate(labels) if label == target] or \
                  [i for i, label in enumerate(labels) if label.lower() == target.lower()]
        if not matches:
            raise MethodError(f"No class is labelled {target!r}.")
        return matches[0]
    index = int(target)
    if not 0 <= index < num_classes:
        raise MethodError(f"Target class {index} is out of range: the model has {num_classes} "
                          f"classes (0-{num_classes - 1}).")
    return index


def top_predictions(probabilities: torch.Tensor, labels: list[str] | None, k: int) -> list[Prediction]:
    probabilities = probabilities.float()
    # Stable sort: ties keep index order, so the top-1 agrees with argmax (the default target).
    values, indices = torch.sort(probabilities, descending=True, stable=True)
    values, indices = values[:max(k, 1)], indices[:max(k, 1)]
    return [Prediction(int(i), _label(labels, int(i)), float(v)) for v, i in zip(values, indices)]


def _label(labels: list[str] | None, index: int) -> str | None:
    return labels[index] if labels is not None and index < len(labels) else None


def _as_loaded_model(model: LoadedModel | torch.nn.Module | str | Path, *,
                     labels: str | Path | Sequence[str] | None = None,
                     device: str | None = None) -> LoadedModel:
    """``model`` as a :class:`LoadedModel` on ``device`` (None: where it is), with ``labels`` if given.
    A :class:`LoadedModel` passed in is not changed: a copy gets the labels."""
    if not isinstance(model, LoadedModel):
        return load_model(model, labels=labels, device=device)
    from .loading import read_labels, resolve_device

    if labels is not None:
        model = dataclasses.replace(model, labels=read_labels(labels))
    if device is not None:
        model.module.to(resolve_device(device))
    return model


def _model_device(module: Any) -> torch.device:
    for parameter in module.parameters():
        return parameter.device
    return torch.device("cpu")
