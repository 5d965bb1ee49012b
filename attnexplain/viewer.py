"""What the interactive pages (report.html, a batch's detail pages) embed to draw maps themselves.

Each map travels as 8-bit levels of its own min–max range (base64), with that range, so the page
can colour it with any colormap, blend it at any opacity and read a value under the pointer,
without an extra file. The colormaps are OpenCV's tables, so the page and the written PNGs agree.
"""

from __future__ import annotations

import base64
import math
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from .formats import COLORMAP_NAMES
from .render import colormap_table, normalize_each, normalize_heatmap

if TYPE_CHECKING:
    from .results import MethodMap

#: Longest side of the maps report.html embeds (model inputs are ~224 px: kept whole).
REPORT_MAP_SIDE = 256
#: A batch writes thousands of detail pages: their maps are coarser (hover values stay right to
#: a few pixels of the model input).
DETAIL_MAP_SIDE = 96


def encode_levels(unit_map: np.ndarray) -> str:
    """A [0, 1] map (any shape) as base64 of its uint8 levels, row by row."""
    levels = np.asarray(unit_map, dtype=np.float32) * 255.0 + 0.5
    return base64.b64encode(np.clip(levels, 0, 255, out=levels).astype(np.uint8).tobytes()).decode("ascii")


def _shrunk(unit_map: np.ndarray, side: int) -> np.ndarray:
    height, width = unit_map.shape
    scale = side / max(height, width)
    if scale >= 1.0:
        return unit_map
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(unit_map, size, interpolation=cv2.INTER_AREA)


@lru_cache(maxsize=1)
def colormap_tables() -> dict[str, str]:
    """Every colormap as base64 of its 256 × RGB table."""
    return {name: base64.b64encode(colormap_table(name).tobytes()).decode("ascii") for name in COLORMAP_NAMES}


def method_entry(result: "MethodMap", target_label: str, side: int) -> dict[str, Any]:
    """One method's map for the page, its caption (what it is, its paper, what its colours mean)
    and, where the method has them, the learned attention per layer × head and rollout per depth."""
    from .errors import MethodError
    from .method_registry import find_method

    try:
        method = find_method(result.method)  # built-in, or the plugin's that made it
    except MethodError:
        method = None
    heatmap = np.nan_to_num(np.asarray(result.heatmap, dtype=np.float32))
    unit = _shrunk(normalize_heatmap(heatmap), side)
    entry: dict[str, Any] = {
        "method": result.key,
        "summary": method.summary if method else "",
        "paper": method.paper if method else "",
        "scale": (method.scale if method else "relative importance for {target}").replace(
            "{target}", target_label if result.target is None else result.key.partition("@")[2]
        ),
        "layers": list(result.layers),
        "min": float(heatmap.min()),
        "max": float(heatmap.max()),
        "width": int(unit.shape[1]),
        "height": int(unit.shape[0]),
        "levels": encode_levels(unit),
    }
    if result.attention_grid is not None:
        grid = np.asarray(result.attention_grid, dtype=np.float32)
        present = ~np.isnan(grid).all(axis=(2, 3))  # windowed models: fewer heads in early layers
        entry["attention"] = {
            "layers": int(grid.shape[0]),
            "heads": int(grid.shape[1]),
            "height": int(grid.shape[2]),
            "width": int(grid.shape[3]),
            "present": present.astype(int).tolist(),
            "levels": encode_levels(normalize_each(grid)),
            "mean_levels": encode_levels(
                normalize_each(np.nanmean(np.where(present[..., None, None], grid, np.nan), axis=1))
            ),
        }
    if result.depth_maps is not None:
        depths = np.asarray(result.depth_maps, dtype=np.float32)
        entry["depths"] = {
            "depths": int(depths.shape[0]),
            "height": int(depths.shape[1]),
            "width": int(depths.shape[2]),
            "levels": encode_levels(normalize_each(depths)),
        }
    return entry


def viewer_data(
    maps: dict[str, "MethodMap"],
    target_label: str,
    box: tuple[float, float, float, float],
    photo_size: tuple[int, int],
    side: int,
    colormap: str,
    alpha: float,
    detections: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Everything the page script draws from: the region of the photo the model saw (as shares of
    the photo: the page's photo may be shrunk) and each method's entry (the colormap tables are in
    the script, :func:`colormap_tables`)."""
    from .render import SHOWN_BOX_SCORE

    width, height = photo_size
    left, top, right, bottom = box
    data = {
        "box": [left / width, top / height, right / width, bottom / height],
        "methods": [method_entry(result, target_label, side) for result in maps.values()],
        "colormap": colormap,
        "alpha": alpha,
    }
    if detections:  # a detector's boxes, drawn over every overlay as the written pictures have them
        shown = [d for d in detections if d.get("explained")]
        shown += [d for d in detections if not d.get("explained") and d["score"] >= SHOWN_BOX_SCORE][:20]
        data["detections"] = [
            {
                "box": [d["box"][0] / width, d["box"][1] / height, d["box"][2] / width, d["box"][3] / height],
                "text": f"{d.get('label') or 'class ' + str(d['index'])} {d['score']:.2f}",
                "explained": bool(d.get("explained")),
            }
            for d in shown
        ]
    return data


def human_duration(seconds: float) -> str:
    """Seconds as a person reads them: "0.4 ms", "12.3 ms", "1.25 s", "2 min 5 s"."""
    if not math.isfinite(seconds) or seconds < 0:
        return "—"
    if seconds < 1.0:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 60.0:
        return f"{seconds:.2f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s"


def timing_name(key: str) -> str:
    """A timing's key as words: "load_model_s" → "load model"."""
    return key.removesuffix("_s").replace("_", " ")


def file_name(path: Any) -> str:
    """The title of a page about an image: its file name, not where it lies."""
    return Path(str(path)).name if path else "image"


def preprocessing_text(preprocessing: dict[str, Any]) -> str:
    """How the photo became the model's input, in words (from ``Preprocessing.as_dict()``)."""
    size = "×".join(str(v) for v in preprocessing.get("size") or [])
    if preprocessing.get("letterbox"):
        how = f"shrunk to fit {size} keeping its shape, padded with the mean colour"
    elif preprocessing.get("resize"):
        how = f"shorter side resized to {preprocessing['resize']}, then the centre {size} cropped"
    else:
        how = f"resized to {size} (height × width), the whole photo"

    def numbers(key: str) -> str:
        return ", ".join(f"{float(v):.3g}" for v in preprocessing.get(key) or [])

    return f"{how}; normalised with mean {numbers('mean')} and std {numbers('std')} ({preprocessing.get('source', '')})"
