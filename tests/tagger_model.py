"""A tiny multi-label tagger for the tests of targets: built here, saved with torch.save and loaded
from disk as a user would (``--arch FILE:Tagger``); a 3×3 convolution (``features``), ReLU, a global
mean and a linear head of four outputs, two of them above 0 on any photo (the head's bias)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

LABELS = ["cat", "dog", "grass", "rocket"]
NET_SOURCE = """
import torch


class Tagger(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.features(x)).mean((2, 3)))
"""


def save_tagger(folder: Path, multilabel: bool = True, labels: list[str] = LABELS) -> tuple[Path, str]:
    """The saved weights (labels and ``"multilabel"`` in the checkpoint) and the ``--arch`` that builds it."""
    source = folder / "tagger.py"
    source.write_text(NET_SOURCE)
    namespace: dict = {}
    exec(compile(NET_SOURCE, str(source), "exec"), namespace)
    torch.manual_seed(4)
    state = namespace["Tagger"]().state_dict()
    state["head.bias"] = torch.tensor([2.0, 1.5, -0.5, -3.0])
    weights = folder / "tagger.pt"
    torch.save({"state_dict": state, "multilabel": multilabel, "labels": labels}, weights)
    return weights, f"{source}:Tagger"


def gradcam_by_hand(module: torch.nn.Module, batch: torch.Tensor, index: int) -> np.ndarray:
    """Grad-CAM (Selvaraju et al.) of logit ``index`` on layer ``features``, with plain autograd."""
    captured = {}
    handle = module.features.register_forward_hook(lambda m, args, output: captured.setdefault("a", output))
    logits = module(batch.clone().requires_grad_())
    handle.remove()
    (gradient,) = torch.autograd.grad(logits[0, index], captured["a"])
    return torch.relu((gradient.mean(dim=(2, 3), keepdim=True) * captured["a"]).sum(dim=1))[0].detach().numpy()
