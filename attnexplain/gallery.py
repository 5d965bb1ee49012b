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
from ._untrusted import finite_number
from .caption_records import caption_gallery_row, is_caption_record
from .formats import INDEX_HTML, REPORT_JSON, SUMMARY_CSV
from .report import templates
from .truth import LABEL_SEPARATOR, true_labels
from .truth_labels import label_counts


def _label(prediction: dict[str, Any] | None) -> str:
    if not prediction:
        return ""
    return str(prediction["label"]) if prediction.get("label") is not None else str(prediction["index"])


#: The gallery's records, as a script the pages load with <script src>: a page opened from disk
#: cannot fetch() a JSON file, and the gallery of 10,000 images must not hold 10,000 cards.
GALLERY_DATA_JS = "gallery-data.js"
#: The detail pages' scripts and style, shared by all of them (report.html inlines its own).
VIEWER_JS = "viewer.js"
PAGES_CSS = "pages.css"
DETAIL_JS = "detail.js"


def render_detail(record: dict[str, Any], viewer: dict[str, Any] | None = None, photo_src: str | None = None) -> str:
    """One image's page, placed in its own output folder (links are relative to it). ``viewer``
    (see :func:`attnexplain.viewer.viewer_data`) makes its maps interactive over the photo at
    ``photo_src``; without them (an earlier run's record) the page shows the written overlays."""

    links = gallery_links(record)
    return (
        templates()
        .get_template("batch_detail.html.j2")
        .render(
            record=record,
            index_url=links["index_url"],
            data_url=links["data_url"],
            root=links["root"],
            target_label=_label(record["target"]),
            label=_label,
            viewer=viewer,
            photo_src=photo_src,
            title=PurePosixPath(record["image"]).name,
        )
    )


def gallery_links(record: dict[str, Any]) -> dict[str, str]:
    """Where an image's page, in its own output folder, finds the gallery (relative addresses)."""
    root = "../" * len(PurePosixPath(record["output"]).parts)
    return {"root": root, "index_url": root + INDEX_HTML, "data_url": root + GALLERY_DATA_JS, "image": record["image"]}


def correct(record: dict[str, Any]) -> bool | None:
    """Whether the top prediction is the image's true class (``--truth``), None when not known. A
    model without class names is right when the truth is its class index; a multi-label image when
    its present labels are exactly its true classes (``cat;dog``)."""
    truth = record.get("truth")
    if not isinstance(truth, str) or not record.get("predictions"):
        return None
    if "present" in record or LABEL_SEPARATOR in truth:  # multi-label: right when the sets agree
        return sorted(_classes(record)) == sorted(true_labels(truth))
    top = record["predictions"][0]
    return truth in (top.get("label"), str(top["index"]))


#: Between a multi-label image's present labels in the gallery's class cell ("cat; dog").
CLASSES_SEPARATOR = "; "


def _classes(record: dict[str, Any]) -> list[str]:
    """The classes the gallery files an image under: its top class, or a multi-label model's
    present labels (each one filterable as a top class is); a captioner's image under its caption."""
    if is_caption_record(record):
        return [record["caption"]]
    present = record.get("present")
    if isinstance(present, list) and present and all(isinstance(p, dict) for p in present):
        return [_label(p) for p in present]
    return [_label(record["predictions"][0])]


def _classes_shown(record: dict[str, Any]) -> str:
    return CLASSES_SEPARATOR.join(_classes(record))


def _model_line(meta: dict[str, Any]) -> str | None:
    """The run's model and preprocessing in one sentence, for every detail page."""
    from .viewer import file_name, preprocessing_text

    model = meta.get("model") or {}
    if not model:
        return None
    architecture = f" ({model['architecture']})" if model.get("architecture") else ""
    line = f"Model {file_name(model.get('source'))}{architecture}"
    if meta.get("preprocessing"):
        line += f"; input {preprocessing_text(meta['preprocessing'])}"
    return line + "."


