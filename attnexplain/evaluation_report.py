"""The outputs of ``attnexplain evaluate``: evaluation.json, evaluation.csv and evaluation.html.

Written atomically, each file whole or not at all. Image names come from the user's files: the page
is autoescaped Jinja2, the CSV's cells are spreadsheet-safe.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Callable

from ._atomic import write_bytes_atomic
from .gallery import spreadsheet_safe
from .metrics import RANDOM_MAP
from .report import templates

#: The files ``evaluate`` writes into ``--out`` (beside its log, evaluation.jsonl).
EVALUATION_JSON = "evaluation.json"
EVALUATION_CSV = "evaluation.csv"
EVALUATION_HTML = "evaluation.html"
#: Plot area of the curves on the page, in SVG user units.
PLOT_WIDTH, PLOT_HEIGHT = 480, 300
#: How a value is shown, where evaluation.json's sign is not what a reader expects: ROAD stores the
#: change of probability (after − before), so a faithful map's MoRF is negative and "lower is
#: better"; shown as the drop (before − after), larger means a larger effect, as every other value.
SHOWN_AS_DROP = ("road_morf", "road_lerf")
#: The convention, stated once on the page and the terminal.
CONVENTION = (
    "Every value is shown as a size of effect: areas under the probability curves, drops "
    "of the target's probability (road_morf and road_lerf: before − after, stored in "
    "evaluation.json as the change after − before), shares of images or of the map; "
    "↑ higher is better, ↓ lower is better."
)
#: Line styles of the curves: methods differ by dash as well as by colour (colour-blind readers, print).
DASHES = ("", "8,4", "2,3", "10,3,2,3", "4,4", "1,5", "12,6", "6,2,2,2,2,2")


def evaluation_csv(evaluation: dict[str, Any]) -> str:
    """One row per image and method: every metric's value."""
    metrics = [metric for summary in evaluation["methods"].values() for metric in summary]
    metrics = list(dict.fromkeys(metrics))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image", "status", "method", *metrics, "reason"])
    for record in evaluation["per_image"]:
        if record["status"] != "ok":
            writer.writerow(
                [
                    spreadsheet_safe(record["image"]),
                    "failed",
                    "",
                    *[""] * len(metrics),
                    spreadsheet_safe(record.get("reason", "")),
                ]
            )
            continue
        for method, values in record["metrics"].items():
            writer.writerow(
                [
                    spreadsheet_safe(record["image"]),
                    "ok",
                    spreadsheet_safe(method),
                    *[values.get(metric, "") for metric in metrics],
                    spreadsheet_safe(record.get("mask_error", "")),
                ]
            )
    return buffer.getvalue()


def curve_paths(curves: dict[str, list[float]], fractions: list[float]) -> dict[str, str]:
    """Method → SVG polyline points of its mean curve (x: share of pixels, y: probability)."""
    return {
        method: " ".join(
            f"{PLOT_WIDTH * x:.1f},{PLOT_HEIGHT * (1 - min(max(y, 0.0), 1.0)):.1f}" for x, y in zip(fractions, values)
        )
        for method, values in curves.items()
    }


def band_path(band: list[list[float]] | None, fractions: list[float]) -> str | None:
    """SVG polygon points of the random map's band (per point [low, high]), or None."""
    if not band or len(band) != len(fractions):
        return None

    def point(x: float, y: float) -> str:
        return f"{PLOT_WIDTH * x:.1f},{PLOT_HEIGHT * (1 - min(max(y, 0.0), 1.0)):.1f}"

    upper = [point(x, high) for x, (_, high) in zip(fractions, band)]
    lower = [point(x, low) for x, (low, _) in zip(fractions, band)]
    return " ".join(upper + lower[::-1])


def pairs_of(pairwise: list[dict[str, Any]], method: str | None) -> list[dict[str, Any]]:
    """``method``'s paired differences with every other, each as ``method`` − other."""
    found = []
    for pair in pairwise:
        if pair["method"] == method:
            found.append(pair)
        elif pair["other"] == method and pair["ci95"] is not None:
            low, high = pair["ci95"]
            found.append(
                {
                    "method": method,
                    "other": pair["method"],
                    "difference": -pair["difference"],
                    "ci95": [-high, -low],
                    "images": pair["images"],
                }
            )
    return found


def randomization_plots(evaluation: dict[str, Any]) -> dict[str, Any] | None:
    """The randomization check's curves for the page, or None when it was not run: per measure,
    method → SVG polyline points (x: the trained model, then each cascading step; y: similarity in
    [-1, 1]); a step with no value is left out of its line, never drawn as 0."""
    found = evaluation.get("randomization")
    if not found or not found.get("steps"):
        return None
    steps = found["steps"]
    xs = [PLOT_WIDTH * i / len(steps) for i in range(len(steps) + 1)]

    def y(value: float) -> float:
        return PLOT_HEIGHT * (1 - (min(max(value, -1.0), 1.0) + 1) / 2)

    plots = []
    for measure, title in (
        ("judged", "Spearman ρ (the larger of signed and absolute; judged)"),
        ("ssim", "SSIM (signed map)"),
    ):
        lines = {}
        for method, result in found["methods"].items():
            values = [1.0, *result["curves"][measure]]  # the trained model's map is itself
            lines[method] = " ".join(f"{x:.1f},{y(v):.1f}" for x, v in zip(xs, values) if v is not None)
        plots.append((title, lines))
    return {
        "plots": plots,
        "ticks": list(zip(xs, ["trained", *steps])),
        "limit_y": y(found["limit"]),
        "zero_y": y(0.0),
        "early_x": xs[min(found["early_steps"], len(steps))],
    }


