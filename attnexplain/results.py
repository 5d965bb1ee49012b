"""What an explanation yields per image: its predictions and each method's map (plain data)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .formats import DEFAULT_COLORMAP


@dataclass(frozen=True)
class Prediction:
    """A class and its probability; for a single-output model (regression, a binary logit) its
    value instead, with ``prob`` None."""

    index: int
    label: str | None
    prob: float | None
    value: float | None = None

    @property
    def score(self) -> float:
        """The probability, or the value of a single output: what the perturbation metrics follow."""
        return self.prob if self.prob is not None else float(self.value if self.value is not None else "nan")

    def as_dict(self) -> dict[str, Any]:
        shown = {"index": self.index, "label": self.label, "prob": self.prob}
        return shown if self.value is None else {**shown, "value": self.value}


@dataclass(frozen=True)
class Photo:
    """What a map is drawn over: the photo (H, W, 3) uint8, the region of it the model saw (left,
    top, right, bottom, photo pixels) and a detector's boxes (see
    :func:`attnexplain.targets.boxes_on_photo`), None for models that do not detect."""

    pixels: np.ndarray
    box: tuple[float, float, float, float]
    detections: list[dict[str, Any]] | None = None


@dataclass
class MethodMap:
    """One method's result."""

    method: str
    heatmap: np.ndarray  # (h, w) float32 at the model's input resolution
    layers: list[str] = field(default_factory=list)
    #: Raw attention only: (layers, heads, grid h, grid w) class-token attention.
    attention_grid: np.ndarray | None = None
    #: Gates only: per block, its name, mean gate and most-gated channels; and the last block's
    #: most-gated channels' activation maps (k, h, w).
    gates: list[dict[str, Any]] | None = None
    gate_maps: np.ndarray | None = None
    #: Rollout over global attention only: (layers, grid h, grid w), the rollout through the first
    #: 1, 2, … layers (the last is the map before upsampling).
    depth_maps: np.ndarray | None = None
    #: The photo the map explains (set by the :class:`attnexplain.Explanation` that holds the map),
    #: for :meth:`overlay`; None for a map made without one (``compute_maps``).
    photo: Photo | None = field(default=None, repr=False, compare=False)

    def overlay(self, alpha: float = 0.5, colormap: str = DEFAULT_COLORMAP) -> np.ndarray:
        """This map blended over its photo, at the photo's resolution (H, W, 3) uint8, in one of
        :data:`attnexplain.render.COLORMAPS`; a detector's boxes drawn on it."""
        from .render import render_explained_overlay

        if self.photo is None:
            raise ValueError(
                f"The {self.method} map has no photo to draw over: it was made by compute_maps, not "
                f"explain(); blend it with attnexplain.render.render_overlay(pixels, heatmap, box)."
            )
        photo = self.photo
        return render_explained_overlay(photo.pixels, self.heatmap, photo.box, alpha, photo.detections, colormap)

    #: The class this map explains where one run explains several (``--target cat,dog``); None: the
    #: explanation's one target.
    target: Prediction | None = None

    @property
    def key(self) -> str:
        """The map's name among the explanation's maps: its method, and the class it explains where
        there are several ("gradcam@cat")."""
        if self.target is None:
            return self.method
        return f"{self.method}@{self.target.label if self.target.label is not None else self.target.index}"
