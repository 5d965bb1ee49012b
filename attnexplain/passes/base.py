"""What every pass is given (:class:`PassRun`) and returns (:class:`PassOutput`), and the helpers
they share."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..methods.combine import fuse_maps, upsample
from ..options import MethodOptions
from ..running import model_as_called
from .counting import ForwardCount

__all__ = ["PassOutput", "PassRun", "Scorer", "fuse_maps", "no_gradient", "upsample"]

if TYPE_CHECKING:
    from ..loading import LoadedModel

#: A pass's view of the model's output: (B, classes) differentiable scores and (B,) targets.
Scorer = Callable[[Any], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class PassRun:
    """One batch being explained, as every family's pass sees it."""

    loaded: "LoadedModel"
    batch: torch.Tensor  # (B, 3, H, W), preprocessed
    layers: list[str]  # CAM layers (empty when no method needs one)
    options: MethodOptions
    #: The model's raw output → (scores, targets); the first call fixes the predictions and targets.
    score: Scorer
    black: torch.Tensor  # a black pixel, normalised (what --baseline black means)
    #: What the first forward found: "probabilities" (B, classes), "targets" (B,), "detections".
    state: dict[str, Any] = field(default_factory=dict)
    #: The maps made so far by earlier passes (guided Grad-CAM reuses Grad-CAM's).
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    #: The progress of the methods that cost many forwards (see :mod:`attnexplain.passes.counting`).
    forwards: ForwardCount = field(default_factory=ForwardCount)
    #: Further targets (indices or labels) whose maps share the pass's forward, one backward each
    #: (:func:`attnexplain.passes.cam.shares_forward`); their maps go to ``state["also"]``.
    also: list[Any] = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the model's input."""
        return tuple(self.batch.shape[-2:])

    @property
    def module(self) -> torch.nn.Module:
        return self.loaded.module

    def targets(self) -> torch.Tensor:
        """(B,) the class each map explains, from a forward of its own if no pass ran one yet."""
        if "targets" not in self.state:
            with torch.no_grad():
                self.score(self.forward(self.batch))
        return self.state["targets"]

    @cached_property
    def forward(self) -> Callable[[torch.Tensor], Any]:
        """The model as every pass calls it: inputs → raw output, with its plugin's forward
        arguments (see :func:`attnexplain.running.model_as_called`)."""
        return model_as_called(self.loaded, self.size)


@dataclass
class PassOutput:
    """A pass's maps, (B, H, W) at the input's resolution, and what it keeps beside them."""

    maps: dict[str, torch.Tensor]
    layers: dict[str, list[str]]  # method → the layers it used (empty for non-layer methods)
    attention_grids: dict[str, torch.Tensor] = field(default_factory=dict)  # (B, layers, heads, h, w)
    channel_gates: dict[str, Any] = field(default_factory=dict)  # method → gates.ChannelGates
    depth_maps: dict[str, torch.Tensor] = field(default_factory=dict)  # (B, layers, h, w), rollout

    def add(self, other: "PassOutput") -> None:
        """Take in another pass's maps and what it kept beside them."""
        self.maps.update(other.maps)
        self.layers.update(other.layers)
        self.attention_grids.update(other.attention_grids)
        self.channel_gates.update(other.channel_gates)
        self.depth_maps.update(other.depth_maps)


def no_gradient(what: str, alternative: str) -> str:
    return (
        f"The model's output carries no gradient back to {what}: its forward runs under "
        f"torch.no_grad() or detaches its result, or {what} does not feed the output. "
        f"Use {alternative}."
    )