def curve_styles(methods) -> tuple[dict[str, str], dict[str, str]]:
    """Each method's curve colour and dash pattern, in order (the random map black and dashed)."""
    palette = [
        "#1f77b4",
        "#ff7f0e",
        "#2ca02c",
        "#d62728",
        "#9467bd",
        "#8c564b",
        "#e377c2",
        "#17becf",
        "#bcbd22",
        "#7f7f7f",
    ]
    colours: dict[str, str] = {}
    dashes: dict[str, str] = {}
    for method in methods:
        colours[method] = "#000" if method == RANDOM_MAP else palette[len(colours) % len(palette)]
        # 8 dashes beside 10 colours: the first 40 methods differ in colour or dash from each other.
        dashes[method] = "5,3" if method == RANDOM_MAP else DASHES[(len(dashes)) % len(DASHES)]
    return colours, dashes


def curve_plots(evaluation: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """The page's deletion and insertion plots: (name, each method's curve path, the random band)."""
    fractions = evaluation["curves"]["fractions"]
    bands = evaluation["curves"].get("random_band", {})
    return [
        (name, curve_paths(evaluation["curves"][name], fractions), band_path(bands.get(name), fractions))
        for name in ("deletion", "insertion")
        if evaluation["curves"][name]
    ]


def render_evaluation_html(evaluation: dict[str, Any]) -> str:
    plots = curve_plots(evaluation)
    colours, dashes = curve_styles(evaluation["methods"])
    best = evaluation.get("winner") or next(iter(evaluation.get("no_difference") or []), None)
    return (
        templates()
        .get_template("evaluation.html.j2")
        .render(
            evaluation=evaluation,
            best=best,
            best_pairs=pairs_of(evaluation.get("pairwise", []), best),
            metrics=shown_metrics(evaluation),
            plots=plots,
            colours=colours,
            dashes=dashes,
            random_map=RANDOM_MAP,
            width=PLOT_WIDTH,
            height=PLOT_HEIGHT,
            shown=shown_number,
            shown_mean=shown_mean,
            convention=CONVENTION,
            randomization=randomization_plots(evaluation),
        )
    )


def shown_number(value: Any, sign: int = 1) -> str:
    """``value`` × ``sign`` with three decimals, "–" where missing; never "-0.000"."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{round(sign * value, 3) + 0.0:.3f}"  # + 0.0 turns a rounded -0.0 into 0.0


def metric_display(metric: str, better: str) -> dict[str, Any]:
    """How ``metric`` is shown: its label, the sign its values are shown with, and the arrow of the
    better direction once that sign is applied (``better`` as evaluation.json's settings give it)."""
    sign = -1 if metric in SHOWN_AS_DROP else 1
    higher = (better == "higher") == (sign > 0)
    return {"label": f"{metric} drop" if sign < 0 else metric, "sign": sign, "arrow": "↑" if higher else "↓"}


def shown_mean(summary: dict[str, Any] | None, display: dict[str, Any]) -> tuple[str, str]:
    """A metric's mean and its interval ``[low, high]`` as shown (the interval flips with the sign)."""
    if not summary:
        return "–", ""
    ends = sorted(display["sign"] * value for value in summary["ci95"])
    return shown_number(summary["mean"], display["sign"]), f"[{shown_number(ends[0])}, {shown_number(ends[1])}]"


def shown_metrics(evaluation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every metric measured (in the order measured) → :func:`metric_display`."""
    better = evaluation["settings"]["better"]
    # The randomization check has its own table (its judged score and verdict): a mean of the images'
    # early-step values beside it would be a second, different number under the same name.
    metrics = dict.fromkeys(
        metric
        for summary in evaluation["methods"].values()
        for metric in summary
        if metric != "randomization" or not evaluation.get("randomization")
    )
    return {metric: metric_display(metric, better[metric]) for metric in metrics}


def write_evaluation(
    out: Path,
    evaluation: dict[str, Any],
    csv_of: Callable[[dict[str, Any]], str] | None = None,
    html_of: Callable[[dict[str, Any]], str] | None = None,
) -> dict[str, Path]:
    """Write the three files into ``out``; returns their paths. ``csv_of``/``html_of``: how this
    kind of evaluation is tabled and shown (a classifier's by default; a captioner's words have their
    own)."""
    report = {key: value for key, value in evaluation.items() if key != "examples"}
    files = {
        EVALUATION_JSON: json.dumps(report, indent=2, allow_nan=False).encode(),
        EVALUATION_CSV: (csv_of or evaluation_csv)(evaluation).encode(),
        EVALUATION_HTML: (html_of or render_evaluation_html)(evaluation).encode(),
    }
    for name, data in files.items():
        write_bytes_atomic(out / name, data)
    return {name: out / name for name in files}
