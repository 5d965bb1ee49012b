"""Explanation methods: small functions over what a forward (and backward) pass captured.

Each method declares what it needs:

- ``layer``: a layer's activation and the gradient of the target score with respect to it
  (CAM family), computed by :func:`attnexplain.explain` in one forward and one partial backward;
- ``attention``: the attention probabilities of every attention module, input to output;
- ``input``: the model as a function of its input (gradient attributions through Captum).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .gradcam import gradcam
from .rollout import rollout
from .saliency import saliency


@dataclass(frozen=True)
class Method:
    name: str
    needs: str  # "layer" | "attention" | "input"
    summary: str
    paper: str
    compute: Callable


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("gradcam", "layer",
               "Class-discriminative map: a layer's channels weighted by their mean gradient.",
               "Selvaraju et al. 2017, Grad-CAM", gradcam),
        Method("rollout", "attention",
               "How much each patch flows into the class token through every attention layer.",
               "Abnar & Zuidema 2020, Quantifying Attention Flow in Transformers", rollout),
        Method("saliency", "input",
               "Absolute input gradient of the target score (Captum Saliency).",
               "Simonyan et al. 2014, Deep Inside Convolutional Networks", saliency),
    )
}

__all__ = ["METHODS", "Method", "gradcam", "rollout", "saliency"]
