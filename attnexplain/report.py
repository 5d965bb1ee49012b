"""Writing an explanation to disk: overlay, raw heatmap, report.json and a self-contained report.html."""

from __future__ import annotations

import base64
import io
import json
import platform
import re
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._atomic import atomic_directory
from .render import downscale, encode_image

if TYPE_CHECKING:
    from .explanation import Explanation

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
_PREVIEW_SIDE = 1024  # pixels; keeps report.html small enough to mail


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("attnexplain", "torch", "torchvision", "captum"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def output_dir_for(root: str | Path, image_path: str | Path | None) -> Path:
    """A folder under ``root`` for this image's outputs that never holds another image's.

    Named after the image's file name; a folder of that name that holds the report of a different
    image (same name, other folder) makes this one ``NAME-2``, ``NAME-3``...
    """
    root = Path(root)
    source = Path(image_path).resolve() if image_path else None
    stem = _safe_name(Path(image_path).stem if image_path else "image")
    candidate, number = root / stem, 1
    while candidate.exists():
        if source is not None and _report_image(candidate) == str(source):
            return candidate
        number += 1
        candidate = root / f"{stem}-{number}"
    return candidate


def _report_image(directory: Path) -> str | None:
    try:
        return json.loads((directory / REPORT_JSON).read_text(encoding="utf-8"))["image"]["path"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _safe_name(name: str) -> str:
    cleaned = re.sub(r"[^\w.-]+", "_", name).strip("._")
    return cleaned[:100] or "image"


def save_explanation(explanation: "Explanation", directory: Path, alpha: float) -> dict[str, Any]:
    """Write every output into a staging folder, then swap it in: no half-written results."""
    method = explanation.method
    overlay_name, heatmap_name = f"overlay-{method}.png", f"heatmap-{method}.npy"
    overlay = explanation.overlay(alpha)
    report = explanation.to_dict()
    report["outputs"] = {"directory": str(directory.resolve()), "overlay": overlay_name,
                         "heatmap": heatmap_name, "report_json": REPORT_JSON, "report_html": REPORT_HTML}
    with atomic_directory(directory) as staging:
        (staging / overlay_name).write_bytes(encode_image(overlay, ".png"))
        buffer = io.BytesIO()
        np.save(buffer, explanation.heatmap.astype(np.float32))
        (staging / heatmap_name).write_bytes(buffer.getvalue())
        (staging / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        html = render_html(report, explanation.image.pixels, overlay)
        (staging / REPORT_HTML).write_text(html, encoding="utf-8")
    return report


def render_html(report: dict[str, Any], photo: np.ndarray, overlay: np.ndarray) -> str:
    """The report as one HTML file with its images embedded, so it opens from disk or an e-mail."""
    return _template().render(
        report=report,
        photo_uri=_data_uri(downscale(photo, _PREVIEW_SIDE)),
        overlay_uri=_data_uri(downscale(overlay, _PREVIEW_SIDE)),
    )


def _data_uri(pixels: np.ndarray) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(encode_image(pixels, ".jpg")).decode("ascii")


@lru_cache(maxsize=1)
def _template():
    from jinja2 import Environment, PackageLoader, select_autoescape

    environment = Environment(loader=PackageLoader("attnexplain", "templates"),
                              autoescape=select_autoescape(["html", "j2"]))
    return environment.get_template("report.html.j2")