#: Classes a confusion table shows by name (the most frequent true classes); the rest are "other".
CONFUSION_CLASSES = 20


def accuracy_and_confusion(records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Accuracy over the explained images with a true class, and the confusion table (true class →
    predicted class → count), or for a multi-label run the counts per label
    (:func:`attnexplain.truth_labels.label_counts`; accuracy: every label right); None when no
    image has one."""
    judged = [r for r in records if r.get("status") == "ok" and correct(r) is not None]
    if not judged:
        return None
    if any("present" in r or LABEL_SEPARATOR in r["truth"] for r in judged):  # multi-label: per label
        right = sum(1 for r in judged if correct(r))
        counted = label_counts((true_labels(r["truth"]), _classes(r)) for r in judged)
        return {"judged": len(judged), "correct": right, "accuracy": round(right / len(judged), 6), **counted}
    shown_classes = [name for name, _ in Counter(r["truth"] for r in judged).most_common(CONFUSION_CLASSES)]
    other = "(other)"

    def named(name: str) -> str:
        return name if name in shown_classes else other

    counts = Counter(
        (named(r["truth"]), named(_label(r["predictions"][0]) if correct(r) is False else r["truth"])) for r in judged
    )
    columns = shown_classes + ([other] if any(other in pair for pair in counts) else [])
    right = sum(1 for r in judged if correct(r))
    return {
        "judged": len(judged),
        "correct": right,
        "accuracy": round(right / len(judged), 6),
        "classes": columns,
        "confusion": {
            truth: {predicted: counts[truth, predicted] for predicted in columns if counts[truth, predicted]}
            for truth in columns
        },
    }


def gallery_data(records: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The gallery's records as a script (see :data:`GALLERY_DATA_JS`): per explained image its
    name, folder, top class and confidence, true class and correctness, photo and thumbnails; every
    address percent-encoded here, every text set as text by the page."""
    from urllib.parse import quote

    measured = sorted(
        {
            (method, metric)
            for r in records
            if r.get("status") == "ok"
            for method, values in (r.get("metrics") or {}).items()
            for metric in values
        }
    )
    rows = []
    for r in records:
        if r.get("status") != "ok":
            continue
        if is_caption_record(r):
            rows.append(caption_gallery_row(r))
            continue
        metrics = r.get("metrics") or {}
        top = r["predictions"][0]
        right = correct(r)
        # Records are checked before they come here (records.ok_record_problem), but a number that
        # is no finite float must not stop every other image's gallery: it is shown as unknown.
        confidence = finite_number(top.get("prob"))
        rows.append(
            [
                r["image"],
                quote(r["output"]),
                _classes_shown(r),
                None if confidence is None else round(confidence, 6),
                r.get("truth") if isinstance(r.get("truth"), str) else None,
                -1 if right is None else int(right),
                [quote(files.get("thumb", "")) for files in r["files"].values()],
                list(r["files"]),
                quote(r["photo"]) if isinstance(r.get("photo"), str) else None,
                [metrics.get(method, {}).get(metric) for method, metric in measured],
                None,  # a caption, searched beside the name
            ]
        )
    payload = {
        "columns": [
            "image",
            "folder",
            "label",
            "confidence",
            "truth",
            "correct",
            "thumbs",
            "methods",
            "photo",
            "metrics",
            "caption",
        ],
        # the per-image values of --metrics, in this order: what the gallery can sort by
        "metrics": [f"{method} {metric}" for method, metric in measured],
        "methods": list(meta.get("methods") or []),
        "model": _model_line(meta),
        "images": rows,
    }
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=True)
    # Inside a script: no way out of it, whatever the names hold.
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f"window.attnexplainGallery = {text};\n"


