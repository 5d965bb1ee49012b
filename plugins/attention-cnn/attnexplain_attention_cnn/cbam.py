"""A small CNN with CBAM blocks: channel attention, then spatial attention, after each stage.

Woo et al. 2018 (CBAM: Convolutional Block Attention Module) refine a feature map F (B, C, H, W)
in two steps:

    Mc(F)  = σ(MLP(AvgPool(F)) + MLP(MaxPool(F)))             (B, C, 1, 1)   channel attention
    F'     = Mc(F) ⊗ F
    Ms(F') = σ(conv7×7([mean over channels(F'); max over channels(F')]))   (B, 1, H, W)
    F''    = Ms(F') ⊗ F'

Ms is the model's own spatial attention: which positions of that stage it lets through. Each stage
has its own, at its own resolution (32², 16², 8² for a 128-pixel input). :class:`SpatialGate`
computes Ms in its ``gate`` submodule (the sigmoid), so a forward hook there reads the very map the
stage is multiplied by.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn


class ChannelGate(nn.Module):
    """CBAM's channel attention: a shared MLP over the average- and max-pooled channels."""

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pooled = self.mlp(features.mean(dim=(2, 3))) + self.mlp(features.amax(dim=(2, 3)))
        return features * torch.sigmoid(pooled)[:, :, None, None]


class SpatialGate(nn.Module):
    """CBAM's spatial attention: a 7×7 convolution over the channel-wise mean and max, then σ."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1)
        self.gate = nn.Sigmoid()  # its output is Ms, (B, 1, H, W)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([features.mean(dim=1, keepdim=True), features.amax(dim=1, keepdim=True)], dim=1)
        return features * self.gate(self.bn(self.conv(pooled)))


class CBAM(nn.Module):
    """Channel attention, then spatial attention (the order the paper found best)."""

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        self.channel = ChannelGate(channels, reduction)
        self.spatial = SpatialGate()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(features))


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class CBAMCNN(nn.Module):
    """A small classifier: a stride-2 stem, then stages of (strided conv, conv, CBAM), global
    average pooling and a linear head. With the defaults a 128×128 input gives stage maps of 32²,
    16² and 8², each with its own spatial attention. All arguments are JSON values, so a
    checkpoint can name them in ``arch_kwargs``.

    Args:
        num_classes: size of the output.
        channels: output channels of the stem, then of each stage.
        reduction: channel attention's MLP reduction ratio.
        image_size: the input side the model was trained at (a preprocessing hint; any size runs).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        channels: Sequence[int] = (16, 32, 64, 96),
        reduction: int = 8,
        image_size: int = 128,
    ) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) < 2:
            raise ValueError("channels needs the stem's and at least one stage's")
        self.image_size = int(image_size)
        stages: list[tuple[str, nn.Module]] = [("stem", nn.Sequential(*_conv_bn_relu(3, channels[0], 2)))]
        for index, (before, after) in enumerate(zip(channels, channels[1:]), start=1):
            stages.append(
                (
                    f"stage{index}",
                    nn.Sequential(
                        OrderedDict(
                            [
                                (
                                    "convs",
                                    nn.Sequential(*_conv_bn_relu(before, after, 2), *_conv_bn_relu(after, after)),
                                ),
                                ("cbam", CBAM(after, reduction)),
                            ]
                        )
                    ),
                )
            )
        self.features = nn.Sequential(OrderedDict(stages))
        self.classifier = nn.Linear(channels[-1], num_classes)

    @property
    def spatial_gates(self) -> list[str]:
        """Names of every stage's :class:`SpatialGate`, input to output."""
        return [name for name, module in self.named_modules() if isinstance(module, SpatialGate)]

    @property
    def last_stage(self) -> str:
        return "features." + list(self.features.named_children())[-1][0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))
