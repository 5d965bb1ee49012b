"""The run-level outputs of ``attnexplain batch``: report.json, summary.csv, index.html, detail pages.

Every page is rendered by Jinja2 with autoescaping, and every URL is percent-encoded, so file names
are always shown as text.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import PurePosixPath
from typing import Any, Sequence

from ._atomic import write_bytes_atomic
from .report import templates


def _label(prediction: dict[str, Any] | None) -> str:
    if not prediction:
        return ""
    return str(prediction["label"]) if prediction.get("label") is not None else str(prediction["index"])


def render_detail(record: dict[str, Any]) -> str:
    """One image's page, placed in its own output folder (links are relative to it)."""
    from .batch import INDEX_HTML

    depth = len(PurePosixPath(record["output"]).parts)
    return templates().get_template("batch_detail.html.j2").render(
        record=record, index_url="../" * depth + INDEX_HTML, target_label=_label(record["target"]),
        label=_label)


def totals(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in records if r.get("status") == "ok"]
    sums = Counter()
    for record in records:
        for key, value in (record.get("timings") or {}).items():
            sums[key] += float(value)
    return {
        "totals": {"images": len(records), "ok": len(ok), "failed": len(records) - len(ok)},
        "timings_total_s": {key: round(value, 6) for key, value in sorted(sums.items())},
        "class_histogram": dict(sorted(Counter(_label(r["predictions"][0]) for r in ok
                                               if r.get("predictions")).items())),
        "failures": [{"image": r["image"], "reason": r.get("reason")} for r in records
                     if r.get("status") != "ok"],
    }


#: First characters that make a spreadsheet read a cell as a formula (OWASP, "CSV injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(cell: Any) -> str:
    """The cell as text that a spreadsheet shows as text: a leading quote before a formula start."""
    text = str(cell)
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def summary_csv(records: Sequence[dict[str, Any]]) -> str:
    """One row per image. File names and labels come from the user's files, so every cell is
    neutralised (:func:`spreadsheet_safe`): the CSV is meant to be opened in a spreadsheet."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image", "status", "top1_index", "top1_label", "confidence", "target_index",
                     "target_label", "methods", "layer", "output", "reason"])
    for r in records:
        top = (r.get("predictions") or [None])[0]
        target = r.get("target") or {}
        writer.writerow(map(spreadsheet_safe, [r["image"], r.get("status"), top["index"] if top else "",
                         (top.get("label") or "") if top else "", f"{top['prob']:.6f}" if top else "",
                         target.get("index", ""), target.get("label") or "",
                         ",".join(r.get("methods") or []), r.get("layer") or "", r.get("output") or "",
                         r.get("reason") or ""]))
    return buffer.getvalue()


def write_reports(out, records: Sequence[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """(Re)write report.json, summary.csv and index.html from the records, each atomically. A file
    that cannot be written (a full disk) does not keep the others from being tried; the first such
    error is raised after all three were tried."""
    from .batch import INDEX_HTML, REPORT_JSON, SUMMARY_CSV
    from .report import versions

    report = {"run": meta, **totals(records), "versions": versions()}
    wall = float(meta.get("wall_s") or 0.0)
    report["timings"] = {"wall_s": round(wall, 3),
                         "images_per_s": round(len(records) / wall, 3) if wall > 0 else None}
    ok = [r for r in records if r.get("status") == "ok"]
    classes = sorted(report["class_histogram"].items())
    errors: list[OSError] = []
    for name, content in (
            (REPORT_JSON, lambda: json.dumps(report, indent=2, default=str) + "\n"),
            (SUMMARY_CSV, lambda: summary_csv(records)),
            (INDEX_HTML, lambda: templates().get_template("index.html.j2").render(
                meta=meta, report=report, ok=ok, failed=[r for r in records if r.get("status") != "ok"],
                classes=classes, label=_label))):
        try:
            write_bytes_atomic(out / name, content().encode("utf-8"))
        except OSError as error:
            errors.append(error)
    if errors:
        raise errors[0]
    return report
