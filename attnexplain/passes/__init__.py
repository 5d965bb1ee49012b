"""The passes of the method families, registered in one place.

A *pass* runs the model once (or as often as its family needs) for every requested method of one
family and returns their maps: ``cam`` captures a layer's activations and gradients, ``attention``
the attention probabilities, ``gates`` the channel gates, ``input`` hands the model to Captum. The
engine (:func:`attnexplain.engine.compute_maps`) runs, in registration order, the pass of each
family that a requested method belongs to; a method a plugin adds under its own name
(:meth:`attnexplain.plugins.ModelPlugin.methods`) belongs to an existing family and runs in that
family's pass. A new family is a new module here that calls :func:`register_pass`.
"""

from __future__ import annotations

from typing import Callable

from ..methods import Method
from .base import PassOutput, PassRun

#: A family's pass: every requested method of that family, computed on one batch.
Pass = Callable[[PassRun, list[Method]], PassOutput]

#: family → its pass, in the order the engine runs them (``input`` last: guided Grad-CAM reuses
#: Grad-CAM's map when the ``cam`` pass made it).
PASSES: dict[str, Pass] = {}


def register_pass(family: str) -> Callable[[Pass], Pass]:
    """Register the decorated function as the pass of ``family``."""

    def register(run_pass: Pass) -> Pass:
        if family in PASSES:
            raise ValueError(f"The {family} family already has a pass.")
        PASSES[family] = run_pass
        return run_pass

    return register


from . import cam, attention, gates, inputs  # noqa: E402,F401  (each registers its family's pass)

__all__ = ["PASSES", "Pass", "PassOutput", "PassRun", "register_pass"]
