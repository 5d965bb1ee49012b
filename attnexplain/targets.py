"""What a target class is: the model's scores checked, targets chosen, predictions ranked, a
detector's boxes placed on the photo."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch

from .errors import MethodError, ModelRunError, NothingToExplain
from .plugins import Detections
from .results import Prediction
from .target_names import target_names, unquoted_target

if TYPE_CHECKING:
    from .loading import LoadedModel


#: ``--target negative``: explain what lowers a single-output model's value.
NEGATIVE = "negative"


class NonFiniteScores(NothingToExplain):
    """The model's scores for an image are NaN or infinite: an outcome of that image (a batch
    records it and goes on), though usually of the weights."""


def unusable_scores(scores: torch.Tensor) -> str | None:
    """Why a model's scores cannot be explained (NaN or infinite values), or None."""
    values = scores.detach()
    if values.is_floating_point() and not bool(torch.isfinite(values).all()):
        what = "NaN (not a number)" if bool(torch.isnan(values).any()) else "infinite values"
        return (
            f"The model's scores hold {what}, so there is nothing to explain; its weights are "
            f"probably broken (a training run that diverged saves NaN), or --mean/--std do not "
            f"fit it."
        )
    return None


class UniformScores(NothingToExplain):
    """The model gives every class the same score for an image: its prediction does not depend on
    the image (a head of zeros, an untrained model whose features die out), so a map of it would
    only stretch rounding noise (Grad-CAM of ~1e-9) to full contrast."""


def uniform_scores(probabilities: torch.Tensor) -> str | None:
    """Why an image's (classes,) probabilities cannot be explained because every class has the
    same one (to within float32 rounding, as a constant map), or None. One class is not uniform:
    it is the whole prediction."""
    from .render import FLAT_RELATIVE_RANGE  # one rounding tolerance for maps and scores

    values = probabilities.detach().float()
    if values.numel() < 2 or not bool(torch.isfinite(values).all()):
        return None
    low, high = float(values.min()), float(values.max())
    if high - low > FLAT_RELATIVE_RANGE * max(abs(low), abs(high)):
        return None
    return (
        f"The model gives every one of its {values.numel()} classes the same score for this image "
        f"(probability {high:.4g} each): the model's scores do not change with this image, so "
        f"there is nothing to explain; its weights are probably untrained or broken (a classifier "
        f"head of zeros, features that die out before it)."
    )


def explains_a_class(methods: Sequence[Any]) -> bool:
    """Whether any of ``methods`` maps the target class's score (its colour scale names the target):
    those maps are rounding noise when every class scores alike. Rollout, raw attention, gates and
    Eigen-CAM show the model whatever its head says (a pretrained backbone under a fresh zero head)."""
    return any("{target}" in method.scale for method in methods)


def check_scores(logits: torch.Tensor, batch_size: int) -> None:
    """Refuse scores that cannot be explained, naming why (not a later, puzzling failure)."""
    shape = tuple(logits.shape)
    if logits.dim() != 2:
        raise ModelRunError(f"The model's scores have shape {shape}, not (batch, classes).")
    if shape[0] != batch_size:
        raise ModelRunError(
            f"The model returned scores for {shape[0]} images from a batch of {batch_size} "
            f"(shape {shape}): the first dimension of its output must be the batch."
        )
    if shape[1] == 0:
        raise ModelRunError(
            f"The model's output has no classes (shape {shape}), so there is nothing to "
            f"explain; check --num-classes and the model's head."
        )
    if not logits.is_floating_point():
        raise ModelRunError(
            f"The model's scores are {str(logits.dtype).removeprefix('torch.')} numbers, "
            f"not floating point: gradients and probabilities need float scores "
            f"(logits)."
        )


def resolve_targets(target: int | str | None, logits: torch.Tensor, labels: list[str] | None) -> torch.Tensor:
    """(B,) class indices: ``target`` (an index or label) for every image, or each one's top-1
    (the largest of ``logits``, which may be any per-class ranking such as probabilities)."""
    num_classes = logits.shape[1]
    if labels is not None and len(labels) != num_classes:
        raise MethodError(f"{len(labels)} labels were given but the model has {num_classes} classes.")
    if target is None:
        return logits.argmax(dim=1)
    index = _target_index(target, num_classes, labels)
    return torch.full((logits.shape[0],), index, dtype=torch.long, device=logits.device)


#: ``--target box:N``: the N-th detected box by score (0: the best), whatever its class.
BOX_TARGET_PREFIX = "box:"


def box_rank(target: int | str | None) -> int | None:
    """N of a ``box:N`` target, or None for a class target (an index or a label)."""
    if not isinstance(target, str) or not target.strip().lower().startswith(BOX_TARGET_PREFIX):
        return None
    rank = target.strip()[len(BOX_TARGET_PREFIX) :].strip()
    if not rank.isdigit():
        raise MethodError(
            f"Target {target!r}: box:N takes a whole number N from 0 (box:0 is the best-scoring detected box)."
        )
    return int(rank)


