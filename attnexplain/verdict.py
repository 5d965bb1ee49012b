"""The verdict of ``evaluate``: which method's maps to believe on these images, and how sure to be.

Every comparison is **paired**: two methods (or a method and the random map) are compared image by
image, and the bootstrap resamples images, so both sides of a difference always come from the same
images. A method is named most faithful only where the 95% interval of its difference with every
other candidate excludes zero; a metric that separates no method from the random map on these
images (saturated, as RISE's blur-baseline insertion on an easy model) is flagged and left out of
the ranking score. A method that fails the randomization check is never recommended.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .metrics import BETTER, RANDOM_MAP

BOOTSTRAP_SAMPLES = 1000
#: The ranking score is made by the first tier that has an informative metric: the per-image sum of
#: its informative metrics, each signed so that higher is better (insertion − deletion as RISE
#: compares methods; deletion alone where insertion is saturated).
SCORE_TIERS: tuple[tuple[str, ...], ...] = (("insertion", "deletion"), ("road",), ("avg_drop",))
#: Not compared with the random map: the randomization check has its own limit and the random map's
#: own value there is a chance level of a different question.
NOT_AGAINST_RANDOM = ("randomization",)


def bootstrap_interval(values: Sequence[float], seed: int = 0, samples: int = BOOTSTRAP_SAMPLES) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean."""
    data = np.asarray(values, dtype=np.float64)
    if data.size < 2:
        return (float(data.mean()), float(data.mean())) if data.size else (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(samples, data.size))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


@dataclass(frozen=True)
class Difference:
    """Mean per-image difference first − second, its paired 95% interval, on ``images`` images."""

    mean: float
    low: float
    high: float
    images: int

    @property
    def separates(self) -> bool:
        """The interval excludes zero (two images at least: one image proves nothing)."""
        return self.images >= 2 and (self.low > 0 or self.high < 0)

    def as_dict(self) -> dict[str, Any]:
        if not self.images:  # no image has both values: nothing to say (and no NaN in the JSON)
            return {"difference": None, "ci95": None, "images": 0}
        return {
            "difference": _rounded(self.mean),
            "ci95": [_rounded(self.low), _rounded(self.high)],
            "images": self.images,
        }


def paired_difference(
    first: np.ndarray, second: np.ndarray, seed: int = 0, samples: int = BOOTSTRAP_SAMPLES
) -> Difference:
    """``first`` − ``second``, two per-image arrays aligned on the same images (NaN where a value is
    missing: those images are left out of this pair), with the bootstrap interval of the mean
    difference: each resample draws images, and both values of a drawn image come with it."""
    both = np.isfinite(first) & np.isfinite(second)
    differences = (np.asarray(first, np.float64) - np.asarray(second, np.float64))[both]
    if differences.size == 0:
        return Difference(math.nan, math.nan, math.nan, 0)
    low, high = bootstrap_interval(differences, seed, samples)
    return Difference(float(differences.mean()), low, high, int(differences.size))


def _intervals_apart(first: np.ndarray, second: np.ndarray, seed: int) -> bool:
    """Whether the 95% intervals of the two means do not overlap. A saturated metric (RISE's blurred
    insertion on an easy model: 0.994 for every method, 0.986 for the random map on the sample ResNet)
    can still show a paired difference on 50 images, of a size no ranking should rest on: a metric
    informs only where a method is apart from the random map by both tests."""
    first, second = first[np.isfinite(first)], second[np.isfinite(second)]
    if first.size < 2 or second.size < 2:
        return False
    low_first, high_first = bootstrap_interval(first, seed)
    low_second, high_second = bootstrap_interval(second, seed)
    return high_first < low_second or high_second < low_first


def per_image(records: Sequence[dict[str, Any]], method: str, metric: str) -> np.ndarray:
    """One value per record (NaN where the record has none), aligned across methods and metrics."""
    return np.array([record["metrics"].get(method, {}).get(metric, math.nan) for record in records], dtype=np.float64)


