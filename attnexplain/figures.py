"""Figures for papers, as matplotlib ``Figure`` objects: the photo and each method's overlay in a row
(``result.figure()``), a grid of several images (:func:`figure`), the
attention of every layer × head (:func:`attention_grid_figure`) and rollout by depth
(:func:`depth_figure`).

matplotlib is an optional extra (``pip install 'attnexplain[figures]'``), imported only when a figure
is made. The overlays are the pictures ``run`` writes (the same colours, the region the model saw);
titles and colour bars are vector text and shapes, so a PDF keeps them sharp. Figures are made
without pyplot: nothing is shown or kept open, ``fig.savefig`` writes them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .errors import AttnExplainError
from .formats import DEFAULT_COLORMAP

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .explanation import Explanation
    from .results import MethodMap

#: What a figure function says when matplotlib is not installed.
INSTALL_HINT = "Figures need matplotlib, an optional extra: pip install 'attnexplain[figures]'"
#: Inches per panel (a photo or an overlay) of a row; 7 inches, a page's text width, hold 3.
PANEL_INCHES = 2.2


class MatplotlibMissing(AttnExplainError):
    """A figure asked for without matplotlib installed."""


def figure(
    explanations: Sequence["Explanation"],
    methods: Sequence[str] | str | None = None,
    *,
    alpha: float = 0.5,
    colormap: str = DEFAULT_COLORMAP,
    colorbar: bool = True,
    titles: bool = True,
    photo: bool = True,
    panel_inches: float = PANEL_INCHES,
) -> "Figure":
    """Several images in a grid: a row per result, a column for the photo (``photo=False`` leaves it
    out) and one per method (default: the first result's methods, which every result must have).
    Titles name the methods over the first row and each row's explained class over its photo; with
    ``colorbar``, each overlay has a colour bar of its map's own range under it, labelled with what
    it shows. ``panel_inches``: the width of each panel."""
    results = list(explanations)
    if not results:
        raise ValueError("figure() needs at least one explanation.")
    names = _method_names(results, methods)
    Figure = _figure_class()
    columns = len(names) + (1 if photo else 0)
    rows = len(results)
    bar_inches = 0.45 if colorbar else 0.0
    fig = Figure(
        figsize=(panel_inches * columns, (panel_inches + bar_inches) * rows + (0.3 if titles else 0.0)),
        layout="constrained",
    )
    grid = fig.add_gridspec(rows, columns)
    for row, result in enumerate(results):
        column = 0
        if photo:
            axes = fig.add_subplot(grid[row, 0])
            _picture(axes, result.image.pixels)
            if titles:
                axes.set_title(_target_title(result), fontsize=9)
            column = 1
        for name in names:
            axes = fig.add_subplot(grid[row, column])
            _picture(axes, result.overlay(alpha, name, colormap))
            if titles and (row == 0 or not photo):
                axes.set_title(name, fontsize=10)
            if colorbar:
                _colour_bar(fig, axes, colormap, result.maps[name], _scale_text(result, name))
            column += 1
    return fig


def attention_grid_figure(
    explanation: "Explanation",
    method: str | None = None,
    *,
    colormap: str = DEFAULT_COLORMAP,
    cell_inches: float = 0.8,
    titles: bool = True,
) -> "Figure":
    """The learned attention of every layer (rows) and head (columns): each cell the attention the
    class token (or the attention pooling) pays to each position of the grid, scaled to its own
    range (a weak head stays as readable as a strong one). ``method``: a method whose result has an
    attention grid (raw ``attention``; default: the first such)."""
    from .render import normalize_each

    result = _with(explanation, method, "attention_grid", "attention grid (--method attention makes one)")
    grid = np.asarray(result.attention_grid, dtype=np.float32)
    layers, heads = grid.shape[:2]
    present = np.asarray(~np.isnan(grid).all(axis=(2, 3)))  # windowed models: fewer heads in early layers
    unit = normalize_each(grid)
    Figure = _figure_class()
    fig = Figure(
        figsize=(cell_inches * heads + 0.8, cell_inches * layers + (0.5 if titles else 0.1)), layout="constrained"
    )
    cells = fig.subplots(layers, heads, squeeze=False)
    for layer in range(layers):
        for head in range(heads):
            axes = cells[layer, head]
            if present[layer, head]:
                axes.imshow(_coloured(unit[layer, head], colormap), interpolation="nearest")
            _bare(axes)
            if head == 0:
                axes.set_ylabel(f"layer {layer + 1}", fontsize=7)
            if layer == 0:
                axes.set_title(f"head {head + 1}", fontsize=7)
    if titles:
        fig.suptitle(f"{result.method}: attention per layer × head ({_target_title(explanation)})", fontsize=9)
    return fig


def depth_figure(
    explanation: "Explanation",
    method: str | None = None,
    *,
    alpha: float = 0.5,
    colormap: str = DEFAULT_COLORMAP,
    panel_inches: float = 1.6,
    titles: bool = True,
) -> "Figure":
    """Rollout through the first 1, 2, … layers, each over the photo, in a row (the last is the
    rollout map itself). ``method``: a method whose result has maps by depth (``rollout`` over
    global attention; default: the first such)."""
    from .render import render_overlay

    result = _with(
        explanation, method, "depth_maps", "maps by depth (--method rollout makes them, over global attention)"
    )
    depths = np.asarray(result.depth_maps, dtype=np.float32)
    Figure = _figure_class()
    fig = Figure(figsize=(panel_inches * len(depths), panel_inches + (0.5 if titles else 0.1)), layout="constrained")
    panels = fig.subplots(1, len(depths), squeeze=False)[0]
    for depth, (axes, depth_map) in enumerate(zip(panels, depths), start=1):
        # The grid-level map, stretched over the region the model saw as every overlay is.
        _picture(axes, render_overlay(explanation.image.pixels, depth_map, explanation.box, alpha, colormap))
        if titles:
            axes.set_title(f"{depth} layer{'s' if depth > 1 else ''}", fontsize=8)
    if titles:
        fig.suptitle(f"{result.method} by depth ({_target_title(explanation)})", fontsize=9)
    return fig


def _figure_class() -> Any:
    """matplotlib's ``Figure`` (not pyplot: no window, no global state), or a one-line error."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MatplotlibMissing(INSTALL_HINT + ".") from None
    return Figure


def _method_names(results: list["Explanation"], methods: Sequence[str] | str | None) -> list[str]:
    if methods is None:
        names = list(results[0].maps)
    elif isinstance(methods, str):
        names = [name.strip() for name in methods.split(",") if name.strip()]
    else:
        names = list(methods)
    for index, result in enumerate(results):
        missing = [name for name in names if name not in result.maps]
        if missing:
            raise ValueError(
                f"Result {index + 1} has no {missing[0]!r} map (it has {', '.join(result.maps)}); "
                f"explain every image with the same methods, or name those to show with methods=."
            )
    return names


def _with(explanation: "Explanation", method: str | None, field: str, what: str) -> "MethodMap":
    """The result of ``method`` (default: the first method whose result has ``field``)."""
    candidates = [explanation.maps[method]] if method is not None else list(explanation.maps.values())
    found = next((result for result in candidates if getattr(result, field) is not None), None)
    if found is None:
        named = f"The {method} map" if method is not None else f"None of {', '.join(explanation.maps)}"
        raise ValueError(f"{named} has no {what}.")
    return found


def _picture(axes: "Axes", pixels: np.ndarray) -> None:
    axes.imshow(pixels, interpolation="antialiased")
    _bare(axes)


def _bare(axes: "Axes") -> None:
    axes.set_xticks([])
    axes.set_yticks([])
    for spine in axes.spines.values():
        spine.set_visible(False)


def _coloured(unit_map: np.ndarray, colormap: str) -> np.ndarray:
    from .render import colorize

    return colorize(unit_map, colormap)


def _target_title(explanation: "Explanation") -> str:
    target = explanation.target
    label = target.label if target.label is not None else f"class {target.index}"
    return f"{label} ({target.prob:.0%})"


def _scale_text(explanation: "Explanation", name: str) -> str:
    """What the method's colours mean, low to high (the report's caption)."""
    from .viewer import method_entry

    target = explanation.target
    label = target.label if target.label is not None else f"class {target.index}"
    return method_entry(explanation.maps[name], label, 8)["scale"]  # its caption; the small levels unused


def _colour_bar(fig: "Figure", axes: "Axes", colormap: str, result: "MethodMap", label: str) -> None:
    """A horizontal colour bar under ``axes``: the map's own range, min → max, stretched over the
    colormap as the overlay is (the same table)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize

    from .render import colormap_table

    heatmap = np.nan_to_num(np.asarray(result.heatmap, dtype=np.float64))
    low, high = float(heatmap.min()), float(heatmap.max())
    mappable = ScalarMappable(
        Normalize(low, high if high > low else low + 1.0), ListedColormap(colormap_table(colormap) / 255.0)
    )
    bar = fig.colorbar(mappable, ax=axes, orientation="horizontal", fraction=0.06, pad=0.02, aspect=25)
    bar.set_ticks([low, high] if high > low else [low])
    bar.ax.tick_params(labelsize=6, length=2)
    bar.set_label(label, fontsize=6)
    bar.outline.set_linewidth(0.3)


__all__ = [
    "INSTALL_HINT",
    "MatplotlibMissing",
    "attention_grid_figure",
    "depth_figure",
    "figure",
]