def totals(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in records if r.get("status") == "ok"]
    sums = Counter()
    for record in records:
        for key, value in (record.get("timings") or {}).items():
            sums[key] += finite_number(value) or 0.0
    judged = accuracy_and_confusion(records)
    return {
        "totals": {"images": len(records), "ok": len(ok), "failed": len(records) - len(ok)},
        **({"truth": judged} if judged is not None else {}),
        "timings_total_s": {key: round(value, 6) for key, value in sorted(sums.items())},
        "class_histogram": dict(
            sorted(
                Counter(
                    name for r in ok if r.get("predictions") or is_caption_record(r) for name in _classes(r)
                ).items()
            )
        ),
        "failures": [{"image": r["image"], "reason": r.get("reason")} for r in records if r.get("status") != "ok"],
    }


#: First characters that make a spreadsheet read a cell as a formula (OWASP, "CSV injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(cell: Any) -> str:
    """The cell as text that a spreadsheet shows as text: a leading quote before a formula start."""
    text = str(cell)
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def _confidence_cell(top: dict[str, Any] | None) -> str:
    confidence = finite_number(top.get("prob")) if top else None
    return "" if confidence is None else f"{confidence:.6f}"


def summary_csv(records: Sequence[dict[str, Any]]) -> str:
    """One row per image. File names and labels come from the user's files, so every cell is
    neutralised (:func:`spreadsheet_safe`): the CSV is meant to be opened in a spreadsheet."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        [
            "image",
            "status",
            "top1_index",
            "top1_label",
            "confidence",
            "target_index",
            "target_label",
            "methods",
            "layer",
            "output",
            "reason",
            "truth",
            "correct",
            "caption",
        ]
    )
    for r in records:
        top = (r.get("predictions") or [None])[0]
        target = r.get("target") or {}
        writer.writerow(
            map(
                spreadsheet_safe,
                [
                    r["image"],
                    r.get("status"),
                    top["index"] if top else "",
                    (top.get("label") or "") if top else "",
                    _confidence_cell(top),
                    target.get("index", ""),
                    target.get("label") or "",
                    ",".join(r.get("methods") or []),
                    r.get("layer") or "",
                    r.get("output") or "",
                    r.get("reason") or "",
                    r.get("truth") or "",
                    {True: "yes", False: "no", None: ""}[correct(r)],
                    r.get("caption") if is_caption_record(r) else "",
                ],
            )
        )
    return buffer.getvalue()


def write_reports(out, records: Sequence[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """(Re)write report.json, summary.csv and index.html from the records, each atomically. A file
    that cannot be written (a full disk) does not keep the others from being tried; the first such
    error is raised after all three were tried."""
    from .report import versions

    report = {"run": meta, **totals(records), "versions": versions()}
    wall = finite_number(meta.get("wall_s")) or 0.0
    report["timings"] = {"wall_s": round(wall, 3), "images_per_s": round(len(records) / wall, 3) if wall > 0 else None}
    ok = [r for r in records if r.get("status") == "ok"]
    classes = sorted(report["class_histogram"].items())
    errors: list[OSError] = []
    for name, content in (
        (GALLERY_DATA_JS, lambda: gallery_data(records, meta)),
        # What every detail page shares, once per run rather than once per image.
        (VIEWER_JS, lambda: templates().get_template("viewer.js.j2").render()),
        (PAGES_CSS, lambda: templates().get_template("_page.css.j2").render()),
        (DETAIL_JS, lambda: templates().get_template("detail.js.j2").render()),
        (REPORT_JSON, lambda: json.dumps(report, indent=2, default=str) + "\n"),
        (SUMMARY_CSV, lambda: summary_csv(records)),
        (
            INDEX_HTML,
            lambda: (
                templates()
                .get_template("index.html.j2")
                .render(
                    meta=meta,
                    report=report,
                    ok=ok,
                    failed=[r for r in records if r.get("status") != "ok"],
                    classes=classes,
                    label=_label,
                )
            ),
        ),
    ):
        try:
            write_bytes_atomic(out / name, content().encode("utf-8"))
        except OSError as error:
            errors.append(error)
    if errors:
        raise errors[0]
    return report
