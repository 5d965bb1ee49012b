"""The ``attention`` family's maps for an encoder–decoder transformer whose decoder's queries read
the image's tokens (a DETR), its layers recorded as :class:`EncoderDecoderAttention` by the plugin:
``attention`` maps each decoder layer's cross-attention from the explained query, per head;
``chefer`` is Chefer et al. 2021b's relevance of that query
(:func:`attnexplain.methods.encoder_decoder.query_relevance`) from one backward of the target's score
through every recorded layer. Rollout and LeGrad chain self-attention between the same tokens from
the first layer to the last, which a decoder's queries reading the image do not: refused.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from ..capture import attention_gradients
from ..detection_targets import query_rows
from ..errors import MethodError
from ..methods import Method
from ..methods.attention import raw_attention, to_grid
from ..methods.encoder_decoder import query_relevance
from ..plugins import EncoderDecoderAttention
from ..precision import as_float32
from .base import PassOutput, PassRun, no_gradient, upsample

if TYPE_CHECKING:
    from ..plugins import TokenGrid


def encoder_decoder_maps(
    run: PassRun,
    methods: list[Method],
    layers: list[EncoderDecoderAttention],
    scores: torch.Tensor,
    targets: torch.Tensor,
    queries: torch.Tensor | None,
) -> PassOutput:
    """Every requested method's map from the recorded ``layers`` (the model's order), while their
    graph is alive: ``scores`` (B, classes) and ``targets`` (B,) from this forward, ``queries`` (B,)
    the explained query of each image (None: the token grid's ``query``)."""
    loaded = run.loaded
    if not all(isinstance(layer, EncoderDecoderAttention) for layer in layers):
        raise MethodError(f"Plugin {loaded.plugin.name} recorded some attention layers without their role.")
    if not any(layer.role == "cross" for layer in layers):
        raise MethodError(f"Plugin {loaded.plugin.name} recorded no decoder cross-attention (role 'cross').")
    grid = loaded.plugin.token_grid(loaded.module, run.size)
    if grid is None:
        raise MethodError(f"Plugin {loaded.plugin.name} does not say how this model's tokens map to the image.")
    if queries is None:
        queries = torch.full((len(targets),), grid.query, dtype=torch.long)
    gradients = None
    if any(method.needs_gradient for method in methods):
        if not scores.requires_grad:
            raise MethodError(no_gradient("the attention layers", "--method attention (gradient-free)"))
        score = scores.gather(1, targets[:, None]).sum()
        gradients = as_float32(attention_gradients(score, [layer.probabilities for layer in layers]))
    detached = [dataclasses.replace(layer, probabilities=as_float32(layer.probabilities.detach())) for layer in layers]
    rows = query_rows([layer.probabilities for layer in detached if layer.role == "cross"], queries)
    maps, grids = {}, {}
    for method in methods:
        try:
            if method.name == "chefer":
                maps[method.name] = upsample(_relevance_map(detached, gradients, queries, grid), run.size)
                continue
            if method.name in ("rollout", "legrad"):
                raise MethodError(refusal(method.name))
            per_head = raw_attention(rows, grid)  # (B, decoder layers, heads, h, w)
            if method.name == "attention":  # the last decoder layer, heads averaged
                maps[method.name] = upsample(per_head[:, -1].mean(dim=1), run.size)
            else:  # a plugin's method: its own map from the explained query's cross-attention
                maps[method.name] = upsample(method.compute(rows, run.size), run.size)
            grids[method.name] = per_head
        except ValueError as error:  # the attention's shape does not suit the method
            raise MethodError(f"{method.name}: {error}.") from None
    return PassOutput(maps=maps, layers={name: [] for name in maps}, attention_grids=grids)


def _relevance_map(
    layers: list[EncoderDecoderAttention],
    gradients: list[torch.Tensor] | None,
    queries: torch.Tensor,
    grid: "TokenGrid",
) -> torch.Tensor:
    """(B, grid h, grid w): the explained query's row of R_qi over the image tokens."""
    assert gradients is not None  # chefer needs the gradient: computed above
    relevance = query_relevance(layers, gradients)
    picked = torch.arange(len(queries), device=relevance.device), queries.to(relevance.device)
    rows = relevance[picked][:, None]  # (B, 1, tokens)
    return to_grid(rows, dataclasses.replace(grid, query=0))


def refusal(method: str) -> str:
    """Why ``method`` does not apply to an encoder–decoder transformer's attention."""
    return (
        f"{method} chains self-attention between the same tokens from layer to layer; this model's "
        f"decoder attends from its queries to the image (cross-attention). Use --method chefer "
        f"(Chefer 2021b's encoder–decoder relevance) or attention."
    )


__all__ = ["encoder_decoder_maps", "refusal"]
