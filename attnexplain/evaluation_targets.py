"""``evaluate`` of several targets at once (``--target cat,dog``: a multi-label model's labels, a
CLIP model's prompts): each target's maps are measured against that target, its own score for the
perturbation metrics and its own object's mask for localisation
(``MASKS/<image>/<label>.png``, :func:`attnexplain.evaluation_masks.object_masks`).

An image's record keeps one column per method and target, ``"<method>@<label>"`` (as ``run`` keys
its maps), the random map's included (``"random@cat"``: the chance level of that target's score).
The totals are given twice: per label (``by_label``: each method's means over the images, for that
label), and over every (image, label) pair (``methods``, the ranking and the verdict: a method is
judged on all the labels at once, each pair a unit, against the random map of the same pair).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .errors import MethodError
from .evaluation_summary import CurveSums, method_summaries
from .metrics import METRIC_VALUES


def column(method: str, key: str) -> str:
    """The record's column of ``method``'s map of the target ``key`` (its label)."""
    return f"{method}@{key}"


def target_keys(
    targets: Sequence[int | str], labels: Sequence[str] | None, versus: int | str | None = None
) -> list[str]:
    """The column key of each of ``targets`` (each checked): its label, or its index where the model
    has no class names. A class named twice is refused (its columns would be one), and so is a
    contrast with one of them (``versus``: its maps would be 0), before any image is read."""
    from .targets import target_index

    keys = []
    for target in targets:
        if labels is not None:
            keys.append(labels[target_index(target, len(labels), list(labels))])
        elif isinstance(target, int) or str(target).strip().lstrip("-").isdigit():
            keys.append(str(int(target)))
        else:
            raise MethodError(
                f"Target {target!r} is a label, but the model has no class names; give a class index or --labels."
            )
    repeated = next((key for key in keys if keys.count(key) > 1), None)
    if repeated is not None:
        raise MethodError(f"The class {repeated!r} is named twice among the targets; name each once.")
    if versus is not None and target_keys([versus], labels)[0] in keys:
        raise MethodError(
            f"--versus {versus!r} is one of the targets: a class's score less its own is 0, so there is "
            f"nothing to explain; give another --versus, or leave it out of --target."
        )
    return keys


def target_columns(names: Sequence[str], keys: Sequence[str]) -> list[str]:
    """Every column of a run: per target, each method's and the random map's (``names``)."""
    return [column(name, key) for key in keys for name in names]


def merged_metrics(parts: Sequence[tuple[dict[str, Any], dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (values, curves) of a chunk, as :func:`attnexplain.evaluation._chunk_metrics` gives them,
    of each target in turn, joined along the methods' axis in the targets' order (the columns of
    :func:`target_columns`). An image's mask errors are joined, each said once."""
    import torch

    values = {name: torch.cat([part[0][name] for part in parts], dim=1) for name in parts[0][0]}
    first = parts[0][1]
    curves: dict[str, Any] = {}
    for which in ("deletion", "insertion"):
        if which in first:
            curves[which] = np.concatenate([part[1][which] for part in parts], axis=1)
    if "fractions" in first:
        curves["fractions"] = first["fractions"]
    if "mask_errors" in first:
        errors: dict[int, list[str]] = {}
        for _, part in parts:
            for image, error in part["mask_errors"].items():
                if error not in errors.setdefault(image, []):
                    errors[image].append(error)
        curves["mask_errors"] = {image: " ".join(texts) for image, texts in errors.items()}
    if "randomization" in first:
        curves["randomization"] = {
            measure: np.concatenate([part[1]["randomization"][measure] for part in parts], axis=1)
            for measure in first["randomization"]
        }
    return values, curves


def pooled_records(
    records: Sequence[dict[str, Any]], names: Sequence[str], keys: Sequence[str]
) -> list[dict[str, Any]]:
    """One row per (image, target) of the ``ok`` records, its metrics (and randomization curves)
    under the methods' own ``names``: what the overall totals, ranking and verdict are made of."""
    rows = []
    for record in records:
        if record.get("status") != "ok":
            continue
        for key in keys:
            row = {
                "image": record["image"],
                "status": "ok",
                "label": key,
                "metrics": {name: record["metrics"].get(column(name, key), {}) for name in names},
            }
            randomization = record.get("randomization")
            if isinstance(randomization, dict):
                row["randomization"] = {
                    name: randomization[column(name, key)] for name in names if column(name, key) in randomization
                }
            rows.append(row)
    return rows


def pooled_sums(sums: CurveSums, names: Sequence[str], keys: Sequence[str]) -> CurveSums:
    """The running sums of the curves of every target's column of a method, as that method's."""
    pooled = CurveSums(fractions=sums.fractions)
    for which in ("deletion", "insertion"):
        table = getattr(sums, which)
        for name in names:
            for key in keys:
                own = column(name, key)
                if own not in table:
                    continue
                getattr(pooled, which)[name] = getattr(pooled, which).get(name, 0) + table[own]
                for total in ("counts", "squares"):
                    found = getattr(pooled, total)
                    found[f"{which}:{name}"] = found.get(f"{which}:{name}", 0) + getattr(sums, total)[f"{which}:{own}"]
    return pooled


def labelled_evaluation(
    summarize_pooled, records: list[dict[str, Any]], sums: CurveSums, names, keys, metrics, seed: int
) -> dict[str, Any]:
    """The evaluation of a run of several targets: ``summarize_pooled(rows, sums)`` (the summary of
    :func:`attnexplain.evaluation_summary.summarize` with the rest of its arguments given) of the
    (image, target) rows, with the images' own records and counts, and ``by_label``: per target,
    per method, each value's mean over the images with its interval."""
    ok = [record for record in records if record["status"] == "ok"]
    rows = pooled_records(records, names, keys)
    evaluation = summarize_pooled(rows, pooled_sums(sums, names, keys))
    value_names = [value for group in metrics for value in METRIC_VALUES[group]]
    evaluation["per_image"] = records
    evaluation["images"] = {
        "total": len(records),
        "ok": len(ok),
        "failed": len(records) - len(ok),
        "mask_errors": sum(1 for record in ok if "mask_error" in record),
    }
    evaluation["settings"]["targets"] = list(keys)
    # The verdict counts (image, target) pairs as its images: said so.
    evaluation["verdict"] += f" (Counted per (image, target) pair: {len(rows)} pairs.)"
    evaluation["by_label"] = {
        key: method_summaries([row for row in rows if row["label"] == key], names, value_names, seed) for key in keys
    }
    return evaluation


def by_label_lines(evaluation: dict[str, Any]) -> list[str]:
    """What the terminal says of each target of a run of several (none for a run of one): per
    label, each method's means."""
    from .evaluation_report import shown_metrics, shown_number

    found = evaluation.get("by_label")
    if not found:
        return []
    shown = shown_metrics(evaluation)
    lines = [
        f"{len(found)} targets, each measured against its own score and object; above, every (image, target) "
        f"pair together. Per target:"
    ]
    for key, methods in found.items():
        parts = [
            f"{method} "
            + ", ".join(
                f"{display['label']} {shown_number(summary[metric]['mean'], display['sign'])}"
                for metric, display in shown.items()
                if metric in summary
            )
            for method, summary in methods.items()
        ]
        lines.append(f"  {key}: " + "; ".join(parts))
    return lines
