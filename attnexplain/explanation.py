"""explain(): one image, one model, one or more methods → an :class:`Explanation`.

The public API and its result; the engine it drives lives apart: :mod:`attnexplain.planning`
(the plan: preprocessing, methods and layers), :mod:`attnexplain.engine` (every map for a batch,
through the family passes of :mod:`attnexplain.passes`), :mod:`attnexplain.targets` (scores,
targets, predictions).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .captioning import refuse_captioner
from .detection_targets import box_outcome
from .engine import BatchMaps, compute_maps, compute_maps_of_targets
from .formats import DEFAULT_COLORMAP
from .images import LoadedImage, image_from
from .loading import LoadedModel, load_model, with_prompts
from .options import MethodOptions
from .planning import Plan, default_layer, layer_maps, plan_explanation, plan_preprocessing, resolve_methods
from .preprocess import Preprocessing, prepare
from .prompts import read_prompts
from .results import MethodMap, Photo, Prediction
from .running import model_device
from .targets import (
    NonFiniteScores,
    boxes_on_photo,
    explains_a_class,
    image_outcome,
    present_labels,
    resolve_targets,
    target_record,
    top_predictions,
    unusable_scores,
)

#: Importable from here as before the engine and the plan moved out (tests, samples and plugins import them so).
__all__ = [
    "BatchMaps",
    "Explanation",
    "MethodMap",
    "MethodOptions",
    "NonFiniteScores",
    "Plan",
    "Prediction",
    "boxes_on_photo",
    "compute_maps",
    "default_layer",
    "explain",
    "image_outcome",
    "layer_maps",
    "plan_explanation",
    "plan_preprocessing",
    "resolve_methods",
    "resolve_targets",
    "top_predictions",
    "unusable_scores",
]


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
    #: What the model's forward ran in: ``options.precision`` resolved for the device (fp32, bf16, fp16).
    precision: str = "fp32"
    #: A contrast's class index (the maps explain score(target) − score(versus)); None: no contrast.
    versus: int | None = None
    negative: bool = False  # the maps explain what lowers a single output
    #: A multi-label model's classes at or above the threshold (what it says the image holds); None
    #: for other models.
    present: list[Prediction] | None = None

    def __post_init__(self) -> None:
        # Each map knows its photo, so that ``result.maps[name].overlay()`` draws it.
        photo = Photo(self.image.pixels, self.box, self.detections)
        for result in self.maps.values():
            result.photo = photo

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
        return self.maps[method or self.method].overlay(alpha, colormap)

    def __repr__(self) -> str:
        # What a console shows: the facts, not the photo's and the maps' arrays.
        source = self.image.path.name if self.image.path else f"{self.image.size[0]}x{self.image.size[1]} image"
        return (
            f"<Explanation of {source!r} by {self.model.source!r}: "
            f"{', '.join(self.maps)} for {self.target.label or self.target.index!r} (p={self.target.prob:.3f})>"
        )

    def _repr_html_(self) -> str:
        """How Jupyter shows the result: the photo, each method's overlay with its colour bar, the
        predictions (see :mod:`attnexplain.notebook`)."""
        from .notebook import notebook_html

        return notebook_html(self)

    def _repr_png_(self) -> bytes:
        """How consoles and exports show the result: the photo and each overlay in a row, one PNG."""
        from .notebook import notebook_png

        return notebook_png(self)

    def figure(self, methods: str | Sequence[str] | None = None, **options: Any) -> Any:
        """A matplotlib ``Figure`` for a paper: the photo and each method's overlay in a row, titled,
        with colour bars (see :func:`attnexplain.figures.figure` for ``options``: alpha, colormap,
        colorbar, titles, photo, panel_inches). Needs ``attnexplain[figures]``."""
        from .figures import figure

        return figure([self], methods, **options)

    def attention_figure(self, method: str | None = None, **options: Any) -> Any:
        """The attention of every layer × head as a matplotlib ``Figure`` (raw ``attention`` maps;
        see :func:`attnexplain.figures.attention_grid_figure`)."""
        from .figures import attention_grid_figure

        return attention_grid_figure(self, method, **options)

    def depth_figure(self, method: str | None = None, **options: Any) -> Any:
        """Rollout through the first 1, 2, … layers as a matplotlib ``Figure`` (see
        :func:`attnexplain.figures.depth_figure`)."""
        from .figures import depth_figure

        return depth_figure(self, method, **options)

    def to_dict(self) -> dict[str, Any]:
        """The report's fields (without output paths: :meth:`save` adds them)."""
        from .report import method_summary, versions

        return {
            "image": {"path": str(self.image.path.resolve()) if self.image.path else None, **self.image.describe()},
            "model": self.model.describe(),
            "method": self.method,
            "methods": list(self.maps),
            "layer": self.layer,
            "target": target_record(self.target, self.model.labels, self.versus, self.negative),
            **({"class_agnostic": agnostic} if (agnostic := class_agnostic(list(self.maps))) else {}),
            "predictions": [p.as_dict() for p in self.predictions],
            **({"present": [p.as_dict() for p in self.present]} if self.present is not None else {}),
            "preprocessing": self.preprocessing.as_dict(),
            "options": self.options.as_dict(),
            "precision": self.precision,
            "maps": {
                name: {
                    **method_summary(result),
                    "height": int(result.heatmap.shape[0]),
                    "width": int(result.heatmap.shape[1]),
                    "min": float(result.heatmap.min()),
                    "max": float(result.heatmap.max()),
                }
                for name, result in self.maps.items()
            },
            **({"detections": self.detections} if self.detections is not None else {}),
            **({"metrics": self.metrics} if self.metrics is not None else {}),
            "timings": {key: round(value, 6) for key, value in self.timings.items()},
            "versions": versions(),
        }

    def save(
        self, directory: str | Path, alpha: float = 0.5, overlay_format: str = "png", colormap: str = DEFAULT_COLORMAP
    ) -> dict[str, Any]:
        """Write overlays, heatmaps, report.json and report.html into ``directory``, all or nothing.
        ``colormap`` colours the written pictures (the page lets the reader switch).

        Returns the report (as written to report.json).
        """
        from .report import save_explanation

        return save_explanation(self, Path(directory), alpha, overlay_format, colormap)


