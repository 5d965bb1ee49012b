"""What a captioner's line of ``results.jsonl`` holds besides what every record does: the caption,
where it came from, each word's probability and where its attention peaked, and the files of each
explained word; how such a line read back from an earlier run is checked; and its card in the
gallery.

Records are plain text anyone can edit (see :mod:`attnexplain.records`): nothing here trusts a
caption read back; the pages set it as text and summary.csv neutralises it like any other cell.
"""

from __future__ import annotations

import math
from typing import Any

from ._untrusted import finite_number

#: A record's ``task`` when it is a captioner's.
CAPTIONING = "captioning"
#: What a captioner's batch computes for each word by default (the record's ``methods``): α and
#: each chosen gradient method (``--method``; Grad-CAM by default).
CAPTION_METHODS = ["attention", "gradcam"]
#: What an encoder–decoder's words have besides (Chefer et al. 2021b's relevance of the image).
RELEVANCE = "relevance"
#: The record's files that are the caption's, not one word's.
CAPTION_FILES = "caption"
#: The longest caption a record read back may hold (a captioner writes tens of words).
MAX_CAPTION_LENGTH = 10_000


def is_caption_record(record: dict[str, Any]) -> bool:
    return record.get("task") == CAPTIONING


def word_files_key(position: int) -> str:
    """The key of a word's files in a record's ``files`` (positions count from 0, keys from 1)."""
    return f"word-{position + 1}"


def caption_record_fields(report: dict[str, Any]) -> dict[str, Any]:
    """A captioner's part of an image's record, from the report :func:`attnexplain.caption_report.
    write_caption_outputs` wrote: every word with its probability, the explained ones with their
    attention's peak (row, column of the feature map's grid) and height (and its relevance's peak,
    for an encoder–decoder), and the files by word."""
    explained = {word["position"]: word for word in report["words"]}
    words = []
    for position, entry in enumerate(report["word_probabilities"]):
        word: dict[str, Any] = {"word": entry["word"], "position": position, "probability": entry["probability"]}
        if position in explained:
            word["attention_peak"] = explained[position]["attention_peak"]
            word["attention_max"] = explained[position]["attention_max"]
            if explained[position].get("relevance_peak") is not None:
                word["relevance_peak"] = explained[position]["relevance_peak"]
        words.append(word)
    outputs = report["outputs"]
    files = {word_files_key(word["position"]): named for word, named in zip(report["words"], outputs["words"])}
    files[CAPTION_FILES] = {"report_json": outputs["report_json"], "attention_strip": outputs["attention_strip"]}
    log_probability = finite_number(report.get("log_probability"))
    return {
        "task": CAPTIONING,
        "caption": report["caption"],
        "caption_source": report["caption_source"],
        # p(caption | image): every word's probability, and the end's where the model ended it
        "caption_probability": None if log_probability is None else math.exp(log_probability),
        "end_probability": report["end_probability"],
        "words": words,
        "grid": report["grid"],
        "layer": report.get("cam_layer") or report["feature_layer"],  # where each word's CAMs are taken
        "files": files,
        "methods": ["attention", *report.get("methods", CAPTION_METHODS[1:])]
        + ([RELEVANCE] if report.get("relevance_method") and RELEVANCE not in report.get("methods", []) else []),
    }


def _is_probability(value: Any) -> bool:
    number = finite_number(value)
    return number is not None and 0.0 <= number <= 1.0


def _is_position(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_CAPTION_LENGTH


def _word_problem(position: int, word: Any) -> str | None:
    if not (isinstance(word, dict) and isinstance(word.get("word"), str) and word.get("position") == position):
        return f"has a word {position + 1} that is not a word at its place"
    if not _is_probability(word.get("probability")):
        return f"has a word {position + 1} without a probability"
    for key in ("attention_peak", "relevance_peak"):
        peak = word.get(key)
        if peak is not None and not (isinstance(peak, list) and len(peak) == 2 and all(map(_is_position, peak))):
            return f"has a word {position + 1} whose {key.replace('_', ' ')} is not a (row, column)"
    if "attention_max" in word and not _is_probability(word["attention_max"]):
        return f"has a word {position + 1} whose attention maximum is not a weight"
    return None


def caption_record_problem(record: dict[str, Any]) -> str | None:
    """Why a captioner's ``ok`` record read back cannot stand for its image, or None: its caption
    is text of its words, its probabilities are probabilities (the files, common to every record,
    are :func:`attnexplain.records.ok_record_problem`'s)."""
    caption = record.get("caption")
    if not (isinstance(caption, str) and 0 < len(caption) <= MAX_CAPTION_LENGTH):
        return "has no caption (text of at most 10,000 characters)"
    if record.get("caption_source") not in ("generated", "given"):
        return "has a caption that is neither generated nor given"
    words = record.get("words")
    if not (isinstance(words, list) and words and len(words) <= MAX_CAPTION_LENGTH):
        return "has no words"
    for position, word in enumerate(words):
        problem = _word_problem(position, word)
        if problem is not None:
            return problem
    if " ".join(word["word"] for word in words) != caption:
        return "has a caption that is not its words"
    for key in ("caption_probability", "end_probability"):
        if record.get(key) is not None and not _is_probability(record[key]):
            return f"has a {key.replace('_', ' ')} that is no probability"
    return None


def caption_gallery_row(record: dict[str, Any]) -> list[Any]:
    """A captioner's record (checked) as a row of the gallery's data (the columns of
    :func:`attnexplain.gallery.gallery_data`): the caption as its label and searched text, the
    caption's probability as its confidence, each explained word's attention as its thumbnails
    (and its relevance after it, for an encoder–decoder's word)."""
    from urllib.parse import quote

    files = record["files"]
    explained = [word for word in record["words"] if word_files_key(word["position"]) in files]
    confidence = finite_number(record.get("caption_probability"))
    thumbs, labels = [], []
    for word in explained:
        named = files[word_files_key(word["position"])]
        thumbs.append(quote(named.get("thumb", "")))
        labels.append(word["word"])
        if isinstance(named.get("relevance_thumb"), str):
            thumbs.append(quote(named["relevance_thumb"]))
            labels.append(f"{word['word']} · {RELEVANCE}")
    return [
        record["image"],
        quote(record["output"]),
        record["caption"],
        None if confidence is None else round(confidence, 6),
        None,  # no true class
        -1,  # so never right or wrong
        thumbs,
        labels,
        quote(record["photo"]) if isinstance(record.get("photo"), str) else None,
        [],  # no --metrics
        record["caption"],
    ]
