"""Writing an explanation to disk: overlay, raw heatmap, report.json and a self-contained report.html."""

from __future__ import annotations

import base64
import errno
import io
import json
import os
import platform
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Protocol

import numpy as np

from ._atomic import atomic_directory
from .errors import OutputError
from .formats import DEFAULT_COLORMAP, OVERLAY_FORMATS, REPORT_HTML, REPORT_JSON
from .render import (
    NEARLY_FLAT_VARIATION,
    downscale,
    encode_image,
    flat_map,
    nearly_flat,
    render_attention_grid,
    render_model_view,
)
from .viewer import (
    REPORT_MAP_SIDE,
    colormap_tables,
    file_name,
    human_duration,
    preprocessing_text,
    timing_name,
    viewer_data,
)

if TYPE_CHECKING:
    from .images import LoadedImage
    from .preprocess import Preprocessing
    from .results import MethodMap, Prediction


class Explained(Protocol):
    """What the writers read of an :class:`attnexplain.Explanation`, which imports this module to
    save itself (so this module does not import it back)."""

    image: "LoadedImage"
    maps: dict[str, "MethodMap"]
    target: "Prediction"
    box: tuple[float, float, float, float]
    preprocessing: "Preprocessing"
    detections: list[dict[str, Any]] | None

    @property
    def method(self) -> str: ...

    def overlay(
        self, alpha: float = 0.5, method: str | None = None, colormap: str = DEFAULT_COLORMAP
    ) -> np.ndarray: ...

    def to_dict(self) -> dict[str, Any]: ...


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