def scored_for(
    loaded: "LoadedModel", target: int | str | None, versus: int | str | None
) -> tuple["LoadedModel", int | str | None]:
    """``loaded`` scoring a contrast with ``versus`` (if given) and, for ``target="negative"`` (where
    no class is labelled so), its single output negated; with the target left to explain."""
    from dataclasses import replace

    negative = (
        isinstance(target, str)
        and target.strip().lower() == NEGATIVE
        and not any(label.lower() == NEGATIVE for label in loaded.labels or [])
    )
    if versus is None and not negative:
        return loaded, target
    if negative:
        target = None
    scoring = replace(loaded.scoring, versus=versus, negative=negative)
    return replace(loaded, scoring=scoring), target


def check_contrast(targets: torch.Tensor, versus: int, labels: list[str] | None) -> None:
    """Refuse a contrast of a class with itself (every map would be zero)."""
    if bool((targets == versus).any()):
        name = _label(labels, versus) or versus
        raise MethodError(
            f"The target and --versus are the same class ({name}): a class's score less its own is 0, "
            f"so there is nothing to explain; give another --target or --versus."
        )


def several_targets(target: Any) -> list[int | str] | None:
    """The classes of ``target`` when it names several (a list, or "cat,dog"), each to get its own
    maps; None when it names one or none."""
    if isinstance(target, str) and "," in target:
        target = target_names(target)  # "a, b" in quotes: one name that holds a comma
    if isinstance(target, (list, tuple)):
        if not target:
            raise MethodError("No class to explain was named in the list of targets.")
        boxes = [each for each in target if box_rank(each) is not None]
        if boxes and len(target) > 1:  # maps are named by class: two boxes of one label would collide
            raise MethodError(
                f"Target {boxes[0]} names one detected box; several targets are classes (cat,dog), "
                f"each its best box. Explain each box:N on its own."
            )
        return list(target) if len(target) > 1 else None
    return None


def target_index(target: int | str, num_classes: int, labels: list[str] | None) -> int:
    """The class index ``target`` (an index, or a label of ``labels``) names, checked."""
    return _target_index(target, num_classes, labels)


def class_scores(loaded: "LoadedModel", output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, probabilities) of the model's raw ``output`` as its plugin defines them, read as the
    model's :class:`~attnexplain.scoring.Scoring` says (sigmoid, a single output's value, a contrast,
    a negated output): what every pass differentiates and the report shows."""
    logits, probabilities = loaded.plugin.class_scores(loaded.module, output)
    return loaded.scoring.apply(logits, probabilities, loaded.labels, model_task(loaded))


def model_task(loaded: "LoadedModel") -> str:
    """What the model does, as its plugin says (classification, detection, ...)."""
    try:
        return loaded.plugin.task(loaded.module)
    except Exception:  # a plugin's answer only decides how a single output is shown
        return "unknown"


def _target_index(target: int | str, num_classes: int, labels: list[str] | None) -> int:
    if isinstance(target, str):
        target = unquoted_target(target)
    if isinstance(target, str) and not target.strip().lstrip("-").isdigit():
        if labels is None:
            raise MethodError(
                f"Target {target!r} is a label, but the model has no class names; give a class index or --labels."
            )
        matches = [i for i, label in enumerate(labels) if label == target] or [
            i for i, label in enumerate(labels) if label.lower() == target.lower()
        ]
        if not matches:
            raise MethodError(f"No class is labelled {target!r}.")
        return matches[0]
    index = int(target)
    if not 0 <= index < num_classes:
        raise MethodError(
            f"Target class {index} is out of range: the model has {num_classes} classes (0-{num_classes - 1})."
        )
    return index


def top_predictions(
    probabilities: torch.Tensor, labels: list[str] | None, k: int, values: bool = False
) -> list[Prediction]:
    """The ``k`` best classes of (classes,) ``probabilities``; ``values``: they are a single
    output's value (:meth:`attnexplain.scoring.Scoring.shows_value`), reported as such."""
    probabilities = probabilities.float()
    if values:
        return [Prediction(0, _label(labels, 0), None, float(probabilities[0]))]
    # Stable sort: ties keep index order, so the top-1 agrees with argmax (the default target).
    ranked, indices = torch.sort(probabilities, descending=True, stable=True)
    ranked, indices = ranked[: max(k, 1)], indices[: max(k, 1)]
    return [Prediction(int(i), _label(labels, int(i)), float(v)) for v, i in zip(ranked, indices)]


