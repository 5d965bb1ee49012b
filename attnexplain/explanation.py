"""explain(): one image, one model, one method → an :class:`Explanation`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .capture import capture_activations, frozen_parameters, probe_layers
from .errors import MethodError
from .images import LoadedImage, from_array, load_image
from .loading import LoadedModel, load_model
from .methods import METHODS, Method
from .preprocess import DEFAULT_SIZE, Preprocessing, prepare


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str | None
    prob: float

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "label": self.label, "prob": self.prob}


@dataclass
class Explanation:
    """Where the model looked, for one image: the heatmap, the predictions and how they were made."""

    image: LoadedImage
    model: LoadedModel
    method: str
    layer: str | None
    target: Prediction
    predictions: list[Prediction]
    heatmap: np.ndarray  # (h, w) float32 at the model's input resolution, raw values
    box: tuple[float, float, float, float]  # region of the photo the model saw
    preprocessing: Preprocessing
    timings: dict[str, float] = field(default_factory=dict)

    def overlay(self, alpha: float = 0.5) -> np.ndarray:
        """The heatmap blended over the photo, at the photo's resolution (H, W, 3) uint8."""
        from .render import render_overlay

        return render_overlay(self.image.pixels, self.heatmap, self.box, alpha)

    def to_dict(self) -> dict[str, Any]:
        """The report's fields (without output paths: :meth:`save` adds them)."""
        from .report import versions

        return {
            "image": {"path": str(self.image.path.resolve()) if self.image.path else None,
                      "width": self.image.size[0], "height": self.image.size[1],
                      "format": self.image.format, "mode": self.image.mode},
            "model": self.model.describe(),
            "method": self.method,
            "layer": self.layer,
            "target": {"index": self.target.index, "label": self.target.label},
            "predictions": [p.as_dict() for p in self.predictions],
            "preprocessing": self.preprocessing.as_dict(),
            "heatmap": {"height": int(self.heatmap.shape[0]), "width": int(self.heatmap.shape[1]),
                        "min": float(self.heatmap.min()), "max": float(self.heatmap.max())},
            "timings": {key: round(value, 6) for key, value in self.timings.items()},
            "versions": versions(),
        }

    def save(self, directory: str | Path, alpha: float = 0.5) -> dict[str, Any]:
        """Write overlay, heatmap, report.json and report.html into ``directory``, all or nothing.

        Returns the report (as written to report.json).
        """
        from .report import save_explanation

        return save_explanation(self, Path(directory), alpha)


