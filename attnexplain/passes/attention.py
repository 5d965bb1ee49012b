"""The ``attention`` family's pass: one forward, inside the plugin's recording context, records
every attention layer's probabilities (and, for the gradient methods, their gradients).

Attention comes recorded in one of three forms (see :mod:`attnexplain.methods.attention`): global
self-attention tensors placed on the image by the plugin's token grid, :class:`WindowedAttention`
carrying its own positions, and :class:`SpatialAttention`, weights on each layer's own grid. The
last does not chain from layer to layer, so the methods that chain it are refused for it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from ..capture import attention_gradients, capture_activations, frozen_parameters
from ..detection_targets import query_rows
from ..errors import MethodError
from ..methods import Method
from ..methods.attention import (
    attention_received,
    raw_attention,
    rollout_by_depth,
    spatial_attention,
    spatial_attention_grid,
)
from ..plugins import EncoderDecoderAttention, SpatialAttention, TokenReadout, WindowedAttention
from ..precision import as_float32
from .base import PassOutput, PassRun, no_gradient, upsample
from .encoder_decoder import encoder_decoder_maps
from .registry import register_pass

if TYPE_CHECKING:
    from ..loading import LoadedModel

#: The built-in methods that chain attention between the same tokens from layer to layer.
CHAINING_METHODS = ("rollout", "chefer", "legrad")


@register_pass("attention")
def attention_pass(run: PassRun, methods: list[Method]) -> PassOutput:
    loaded, batch, options = run.loaded, run.batch, run.options
    module, plugin = loaded.module, loaded.plugin
    names = plugin.attention_modules(module)
    needs_gradient = any(m.needs_gradient for m in methods)
    captured: dict[str, torch.Tensor] = {}
    readout = token_readout(loaded) if any(m.name == "legrad" for m in methods) else None
    block_tokens: dict[str, torch.Tensor] = {}
    # Gradients with respect to attention need a graph through the attention layers: with every
    # parameter frozen, an input that requires a gradient provides it.
    inputs = batch.detach().requires_grad_(needs_gradient)
    with (
        frozen_parameters(module),
        plugin.recording(module),
        plugin.capture_attention(module, names, captured),
        capture_activations(module, readout.blocks if readout else [], block_tokens),
        torch.set_grad_enabled(needs_gradient),
    ):
        logits, targets = run.score(run.forward(inputs))
        missing = [name for name in names if name not in captured]
        if missing:
            raise MethodError(f"No attention was recorded for {', '.join(missing)}.")
        attentions = [captured[name] for name in names]
        if isinstance(attentions[0], SpatialAttention):
            return _spatial_pass(run, methods, attentions)
        if isinstance(attentions[0], EncoderDecoderAttention):  # a DETR-like decoder: its own rules
            return encoder_decoder_maps(run, methods, attentions, logits, targets, _explained_queries(run))
        windowed = isinstance(attentions[0], WindowedAttention)
        probabilities = [a.probabilities if windowed else a for a in attentions]
        gradients = layer_gradients = None
        if needs_gradient:
            if not logits.requires_grad:
                raise MethodError(no_gradient("the attention layers", "--method rollout or attention (gradient-free)"))
            if readout is not None:
                layer_gradients = as_float32(_layer_score_gradients(readout, block_tokens, probabilities, targets))
            if any(m.needs_gradient and m.name != "legrad" for m in methods):  # legrad has its own
                gradients = as_float32(attention_gradients(logits.gather(1, targets[:, None]).sum(), probabilities))
    size = run.size
    if windowed:
        grid = None  # each layer carries its positions
        attentions = [dataclasses.replace(a, probabilities=as_float32(a.probabilities.detach())) for a in attentions]
    else:
        grid = plugin.token_grid(module, size)
        if grid is None:
            raise MethodError(f"Plugin {plugin.name} does not say how this model's tokens map to the image.")
        # float32 whatever precision the forward ran in: rollout multiplies them layer after layer.
        attentions = [as_float32(attention.detach()) for attention in attentions]
        queries = _explained_queries(run)
        if queries is not None:  # a detector's object queries: the explained box's row
            attentions = query_rows(attentions, queries)
            gradients = query_rows(gradients, queries) if gradients is not None else None
    maps, grids, depth_maps = {}, {}, {}
    for method in methods:
        try:
            if method.name == "rollout" and not windowed:  # one pass gives every depth, the last is the map
                depth_maps[method.name] = rollout_by_depth(attentions, grid, options.head_fusion, options.discard_ratio)
                maps[method.name] = upsample(depth_maps[method.name][:, -1], size)
                continue
            maps[method.name], grid_maps = _attention_map(
                method, attentions, layer_gradients if method.name == "legrad" else gradients, grid, options, size
            )
        except ValueError as error:  # the attention's shape does not suit the method
            raise MethodError(f"{method.name}: {error}.") from None
        if grid_maps is not None:
            grids[method.name] = grid_maps
    return PassOutput(maps=maps, layers={name: [] for name in maps}, attention_grids=grids, depth_maps=depth_maps)


def _explained_queries(run: PassRun) -> torch.Tensor | None:
    """(B,) the object query of each image's explained box, when a detector's boxes are queries of
    its recorded attention (:attr:`~attnexplain.plugins.Detections.queries`)."""
    chosen, detections = run.state.get("boxes"), run.state.get("detections")
    return chosen.queries(detections) if chosen is not None and detections is not None else None


def _spatial_pass(run: PassRun, methods: list[Method], recorded: list[SpatialAttention]) -> PassOutput:
    """Attention recorded per layer on its own grid: ``attention`` resizes each layer's weights to
    the input and averages them (:func:`~attnexplain.methods.attention.spatial_attention`); a
    plugin's method of this family computes its map from the recorded layers itself."""
    if not all(isinstance(layer, SpatialAttention) for layer in recorded):
        raise MethodError(
            f"Plugin {run.loaded.plugin.name} recorded spatial attention for some layers and not for others."
        )
    layers = [dataclasses.replace(layer, weights=as_float32(layer.weights.detach())) for layer in recorded]
    maps, grids = {}, {}
    for method in methods:
        refusal = spatial_refusal(method.name)
        if refusal is not None:
            raise MethodError(refusal)
        try:
            if method.name == "attention":
                heatmap = spatial_attention(layers, run.size)
            else:
                heatmap = upsample(method.compute(layers, run.size), run.size)
            grids[method.name] = spatial_attention_grid(layers)
        except ValueError as error:
            raise MethodError(f"{method.name}: {error}.") from None
        maps[method.name] = heatmap
    return PassOutput(maps=maps, layers={name: [] for name in maps}, attention_grids=grids)


