"""evaluation.jsonl: ``evaluate``'s line per image, written as each image is measured, and what
``--resume`` reuses of it.

Each line is an image's record as evaluation.json shows it, plus what rebuilds the run's totals
without the image (its key and its curves). The file is written with :class:`attnexplain.records.
ResultsLog` (one flushed line per image, never half a line) and read back with
:func:`attnexplain.records.read_results`. Its lines are untrusted on ``--resume``: a line stands for its
image only when it was made with the same model, methods, metrics and settings (the fingerprint
``batch`` uses), from the same image bytes and the same mask, and holds what this run would have
written (finite numbers, the run's methods, curves of the run's length); anything else is measured
again.
"""

from __future__ import annotations

import math
import types
from pathlib import Path
from typing import Any, Iterable, Sequence

from ._files import not_a_regular_file
from .errors import AttnExplainError
from .metrics import metrics_table_problem
from .model_spec import ModelSpec
from .randomization import SIMILARITIES
from .records import ResultsLog, file_sha256, fingerprint, read_results

EVALUATION_JSONL = "evaluation.jsonl"
#: The record fields evaluation.json shows per image; the log's other fields rebuild the totals.
SHOWN_FIELDS = (
    *("image", "path", "status", "reason", "target", "targets", "probability", "metrics", "mask_error"),
    "randomization",
)
#: Curves a record carries, each ``{"<method>": [value per point]}``; NaN is written as null.
CURVES = ("deletion", "insertion")
MAX_TEXT = 4096


def run_fingerprint(
    model_spec: ModelSpec | dict[str, Any], settings, plan, metrics: Sequence[str], boxes: Path | None
) -> str:
    """:func:`attnexplain.records.fingerprint` of an evaluation: the model, the plan, every setting that
    changes a number (:meth:`EvaluationSettings.describe`), the metrics measured and the boxes file's
    content. Masks are checked per image (:func:`mask_digest`)."""
    described = {
        **settings.describe(),
        "metrics": list(metrics),
        "boxes_sha256": file_sha256(boxes) if boxes is not None else None,
    }
    # fingerprint() asks its settings for describe() only.
    return fingerprint(model_spec, types.SimpleNamespace(describe=lambda: described), plan)


def mask_digest(masks: Path | None, relative: str) -> str | None:
    """sha256 of the mask files an image's localisation reads (its one mask, and its objects' masks
    ``<image>/<label>.png`` where it has them), None where there is none to read."""
    if masks is None:
        return None
    own = masks / Path(relative).with_suffix("")
    try:
        objects = sorted(own.glob("*.png")) if own.is_dir() else []
    except OSError:
        objects = []
    digests = [_file_digest(path) for path in [masks / Path(relative).with_suffix(".png"), *objects]]
    if not objects:
        return digests[0]
    return ";".join(f"{path.name}:{digest}" for path, digest in zip(objects, digests[1:])) + f";{digests[0]}"


def _file_digest(path: Path) -> str | None:
    if not_a_regular_file(path) is not None:  # a FIFO would block: never opened
        return None
    try:
        return file_sha256(path)
    except OSError:
        return None


def logged(
    record: dict[str, Any], key: str | None, mask_sha256: str | None, curves: dict[str, Any] | None
) -> dict[str, Any]:
    """The log's line for ``record``."""
    line = {**record, "key": key, "mask_sha256": mask_sha256}
    if curves:
        line["curves"] = {
            name: (
                {method: [None if math.isnan(v) else v for v in values] for method, values in table.items()}
                if name in CURVES
                else table
            )
            for name, table in curves.items()
        }
    return line


def shown_record(line: dict[str, Any]) -> dict[str, Any]:
    """The record evaluation.json shows for a log line."""
    return {name: line[name] for name in SHOWN_FIELDS if name in line}


def line_curves(line: dict[str, Any]) -> dict[str, Any]:
    """A checked line's curves, null back to NaN."""
    curves = line.get("curves") or {}
    return {
        name: (
            {method: [math.nan if v is None else float(v) for v in values] for method, values in table.items()}
            if name in CURVES
            else table
        )
        for name, table in curves.items()
    }