def explain(model: LoadedModel | torch.nn.Module | str | Path,
            image: LoadedImage | np.ndarray | str | Path, method: str = "auto", *,
            target: int | str | None = None, layer: str | None = None, top_k: int = 5,
            size: Sequence[int] | int | None = None, mean: Sequence[float] | None = None,
            std: Sequence[float] | None = None, device: str | None = None) -> Explanation:
    """Explain ``model``'s prediction on ``image`` with ``method``.

    ``model`` may be a :class:`LoadedModel`, a plain ``nn.Module`` or anything :func:`load_model`
    accepts; ``image`` a :class:`LoadedImage`, an RGB uint8 array or a path. ``method="auto"`` picks
    attention rollout for models whose plugin knows their attention, Grad-CAM otherwise (saliency
    where inner layers are out of reach). ``target`` is a class index or label (default: top-1).
    """
    timings: dict[str, float] = {}
    started = time.perf_counter()
    loaded = _as_loaded_model(model)
    picture = _as_image(image)
    module = loaded.module
    run_device = _model_device(module) if device is None else torch.device(device)

    preprocessing = (loaded.preprocessing or Preprocessing(size=DEFAULT_SIZE)).with_overrides(
        size=size, mean=mean, std=std)
    prepared = prepare(picture.pixels, preprocessing)
    batch = prepared.tensor.to(run_device)
    timings["preprocess_s"] = time.perf_counter() - started

    chosen = resolve_method(loaded, method)
    started = time.perf_counter()
    if chosen.needs == "layer":
        layer = layer or default_layer(loaded, batch)
        logits, raw_map, target_index = _run_layer_method(module, batch, layer, chosen, target, loaded)
    elif chosen.needs == "attention":
        if layer is not None:
            raise MethodError(f"--layer does not apply to {chosen.name}, which uses every attention layer.")
        logits, raw_map, target_index = _run_attention_method(loaded, batch, chosen, target)
    else:
        if layer is not None:
            raise MethodError(f"--layer does not apply to {chosen.name}, which explains the input.")
        logits, raw_map, target_index = _run_input_method(module, batch, chosen, target, loaded)
    if run_device.type == "cuda":
        torch.cuda.synchronize(run_device)
    timings["explain_s"] = time.perf_counter() - started

    heatmap = F.interpolate(raw_map[:, None].float(), size=batch.shape[-2:], mode="bilinear",
                            align_corners=False)[0, 0]
    predictions = top_predictions(logits[0], loaded.labels, top_k)
    probabilities = torch.softmax(logits[0].float(), dim=0)
    chosen_target = Prediction(target_index, _label(loaded.labels, target_index),
                               float(probabilities[target_index]))
    return Explanation(image=picture, model=loaded, method=chosen.name,
                       layer=layer if chosen.needs == "layer" else None, target=chosen_target,
                       predictions=predictions, heatmap=heatmap.detach().cpu().numpy().astype(np.float32),
                       box=prepared.box, preprocessing=preprocessing, timings=timings)


def resolve_method(loaded: LoadedModel, name: str) -> Method:
    """The method called ``name``, checked against what the model allows; ``auto`` chooses."""
    if name == "auto":
        if loaded.inner_layers and loaded.plugin.attention_modules(loaded.module):
            name = "rollout"
        else:
            name = "gradcam" if loaded.inner_layers else "saliency"
    if name not in METHODS:
        raise MethodError(f"Unknown method {name!r}; choose from auto, {', '.join(METHODS)}.")
    method = METHODS[name]
    if method.needs != "input" and not loaded.inner_layers:
        raise MethodError(f"{name} needs the model's inner layers, which a {loaded.loader} model does "
                          f"not expose; use --method saliency, or load the weights as a state_dict "
                          f"with --arch.")
    if method.needs == "attention" and not loaded.plugin.attention_modules(loaded.module):
        raise MethodError(f"{name} needs attention layers; plugin {loaded.plugin.name} knows none in "
                          f"this {type(loaded.module).__name__}. Use --method gradcam.")
    return method


def default_layer(loaded: LoadedModel, batch: torch.Tensor) -> str:
    """The plugin's choice, else the last layer to produce a spatial (B, C, H, W) map."""
    chosen = loaded.plugin.default_layer(loaded.module)
    if chosen:
        return chosen
    spatial = [info for info in probe_layers(loaded.module, batch) if info.is_spatial]
    if not spatial:
        raise MethodError("No layer of this model outputs a spatial (batch, channels, height, width) "
                          "map, so Grad-CAM has nothing to weight; try --method saliency.")
    return spatial[-1].name


def _run_layer_method(module: torch.nn.Module, batch: torch.Tensor, layer: str, method: Method,
                      target: int | str | None, loaded: LoadedModel):
    captured: dict[str, torch.Tensor] = {}
    with frozen_parameters(module), capture_activations(module, [layer], captured), \
            torch.enable_grad():
        logits = _classification_logits(module(batch))
        if layer not in captured:
            raise MethodError(f"Layer {layer!r} did not run during the forward pass.")
        activation = captured[layer]
        if activation.dim() != 4:
            raise MethodError(f"Layer {layer!r} outputs shape {tuple(activation.shape)}, not a "
                              f"(batch, channels, height, width) map; choose one that `attnexplain "
                              f"layers` marks as spatial.")
        target_index = resolve_target(target, logits, loaded.labels)
        score = logits[:, target_index].sum()
        if not score.requires_grad:
            raise MethodError(f"The model's output does not depend on layer {layer!r}.")
        (gradient,) = torch.autograd.grad(score, activation)
    return logits.detach(), method.compute(activation.detach(), gradient), target_index