def faithfulness(records: Sequence[dict[str, Any]], method: str, parts: Sequence[str]) -> np.ndarray:
    """Per-image ranking score of ``method``: the sum of ``parts``, each signed so that higher is
    better; NaN for an image that lacks one of them (and everywhere when ``parts`` is empty)."""
    if not parts:
        return np.full(len(records), math.nan)
    return sum(BETTER[metric] * per_image(records, method, metric) for metric in parts)


def score_parts(informative: Sequence[str]) -> list[str]:
    """The metrics that make the ranking score: the informative ones of the first tier that has one."""
    for tier in SCORE_TIERS:
        parts = [metric for metric in tier if metric in informative]
        if parts:
            return parts
    return []


def score_formula(parts: Sequence[str]) -> str:
    """The score as a reader writes it: ``insertion − deletion``, ``−deletion``, ``road``."""
    text = ""
    for metric in parts:
        sign = "−" if BETTER[metric] < 0 else ("+" if text else "")
        text += f" {sign} {metric}" if text else f"{sign}{metric}"
    return text


@dataclass
class Judgement:
    """What the verdict rests on (all of it goes into evaluation.json)."""

    images: int
    measured: list[str]  # the metrics judged against the random map
    uninformative: list[str]
    against_random: dict[str, dict[str, Difference]]  # metric → method → method − random map
    parts: list[str]  # the ranking score's metrics
    ranking: list[dict[str, Any]]
    pairwise: dict[tuple[str, str], Difference]  # (higher-ranked, lower-ranked) → their difference
    candidates: list[str]  # may be recommended: a finite score and not failing randomization
    winner: str | None
    tied: list[str]  # with the best candidate: no difference on these images
    agreement: dict[str, Any] | None
    failing: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "score": {"metrics": self.parts, "formula": score_formula(self.parts) or None},
            "uninformative": self.uninformative,
            "against_random": {
                metric: {method: difference.as_dict() for method, difference in by_method.items()}
                for metric, by_method in self.against_random.items()
            },
            "pairwise": [
                {"method": first, "other": second, **difference.as_dict()}
                for (first, second), difference in self.pairwise.items()
            ],
            "winner": self.winner,
            "no_difference": self.tied if self.winner is None else [],
            "agreement": self.agreement,
        }


def judge(
    records: Sequence[dict[str, Any]],
    names: Sequence[str],
    value_names: Sequence[str],
    failing: Sequence[str],
    seed: int = 0,
) -> Judgement:
    """Rank ``names`` (the methods and the random map) on the ``ok`` per-image ``records``.

    ``value_names`` are the metric values measured; ``failing`` the methods that fail the
    randomization check (never candidates)."""
    methods = [name for name in names if name != RANDOM_MAP]
    measured = [metric for metric in value_names if metric not in NOT_AGAINST_RANDOM]
    against_random: dict[str, dict[str, Difference]] = {}
    uninformative = []
    for metric in measured:
        chance = per_image(records, RANDOM_MAP, metric)
        # Signed so that a positive difference means better than the random map.
        against_random[metric] = {
            method: paired_difference(
                BETTER[metric] * per_image(records, method, metric), BETTER[metric] * chance, seed
            )
            for method in methods
        }
        # On fewer than two images nothing separates: that is too few to judge, not a saturated metric.
        measured_on = max((difference.images for difference in against_random[metric].values()), default=0)
        if measured_on >= 2 and not any(
            difference.separates and _intervals_apart(per_image(records, method, metric), chance, seed)
            for method, difference in against_random[metric].items()
        ):
            uninformative.append(metric)
    informative = [metric for metric in measured if metric not in uninformative]
    parts = score_parts(informative)
    scores = {name: faithfulness(records, name, parts) for name in names}

    rows = []
    for name in names:
        finite = scores[name][np.isfinite(scores[name])]
        low, high = bootstrap_interval(finite, seed) if finite.size else (math.nan, math.nan)
        rows.append(
            {
                "method": name,
                "faithfulness": _rounded(finite.mean()) if finite.size else None,
                "ci95": [_rounded(low), _rounded(high)] if finite.size else None,
                "images": int(finite.size),
            }
        )
    rows.sort(key=lambda row: -math.inf if row["faithfulness"] is None else -row["faithfulness"])
    order = [row["method"] for row in rows]
    pairwise = {
        (first, second): paired_difference(scores[first], scores[second], seed)
        for i, first in enumerate(order)
        for second in order[i + 1 :]
        if np.isfinite(scores[first]).any() and np.isfinite(scores[second]).any()
    }

    candidates = [name for name in order if name in methods and name not in failing and np.isfinite(scores[name]).any()]
    winner, tied = None, []
    if candidates:
        best = candidates[0]
        tied = [best] + [other for other in candidates[1:] if not pairwise[(best, other)].separates]
        if len(tied) == 1:
            winner = best
    return Judgement(
        images=len(records),
        measured=measured,
        uninformative=uninformative,
        against_random=against_random,
        parts=parts,
        ranking=rows,
        pairwise=pairwise,
        candidates=candidates,
        winner=winner,
        tied=tied,
        agreement=metric_agreement(records, methods, informative),
        failing=list(failing),
    )


