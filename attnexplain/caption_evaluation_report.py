"""The outputs of ``attnexplain evaluate`` on a captioner: evaluation.json, evaluation.csv (a row per
image, word and map) and evaluation.html, each written whole or not at all, as ``evaluate``'s
(:mod:`attnexplain.evaluation_report`, whose curve drawing and number format they share)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from .evaluation_report import (
    CONVENTION,
    PLOT_HEIGHT,
    PLOT_WIDTH,
    curve_plots,
    curve_styles,
    metric_display,
    shown_mean,
    shown_number,
    write_evaluation,
)
from .gallery import spreadsheet_safe
from .metrics import RANDOM_MAP
from .report import templates


def caption_evaluation_csv(evaluation: dict[str, Any]) -> str:
    """One row per image, measured word and map: every value; a failed image's row gives why."""
    metrics = list(evaluation["settings"]["better"])
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image", "status", "caption", "word", "position", "probability", "map", *metrics, "reason"])
    for record in evaluation["per_image"]:
        image = spreadsheet_safe(record["image"])
        if record["status"] != "ok":
            writer.writerow(
                [image, "failed", "", "", "", "", "", *[""] * len(metrics), spreadsheet_safe(record["reason"])]
            )
            continue
        caption = spreadsheet_safe(record["caption"])
        if not record["words"]:
            writer.writerow(
                [
                    image,
                    "ok",
                    caption,
                    "",
                    "",
                    "",
                    "",
                    *[""] * len(metrics),
                    spreadsheet_safe(record.get("mask_error", "")),
                ]
            )
        for word in record["words"]:
            for name, values in word["metrics"].items():
                writer.writerow(
                    [
                        image,
                        "ok",
                        caption,
                        spreadsheet_safe(word["word"]),
                        word["position"],
                        word["probability"],
                        name,
                        *[values.get(metric, "") for metric in metrics],
                        spreadsheet_safe(record.get("mask_error", "")),
                    ]
                )
    return buffer.getvalue()


def render_caption_evaluation_html(evaluation: dict[str, Any]) -> str:
    plots = curve_plots(evaluation)
    colours, dashes = curve_styles([*evaluation["settings"]["maps"], RANDOM_MAP])
    better = evaluation["settings"]["better"]
    return (
        templates()
        .get_template("caption_evaluation.html.j2")
        .render(
            evaluation=evaluation,
            metrics={metric: metric_display(metric, direction) for metric, direction in better.items()},
            plots=plots,
            colours=colours,
            dashes=dashes,
            random_map=RANDOM_MAP,
            width=PLOT_WIDTH,
            height=PLOT_HEIGHT,
            shown=shown_number,
            shown_mean=shown_mean,
            convention=CONVENTION,
        )
    )


def write_caption_evaluation(out: Path, evaluation: dict[str, Any]) -> dict[str, Path]:
    """Write evaluation.json, .csv and .html into ``out``; returns their paths."""
    return write_evaluation(out, evaluation, caption_evaluation_csv, render_caption_evaluation_html)
