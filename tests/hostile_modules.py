"""Tiny models that misbehave on purpose, saved whole (``torch.save(module)``) by the hostile CLI
tests and loaded back with ``--trust-model``: the class must live in an importable module."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """A small CNN (conv → ReLU → conv → pool → linear) whose output ``kind`` decides how it fails."""

    def __init__(self, kind: str = "ok", classes: int = 3) -> None:
        super().__init__()
        self.kind = kind
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        )
        self.head = nn.Linear(8, max(classes, 1))
        self.classes = classes

    def forward(self, x: torch.Tensor):
        kind = self.kind
        if kind == "raises":
            raise RuntimeError("boom inside forward")
        if kind == "exits":
            raise SystemExit(0)
        if kind == "exits-in-backward":
            return _ExitInBackward.apply(self._logits(x))
        if kind == "once-differentiable":
            return _SquaredOnce.apply(self._logits(x))
        if kind == "no-grad":
            with torch.no_grad():
                return self._logits(x)
        if kind == "gray":  # needs 1-channel input
            if x.shape[1] != 1:
                raise RuntimeError(f"expected input to have 1 channels, but got {x.shape[1]} channels")
        logits = self._logits(x)
        if kind == "nan":
            return logits * float("nan")
        if kind == "inf":
            return logits + float("inf")
        if kind == "zero-classes":
            return logits[:, :0]
        if kind == "wrong-batch":
            return torch.cat([logits, logits])
        if kind == "1d":
            return logits[0]
        if kind == "integer":
            return logits.round().long()
        if kind == "dict":
            return {"scores": logits}
        if kind == "string":
            return "cat"
        return logits

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        return self.head(features.mean(dim=(2, 3)))


class _ExitInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits):
        return logits.clone()

    @staticmethod
    def backward(ctx, grad):
        raise SystemExit(0)


class _SquaredOnce(torch.autograd.Function):
    """x² through a "fused kernel" whose backward has no derivative itself, as a custom CUDA kernel's
    (or PyTorch's fused attention's): a first backward works, a second raises."""

    @staticmethod
    def forward(ctx, logits):
        ctx.save_for_backward(logits)
        return logits * logits

    @staticmethod
    def backward(ctx, grad):
        (logits,) = ctx.saved_tensors
        return _SquaredOnceBackward.apply(logits, grad)


class _SquaredOnceBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, grad):
        return 2 * logits * grad

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("derivative for squared_once_backward is not implemented")


def build(kind: str, classes: int = 3) -> TinyNet:
    """A TinyNet with fixed random weights; ``dead``: its last ReLU never fires, so every CAM map
    at its layers is all zero (no positive evidence anywhere); ``zero-head``: its head's weights and
    bias are zero, so every class scores 0 whatever the image."""
    torch.manual_seed(0)
    model = TinyNet(kind, classes).eval()
    if kind == "dead":
        with torch.no_grad():
            model.features[2].bias.fill_(-1e4)
    if kind == "zero-head":
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.zero_()
    return model


def save(kind: str, path, classes: int = 3):
    torch.save(build(kind, classes), path)
    return path


class NearlyEvenNet(torch.nn.Module):
    """Scores that weigh every pixel of a 32×32 input alike to within ``spread`` (each weight
    1 ± spread): its saliency map varies by about that share of its level, a nearly flat map."""

    def __init__(self, spread: float, classes: int = 3) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        jitter = 2 * torch.rand(classes, 3, 32, 32, generator=generator) - 1
        self.weight = torch.nn.Parameter(1 + spread * jitter)
        self.bias = torch.nn.Parameter(torch.arange(classes, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,kchw->bk", x, self.weight) / x[0].numel() + self.bias
