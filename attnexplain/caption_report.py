"""A captioner's outputs: each word's overlays and maps, the attention strip, report.json and
report.html (the template ``caption_report.html.j2``), written all or nothing like ``run``'s."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from ._atomic import atomic_directory
from .errors import OutputError
from .formats import DEFAULT_COLORMAP
from .render import colorize, downscale, encode_image, normalize_heatmap, render_overlay
from .report import REPORT_HTML, REPORT_JSON, data_uri, file_name, templates, why_not_written, write_npy

if TYPE_CHECKING:
    from .captioning import CaptionExplanation, WordExplanation

#: The longest side of each word's picture in the strip, in pixels.
STRIP_SIDE = 160
#: The side of a word's large maps in the page.
LARGE_SIDE = 384
#: Pixels per feature-map cell in the picture of the alignment scores.
SCORE_CELL = 16


def save_caption_explanation(
    explanation: "CaptionExplanation", directory: Path, alpha: float, overlay_format: str, colormap: str
) -> dict[str, Any]:
    """Write every output into a staging folder, then swap it in: no half-written results."""
    try:
        return write_caption_outputs(explanation, directory, alpha, overlay_format, colormap)
    except OSError as error:
        raise OutputError(
            f"Could not write the outputs to {directory}: {why_not_written(directory, error)}; "
            f"nothing was written there (an earlier result is kept)."
        ) from None


def write_caption_outputs(
    explanation: "CaptionExplanation",
    directory: Path,
    alpha: float,
    overlay_format: str,
    colormap: str,
    *,
    into: Path | None = None,
    page_name: str = REPORT_HTML,
    gallery: dict[str, str] | None = None,
    thumbs: bool = False,
) -> dict[str, Any]:
    """The outputs of ``directory``, swapped in as a whole; or written into ``into``, a folder
    the caller swaps in (a batch run's image folder, which holds more). ``page_name``: the page's
    file; ``gallery``: a batch gallery's addresses (``index_url``, ``data_url``, ``root``,
    ``image``) for the page's way back and through it; ``thumbs``: a small JPEG of each word's
    attention too (``thumb`` among its files), for the gallery's cards."""
    report = explanation.to_dict()
    pixels = explanation.image.pixels
    word_files: list[dict[str, str]] = []
    pages: list[dict[str, Any]] = []
    strip: list[np.ndarray] = []
    with nullcontext(into) if into is not None else atomic_directory(directory) as staging:
        for entry, word in zip(report["words"], explanation.words):
            stem = f"{word.position + 1:02d}-{_file_word(word.word)}"
            attention = render_overlay(pixels, word.attention, explanation.box, alpha, colormap)
            files = {"attention": f"attention-{stem}.{overlay_format}", "attention_npy": f"attention-{stem}.npy"}
            (staging / files["attention"]).write_bytes(encode_image(attention, f".{overlay_format}"))
            write_npy(staging / files["attention_npy"], word.attention)
            maps = []
            for name, heatmap in word.maps.items():  # each chosen method's map: <method>-<stem>.png/.npy
                overlay = render_overlay(pixels, heatmap, explanation.box, alpha, colormap)
                files[name], files[f"{name}_npy"] = f"{name}-{stem}.{overlay_format}", f"{name}-{stem}.npy"
                (staging / files[name]).write_bytes(encode_image(overlay, f".{overlay_format}"))
                write_npy(staging / files[f"{name}_npy"], heatmap)
                maps.append({"name": name, "uri": data_uri(downscale(overlay, LARGE_SIDE)), "on": map_subject(name)})
            extras = _word_extras(staging, stem, word, explanation, files, alpha, colormap)
            entry["files"] = files
            word_files.append(files)
            small = downscale(attention, STRIP_SIDE)
            strip.append(small)
            if thumbs:
                files["thumb"] = f"thumb-{stem}.jpg"
                (staging / files["thumb"]).write_bytes(encode_image(small, ".jpg", quality=80))
                if "relevance" in extras:  # the card shows the word's relevance beside its α
                    files["relevance_thumb"] = f"thumb-relevance-{stem}.jpg"
                    thumb = downscale(extras.pop("relevance"), STRIP_SIDE)
                    (staging / files["relevance_thumb"]).write_bytes(encode_image(thumb, ".jpg", quality=80))
            extras.pop("relevance", None)
            pages.append(
                {
                    **entry,
                    "strip_uri": data_uri(small),
                    "attention_uri": data_uri(downscale(attention, LARGE_SIDE)),
                    "maps": maps,
                    **extras,
                }
            )
        strip_picture = attention_strip(strip, [word.word for word in explanation.words])
        (staging / "attention-strip.png").write_bytes(encode_image(strip_picture, ".png"))
        report["outputs"] = {
            "directory": str(directory.resolve()),
            "words": word_files,
            "attention_strip": "attention-strip.png",
            "report_json": REPORT_JSON,
            "report_html": page_name,
        }
        (staging / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        html = (
            templates()
            .get_template("caption_report.html.j2")
            .render(
                report=report,
                title=file_name(report["image"]["path"]),
                photo_uri=data_uri(downscale(pixels, LARGE_SIDE)),
                words=pages,
                explained={word.position for word in explanation.words},
                gallery=gallery,
            )
        )
        (staging / page_name).write_text(html, encoding="utf-8")
    return report


def _word_extras(
    staging: Path,
    stem: str,
    word: "WordExplanation",
    explanation: "CaptionExplanation",
    files: dict[str, str],
    alpha: float,
    colormap: str,
) -> dict[str, Any]:
    """What a word has beyond α and its gradient maps, written and added to ``files``: its alignment scores,
    its attention per layer and head (a transformer decoder's, for the explorer) and its relevance
    (Chefer 2021b); returns the page's pictures of them."""
    pictures: dict[str, Any] = {}
    if word.alignment_scores is not None:
        files["alignment_scores_npy"] = f"alignment-scores-{stem}.npy"
        files["alignment_scores"] = f"alignment-scores-{stem}.png"
        scores = score_picture(word.alignment_scores, colormap)
        write_npy(staging / files["alignment_scores_npy"], word.alignment_scores)
        (staging / files["alignment_scores"]).write_bytes(encode_image(scores, ".png"))
        pictures["scores_uri"] = data_uri(scores, ".png")
    if word.relevance is not None:
        files["relevance_npy"] = f"relevance-{stem}.npy"
        files["relevance"] = f"relevance-{stem}.png"
        relevance = render_overlay(explanation.image.pixels, word.relevance, explanation.box, alpha, colormap)
        write_npy(staging / files["relevance_npy"], word.relevance)
        (staging / files["relevance"]).write_bytes(encode_image(relevance, ".png"))
        pictures["relevance_uri"] = data_uri(downscale(relevance, LARGE_SIDE))
        pictures["relevance"] = relevance  # the overlay itself, for a gallery card's thumbnail
    layered = word.layer_attention
    if layered is not None and layered.shape[0] * layered.shape[1] > 1:
        files["layer_attention_npy"] = f"cross-attention-{stem}.npy"
        write_npy(staging / files["layer_attention_npy"], layered)
        pictures["layer_uris"] = [
            [data_uri(score_picture(layered[layer, head], colormap), ".png") for head in range(layered.shape[1])]
            for layer in range(layered.shape[0])
        ]
    return pictures


def map_subject(name: str) -> str:
    """What a word's map of method ``name`` is taken with respect to, for its caption: the CAM
    layer's activation and gradient, or the input's pixels."""
    from .method_registry import find_method

    return "pixels" if find_method(name).family == "input" else "layer"


def _file_word(word: str) -> str:
    """A word as part of a file name: letters, digits, '-' and '_' only."""
    cleaned = "".join(c if c.isalnum() or c in "-_" else "_" for c in word)[:40]
    return cleaned or "word"


def score_picture(scores: np.ndarray, colormap: str = DEFAULT_COLORMAP) -> np.ndarray:
    """The alignment scores on their grid, one ``SCORE_CELL``-pixel square per position, coloured
    from their minimum to their maximum (the page prints both)."""
    colours = colorize(normalize_heatmap(scores.astype(np.float32)), colormap)
    return cv2.resize(
        colours, (scores.shape[1] * SCORE_CELL, scores.shape[0] * SCORE_CELL), interpolation=cv2.INTER_NEAREST
    )


def attention_strip(pictures: list[np.ndarray], words: list[str]) -> np.ndarray:
    """The paper's figure: each word's attention over the photo side by side, the word under it."""
    height = max(p.shape[0] for p in pictures)
    label = 28
    columns = []
    for picture, word in zip(pictures, words):
        column = np.full((height + label, picture.shape[1], 3), 255, np.uint8)
        column[: picture.shape[0]] = picture
        scale = 0.6
        (text_width, _), _ = cv2.getTextSize(word, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        x = max(0, (picture.shape[1] - text_width) // 2)
        cv2.putText(column, word, (x, height + 20), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
        columns.append(column)
        columns.append(np.full((height + label, 4, 3), 255, np.uint8))
    return np.concatenate(columns[:-1], axis=1)
