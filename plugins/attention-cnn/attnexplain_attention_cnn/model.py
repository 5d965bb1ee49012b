"""A "Show, Attend and Tell"-style attention CNN for image classification.

Xu et al. 2015 (Show, Attend and Tell: Neural Image Caption Generation with Visual Attention) let an
LSTM attend over the positions of a CNN feature map with soft attention. For classification there is
one query, so the decoder disappears and what remains is learned attention pooling:

    a_i      = the backbone's feature vector at position i              (C,)   i = 1 .. h·w
    e_i      = wᵀ tanh(W a_i + b)                                       alignment score
    α        = softmax(e)                                               over the positions
    context  = Σ_i α_i a_i                                              (C,)
    logits   = classifier(context)

α is the model's own answer to "where did you look": the classifier sees nothing but the α-weighted
average of the feature vectors. :class:`SoftAttentionPooling` returns ``(context, alpha)``, and the
context is computed from that very ``alpha`` tensor, so gradients with respect to it are real.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


def strided_backbone(channels: Sequence[int], convs_per_stage: int) -> nn.Sequential:
    """A stride-2 stem (``stem``), then per further entry of ``channels`` a block (``block1``, ...)
    of ``convs_per_stage`` conv-BN-ReLUs, the first strided: each halves the map."""
    blocks: list[tuple[str, nn.Module]] = [("stem", nn.Sequential(*_conv_bn_relu(3, channels[0], 2)))]
    for index, (before, after) in enumerate(zip(channels, channels[1:]), start=1):
        layers = _conv_bn_relu(before, after, 2)
        for _ in range(convs_per_stage - 1):
            layers += _conv_bn_relu(after, after)
        blocks.append((f"block{index}", nn.Sequential(*layers)))
    return nn.Sequential(OrderedDict(blocks))


class SoftAttentionPooling(nn.Module):
    """Soft (deterministic) attention over the positions of a feature map, with one learned query.

    Input (B, C, h, w); returns ``(context, alpha)``: context (B, C) and alpha (B, h·w), positions in
    row-major order (``i = row * w + column``), each row of alpha summing to one.
    """

    def __init__(self, channels: int, attention_dim: int = 64) -> None:
        super().__init__()
        self.project = nn.Linear(channels, attention_dim)  # W a_i + b
        self.score = nn.Linear(attention_dim, 1, bias=False)  # wᵀ tanh(.)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = features.flatten(2).transpose(1, 2)  # (B, h·w, C): a_i
        scores = self.score(torch.tanh(self.project(positions))).squeeze(-1)  # (B, h·w): e_i
        alpha = torch.softmax(scores, dim=1)
        context = torch.bmm(alpha.unsqueeze(1), positions).squeeze(1)  # Σ α_i a_i
        return context, alpha


class AttentionPoolingCNN(nn.Module):
    """A small CNN whose feature map is pooled by learned soft attention, then classified.

    The backbone has a stem and ``len(channels) - 1`` stages; each starts with a stride-2
    convolution, so the default three blocks turn a 128×128 input into a 16×16 feature map (256
    positions to attend over, each feature seeing a 39×39-pixel receptive field). All arguments are
    JSON values, so a checkpoint can name them in ``arch_kwargs``.

    Args:
        num_classes: size of the output.
        channels: output channels of the stem, then of each stage.
        convs_per_stage: convolutions per stage after the stem (the first one strided).
        attention_dim: size of the hidden layer of the alignment score (W's rows).
        dropout: dropout on the context vector before the classifier (training only).
        image_size: the input side the model was trained at (a preprocessing hint; any size runs).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        channels: Sequence[int] = (32, 64, 128),
        convs_per_stage: int = 2,
        attention_dim: int = 64,
        dropout: float = 0.1,
        image_size: int = 128,
    ) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) < 1 or convs_per_stage < 1:
            raise ValueError("channels needs at least one entry and convs_per_stage must be >= 1")
        self.image_size = int(image_size)
        self.backbone = strided_backbone(channels, convs_per_stage)
        self.attention = SoftAttentionPooling(channels[-1], attention_dim)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(channels[-1], num_classes)

    @property
    def last_block(self) -> str:
        """Name (relative to the model) of the backbone's last block, whose output is attended over."""
        return "backbone." + list(self.backbone.named_children())[-1][0]

    def feature_size(self, input_size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the feature map — the attention's grid — for an input of (height, width)."""
        height, width = input_size
        for module in self.backbone.modules():
            if isinstance(module, nn.Conv2d):
                height, width = (
                    (size + 2 * module.padding[k] - module.dilation[k] * (module.kernel_size[k] - 1) - 1)
                    // module.stride[k]
                    + 1
                    for k, size in enumerate((height, width))
                )
        return height, width

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, classes), alpha (B, h·w))."""
        context, alpha = self.attention(self.backbone(x))
        return self.classifier(self.dropout(context)), alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_attention(x)[0]
