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
with :func:`attnexplain.capture.capture_softmax`, and each layer's positions are worked out from the
shape of the map it was called on, following the same partition the model used.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..capture import capture_softmax
from ..plugins import WindowedAttention


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
def capture_windowed_attention(model: nn.Module, names: list[str],
                               sink: dict[str, WindowedAttention]) -> Iterator[None]:
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
            positions = _swin_positions(height, width, list(module.window_size), list(module.shift_size))
            windows = positions.shape[0]
            # (B · windows, heads, T, T), windows of one image consecutive
            probabilities = probabilities.reshape(-1, windows, *probabilities.shape[1:])
        sink[name] = WindowedAttention(probabilities, positions.to(probabilities.device), height, width)

    with capture_softmax(model, names, record):
        yield


def _swin_positions(height: int, width: int, window: list[int], shift: list[int]) -> torch.Tensor:
    """(windows, tokens) positions of ``shifted_window_attention`` on a height × width map: the same
    padding, cyclic shift and partition, applied to the positions instead of the features."""
    pad_bottom = (window[0] - height % window[0]) % window[0]
    pad_right = (window[1] - width % window[1]) % window[1]
    positions = torch.arange(height * width).reshape(1, 1, height, width)
    positions = F.pad(positions, (0, pad_right, 0, pad_bottom), value=-1)[0, 0]
    padded_h, padded_w = positions.shape
    # The function drops the shift along a side that a single window covers.
    shift = [0 if window[0] >= padded_h else shift[0], 0 if window[1] >= padded_w else shift[1]]
    if any(shift):
        positions = torch.roll(positions, shifts=(-shift[0], -shift[1]), dims=(0, 1))
    positions = positions.reshape(padded_h // window[0], window[0], padded_w // window[1], window[1])
    return positions.permute(0, 2, 1, 3).reshape(-1, window[0] * window[1])


def _maxvit_positions(layer: Any) -> tuple[torch.Tensor, int, int]:
    """(groups, tokens) positions of a MaxViT ``PartitionAttentionLayer``, found by running its own
    partition and axis swap over a map of position numbers."""
    height, width = layer.grid_size
    positions = torch.arange(height * width).reshape(1, 1, height, width)
    # .forward: the partition modules' own hooks (a user's, say) must not see this position map.
    grouped = layer.partition_swap.forward(layer.partition_op.forward(positions, layer.p))  # (1, G, T, 1)
    return grouped[0, :, :, 0], height, width