def metric_agreement(
    records: Sequence[dict[str, Any]], methods: Sequence[str], metrics: Sequence[str]
) -> dict[str, Any] | None:
    """How far the metrics agree on the order of the methods: Kendall's τ (τ-b, ties allowed)
    between every two metrics' rankings of the methods by their means, each signed so that higher is
    better (1: the same order, −1: reversed). None with fewer than two metrics or methods."""
    from scipy.stats import kendalltau

    means = {
        metric: {
            method: float(np.nanmean(values))
            for method in methods
            if np.isfinite(values := per_image(records, method, metric)).any()
        }
        for metric in metrics
    }
    pairs = []
    for i, first in enumerate(metrics):
        for second in metrics[i + 1 :]:
            shared = [method for method in methods if method in means[first] and method in means[second]]
            if len(shared) < 2:
                continue
            tau = kendalltau(
                [BETTER[first] * means[first][m] for m in shared], [BETTER[second] * means[second][m] for m in shared]
            ).statistic
            pairs.append(
                {
                    "metrics": [first, second],
                    "tau": _rounded(tau) if math.isfinite(tau) else None,
                    "methods": len(shared),
                }
            )
    finite = [pair["tau"] for pair in pairs if pair["tau"] is not None]
    if not finite:
        return None
    return {"pairs": pairs, "mean_tau": _rounded(float(np.mean(finite)))}


def _listed(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def verdict_text(judgement: Judgement, randomization_checked: bool) -> str:
    """The one line the terminal and the page lead with."""
    images = f"{judgement.images} image" + ("" if judgement.images == 1 else "s")
    if not judgement.images:
        return "No image was measured."
    if not judgement.parts:
        flagged = [metric for tier in SCORE_TIERS for metric in tier if metric in judgement.uninformative]
        if flagged:
            text = (
                f"No ranking metric separates any method from the random map on these {images} "
                f"({', '.join(flagged)} uninformative): no method is recommended."
            )
        else:
            text = f"No faithfulness metric was measured on {images}."
    elif not judgement.candidates:
        text = f"No method can be recommended on these {images}"
        text += ": every one fails the randomization check." if judgement.failing else "."
    elif judgement.winner is not None:
        text = f"Most faithful on these {images}: {judgement.winner}"
        versus = judgement.pairwise.get((judgement.winner, RANDOM_MAP))
        if versus is None or not versus.separates or versus.mean <= 0:
            text += " (but no better than a random map)"
        text += "."
    else:
        text = f"No single winner: {_listed(judgement.tied)}: no difference on {images}."
    if judgement.parts:
        text += f" Ranked by {score_formula(judgement.parts)}"
        if judgement.uninformative:
            text += (
                f"; uninformative on these images (no method separates from the random map): "
                f"{', '.join(judgement.uninformative)}"
            )
        text += "."
    if randomization_checked:
        text += (
            f" Never recommended, they fail the randomization check: {', '.join(judgement.failing)}."
            if judgement.failing
            else " Every method passes the randomization check."
        )
    elif judgement.candidates:
        text += " The randomization check was not run: a method it would reject may lead."
    return text


def _rounded(value: float) -> float:
    return round(float(value), 6) + 0.0  # + 0.0: never a negative zero in evaluation.json
