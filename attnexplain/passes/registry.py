"""The registry of the method families' passes: :data:`PASSES`, fed by :func:`register_pass`, which
each family's module applies to its pass (``@register_pass("cam")``)."""

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


__all__ = ["PASSES", "Pass", "register_pass"]