def image_outcome(
    probabilities: torch.Tensor,
    target_index: int,
    labels: list[str] | None,
    top_k: int,
    target_given: bool,
    methods: Sequence[Any] | None = None,
    values: bool = False,
    threshold: float | None = None,
) -> tuple[Prediction, list[Prediction]]:
    """One image's explained target and top-k predictions from its (classes,) probabilities.

    A target the user asked for that has probability 0 (a segmentation class with no pixels, a
    class no box was detected as) is refused: its map would be empty; so is an image in which no
    class scores above 0 (a detector that found nothing), and one in which every class scores the
    same (:func:`uniform_scores`) where ``methods`` (default: any) map a class (:func:`explains_a_class`).
    ``values``: the model has a single output whose value ``probabilities`` hold (any value is one
    to explain). ``threshold`` (a multi-label model's): the predictions go on past the top-k to every
    class at or above it.
    """
    unusable = unusable_scores(probabilities)
    if unusable is not None:
        raise NonFiniteScores(unusable)
    if values:
        predictions = top_predictions(probabilities, labels, top_k, values=True)
        return predictions[0], predictions
    # != 0: a score may be negative (one text prompt's cosine similarity); all 0 is nothing found.
    if not bool((probabilities != 0).any()):
        raise NothingToExplain()
    uniform = uniform_scores(probabilities) if methods is None or explains_a_class(methods) else None
    if uniform is not None:  # whatever the target: every class's map would be rounding noise
        raise UniformScores(uniform)
    probability = float(probabilities[target_index])
    if target_given and probability == 0.0:
        name = _label(labels, target_index) or target_index
        raise MethodError(
            f"Class {name} is not in this image (its probability is 0), so there is nothing to explain for it."
        )
    predictions = top_predictions(probabilities, labels, top_k)
    if threshold is not None:
        predictions += present_labels(probabilities, labels, threshold)[len(predictions) :]
    return Prediction(target_index, _label(labels, target_index), probability), predictions


def present_labels(probabilities: torch.Tensor, labels: list[str] | None, threshold: float) -> list[Prediction]:
    """A multi-label model's (classes,) independent ``probabilities``: every class at or above
    ``threshold``, most probable first (what it says the image holds)."""
    above = int((probabilities.float() >= threshold).sum())
    return top_predictions(probabilities, labels, above)[:above]


def target_record(
    target: Prediction, labels: list[str] | None, versus: int | None = None, negative: bool = False
) -> dict[str, Any]:
    """The report's ``target``: the class explained and, for a contrast, the class (index) it is set
    against; ``explained`` says it in words ("cat rather than dog", "what lowers the output")."""
    record: dict[str, Any] = {"index": target.index, "label": target.label}
    if versus is not None:
        record["versus"] = {"index": versus, "label": _label(labels, versus)}
        record["explained"] = f"{_named(labels, target.index)} rather than {_named(labels, versus)}"
    elif negative:
        record["negative"] = True
        record["explained"] = "what lowers the output"
    else:
        record["explained"] = _named(labels, target.index)
    return record


def _named(labels: list[str] | None, index: int) -> str:
    label = _label(labels, index)
    return label if label is not None else f"class {index}"


def boxes_on_photo(
    detected: Detections,
    target_index: int,
    labels: list[str] | None,
    input_size: tuple[int, int],
    box: tuple[float, float, float, float],
    photo_size: tuple[int, int],
    explained_box: int | None = None,
) -> list[dict[str, Any]]:
    """A detector's boxes in the photo's pixels, best first, for drawing and for the report.

    ``box`` is the region of the photo the model's input covers (beyond the photo where it was
    letterboxed: boxes are clipped to the photo's ``photo_size``, (width, height)). The box explained for
    ``target_index`` is that class's highest-scoring one (how a detector's plugin scores a class)
    and is marked ``explained``, unless ``explained_box`` (an index into ``detected``, as a
    ``box:N`` target chose it) names another.
    """
    left, top, right, bottom = box
    scale_x, scale_y = (right - left) / input_size[1], (bottom - top) / input_size[0]
    order = torch.argsort(detected.scores, descending=True, stable=True).tolist()
    of_target = [i for i in order if int(detected.labels[i]) == target_index]
    explained = explained_box if explained_box is not None else (of_target[0] if of_target else None)
    boxes = []
    for i in order:
        x0, y0, x1, y1 = (float(v) for v in detected.boxes[i])
        label_index = int(detected.labels[i])
        xs = [round(min(max(left + x * scale_x, 0.0), photo_size[0]), 2) for x in (x0, x1)]
        ys = [round(min(max(top + y * scale_y, 0.0), photo_size[1]), 2) for y in (y0, y1)]
        boxes.append(
            {
                "box": [xs[0], ys[0], xs[1], ys[1]],
                "index": label_index,
                "label": _label(labels, label_index),
                "score": float(detected.scores[i]),
                "explained": i == explained,
            }
        )
    return boxes


def _label(labels: list[str] | None, index: int) -> str | None:
    return labels[index] if labels is not None and index < len(labels) else None
