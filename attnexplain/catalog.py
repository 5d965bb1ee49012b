"""Which models attnexplain can explain out of the box: every plugin's catalog, checked by running."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .plugins import CatalogEntry, ModelPlugin, installed_plugins

if TYPE_CHECKING:
    from .loading import LoadedModel


@dataclass(frozen=True)
class CatalogRow:
    entry: CatalogEntry
    plugin: str
    method: str | None = None
    layer: str | None = None
    status: str = "not checked"  # "ok", "failed: ...", "not supported: ..."
    seconds: float | None = None


def catalog_entries() -> list[tuple[ModelPlugin, CatalogEntry]]:
    return [(plugin, entry) for plugin in sorted(installed_plugins(), key=lambda p: p.name)
            for entry in plugin.catalog()]


def _loaded(plugin: ModelPlugin, entry: CatalogEntry, module) -> "LoadedModel":
    """A catalog model as ``load_model`` would hand it over: the plugin that claims it, its
    preprocessing."""
    from .loading import LoadedModel
    from .plugins import select_plugin

    chosen = select_plugin(module)
    return LoadedModel(module=module, source=f"{plugin.name}:{entry.name}", loader=plugin.name,
                       architecture=entry.name, plugin=chosen, preprocessing=chosen.preprocessing(module))


def describe_entry(plugin: ModelPlugin, entry: CatalogEntry) -> CatalogRow:
    """What ``--method auto`` means for ``entry`` and which layer it uses, without computing anything:
    the model is built on the meta device (no memory, no initialisation) and its default layer
    found from shapes alone. Status ``supported`` means listed as explained, not yet checked."""
    import torch

    from .planning import default_layer, resolve_methods

    if not entry.supported:
        return CatalogRow(entry, plugin.name, status=f"not supported: {entry.note}")
    try:
        with torch.device("meta"):
            module = entry.build().eval()
        loaded = _loaded(plugin, entry, module)
        methods = resolve_methods(loaded, "auto")
        layer = None
        if any(method.family == "cam" for method in methods):
            probe = torch.zeros(1, 3, entry.input_size, entry.input_size, device="meta")
            layer = default_layer(loaded, probe)
    except Exception:  # a builder that computes with real tensors while constructing
        return CatalogRow(entry, plugin.name, status="supported (method and layer: see --check)")
    return CatalogRow(entry, plugin.name, ",".join(m.name for m in methods), layer, "supported")


def check_entry(plugin: ModelPlugin, entry: CatalogEntry, seed: int = 0) -> CatalogRow:
    """Build ``entry`` with random weights and explain a synthetic image with ``--method auto``.

    Passes when the heatmap is finite and not constant and the overlay has the image's size (and, for
    a detector, the explained box is among the detections).
    """
    import torch

    from .explanation import explain

    if not entry.supported:
        return CatalogRow(entry, plugin.name, status=f"not supported: {entry.note}")
    started = time.perf_counter()
    try:
        torch.manual_seed(seed)
        module = entry.build().eval()
        loaded = _loaded(plugin, entry, module)
        height, width = entry.input_size + 16, entry.input_size + 40  # not square, not input-sized
        image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
        result = explain(loaded, image, "auto", size=entry.input_size)
        heatmap = result.heatmap
        problems = []
        if not np.isfinite(heatmap).all():
            problems.append("heatmap has NaN or inf")
        elif float(heatmap.std()) == 0.0:
            problems.append("heatmap is constant")
        if result.overlay().shape != (height, width, 3):
            problems.append("overlay is not the image's size")
        if entry.task == "detection" and not any(box["explained"] for box in result.detections or []):
            problems.append("no detected box is marked as the one explained")
        status = "ok" if not problems else "failed: " + "; ".join(problems)
        return CatalogRow(entry, plugin.name, ",".join(result.maps), result.layer, status,
                          time.perf_counter() - started)
    except Exception as error:
        text = " ".join(str(error).split())[:200]
        return CatalogRow(entry, plugin.name, status=f"failed: {type(error).__name__}: {text}",
                          seconds=time.perf_counter() - started)
