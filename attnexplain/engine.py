"""The batch-level engine: every requested map for a batch of preprocessed images.

:func:`compute_maps` runs, once each, the pass of every method family requested (the registry in
:mod:`attnexplain.passes`); :func:`attnexplain.explain` and the batch command both call it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from .augmentation import augmentation_smoothing
from .detection_targets import (
    ExplainedBoxes,
    box_target_scores,
    choose_boxes,
    in_input_pixels,
    no_boxes,
    refuse_box_target,
)
from .errors import MethodError, NothingToExplain
from .methods import Method
from .options import MethodOptions
from .passes import PASSES, PassOutput, PassRun
from .passes.cam import shares_forward
from .passes.counting import ForwardCount, ProgressCallback
from .passes.gates import ChannelGates
from .plugins import Detections
from .precision import model_precision
from .preprocess import DEFAULT_SIZE, Preprocessing
from .results import MethodMap, Prediction
from .running import model_failures
from .targets import (
    NonFiniteScores,
    UniformScores,
    box_rank,
    check_contrast,
    check_scores,
    class_scores,
    explains_a_class,
    model_task,
    resolve_targets,
    scored_for,
    several_targets,
    uniform_scores,
    unusable_scores,
)

if TYPE_CHECKING:
    from .loading import LoadedModel


@dataclass
class BatchMaps:
    """Every requested map for a batch of preprocessed images, at the input's resolution."""

    probabilities: torch.Tensor  # (B, classes), as the plugin defines them (softmax for classifiers)
    targets: torch.Tensor  # (B,) the class each map explains
    maps: dict[str, torch.Tensor]  # method → (B, H, W) float32
    layers: dict[str, list[str]]  # method → the layers it used (empty for non-layer methods)
    attention_grids: dict[str, torch.Tensor] = field(default_factory=dict)  # (B, layers, heads, h, w)
    channel_gates: dict[str, ChannelGates] = field(default_factory=dict)
    depth_maps: dict[str, torch.Tensor] = field(default_factory=dict)  # (B, layers, h, w), rollout
    detections: list[Detections] | None = None  # a detector's boxes per image, model-input pixels
    explained_boxes: ExplainedBoxes | None = None  # which of a detector's boxes each map explains
    #: ``probabilities`` hold a single output's value (regression, a binary logit), not probabilities.
    values: bool = False
    versus: int | None = None  # a contrast's class: the maps explain score(target) − score(versus)
    negative: bool = False  # the maps explain what lowers a single output
    multilabel: bool = False  # ``probabilities`` are independent sigmoids (see attnexplain.scoring)
    #: The maps of ``compute_maps(also=...)``'s further targets, each of the same forward.
    also: list["BatchMaps"] = field(default_factory=list)

    def explained_scores(self) -> torch.Tensor:
        """(B,) each target's probability (a single output's value, negated for target negative),
        less the contrasted class's: the score the perturbation metrics follow (as
        :func:`attnexplain.running.probabilities_of`)."""
        chosen = self.probabilities.gather(1, self.targets[:, None].to(self.probabilities.device))[:, 0]
        if self.negative:
            return -chosen
        if self.versus is None:
            return chosen
        return chosen - self.probabilities[:, self.versus]

    precision: str = "fp32"  # what the model's forward ran in (options.precision resolved)

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
            image = {
                name: MethodMap(
                    name,
                    np.array(values[index]),
                    self.layers[name],
                    np.array(grids[name][index]) if name in grids else None,
                )
                for name, values in heatmaps.items()
            }
            for name, recorded in self.channel_gates.items():
                image[name].gates = recorded.summary(image_index=index)
                image[name].gate_maps = np.array(gate_maps[name][index])
            for name, maps in depth_maps.items():
                image[name].depth_maps = np.array(maps[index])
            images.append(image)
        return images


