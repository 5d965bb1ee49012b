"""Ablation-CAM (Desai & Ramaswamy 2020): channels weighted by how much the target's score drops when
each is set to zero.

The layer's output is replaced, not the input: only the network above the layer runs once per
ablated channel. Where the model allows it, the image is run through the layers below once per chunk
and the chunk's ablated outputs are handed on as a batch (a skip connection from below the layer
broadcasts over it); a model that cannot take that (a concatenation with an earlier output, a batch
size read from the input) is run on as many copies of the image instead, as pytorch-grad-cam does.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import MethodError

#: (image (1, 3, H, W), the layer's outputs to use instead (k, …)) → the model's (k, classes) scores.
RunWithLayerOutput = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ablationcam(
    activation: torch.Tensor,
    layer_output: torch.Tensor,
    as_map: Callable[[torch.Tensor], torch.Tensor],
    run: RunWithLayerOutput,
    batch: torch.Tensor,
    targets: torch.Tensor,
    scores: torch.Tensor,
    batch_size: int = 32,
) -> torch.Tensor:
    """Per-channel contributions (B, C, H, W): weight (y − y_k) / y of channel k times its map.

    ``activation`` is the layer's output laid out as a map by ``as_map``; ``layer_output`` the same
    values in the layer's own layout (a token sequence, channels last), where they are zeroed;
    ``scores`` (B,) the target's clean scores y. Costs C forwards of the network above the layer,
    ``batch_size`` at a time.
    """
    channel_positions = _channel_positions(layer_output, as_map)
    channels = channel_positions.shape[0]
    weights = []
    state = {"broadcast": True}
    with torch.no_grad():
        for image, output, target, score in zip(batch, layer_output, targets.tolist(), scores.tolist()):
            flat = output.reshape(-1)
            ablated_scores = []
            for start in range(0, channels, batch_size):
                positions = channel_positions[start : start + batch_size].to(flat.device)
                ablated = flat.expand(len(positions), -1).scatter(1, positions, 0.0)
                ablated = ablated.reshape(len(positions), *output.shape)
                ablated_scores.append(_scores_with(run, image, ablated, state)[:, target].float())
            drop = score - torch.cat(ablated_scores)
            weights.append(drop / score)
        return torch.stack(weights).to(activation.dtype)[:, :, None, None] * activation


def _scores_with(
    run: RunWithLayerOutput, image: torch.Tensor, ablated: torch.Tensor, state: dict[str, bool]
) -> torch.Tensor:
    """The model's scores with the layer's output replaced by each of ``ablated``; the image run
    once below the layer where the model broadcasts, else once per ablation."""
    count = ablated.shape[0]
    if state["broadcast"]:
        try:
            scores = run(image[None], ablated)
            if tuple(scores.shape[:1]) == (count,):
                return scores
        except Exception:  # the model cannot take a batch above the layer that differs from below
            pass
        state["broadcast"] = False
    return run(image[None].expand(count, *image.shape).contiguous(), ablated)


def _channel_positions(layer_output: torch.Tensor, as_map: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """(C, positions) where each map channel's values lie in one image's flattened layer output.

    The plugin's layout is applied to the numbers 0, 1, 2, … in the layer's own shape; a layout that
    only moves values around (a permutation, a reshape, dropping a class token) keeps them whole.
    """
    shape = layer_output.shape[1:]
    count = layer_output[0].numel()
    numbered = torch.arange(count, dtype=torch.float64).reshape(1, *shape)
    laid_out = as_map(numbered)[0]
    positions = laid_out.reshape(laid_out.shape[0], -1)
    whole = positions.round() == positions
    if not bool(whole.all()) or bool((positions < 0).any()) or bool((positions >= count).any()):
        raise MethodError(
            "ablationcam needs a layer whose map only rearranges the layer's output; "
            "this plugin's layout computes new values. Choose another --layer."
        )
    return positions.long()