def ensure_writable_folder(folder: str | Path) -> list[Path]:
    """Create ``folder`` if needed and prove that a file can be written in it, before any slow work
    (loading the model, explaining): a read-only, full or impossible ``--out`` fails first.

    Returns the folders it created, deepest first (see :func:`writable_output_folder`).
    """
    folder = Path(folder)
    created = [path for path in (folder, *folder.parents) if not path.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        descriptor, probe = tempfile.mkstemp(prefix=".attnexplain-write-check.", dir=folder)
        try:
            os.write(descriptor, b"attnexplain")
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
            os.unlink(probe)
    except OSError as error:
        _remove_empty(created)
        raise OutputError(
            f"Cannot write in the output folder {folder}: {why_not_written(folder, error)}; choose another --out."
        ) from None
    return created


@contextmanager
def writable_output_folder(folder: str | Path) -> Iterator[Path]:
    """:func:`ensure_writable_folder` for a command whose outputs are written in the block: if the
    block fails, the folders created for it are removed again (when still empty), so that a
    refused command leaves nothing behind."""
    created = ensure_writable_folder(folder)
    try:
        yield Path(folder)
    except BaseException:
        _remove_empty(created)
        raise


def _remove_empty(folders: list[Path]) -> None:
    for path in folders:  # deepest first
        try:
            path.rmdir()
        except OSError:  # not empty, or gone: leave the rest as they are
            return


def why_not_written(path: Path, error: OSError) -> str:
    if error.errno in (errno.ENOTDIR, errno.EEXIST):
        blocking = next((parent for parent in (path, *path.parents) if parent.is_file()), None)
        if blocking is not None:
            return f"{blocking} is a file, not a folder"
    reasons = {
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EROFS: "the file system is read-only",
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "the disk quota is exceeded",
    }
    return reasons.get(error.errno, error.strerror or str(error))


def _report_image(directory: Path) -> str | None:
    try:
        return json.loads((directory / REPORT_JSON).read_text(encoding="utf-8"))["image"]["path"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _safe_name(name: str) -> str:
    cleaned = re.sub(r"[^\w.-]+", "_", name).strip("._")
    return cleaned[:100] or "image"


def save_explanation(
    explanation: Explained, directory: Path, alpha: float, overlay_format: str = "png", colormap: str = DEFAULT_COLORMAP
) -> dict[str, Any]:
    """Write every output into a staging folder, then swap it in: no half-written results."""
    try:
        return _save_explanation(explanation, directory, alpha, overlay_format, colormap)
    except OSError as error:
        raise OutputError(
            f"Could not write the outputs to {directory}: {why_not_written(directory, error)}; "
            f"nothing was written there (an earlier result is kept)."
        ) from None


def _save_explanation(
    explanation: Explained, directory: Path, alpha: float, overlay_format: str, colormap: str
) -> dict[str, Any]:
    report = explanation.to_dict()
    files: dict[str, dict[str, str]] = {}
    previews: list[dict[str, Any]] = []
    with atomic_directory(directory) as staging:
        for name, result in explanation.maps.items():
            written = write_method_outputs(
                staging, result, explanation.overlay(alpha, name, colormap), overlay_format, colormap
            )
            files[name] = written.files
            preview = {
                "method": name,
                **method_summary(result),
                "overlay_uri": data_uri(downscale(written.pictures["overlay"], _PREVIEW_SIDE)),
            }
            if "attention_grid" in written.pictures:
                preview["grid_uri"] = data_uri(written.pictures["attention_grid"], ".png")
            if "gate_maps" in written.pictures:
                preview["gate_maps_uri"] = data_uri(written.pictures["gate_maps"], ".png")
            previews.append(preview)
        first = files[explanation.method]
        report["outputs"] = {
            "directory": str(directory.resolve()),
            "overlay": first["overlay"],
            "heatmap": first["heatmap"],
            "maps": files,
            "report_json": REPORT_JSON,
            "report_html": REPORT_HTML,
        }
        (staging / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        html = render_html(report, explanation, previews, alpha, colormap)
        (staging / REPORT_HTML).write_text(html, encoding="utf-8")
    return report


@dataclass
class MethodOutputs:
    """What :func:`write_method_outputs` wrote for one method."""

    files: dict[str, str]  # kind (overlay, heatmap, attention_grid, ...) → file name in the folder
    pictures: dict[str, np.ndarray]  # kind → the RGB picture written, for previews and thumbnails


def write_method_outputs(
    directory: Path,
    result: "MethodMap",
    overlay: np.ndarray,
    overlay_format: str = "png",
    colormap: str = DEFAULT_COLORMAP,
) -> MethodOutputs:
    """One method's files, the same for ``run`` and ``batch``.

    ``overlay-M.png`` or ``.jpg`` (``overlay``: the map over the photo, at the photo's resolution) and
    ``heatmap-M.npy`` (raw, at the model's input resolution); for raw attention also
    ``attention-grid-M.png`` and ``.npy`` (layers × heads), for gates ``gate-maps-M.png`` (the
    most-gated channels of the last block).
    """
    name = result.method if result.target is None else _safe_name(result.key)  # a label is the user's text
    if overlay_format not in OVERLAY_FORMATS:
        raise ValueError(f"overlay format must be one of {', '.join(OVERLAY_FORMATS)}, not {overlay_format!r}")
    files = {"overlay": f"overlay-{name}.{overlay_format}", "heatmap": f"heatmap-{name}.npy"}
    pictures = {"overlay": overlay}
    (directory / files["overlay"]).write_bytes(encode_image(overlay, f".{overlay_format}"))
    write_npy(directory / files["heatmap"], result.heatmap)
    if result.attention_grid is not None:
        files["attention_grid"] = f"attention-grid-{name}.png"
        files["attention_grid_npy"] = f"attention-grid-{name}.npy"
        heads = result.attention_grid.shape[1]
        pictures["attention_grid"] = render_attention_grid(
            result.attention_grid, cell=max(48, min(192, 480 // heads)), colormap=colormap
        )
        (directory / files["attention_grid"]).write_bytes(encode_image(pictures["attention_grid"], ".png"))
        write_npy(directory / files["attention_grid_npy"], result.attention_grid)
    if result.gate_maps is not None:
        files["gate_maps"] = f"gate-maps-{name}.png"
        pictures["gate_maps"] = render_attention_grid(result.gate_maps[None], cell=64, colormap=colormap)
        (directory / files["gate_maps"]).write_bytes(encode_image(pictures["gate_maps"], ".png"))
    return MethodOutputs(files, pictures)


def method_summary(result: "MethodMap") -> dict[str, Any]:
    """What a page shows beside one method's pictures: its layers, the attention grid's shape
    (layers, heads) and the gates' per-block summary, where the method has them, and a warning
    when the map is flat (all zero or constant: the overlay shows nothing) or nearly flat."""
    summary: dict[str, Any] = {"layers": list(result.layers)}
    if result.target is not None:  # one of several classes explained: the map names its own
        summary["target"] = {"index": result.target.index, "label": result.target.label, "method": result.method}
    warning = map_warning(result)
    if warning is not None:
        summary["warning"] = warning
    if result.attention_grid is not None:
        summary["grid_shape"] = [int(n) for n in result.attention_grid.shape[:2]]
    if result.gates is not None:
        summary["gates"] = result.gates
    return summary


def map_warning(result: "MethodMap") -> str | None:
    """A sentence for a map with nothing to show (see :func:`attnexplain.render.flat_map`) or too
    little variation to mean anything (:func:`attnexplain.render.nearly_flat`), saying what to try;
    None for a map with contrast."""
    where = f" at layer {', '.join(result.layers)}" if result.layers else ""
    flat = flat_map(result.heatmap)
    if flat is None:
        variation = nearly_flat(result.heatmap)
        if variation is None:
            return None
        low, high = float(np.nanmin(result.heatmap)), float(np.nanmax(result.heatmap))
        # Still drawn stretched (the pattern is all the map has), but never without this word.
        return (
            f"The {result.method} map{where} varies by only {variation:.1%} of its level ({low:.3g} "
            f"to {high:.3g}; under {NEARLY_FLAT_VARIATION:.0%}, as maps of untrained weights do), too "
            f"little to mean anything: its overlay stretches that to full contrast. Check that the "
            f"model's weights are trained."
        )
    cause = (
        "no positive evidence for this class there, or random weights"
        if flat == "all zero"
        else "it differs only by float32 rounding"
    )
    advice = (
        "try another --layer (`attnexplain layers` lists them) or --method layercam"
        if result.layers
        else "try another --method (e.g. layercam or saliency)"
    )
    return f"The {result.method} map{where} is {flat} ({cause}), so its overlay shows no region; {advice}."


def write_npy(path: Path, array: np.ndarray) -> None:
    """A float32 .npy file (a map or a grid of maps), as every output folder holds them."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, dtype=np.float32))
    path.write_bytes(buffer.getvalue())


def render_html(
    report: dict[str, Any],
    explanation: Explained,
    previews: list[dict[str, Any]],
    alpha: float = 0.5,
    colormap: str = DEFAULT_COLORMAP,
) -> str:
    """The report as one HTML file with its images and raw maps embedded, so it opens from disk or
    an e-mail and redraws the overlays itself (opacity, colormap, values under the pointer)."""
    preprocessing = explanation.preprocessing
    seen = render_model_view(
        explanation.image.pixels, explanation.box, preprocessing.size, tuple(255.0 * v for v in preprocessing.mean)
    )
    target = explanation.target
    data = viewer_data(
        explanation.maps,
        target.label if target.label is not None else f"class {target.index}",
        explanation.box,
        explanation.image.size,
        REPORT_MAP_SIDE,
        colormap,
        alpha,
        explanation.detections,
    )
    return (
        templates()
        .get_template("report.html.j2")
        .render(
            report=report,
            title=file_name(report["image"]["path"]),
            photo_uri=data_uri(downscale(explanation.image.pixels, _PREVIEW_SIDE)),
            model_view_uri=data_uri(downscale(seen, _PREVIEW_SIDE), ".png"),
            previews=previews,
            viewer=data,
        )
    )


def data_uri(pixels: np.ndarray, extension: str = ".jpg") -> str:
    """An RGB picture as a data: URI (JPEG, or PNG for ``extension=".png"``), for pages that inline their images."""
    kind = "png" if extension == ".png" else "jpeg"
    return f"data:image/{kind};base64," + base64.b64encode(encode_image(pixels, extension)).decode("ascii")


@lru_cache(maxsize=1)
def templates():
    """The Jinja2 environment of every page attnexplain writes (templates/, HTML autoescaped)."""
    from urllib.parse import quote

    from jinja2 import Environment, PackageLoader, select_autoescape

    # auto_reload off: the templates ship with the package, and checking each file's mtime on every
    # page (8 stat calls for a detail page) cost more than a third of rendering it.
    environment = Environment(
        loader=PackageLoader("attnexplain", "templates"),
        autoescape=select_autoescape(["html", "j2"]),
        auto_reload=False,
        trim_blocks=True,
        lstrip_blocks=True,
    )  # thousands of pages: no idle bytes
    # Relative links to output files whose names may hold spaces, '#', '?' or worse.
    environment.filters["url"] = lambda path: quote(path, safe="/")
    environment.filters["duration"] = human_duration
    environment.filters["timing_name"] = timing_name
    environment.filters["file_name"] = file_name
    environment.filters["preprocessing_text"] = preprocessing_text
    environment.globals["colormap_tables"] = colormap_tables
    return environment