def compute_maps(
    loaded: "LoadedModel",
    batch: torch.Tensor,
    methods: list[Method],
    layers: list[str],
    *,
    target: int | str | None = None,
    options: MethodOptions | None = None,
    targets: torch.Tensor | None = None,
    preprocessing: Preprocessing | None = None,
    progress: ProgressCallback | None = None,
    versus: int | str | None = None,
    also: Sequence[int | str] = (),
) -> BatchMaps:
    """Compute ``methods`` on a preprocessed ``batch`` (B, 3, H, W): each family's pass runs once.

    ``target`` (an index or label) is explained for every image; by default each image's top-1
    class. ``targets`` fixes the classes outright. ``layers`` are the CAM layers (see
    :func:`attnexplain.planning.default_layer`). ``preprocessing`` is how ``batch`` was normalised
    (default: the model's), which says what a black pixel is for ``--baseline black``. This is the
    batch-level core that :func:`attnexplain.explain` wraps. Every image's maps are the same as if
    it were alone. ``progress`` is called with (done, total) images scored by the methods that cost
    many forwards (see :mod:`attnexplain.passes.counting`). ``versus`` (an index or label) makes every
    map explain score(target) − score(versus); ``target="negative"`` explains what lowers a
    single-output model's value. ``also``: further targets, whose maps (:attr:`BatchMaps.also`) share
    the forward, a backward each; only for methods that allow it (:func:`shares_forward`).
    """
    options = options or MethodOptions()
    refuse_box_target(box_rank(target), [m.family for m in methods], options.aug_smooth)
    loaded, target = scored_for(loaded, target, versus)
    normalised = preprocessing or loaded.preprocessing or Preprocessing(size=DEFAULT_SIZE)
    black = -torch.tensor(normalised.mean) / torch.tensor(normalised.std)  # pixel 0, normalised

    forwards = ForwardCount(progress)
    with model_failures(loaded.module), model_precision(loaded.module, options.precision) as precision:
        computed = _compute_once(loaded, batch, methods, layers, target, options, targets, black, forwards, also)
        if options.aug_smooth:

            def maps_of(augmented: torch.Tensor) -> dict[str, torch.Tensor]:
                again = _compute_once(
                    loaded, augmented, methods, layers, None, options, computed.targets, black, forwards
                )
                return again.maps

            computed = dataclasses.replace(computed, maps=augmentation_smoothing(maps_of, batch, computed.maps))
    return dataclasses.replace(computed, precision=precision)


def compute_maps_of_targets(
    loaded: "LoadedModel",
    batch: torch.Tensor,
    methods: list[Method],
    layers: list[str],
    target: Any,
    **settings: Any,
) -> tuple[BatchMaps, list[dict[str, MethodMap]]]:
    """:func:`compute_maps` for ``target``, or once for each class where it names several (a list,
    "cat,dog": see :func:`attnexplain.targets.several_targets`): the (first) class's
    :class:`BatchMaps`, whose predictions hold for all (the other classes' in its ``also``), and per
    image every map by its :attr:`MethodMap.key` ("gradcam@cat"), each naming the class it explains."""
    several = several_targets(target)
    if several is None:
        computed = compute_maps(loaded, batch, methods, layers, target=target, **settings)
        return computed, computed.image_maps()
    images: list[dict[str, MethodMap]] = [{} for _ in range(batch.shape[0])]
    every = each_target_maps(loaded, batch, methods, layers, several, **settings)
    for computed in every:
        for index, maps in enumerate(computed.image_maps()):
            chosen = int(computed.targets[index])
            probability = float(computed.probabilities[index, chosen])
            label = loaded.labels[chosen] if loaded.labels is not None and chosen < len(loaded.labels) else None
            for method_map in maps.values():
                method_map.target = Prediction(chosen, label, probability)
                images[index][method_map.key] = method_map
    return dataclasses.replace(every[0], also=every[1:]), images


def each_target_maps(
    loaded: "LoadedModel", batch: torch.Tensor, methods: list[Method], layers: list[str], targets: list, **settings: Any
) -> list[BatchMaps]:
    """:func:`compute_maps` of each of ``targets`` in turn: of one forward and a backward per target
    where every method allows it (:func:`shares_forward`; not with --aug-smooth or box:N), else of
    a whole pass each."""
    options = settings.get("options") or MethodOptions()
    shared = (
        all(shares_forward(method) for method in methods)
        and not options.aug_smooth
        and all(box_rank(each) is None for each in targets)
        and "targets" not in settings
    )
    if not shared:
        return [compute_maps(loaded, batch, methods, layers, target=each, **settings) for each in targets]
    computed = compute_maps(loaded, batch, methods, layers, target=targets[0], also=targets[1:], **settings)
    return [computed, *computed.also]


