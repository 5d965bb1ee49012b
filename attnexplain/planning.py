"""Choosing what to compute before any image is seen (:func:`plan_explanation`, a :class:`Plan`):
the preprocessing, the methods a name stands for (``auto`` included), checked against what the model
allows, and the CAM layers."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

from .errors import MethodError
from .layer_probe import layer_infos, map_layout
from .layout import as_map
from .method_registry import find_method
from .methods import Method
from .passes.attention import token_readout
from .preprocess import DEFAULT_SIZE, Preprocessing
from .running import model_device

if TYPE_CHECKING:
    from .loading import LoadedModel


def resolve_methods(loaded: "LoadedModel", requested: str | Sequence[str]) -> list[Method]:
    """The methods called ``requested`` (``auto`` chooses), checked against what the model allows.

    Names are built-in methods or those the model's plugin adds (:func:`~attnexplain.method_registry.find_method`).
    The plugin is asked about every method (:meth:`~attnexplain.plugins.ModelPlugin.refuse_method`):
    a method it refuses is an error when named, and ``auto`` leaves it out.
    """
    names = _split_names(requested)
    if not names:
        raise MethodError("No method was given.")
    has_attention = loaded.inner_layers and bool(loaded.plugin.attention_modules(loaded.module))
    automatic: list[str] = []
    if "auto" in names:
        automatic = _automatic_methods(loaded, has_attention)
        position = names.index("auto")
        names[position : position + 1] = automatic
    chosen: list[Method] = []
    for name in names:
        method = find_method(name, loaded.plugin)
        refusal = loaded.plugin.refuse_method(loaded.module, name) if loaded.inner_layers else None
        if refusal is not None:
            if name in automatic:
                continue
            raise MethodError(f"{name}: {refusal}")
        needs_layers = method.family != "input" or method.name in ("guided_gradcam", "fullgrad") or method.needs_modules
        if needs_layers and not loaded.inner_layers:
            raise MethodError(
                f"{name} needs the model's inner layers, which a {loaded.loader} model "
                f"does not expose; use --method saliency, or load the weights as a "
                f"state_dict with --arch."
            )
        if method.family == "gates" and not loaded.plugin.gate_modules(loaded.module):
            raise MethodError(
                f"{name} needs squeeze-and-excitation blocks; plugin "
                f"{loaded.plugin.name} knows none in this {type(loaded.module).__name__}."
            )
        if method.family == "attention" and not has_attention:
            raise MethodError(
                f"{name} needs attention layers; plugin {loaded.plugin.name} knows none "
                f"in this {type(loaded.module).__name__}. Use --method gradcam."
            )
        if method.name == "legrad":
            token_readout(loaded)
        if method not in chosen:
            chosen.append(method)
    if not chosen:
        raise MethodError(
            f"Plugin {loaded.plugin.name} refuses every method `auto` chose ({', '.join(automatic)}); name a --method."
        )
    return chosen


def _automatic_methods(loaded: "LoadedModel", has_attention: bool) -> list[str]:
    """What ``auto`` stands for: the plugin's choice, else rollout where attention is known,
    Grad-CAM where inner layers are, saliency otherwise."""
    automatic = loaded.plugin.default_method(loaded.module) if loaded.inner_layers else None
    if not automatic:
        automatic = "rollout" if has_attention else ("gradcam" if loaded.inner_layers else "saliency")
    return _split_names(automatic)


def _split_names(requested: str | Sequence[str]) -> list[str]:
    parts = requested.split(",") if isinstance(requested, str) else [str(part) for part in requested]
    return [part.strip() for part in parts if part.strip()]


def default_layer(loaded: "LoadedModel", batch: torch.Tensor) -> str:
    """The plugin's choice, else the last layer to produce a spatial map the core can read (a
    (B, C, H, W) map, or one the plugin or the layout evidence lays out as one; see
    :mod:`attnexplain.layout`)."""
    chosen = loaded.plugin.default_layer(loaded.module)
    if chosen:
        return chosen
    # The probe depends only on the model and the input's shape: remember it for later calls.
    known = _probed_layers.setdefault(loaded.module, {})
    shape = tuple(batch.shape[1:])
    if shape not in known:
        spatial = [
            info
            for info, map_shape in layer_maps(loaded, batch)
            if map_shape is not None and map_shape[2] * map_shape[3] > 1 and info.depends_on_input
        ]
        known[shape] = spatial[-1].name if spatial else None
    if known[shape] is None:
        raise MethodError(
            "No layer of this model outputs a spatial (batch, channels, height, width) "
            "map, so the CAM methods have nothing to weight; try --method saliency."
        )
    return known[shape]


def layer_maps(loaded: "LoadedModel", batch: torch.Tensor) -> list[tuple[Any, tuple[int, ...] | None]]:
    """Every layer (see :func:`attnexplain.capture.probe_layers`) with the shape of the (B, C, H, W)
    map the CAM methods would weight, None where its output is none (after the plugin's
    :meth:`~attnexplain.plugins.ModelPlugin.layer_map`, or laid out as
    :func:`~attnexplain.layer_probe.map_layout` says;
    shapes only: nothing is computed)."""
    size = tuple(batch.shape[-2:])
    found = []
    for info in layer_infos(loaded, batch):
        shape = None
        if info.shape is not None:
            laid_out = loaded.plugin.layer_map(loaded.module, info.name, torch.empty(info.shape, device="meta"), size)
            if laid_out is not None:
                shape = tuple(laid_out.shape)
            elif len(info.shape) == 4:
                layout, _ = map_layout(loaded, info.name, info.shape, size, info.layout, int(batch.shape[0]))
                laid_out = as_map(layout, torch.empty(info.shape, device="meta")) if layout else None
                if laid_out is not None and laid_out.shape[2] * laid_out.shape[3] > 1:
                    shape = tuple(laid_out.shape)  # one position (pooled) is nothing to weight
        found.append((info, shape))
    return found


_probed_layers: "weakref.WeakKeyDictionary[Any, dict[tuple[int, ...], str | None]]" = weakref.WeakKeyDictionary()


def layer_names(layer: str | Sequence[str] | None) -> list[str]:
    return [] if layer is None else _split_names(layer)


@dataclass(frozen=True)
class Plan:
    """What an explanation will do, decided once before any image is seen."""

    preprocessing: Preprocessing
    methods: list[Method]
    layers: list[str]  # CAM layers (empty when no method needs one)


def plan_explanation(
    loaded: "LoadedModel",
    method: str | Sequence[str] = "auto",
    layer: str | Sequence[str] | None = None,
    *,
    size: Sequence[int] | int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Plan:
    """Preprocessing, methods and layers for ``loaded``: what :func:`attnexplain.explain` and the batch command
    share. The default layer is found from the input's shape alone."""
    preprocessing = plan_preprocessing(loaded, size=size, mean=mean, std=std)
    methods = resolve_methods(loaded, method)
    layers = layer_names(layer)
    needs_layer = any(m.family == "cam" or m.name == "guided_gradcam" for m in methods)
    if layers and not needs_layer:
        raise MethodError(f"--layer does not apply to {', '.join(m.name for m in methods)}.")
    if needs_layer and not layers:
        probe = torch.zeros(1, 3, *preprocessing.size, device=model_device(loaded.module))
        layers = [default_layer(loaded, probe)]
    return Plan(preprocessing, methods, layers)


def plan_preprocessing(
    loaded: "LoadedModel",
    *,
    size: Sequence[int] | int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Preprocessing:
    """The model's preprocessing (its file's, its plugin's, torchvision's evaluation crop for a
    classifier's file that says none: :data:`~attnexplain.preprocess.DEFAULT_PREPROCESSING`; else the
    whole photo at 224×224) with the user's overrides."""
    return (loaded.preprocessing or Preprocessing(size=DEFAULT_SIZE)).with_overrides(size=size, mean=mean, std=std)