def _run_attention_method(loaded: LoadedModel, batch: torch.Tensor, method: Method,
                          target: int | str | None):
    module, plugin = loaded.module, loaded.plugin
    names = plugin.attention_modules(module)
    grid = plugin.token_grid(module, tuple(batch.shape[-2:]))
    if grid is None:
        raise MethodError(f"Plugin {plugin.name} does not say how this model's tokens map to the image.")
    captured: dict[str, torch.Tensor] = {}
    with torch.no_grad(), plugin.capture_attention(module, names, captured):
        logits = _classification_logits(module(batch))
    missing = [name for name in names if name not in captured]
    if missing:
        raise MethodError(f"No attention was recorded for {', '.join(missing)}.")
    target_index = resolve_target(target, logits, loaded.labels)
    return logits, method.compute([captured[name] for name in names], grid), target_index


def _run_input_method(module: Any, batch: torch.Tensor, method: Method, target: int | str | None,
                      loaded: LoadedModel):
    with torch.no_grad():
        logits = _classification_logits(module(batch))
    target_index = resolve_target(target, logits, loaded.labels)
    targets = torch.full((batch.shape[0],), target_index, dtype=torch.long)
    with torch.enable_grad():
        raw_map = method.compute(lambda x: _classification_logits(module(x)), batch, targets)
    return logits, raw_map.detach(), target_index


def _classification_logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor) and output.dim() == 2:
        return output
    if hasattr(output, "logits") and isinstance(output.logits, torch.Tensor):  # InceptionOutputs etc.
        return output.logits
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor) and output[0].dim() == 2:
        return output[0]
    shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
    raise MethodError(f"The model's output is {shape}, not classification scores of shape "
                      f"(batch, classes).")


def resolve_target(target: int | str | None, logits: torch.Tensor, labels: list[str] | None) -> int:
    """A class index from an index, a label or (None) the top-1 prediction."""
    num_classes = logits.shape[1]
    if labels is not None and len(labels) != num_classes:
        raise MethodError(f"{len(labels)} labels were given but the model has {num_classes} classes.")
    if target is None:
        return int(logits[0].argmax())
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


def top_predictions(logits: torch.Tensor, labels: list[str] | None, k: int) -> list[Prediction]:
    probabilities = torch.softmax(logits.float(), dim=0)
    # Stable sort: ties keep index order, so the top-1 agrees with argmax (the default target).
    values, indices = torch.sort(probabilities, descending=True, stable=True)
    values, indices = values[:max(k, 1)], indices[:max(k, 1)]
    return [Prediction(int(i), _label(labels, int(i)), float(v)) for v, i in zip(values, indices)]


def _label(labels: list[str] | None, index: int) -> str | None:
    return labels[index] if labels is not None and index < len(labels) else None


def _as_loaded_model(model: LoadedModel | torch.nn.Module | str | Path) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, torch.nn.Module):
        from .plugins import select_plugin

        plugin = select_plugin(model)
        return LoadedModel(module=model.eval(), source=f"<{type(model).__name__} object>",
                           loader="object", architecture=type(model).__name__, plugin=plugin,
                           preprocessing=plugin.preprocessing(model))
    return load_model(model)


def _as_image(image: LoadedImage | np.ndarray | str | Path) -> LoadedImage:
    if isinstance(image, LoadedImage):
        return image
    if isinstance(image, np.ndarray):
        return from_array(image)
    return load_image(image)


def _model_device(module: Any) -> torch.device:
    for parameter in module.parameters():
        return parameter.device
    return torch.device("cpu")