def _compute_once(
    loaded: "LoadedModel",
    batch: torch.Tensor,
    methods: list[Method],
    layers: list[str],
    target: int | str | None,
    options: MethodOptions,
    targets: torch.Tensor | None,
    black: torch.Tensor,
    forwards: ForwardCount,
    also: Sequence[int | str] = (),
) -> BatchMaps:
    module = loaded.module
    state: dict[str, Any] = {}

    def score(output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, classes) differentiable target scores and (B,) targets from the model's raw output.
        The first pass's output is the prediction; its targets hold for every later pass."""
        logits, probabilities = class_scores(loaded, output)
        check_scores(logits, batch.shape[0])
        if "probabilities" not in state:
            state["probabilities"] = probabilities.detach()
            state["values"] = loaded.scoring.shows_value(logits.shape[1], model_task(loaded))
            detected = loaded.plugin.detections(module, output)
            if detected is not None:
                state["detections"] = in_input_pixels(detected, tuple(batch.shape[-2:]))
            unusable = unusable_scores(logits)
            if unusable is not None and not bool(torch.isfinite(probabilities).any()):
                raise NonFiniteScores(unusable)  # every image; else each image says it for itself
            # != 0: a score may be negative (one text prompt's cosine similarity); all 0 is nothing found.
            if not state["values"] and not bool((state["probabilities"] != 0).any()):
                raise NothingToExplain()
            # Every image's scores equal across classes: no map of a class is worth computing (each
            # image says it for itself otherwise). Not when the targets are fixed (evaluate's
            # randomization check explains the trained model's classes on re-initialised weights).
            if targets is None and explains_a_class(methods):
                uniform = [uniform_scores(row) for row in state["probabilities"]]
                if all(uniform):
                    raise UniformScores(uniform[0])
        rank = box_rank(target) if targets is None else None
        if "targets" not in state:
            if rank is not None and "detections" not in state:
                raise no_boxes(rank)
            state["targets"] = (
                targets.to(probabilities.device)
                if targets is not None
                else resolve_targets(None if rank is not None else target, state["probabilities"], loaded.labels)
            )
            if "detections" in state:  # box:N sets each image's target to its box's label
                state["boxes"] = choose_boxes(state["detections"], rank, state["targets"])
            if loaded.scoring.versus is not None:
                state["versus"] = loaded.scoring.versus_index(logits.shape[1], loaded.labels)
                check_contrast(state["targets"], state["versus"], loaded.labels)
        if rank is not None:
            box_scores = loaded.plugin.box_scores(module, output)
            logits = box_target_scores(logits, box_scores, state["boxes"], state["targets"])
        return logits, state["targets"]

    run = PassRun(
        loaded=loaded,
        batch=batch,
        layers=layers,
        options=options,
        score=score,
        black=black,
        state=state,
        forwards=forwards,
        also=list(also),
    )
    unknown = [m.name for m in methods if m.family not in PASSES]
    if unknown:
        raise MethodError(f"No pass computes the family of {', '.join(unknown)}.")
    made = PassOutput(maps=run.maps, layers={})  # later passes see earlier maps through run.maps
    for family, run_pass in PASSES.items():
        of_family = [m for m in methods if m.family == family]
        if of_family:
            made.add(run_pass(run, of_family))
    explained = run.targets()  # set by the first pass's forward (or now, when no pass ran)
    order = [m.name for m in methods]  # as asked for
    computed = BatchMaps(
        probabilities=state["probabilities"],
        targets=explained,
        maps={name: made.maps[name] for name in order},
        layers={name: made.layers[name] for name in order},
        attention_grids=made.attention_grids,
        channel_gates=made.channel_gates,
        depth_maps=made.depth_maps,
        detections=state.get("detections"),
        explained_boxes=state.get("boxes"),
        values=bool(state.get("values")),
        versus=state.get("versus"),
        negative=loaded.scoring.negative,
        multilabel=loaded.scoring.kind == "sigmoid",
    )
    computed.also = [
        dataclasses.replace(
            computed,
            targets=each,
            maps={name: maps[name] for name in order},
            # A detector's explained box is each target's own best one.
            explained_boxes=choose_boxes(state["detections"], None, each) if "detections" in state else None,
        )
        for each, maps in state.get("also", [])
    ]
    return computed
