"""A model ready to explain, and where it came from: what :func:`attnexplain.loading.load_model` returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..plugins import ModelPlugin
from ..preprocess import Preprocessing
from ..scoring import Scoring


@dataclass
class LoadedModel:
    """A model ready to explain, with everything known about where it came from."""

    module: Any  # torch.nn.Module (or a TorchScript module)
    source: str
    loader: str  # state_dict | safetensors | pickle | torchscript | export | a plugin prefix
    architecture: str | None = None
    weights: str | None = None
    labels: list[str] | None = None
    preprocessing: Preprocessing | None = None
    plugin: ModelPlugin = field(default_factory=ModelPlugin)
    #: False where inner layers cannot be hooked (TorchScript): layer methods are then unavailable.
    inner_layers: bool = True
    notes: list[str] = field(default_factory=list)
    #: How its class scores are read: softmax or sigmoid probabilities, a contrast (see :mod:`attnexplain.scoring`).
    scoring: Scoring = field(default_factory=Scoring)

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "loader": self.loader,
            "architecture": self.architecture,
            "weights": self.weights,
            "plugin": self.plugin.name,
            "task": self._task(),
            "notes": list(self.notes),
        }

    def _task(self) -> str:
        try:
            return self.plugin.task(self.module)
        except Exception:  # a plugin's answer is for the report only; never fail a report on it
            return "unknown"
