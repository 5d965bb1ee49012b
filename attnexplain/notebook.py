"""How an :class:`attnexplain.Explanation` shows itself in Jupyter and IPython: ``_repr_html_`` (the
photo, each method's overlay with its colour bar, the predictions; images inlined, no script, no
network) and ``_repr_png_`` (the photo and the overlays in a row, for consoles and exports). Drawn
with OpenCV: no matplotlib needed (that is :mod:`attnexplain.figures`, for papers)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

from .formats import DEFAULT_COLORMAP
from .render import colormap_table, downscale, encode_image
from .report import data_uri, map_warning, templates
from .viewer import file_name, method_entry, preprocessing_text

if TYPE_CHECKING:
    from .explanation import Explanation

#: Longest side of each picture inlined in a notebook (kept small: a notebook stores its outputs).
NOTEBOOK_SIDE = 256
#: Height of each tile of the ``_repr_png_`` row.
ROW_HEIGHT = 224


def notebook_html(explanation: "Explanation", alpha: float = 0.5, colormap: str = DEFAULT_COLORMAP) -> str:
    """A compact HTML summary: what was explained, the photo and each method's overlay with its
    colour bar, range and warnings, the predictions, the model and its preprocessing. Every text
    from the model, the labels or the file name is escaped (the template autoescapes)."""
    target = explanation.target
    target_label = target.label if target.label is not None else f"class {target.index}"
    methods = []
    for name, result in explanation.maps.items():
        entry = method_entry(result, target_label, 8)  # its caption, scale and range; the levels unused
        methods.append(
            {
                **{key: entry[key] for key in ("method", "summary", "scale", "layers", "min", "max")},
                "overlay_uri": data_uri(downscale(explanation.overlay(alpha, name, colormap), NOTEBOOK_SIDE)),
                "warning": map_warning(result),
            }
        )
    image = explanation.image
    photo = downscale(image.pixels, NOTEBOOK_SIDE)  # the overlays have the photo's shape
    return (
        templates()
        .get_template("notebook.html.j2")
        .render(
            title=file_name(image.path),
            image=image.describe(),
            model=explanation.model.describe(),
            target=target,
            target_label=target_label,
            predictions=explanation.predictions,
            photo_uri=data_uri(photo),
            colorbar_uri=data_uri(colormap_table(colormap)[None], ".png"),
            methods=methods,
            preprocessing=preprocessing_text(explanation.preprocessing.as_dict()),
            width=max(photo.shape[1], 120),  # each picture's column, its bar and caption under it
        )
    )


def notebook_png(
    explanation: "Explanation", alpha: float = 0.5, colormap: str = DEFAULT_COLORMAP, height: int = ROW_HEIGHT
) -> bytes:
    """One PNG: the photo and each method's overlay in a row, ``height`` pixels high, each captioned
    (``photo``, the method's name) with a colour bar under each overlay."""
    tiles = [_tile(explanation.image.pixels, "photo", height, None)]
    for name in explanation.maps:
        tiles.append(_tile(explanation.overlay(alpha, name, colormap), name, height, colormap))
    return encode_image(_row(tiles), ".png")


_CAPTION_HEIGHT = 22
_BAR_HEIGHT = 8
_GAP = 6


def _tile(picture: np.ndarray, caption: str, height: int, colormap: str | None) -> np.ndarray:
    """``picture`` at ``height`` pixels high, a colour bar under it (for an overlay) and a caption."""
    width = max(1, round(picture.shape[1] * height / picture.shape[0]))
    resized = cv2.resize(picture, (width, height), interpolation=cv2.INTER_AREA)
    bar = np.full((_BAR_HEIGHT + 2, width, 3), 255, np.uint8)
    if colormap is not None:
        levels = colormap_table(colormap)[np.linspace(0, 255, width).round().astype(int)]
        bar[2:] = levels[None]
    strip = np.full((_CAPTION_HEIGHT, width, 3), 255, np.uint8)
    # OpenCV's fonts draw ASCII only: a method's name is one (a registry name).
    text = caption.encode("ascii", "replace").decode("ascii")
    cv2.putText(strip, text, (3, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (30, 30, 30), 1, cv2.LINE_AA)
    return np.vstack([resized, bar, strip])


def _row(tiles: list[np.ndarray]) -> np.ndarray:
    height = max(tile.shape[0] for tile in tiles)
    parts: list[np.ndarray] = []
    for tile in tiles:
        if parts:
            parts.append(np.full((height, _GAP, 3), 255, np.uint8))
        parts.append(np.vstack([tile, np.full((height - tile.shape[0], tile.shape[1], 3), 255, np.uint8)]))
    return np.hstack(parts)


__all__ = ["NOTEBOOK_SIDE", "ROW_HEIGHT", "notebook_html", "notebook_png"]
