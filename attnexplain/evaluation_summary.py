"""What evaluation.json holds: the run's totals built from its per-image records and its running
sums of the curves.

Per method and value a mean with its bootstrap interval, the verdict (:mod:`attnexplain.verdict`),
the mean deletion and insertion curves with the random map's band, and the randomization check's
curves and verdict per method. Records may come from an earlier run's log (``--resume``): the
randomization entries are checked before they are averaged, and NaN is never averaged as 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .metrics import BETTER, METRIC_VALUES, RANDOM_MAP
from .randomization import (
    RANDOMIZATION_EARLY_STEPS,
    RANDOMIZATION_LIMIT,
    SIMILARITIES,
    cascade_steps,
    judged_similarity,
    randomization_scores,
    randomization_verdict,
)
from .verdict import bootstrap_interval, judge, verdict_text


def rounded(value) -> float:
    """A number as evaluation.json and the CSV hold it: six decimals."""
    return round(float(value), 6) + 0.0  # + 0.0: never a -0.0 in evaluation.json or the CSV


# --- the running sums of the curves --------------------------------------------------------------


@dataclass
class CurveSums:
    """Running sums of the per-step curves, per method (memory flat in the number of images)."""

    deletion: dict[str, np.ndarray] = field(default_factory=dict)
    insertion: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    fractions: np.ndarray | None = None
    squares: dict[str, np.ndarray] = field(default_factory=dict)  # "which:method" → sum of squares

    def add(self, which: str, method: str, per_image: np.ndarray) -> None:
        """Add (images, points) curves."""
        table = getattr(self, which)
        table[method] = table.get(method, 0) + per_image.sum(axis=0)
        key = f"{which}:{method}"
        self.counts[key] = self.counts.get(key, 0) + per_image.shape[0]
        self.squares[key] = self.squares.get(key, 0) + np.square(per_image.astype(np.float64)).sum(axis=0)

    def band(self, which: str, method: str) -> list[list[float]]:
        """Per point, the 95% interval of the mean curve (normal approximation): the page draws the
        random map's, so a method's mean curve can be seen inside or outside chance."""
        key = f"{which}:{method}"
        if key not in self.counts or self.counts[key] < 2:
            return []
        count = self.counts[key]
        mean = getattr(self, which)[method] / count
        spread = np.sqrt(np.maximum(self.squares[key] / count - mean**2, 0) * count / (count - 1))
        half = 1.96 * spread / math.sqrt(count)
        # A probability's curve: the band stays within [0, 1] where the approximation would leave it.
        return [
            [round(float(low), 6), round(float(high), 6)]
            for low, high in zip(np.clip(mean - half, 0, 1), np.clip(mean + half, 0, 1))
        ]

    def means(self, which: str) -> dict[str, list[float]]:
        return {
            method: [round(float(v), 6) for v in total / self.counts[f"{which}:{method}"]]
            for method, total in getattr(self, which).items()
        }


def add_curves(sums: CurveSums, curves: dict[str, Any]) -> None:
    """One image's curves (``{"deletion": {"<method>": [...]}, ...}``) into the run's running sums."""
    for which in ("deletion", "insertion"):
        for name, values in curves.get(which, {}).items():
            sums.add(which, name, np.asarray([values], dtype=np.float64))
    if "fractions" in curves:
        sums.fractions = np.asarray(curves["fractions"], dtype=np.float64)


# --- the summary ---------------------------------------------------------------------------------


def summarize(
    loaded, plan, names, metrics, settings, records, sums, examples, wall_s, input_specs, left_out: dict[str, str]
):
    """The evaluation of a run: what evaluation.json holds (``records`` in the run's order, ``sums``
    its :class:`CurveSums`), plus ``examples`` for the page."""
    from .report import versions

    ok = [r for r in records if r["status"] == "ok"]
    value_names = [value for group in metrics for value in METRIC_VALUES[group]]
    methods = method_summaries(ok, names, value_names, settings.metric_settings.seed)
    randomization = (
        randomization_summary(
            records,
            names,
            [label for label, _ in cascade_steps(loaded.module, settings.metric_settings.randomization_steps)],
        )
        if "randomization" in metrics
        else None
    )
    failing = [name for name, found in (randomization or {}).get("methods", {}).items() if found["verdict"] == "fails"]
    judgement = judge(ok, names, value_names, failing, settings.metric_settings.seed)
    fractions = sums.fractions
    evaluation = {
        "model": loaded.describe(),
        "inputs": input_specs,
        "settings": {
            "methods": names[:-1],
            "left_out": left_out,
            "metrics": metrics,
            "layers": plan.layers,
            "target": settings.target,
            "preprocessing": plan.preprocessing.as_dict(),
            **settings.metric_settings.as_dict(),
            "randomization_limit": RANDOMIZATION_LIMIT,
            "randomization_early_steps": RANDOMIZATION_EARLY_STEPS,
            "better": {metric: ("higher" if BETTER[metric] > 0 else "lower") for metric in value_names},
        },
        "versions": versions(),
        "images": image_totals(records, ok),
        "methods": methods,
        "ranking": judgement.ranking,
        **judgement.as_dict(),
        "randomization_failed": failing,
        "randomization": randomization,
        "verdict": verdict_text(judgement, "randomization" in metrics),
        "curves": {
            "fractions": [round(float(f), 6) for f in fractions] if fractions is not None else [],
            "deletion": sums.means("deletion"),
            "insertion": sums.means("insertion"),
            "random_band": {
                which: sums.band(which, RANDOM_MAP)
                for which in ("deletion", "insertion")
                if RANDOM_MAP in getattr(sums, which)
            },
            "randomization": {
                name: found["curves"]["judged"] for name, found in (randomization or {}).get("methods", {}).items()
            },
        },
        "per_image": records,
        "wall_s": round(wall_s, 3),
    }
    return {**evaluation, "examples": examples}


def method_summaries(ok, names, value_names, seed: int) -> dict[str, dict[str, Any]]:
    """Per method of ``names``, per value measured, its mean over the ``ok`` records with its
    bootstrap interval and the number of images that gave it."""
    methods: dict[str, dict[str, Any]] = {}
    for name in names:
        summary = {}
        for metric in value_names:
            column = [r["metrics"][name][metric] for r in ok if metric in r["metrics"].get(name, {})]
            if column:
                low, high = bootstrap_interval(column, seed)
                summary[metric] = {
                    "mean": rounded(np.mean(column)),
                    "ci95": [rounded(low), rounded(high)],
                    "images": len(column),
                }
        methods[name] = summary
    return methods


def randomization_summary(records, names, steps: list[str]) -> dict[str, Any]:
    """The randomization check over the images that had it: per method its mean curve of each
    measure (null where no image gave a value; NaN is never averaged as 0), its score and verdict
    (:func:`~attnexplain.randomization.randomization_verdict`: a method no image could measure fails, a
    similarity that cannot be measured never counts as a pass). Records are
    untrusted (``--resume``): an entry that is not a list per measure of one number or null per step,
    each in [-1, 1], is left out."""
    from .evaluation_log import randomization_curves_fit

    per_method: dict[str, dict[str, list]] = {name: {measure: [] for measure in SIMILARITIES} for name in names}
    for record in records:
        entry = record.get("randomization") if record.get("status") == "ok" else None
        if not isinstance(entry, dict):
            continue
        for name in names:
            curves = entry.get(name)
            if randomization_curves_fit(curves, len(steps)):
                for measure in SIMILARITIES:
                    per_method[name][measure].append([math.nan if v is None else float(v) for v in curves[measure]])
    methods = {}
    for name in names:
        found = {
            measure: np.array(rows, dtype=np.float64).reshape(len(rows), len(steps))
            for measure, rows in per_method[name].items()
        }
        head, early = randomization_scores(found, RANDOMIZATION_EARLY_STEPS)
        score, fails = randomization_verdict(head, early)
        verdict = "chance level" if name == RANDOM_MAP else "fails" if fails else "passes"
        methods[name] = {
            "score": None if score is None else rounded(score),
            "images": int((np.isfinite(head) & np.isfinite(early)).sum()),
            "verdict": verdict,
            "curves": {
                measure: _nan_mean_curve(values)
                for measure, values in (*found.items(), ("judged", judged_similarity(found)))
            },
        }
    images = sum(
        1 for record in records if record.get("status") == "ok" and isinstance(record.get("randomization"), dict)
    )
    return {
        "steps": steps,
        "early_steps": RANDOMIZATION_EARLY_STEPS,
        "limit": RANDOMIZATION_LIMIT,
        "images": images,
        "methods": methods,
    }


def _nan_mean_curve(values: np.ndarray) -> list[float | None]:
    """Per step the mean of the images' finite values, null where there is none."""
    counts = np.isfinite(values).sum(axis=0)
    sums = np.where(np.isfinite(values), values, 0.0).sum(axis=0)
    return [rounded(total / count) if count else None for total, count in zip(sums, counts)]


def image_totals(records: Sequence[dict[str, Any]], ok: Sequence[dict[str, Any]]) -> dict[str, int]:
    """evaluation.json's ``images``: how many were given, measured, failed, and measured without
    their masks (``ok``: the records measured)."""
    return {
        "total": len(records),
        "ok": len(ok),
        "failed": len(records) - len(ok),
        "mask_errors": sum(1 for r in ok if "mask_error" in r),
    }