def explain(
    model: LoadedModel | torch.nn.Module | str | Path,
    image: Any,
    method: str | Sequence[str] = "auto",
    *,
    target: int | str | Sequence[int | str] | None = None,
    layer: str | Sequence[str] | None = None,
    top_k: int = 5,
    size: Sequence[int] | int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    options: MethodOptions | None = None,
    device: str | None = None,
    labels: str | Path | Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    prompt: str | None = None,
    prompts: str | Sequence[str] | None = None,
    versus: int | str | None = None,
    threshold: float = 0.5,
) -> Explanation:
    """Explain ``model``'s prediction on ``image`` with one or more methods.

    ``model`` may be a :class:`LoadedModel`, a plain ``nn.Module`` or anything :func:`load_model`
    accepts. ``image`` may be a :class:`LoadedImage`, a path, a PIL image, a numpy array ((H, W, 3)
    or (H, W): uint8, or floats in [0, 1]) or a torch tensor ((3, H, W) or (1, 3, H, W) in [0, 1], or
    uint8). ``method`` is a name, a
    comma-separated list or a sequence of names (see :data:`attnexplain.METHODS`); ``"auto"`` picks
    attention rollout for models whose plugin knows their attention, Grad-CAM otherwise (saliency where
    inner layers are out of reach). Methods of the same family share their forward and backward pass.
    ``layer`` names the CAM layer(s); several are fused. ``target`` is a class index or label
    (default: the top-1 prediction); several (a list, or ``"cat,dog"``) give each method's map of
    each, keyed ``"gradcam@cat"`` (``"negative"``: what lowers a single-output model's value).
    ``versus`` (a class index or label) explains score(target) − score(versus) with every gradient and
    perturbation method: what makes it the target rather than ``versus``. A multi-label model's
    (``scores="sigmoid"``) classes at or above ``threshold`` are its ``present`` labels. ``labels`` (a list of class
    names or a file of one per line) win over those the model carries. ``device`` (cpu, cuda, mps,
    auto) moves the model there; None runs it where it is.
    ``progress`` is called with (done, total) as the methods that cost many
    forwards (Score-CAM, occlusion, RISE, integrated gradients, SmoothGrad, ...) score their images:
    ``done`` grows to ``total`` (which grows when a later method starts); nothing by default.
    ``prompt`` (one text) or ``prompts`` (several, or ``"@FILE"``) make a
    model that compares an image with text (CLIP, SigLIP, through its plugin) a classifier whose
    classes are the prompts; ``target`` then names a prompt.
    """
    options = options or MethodOptions()
    timings: dict[str, float] = {}
    started = time.perf_counter()
    picture = image_from(image)
    loaded = _as_loaded_model(model, labels=labels, device=device, prompts=read_prompts(prompt, prompts))
    refuse_captioner(loaded, "explain()", "attnexplain.explain_caption()")
    module = loaded.module
    run_device = model_device(module)

    plan = plan_explanation(loaded, method, layer, size=size, mean=mean, std=std)
    timings["plan_s"] = time.perf_counter() - started  # methods, layers (the default layer's probe)
    started = time.perf_counter()
    preprocessing = plan.preprocessing
    prepared = prepare(picture.pixels, preprocessing)
    batch = prepared.tensor.to(run_device)
    timings["preprocess_s"] = time.perf_counter() - started

    started = time.perf_counter()
    computed, per_image = compute_maps_of_targets(
        loaded,
        batch,
        plan.methods,
        plan.layers,
        target,
        options=options,
        preprocessing=preprocessing,
        versus=versus,
        progress=progress,
    )
    if run_device.type == "cuda":
        torch.cuda.synchronize(run_device)
    timings["explain_s"] = time.perf_counter() - started

    probabilities, target_index = computed.probabilities[0], int(computed.targets[0])
    maps = per_image[0]
    chosen_target, predictions = image_outcome(
        probabilities,
        target_index,
        loaded.labels,
        top_k,
        target_given=target is not None and not computed.negative,
        methods=plan.methods,
        values=computed.values,
        threshold=threshold if computed.multilabel else None,
    )
    detections = None
    chosen_target, explained_box = box_outcome(computed.explained_boxes, computed.detections, 0, chosen_target)
    if computed.detections is not None:
        detections = boxes_on_photo(
            computed.detections[0],
            target_index,
            loaded.labels,
            tuple(batch.shape[-2:]),
            prepared.box,
            picture.size,
            explained_box,
        )
    return Explanation(
        image=picture,
        model=loaded,
        maps=maps,
        target=chosen_target,
        predictions=predictions,
        box=prepared.box,
        preprocessing=preprocessing,
        options=options,
        timings=timings,
        detections=detections,
        versus=computed.versus,
        negative=computed.negative,
        present=present_labels(probabilities, loaded.labels, threshold) if computed.multilabel else None,
        precision=computed.precision,
    )


