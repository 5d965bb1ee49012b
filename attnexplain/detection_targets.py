"""A detector's explained box: which detected box a map explains, its score, and the row of the
recorded attention its object query is.

A class target (the default top class, ``--target LABEL``) explains that class's best box, which is
how a detector's plugin scores a class (:meth:`~attnexplain.plugins.ModelPlugin.class_scores`).
``--target box:N`` explains the N-th box by score whatever its class: the target class becomes that
box's label and the score differentiated becomes that box's own
(:meth:`~attnexplain.plugins.ModelPlugin.box_scores`), which differs from its class's score when a
better box has the same label.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import MethodError
from .plugins import Detections
from .results import Prediction


@dataclass(frozen=True)
class ExplainedBoxes:
    """Per image, the index of the explained box among its detections (None: none), and why an
    image has no box ``box:N`` (None where it has one)."""

    indices: list[int | None]
    refusals: list[str | None]
    rank: int | None  # N of box:N; None for a class target

    def queries(self, detections: Sequence[Detections]) -> torch.Tensor | None:
        """(B,) the attention row (object query) of each image's explained box, when the boxes are
        queries; 0 for an image without a box (its outcome refuses it)."""
        if any(detected.queries is None for detected in detections):
            return None
        rows = [
            int(detected.queries[index]) if index is not None else 0  # type: ignore[index]
            for detected, index in zip(detections, self.indices)
        ]
        return torch.tensor(rows, dtype=torch.long)


def in_input_pixels(detections: list[Detections], input_size: tuple[int, int]) -> list[Detections]:
    """Boxes a plugin gave in shares of the input (``relative``) scaled to its pixels."""
    height, width = input_size
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    return [
        dataclasses.replace(detected, boxes=detected.boxes.float() * scale, relative=False)
        if detected.relative
        else detected
        for detected in detections
    ]


def best_first(detected: Detections) -> list[int]:
    """The boxes' indices by score, best first; ties keep the plugin's order (as the report's)."""
    return torch.argsort(detected.scores, descending=True, stable=True).tolist()


def choose_boxes(detections: list[Detections], rank: int | None, targets: torch.Tensor) -> ExplainedBoxes:
    """Each image's explained box: the N-th by score for ``box:N`` (``rank``), else the best box of
    its target class. ``targets`` (B,) is updated in place to a ``box:N`` box's label."""
    indices: list[int | None] = []
    refusals: list[str | None] = []
    for image, detected in enumerate(detections):
        order = best_first(detected)
        if rank is None:
            of_target = [i for i in order if int(detected.labels[i]) == int(targets[image])]
            indices.append(of_target[0] if of_target else None)
            refusals.append(None)
        elif rank < len(order):
            indices.append(order[rank])
            targets[image] = int(detected.labels[order[rank]])
            refusals.append(None)
        else:
            indices.append(None)
            last = f" (box:0-box:{len(order) - 1})" if order else ""
            refusals.append(
                f"Target box:{rank} is out of range: the model detected {len(order)} boxes in this image{last}."
            )
    return ExplainedBoxes(indices, refusals, rank)


def box_target_scores(
    logits: torch.Tensor, box_scores: list[torch.Tensor] | None, chosen: ExplainedBoxes, targets: torch.Tensor
) -> torch.Tensor:
    """(B, classes) scores whose target column is each image's ``box:N`` box's own score (the
    class's score is its best box's, which may be another box of the same label)."""
    if chosen.rank is None:
        return logits
    if box_scores is None:
        raise MethodError(
            f"Target box:{chosen.rank}: this model's plugin does not score its boxes one by one; use --target LABEL."
        )
    scores = logits.clone()
    for image, index in enumerate(chosen.indices):
        if index is not None:
            scores[image, int(targets[image])] = box_scores[image][index].to(scores.dtype)
    return scores


def refuse_box_target(rank: int | None, families: Sequence[str], aug_smooth: bool) -> None:
    """``box:N`` names a box of one forward of the image: methods that run the model on changed
    inputs (perturbation, integrated gradients, augmentations) see other boxes, so they are refused."""
    if rank is None:
        return
    if "input" in families or aug_smooth:
        what = "--aug-smooth" if aug_smooth else "input-attribution methods (saliency, occlusion, RISE, ...)"
        raise MethodError(
            f"Target box:{rank} is one box of this image's forward; {what} run the model on changed "
            f"inputs, whose boxes are others. Use --target LABEL (its best box) or a CAM or attention method."
        )


def refuse_box_metrics(rank: int | None, rerunning: Sequence[str]) -> None:
    """``box:N`` under ``evaluate``: the metrics in ``rerunning`` (deletion, insertion, ROAD, drop,
    the randomization check) run the model on changed inputs or weights, whose N-th box is another
    object, so only localisation against box N's object is measured."""
    if rank is None or not rerunning:
        return
    raise MethodError(
        f"Target box:{rank} is one box of this image's forward; {', '.join(rerunning)} run the model on "
        f"changed inputs or weights, whose boxes are others. With box:N give --metrics pointing,mass,rank "
        f"(against that box's object's mask), or --target LABEL (its best box on each input)."
    )


def no_boxes(rank: int) -> MethodError:
    return MethodError(
        f"Target box:{rank} picks a detected box, but this model is not a detector (it returns no boxes); "
        f"give a class index or label."
    )


def query_rows(attentions: list[torch.Tensor], queries: torch.Tensor) -> list[torch.Tensor]:
    """(B, heads, 1, keys): each image's explained query's row of each (B, heads, queries, keys)
    layer, so that the attention maps read that box's query."""
    return [
        attention[torch.arange(len(queries), device=attention.device), :, queries.to(attention.device)][:, :, None]
        for attention in attentions
    ]


def box_outcome(
    chosen: ExplainedBoxes | None, detections: list[Detections] | None, image: int, target: Prediction
) -> tuple[Prediction, int | None]:
    """An image's target as the report shows it, with the index of its explained box: a ``box:N``
    target's probability is that box's own score. Refused (one line) when the image has no box N."""
    if chosen is None or detections is None:
        return target, None
    refusal = chosen.refusals[image]
    if refusal is not None:
        raise MethodError(refusal)
    index = chosen.indices[image]
    if chosen.rank is not None and index is not None:
        target = dataclasses.replace(target, prob=float(detections[image].scores[index]))
    return target, index
