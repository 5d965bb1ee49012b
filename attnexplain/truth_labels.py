"""What ``batch --truth`` says of a multi-label run (a ``cat;dog`` truth cell, or a model with a
sigmoid per class): a confusion table of one true class against one predicted class has no cell for
an image that holds two, so each label is counted on its own, as a detector's or a tagger's scores
are: per label, the images that hold it and are said to (true positives), that are said to but do not
(false positives) and that hold it but are not said to (false negatives), with its precision and
recall; and over all labels, the micro-averaged precision and recall (every decision counted once).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Sequence


def label_counts(images: Iterable[tuple[Sequence[str], Sequence[str]]]) -> dict[str, Any]:
    """Per label, and over all, the counts of the (true labels, predicted labels) of ``images``:
    ``{"labels": {label: {"images", "true_positives", "false_positives", "false_negatives",
    "precision", "recall"}}, "precision": ..., "recall": ...}``; a precision or recall with nothing
    to divide by is None."""
    counts: dict[str, Counter] = {}
    for truth, predicted in images:
        true_set, predicted_set = set(truth), set(predicted)
        for label in true_set | predicted_set:
            found = counts.setdefault(label, Counter())
            found["images"] += label in true_set
            found["true_positives"] += label in true_set and label in predicted_set
            found["false_positives"] += label in predicted_set and label not in true_set
            found["false_negatives"] += label in true_set and label not in predicted_set
    labels = {
        label: _with_rates(found)
        for label, found in sorted(counts.items(), key=lambda item: (-item[1]["images"], item[0]))
    }
    total = sum(counts.values(), Counter())
    overall = _with_rates(total)
    return {"labels": labels, "precision": overall["precision"], "recall": overall["recall"]}


def _with_rates(found: Counter) -> dict[str, Any]:
    right, said, held = (
        found["true_positives"],
        found["true_positives"] + found["false_positives"],
        found["true_positives"] + found["false_negatives"],
    )
    return {
        **{key: found[key] for key in ("images", "true_positives", "false_positives", "false_negatives")},
        "precision": round(right / said, 6) if said else None,
        "recall": round(right / held, 6) if held else None,
    }
