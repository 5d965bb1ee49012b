"""Where torchvision's transformers keep their attention, and where their tokens lie on the image.

- VisionTransformer: ``nn.MultiheadAttention`` per encoder layer, global over a class token and the
  patches (the core's default capture handles it).
- Swin (v1 and v2): ``shifted_window_attention``, a function called by each ``ShiftedWindowAttention``
  module, attends inside 7×7 (v2: 8×8) windows of a channels-last map, every other block on a map
  rolled by half a window; maps are padded at the bottom/right to whole windows.
- MaxViT: ``RelativePositionalMultiHeadAttention`` attends inside groups made by its parent
  ``PartitionAttentionLayer``: contiguous windows ("window" attention) or positions a fixed stride
  apart ("grid" attention, a dilated window).

Neither Swin nor MaxViT materialises the probabilities outside the function, so both are recorded
with :func:`attnexplain.plugin_api.capture_softmax`, and each layer's positions are worked out from
the shape of the map it was called on, following the same partition the model used (Swin's:
:func:`attnexplain.plugin_api.shifted_window_positions`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from ..plugin_api import WindowedAttention, capture_softmax, shifted_window_positions


def windowed_attention_modules(model: nn.Module) -> list[str]:
    """Names of the window-attention modules of a Swin or MaxViT, input to output (else empty)."""
    from torchvision.models.maxvit import MaxVit, RelativePositionalMultiHeadAttention
    from torchvision.models.swin_transformer import ShiftedWindowAttention, SwinTransformer

    kind = {SwinTransformer: ShiftedWindowAttention, MaxVit: RelativePositionalMultiHeadAttention}
    for family, attention in kind.items():
        if isinstance(model, family):
            return [name for name, module in model.named_modules() if isinstance(module, attention)]
    return []


@contextmanager
def capture_windowed_attention(
    model: nn.Module, names: list[str], sink: dict[str, WindowedAttention]
) -> Iterator[None]:
    """Record a :class:`WindowedAttention` per named Swin or MaxViT attention module."""
    from torchvision.models.maxvit import MaxVit

    parents = {}
    if isinstance(model, MaxVit):
        # The positions depend on how the enclosing PartitionAttentionLayer grouped the map.
        for name in names:
            parents[name] = model.get_submodule(name.rsplit(".", 2)[0])

    def record(name: str, module: nn.Module, args: tuple, probabilities: torch.Tensor) -> None:
        if name in parents:
            positions, height, width = _maxvit_positions(parents[name])
            windows = positions.shape[0]
        else:
            _, height, width, _ = args[0].shape
            positions = shifted_window_positions(height, width, list(module.window_size), list(module.shift_size))
            windows = positions.shape[0]
            # (B · windows, heads, T, T), windows of one image consecutive
            probabilities = probabilities.reshape(-1, windows, *probabilities.shape[1:])
        sink[name] = WindowedAttention(probabilities, positions.to(probabilities.device), height, width)

    with capture_softmax(model, names, record):
        yield


def _maxvit_positions(layer: Any) -> tuple[torch.Tensor, int, int]:
    """(groups, tokens) positions of a MaxViT ``PartitionAttentionLayer``, found by running its own
    partition and axis swap over a map of position numbers."""
    height, width = layer.grid_size
    positions = torch.arange(height * width).reshape(1, 1, height, width)
    # .forward: the partition modules' own hooks (a user's, say) must not see this position map.
    grouped = layer.partition_swap.forward(layer.partition_op.forward(positions, layer.p))  # (1, G, T, 1)
    return grouped[0, :, :, 0], height, width