def reusable_lines(
    out: Path, key_prefix: str, wanted: set[str], names: Sequence[str], values: set[str], masks: Path | None, steps: int
) -> dict[str, dict[str, Any]]:
    """Image → the earlier run's line that still stands for it (see the module's docstring):
    ``wanted`` the images of this run, ``names`` its methods (and the random map), ``values`` the
    names of the values it measures."""
    kept = {}
    for line in read_results(out / EVALUATION_JSONL):
        if line_problem(line, key_prefix, wanted, names, values, steps) is None and line.get(
            "mask_sha256"
        ) == mask_digest(masks, line["image"]):
            kept[line["image"]] = line
    return kept


def line_problem(
    line: dict[str, Any], key_prefix: str, wanted: set[str], names: Sequence[str], values: set[str], steps: int
) -> str | None:
    """Why an earlier line cannot stand for its image in this run, or None."""
    key = line.get("key")
    if line.get("status") != "ok" or not isinstance(key, str) or not key.startswith(key_prefix + ":"):
        return "not an ok line of this model and these settings"
    if line.get("image") not in wanted or not isinstance(line.get("path"), str):
        return "not an image of this run"
    target = line.get("target")
    if not (
        isinstance(target, dict)
        and _is_int(target.get("index"))
        and (target.get("label") is None or _is_text(target.get("label")))
    ):
        return "has a target that is not a class"
    if not _is_finite(line.get("probability")):
        return "has a probability that is not a finite number"
    problem = metrics_table_problem(line.get("metrics"), names)
    if problem is not None:
        return problem
    if any(not set(table) <= values for table in line["metrics"].values()):
        return "has values this run does not measure"
    if "mask_error" in line and not _is_text(line["mask_error"]):
        return "has a mask error that is not a short text"
    if "randomization" in line and not (
        isinstance(line["randomization"], dict)
        and set(line["randomization"]) == set(names)
        and all(randomization_curves_fit(curves, steps) for curves in line["randomization"].values())
    ):
        return "has a randomization entry that is not per method and measure a list of numbers"
    return _curves_problem(line.get("curves", {}), names)


def _curves_problem(curves: Any, names: Sequence[str]) -> str | None:
    if not isinstance(curves, dict) or not set(curves) <= {*CURVES, "fractions"}:
        return "has curves that are not a table"
    fractions = curves.get("fractions")
    if fractions is not None and not (
        isinstance(fractions, list) and len(fractions) <= 100_001 and all(map(_is_finite, fractions))
    ):
        return "has fractions that are not finite numbers"
    for name in CURVES:
        table = curves.get(name, {})
        if not isinstance(table, dict) or not set(table) <= set(names):
            return f"has {name} curves for methods not in this run"
        lengths = {len(values) if isinstance(values, list) else -1 for values in table.values()}
        if -1 in lengths or len(lengths) > 1:
            return f"has {name} curves that are not lists of one length"
        if table and (fractions is None or lengths != {len(fractions)}):
            return f"has {name} curves that do not match its fractions"
        if any(not (v is None or _is_finite(v)) for values in table.values() for v in values):
            return f"has {name} curves that are not numbers"
    return None


def randomization_curves_fit(curves: Any, steps: int) -> bool:
    """Whether one method's entry of a record's ``"randomization"`` is what the check writes: per
    measure of :data:`~attnexplain.randomization.SIMILARITIES` one similarity in [-1, 1] or null per step.
    The one rule for a resumed line and for the summary that averages it."""
    return isinstance(curves, dict) and all(_similarity_curve(curves.get(measure), steps) for measure in SIMILARITIES)


def _similarity_curve(values: Any, steps: int) -> bool:
    return (
        isinstance(values, list)
        and len(values) == steps
        # A comparison, not math.isfinite: that raises on an int of 400 digits; NaN compares false.
        and all(
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and -1.0 - 1e-6 <= v <= 1.0 + 1e-6)
            for v in values
        )
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= MAX_TEXT


def open_log(out: Path, kept: Iterable[dict[str, Any]]) -> ResultsLog:
    """evaluation.jsonl holding only the ``kept`` lines, open for appending."""
    try:
        return ResultsLog(out / EVALUATION_JSONL, kept)
    except OSError as error:  # a full disk before anything started
        raise AttnExplainError(f"Cannot write {out / EVALUATION_JSONL}: {error.strerror or error}.") from None
