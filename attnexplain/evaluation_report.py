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
from typing import Any

from ._atomic import write_bytes_atomic
from .evaluation import EVALUATION_CSV, EVALUATION_HTML, EVALUATION_JSON
from .gallery import spreadsheet_safe
from .metrics import RANDOM_MAP
from .report import templates

#: Plot area of the curves on the page, in SVG user units.
PLOT_WIDTH, PLOT_HEIGHT = 320, 200


def evaluation_csv(evaluation: dict[str, Any]) -> str:
    """One row per image and method: every metric's value."""
    metrics = [metric for summary in evaluation["methods"].values() for metric in summary]
    metrics = list(dict.fromkeys(metrics))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image", "status", "method", *metrics, "reason"])
    for record in evaluation["per_image"]:
        if record["status"] != "ok":
            writer.writerow([spreadsheet_safe(record["image"]), "failed", "", *[""] * len(metrics),
                             spreadsheet_safe(record.get("reason", ""))])
            continue
        for method, values in record["metrics"].items():
            writer.writerow([spreadsheet_safe(record["image"]), "ok", spreadsheet_safe(method),
                             *[values.get(metric, "") for metric in metrics],
                             spreadsheet_safe(record.get("mask_error", ""))])
    return buffer.getvalue()


def curve_paths(curves: dict[str, list[float]], fractions: list[float]) -> dict[str, str]:
    """Method → SVG polyline points of its mean curve (x: share of pixels, y: probability)."""
    return {method: " ".join(f"{PLOT_WIDTH * x:.1f},{PLOT_HEIGHT * (1 - min(max(y, 0.0), 1.0)):.1f}"
                             for x, y in zip(fractions, values))
            for method, values in curves.items()}


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
    for measure, title in (("judged", "Spearman ρ (the larger of signed and absolute; judged)"),
                           ("ssim", "SSIM (signed map)")):
        lines = {}
        for method, result in found["methods"].items():
            values = [1.0, *result["curves"][measure]]  # the trained model's map is itself
            lines[method] = " ".join(f"{x:.1f},{y(v):.1f}" for x, v in zip(xs, values) if v is not None)
        plots.append((title, lines))
    return {"plots": plots, "ticks": list(zip(xs, ["trained", *steps])), "limit_y": y(found["limit"]),
            "zero_y": y(0.0), "early_x": xs[min(found["early_steps"], len(steps))]}


def render_evaluation_html(evaluation: dict[str, Any]) -> str:
    metrics = list(dict.fromkeys(metric for summary in evaluation["methods"].values() for metric in summary))
    fractions = evaluation["curves"]["fractions"]
    plots = [(name, curve_paths(evaluation["curves"][name], fractions))
             for name in ("deletion", "insertion") if evaluation["curves"][name]]
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
               "#bcbd22", "#7f7f7f"]
    colours = {}
    for method in evaluation["methods"]:
        colours[method] = "#000" if method == RANDOM_MAP else palette[len(colours) % len(palette)]
    return templates().get_template("evaluation.html.j2").render(
        evaluation=evaluation, metrics=metrics, plots=plots, colours=colours, random_map=RANDOM_MAP,
        width=PLOT_WIDTH, height=PLOT_HEIGHT, shown=_shown, randomization=randomization_plots(evaluation))


def _shown(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.3f}"


def write_evaluation(out: Path, evaluation: dict[str, Any]) -> dict[str, Path]:
    """Write the three files into ``out``; returns their paths."""
    report = {key: value for key, value in evaluation.items() if key != "examples"}
    files = {EVALUATION_JSON: json.dumps(report, indent=2, allow_nan=False).encode(),
             EVALUATION_CSV: evaluation_csv(evaluation).encode(),
             EVALUATION_HTML: render_evaluation_html(evaluation).encode()}
    for name, data in files.items():
        write_bytes_atomic(out / name, data)
    return {name: out / name for name in files}
