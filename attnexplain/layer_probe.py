"""A model's layers as the CAM methods read them: each layer's output shape, probed once per model
and input shape (:func:`layer_infos`), and how a layer's 4-D output is read as a map
(:func:`map_layout`). Planning lists and chooses layers with them; the ``cam`` pass lays out
what it captured with them."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch

from .capture import LayerInfo, probe_layers
from .layout import decide
from .running import model_failures

if TYPE_CHECKING:
    from .loading import LoadedModel


def map_layout(
    loaded: "LoadedModel", layer: str, shape: tuple[int, ...], size: tuple[int, ...], inferred: str | None, batch: int
) -> tuple[str | None, str]:
    """How layer ``layer``'s 4-D output of ``shape`` is read as a map, for a batch of ``batch``
    inputs of ``size``: its layout, or None and the reason it cannot be
    (:func:`attnexplain.layout.decide`)."""
    return decide(loaded.plugin, loaded.module, layer, tuple(shape), inferred, (int(size[0]), int(size[1])), batch)


def layer_infos(loaded: "LoadedModel", batch: torch.Tensor) -> list[LayerInfo]:
    """:func:`_probe`'s answer for ``batch``'s shape, remembered per model and shape."""
    known = _probed_infos.setdefault(loaded.module, {})
    shape = tuple(batch.shape)
    if shape not in known:
        with model_failures(loaded.module):
            known[shape] = _probe(loaded, batch)
    return known[shape]


def _probe(loaded: "LoadedModel", batch: torch.Tensor) -> list[LayerInfo]:
    """Every layer's output shape, the model called as every pass calls it."""
    module, plugin = loaded.module, loaded.plugin
    return probe_layers(
        module,
        batch,
        forward_kwargs=plugin.forward_kwargs(module, tuple(batch.shape[-2:])),
        select=lambda name, output: plugin.select_output(module, name, output),
        said=lambda name: plugin.layer_layout(module, name),
    )


_probed_infos: "weakref.WeakKeyDictionary[Any, dict[tuple[int, ...], list[LayerInfo]]]" = weakref.WeakKeyDictionary()


__all__ = ["layer_infos", "map_layout"]
