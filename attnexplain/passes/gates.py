"""The ``gates`` family's pass: one forward records every squeeze-and-excitation block's channel
gates; the map weights the last block's input by them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import MethodError
from ..methods import Method
from ..methods.gates import most_gated
from ..precision import as_float32
from .base import PassOutput, PassRun, upsample
from .registry import register_pass


@dataclass
class ChannelGates:
    """What the gates method recorded for a batch."""

    blocks: list[str]
    values: list[torch.Tensor]  # per block: (B, C) gates in [0, 1]
    top_channels: torch.Tensor  # (B, k) the last block's most-gated channels
    top_maps: torch.Tensor  # (B, k, h, w) their activation maps

    def summary(self, image_index: int, shown: int = 5) -> list[dict[str, Any]]:
        """Per block, for one image: its name, channel count, mean gate and most-gated channels."""
        summary = []
        for block, values in zip(self.blocks, self.values):
            top_values, top_channels = most_gated(values[image_index : image_index + 1], shown)
            summary.append(
                {
                    "block": block,
                    "channels": int(values.shape[1]),
                    "mean": float(values[image_index].mean()),
                    "top": [{"channel": int(c), "gate": float(v)} for c, v in zip(top_channels[0], top_values[0])],
                }
            )
        return summary


@register_pass("gates")
def gates_pass(run: PassRun, methods: list[Method]) -> PassOutput:
    output = PassOutput(maps={}, layers={})
    for method in methods:
        output.maps[method.name], recorded = _gates_map(run, method)
        output.channel_gates[method.name] = recorded
        output.layers[method.name] = recorded.blocks[-1:]
    return output


def _gates_map(run: PassRun, method: Method, shown_maps: int = 8) -> tuple[torch.Tensor, ChannelGates]:
    module, plugin = run.loaded.module, run.loaded.plugin
    names = plugin.gate_modules(module)
    recorded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad(), plugin.capture_gates(module, names, recorded):
        run.score(run.forward(run.batch))
    missing = [name for name in names if name not in recorded]
    if missing:
        raise MethodError(f"No gates were recorded for {', '.join(missing)}.")
    recorded = as_float32(recorded)  # float32 whatever precision the forward ran in
    gates, inputs = recorded[names[-1]]  # the last block: closest to the decision
    _, channels = most_gated(gates, shown_maps)
    top_maps = torch.gather(inputs, 1, channels[:, :, None, None].expand(-1, -1, *inputs.shape[2:]))
    heatmap = upsample(method.compute(gates, inputs), run.size)
    return heatmap, ChannelGates(
        blocks=names, values=[recorded[name][0] for name in names], top_channels=channels, top_maps=top_maps
    )