def spatial_refusal(method: str) -> str | None:
    """Why ``method`` cannot use attention recorded per layer on its own grid, or None."""
    if method not in CHAINING_METHODS:
        return None
    return (
        f"{method} chains attention between the same tokens from layer to layer; this model's "
        f"attention is recorded per layer on its own grid (spatial attention), which does not "
        f"chain. Use --method attention."
    )


def _attention_map(method: Method, attentions: list[torch.Tensor], gradients, grid, options, size: tuple[int, int]):
    """(B, H, W) map, and for raw attention the (B, layers, heads, h, w) grid kept for the report."""
    if method.name == "rollout":
        return upsample(method.compute(attentions, grid, options.head_fusion, options.discard_ratio), size), None
    if method.name == "chefer":
        return upsample(method.compute(attentions, gradients, grid), size), None
    if method.name == "legrad":
        if grid is None:
            raise ValueError("it needs global attention over a token sequence, not windowed attention")
        layers, reference = gradients  # the layers' gradients, and the reference score's (or None)
        return upsample(method.compute(layers, grid, reference), size), None
    per_head = raw_attention(attentions, grid)
    if method.name != "attention":  # a plugin's method: its own map from the recorded attention
        return upsample(method.compute(attentions, size), size), per_head
    if isinstance(attentions[-1], WindowedAttention):  # at the last layer's own resolution
        return upsample(attention_received(attentions[-1]).mean(dim=1), size), per_head
    return upsample(per_head[:, -1].mean(dim=1), size), per_head  # the last layer, heads averaged


def token_readout(loaded: "LoadedModel") -> TokenReadout:
    """The plugin's :class:`TokenReadout` for legrad; refused with the alternative when it has none."""
    readout = loaded.plugin.token_readout(loaded.module)
    if readout is None:
        raise MethodError(
            f"legrad reads each layer's prediction off its tokens; plugin "
            f"{loaded.plugin.name} does not say how for this "
            f"{type(loaded.module).__name__}. Use --method chefer."
        )
    return readout


def _layer_score_gradients(
    readout: TokenReadout,
    block_tokens: dict[str, torch.Tensor],
    probabilities: list[torch.Tensor],
    targets: torch.Tensor,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """LeGrad's ∂sˡ/∂Aˡ: per layer, the gradient of the target's score read off that layer's tokens
    with respect to that layer's attention only (one backward each, down to that layer), or, for a
    readout that pools by attention, to the attention of its pooling of that layer's tokens; and
    the same for the readout's reference score, if it has one."""
    missing = [name for name in readout.blocks if name not in block_tokens]
    if missing or (readout.pooling is None and len(readout.blocks) != len(probabilities)):
        raise MethodError(
            f"legrad: the plugin's blocks do not match its attention layers "
            f"({', '.join(missing) or len(readout.blocks)})."
        )
    if readout.pooling is None:
        gradients = []
        for block, attention in zip(readout.blocks, probabilities):
            layer_score = readout.scores(block_tokens[block]).gather(1, targets[:, None]).sum()
            gradients += attention_gradients(layer_score, [attention], retain_graph=True)
        return gradients, None
    gradients, references = [], []
    for block in readout.blocks:
        pooled, attention = readout.pooling(block_tokens[block])
        layer_score = readout.scores(pooled).gather(1, targets[:, None]).sum()
        gradients += attention_gradients(layer_score, [attention], retain_graph=True)
        if readout.reference is not None:
            references += attention_gradients(readout.reference(pooled).sum(), [attention], retain_graph=True)
    return gradients, references or None