def class_agnostic(names: Sequence[str]) -> list[str]:
    """Those of the methods ``names`` whose maps do not depend on the target (rollout, raw attention,
    gates, Eigen-CAM: :func:`explains_a_class` of none): the same map for every class, a contrast
    or a negated output."""
    from .errors import MethodError
    from .method_registry import find_method

    agnostic = []
    for name in names:
        try:
            method = find_method(name.partition("@")[0])
        except MethodError:
            continue  # a method no longer installed: nothing to say about it
        if not explains_a_class([method]):
            agnostic.append(name)
    return agnostic


def _as_loaded_model(
    model: LoadedModel | torch.nn.Module | str | Path,
    *,
    labels: str | Path | Sequence[str] | None = None,
    device: str | None = None,
    prompts: tuple[str, ...] | None = None,
) -> LoadedModel:
    """``model`` as a :class:`LoadedModel` on ``device`` (None: where it is), with ``labels`` if given.
    A :class:`LoadedModel` passed in is not changed: a copy gets the labels (or the prompts)."""
    if not isinstance(model, LoadedModel):
        return load_model(model, labels=labels, device=device, prompts=prompts)
    if prompts is not None:
        model = with_prompts(model, prompts, labels_given=labels is not None)
    from .loading import read_labels, resolve_device

    if labels is not None:
        model = replace(model, labels=read_labels(labels))
    if device is not None:
        model.module.to(resolve_device(device))
    return model
