"""What a method is: the :class:`Method` record, one per method, built-in or a plugin's own.

Its fields are keyword-only, so that every row of a table of methods names what each value is
(:mod:`attnexplain.methods.builtin` holds the built-in rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True, kw_only=True)
class Method:
    """One explanation method: its name, the family whose pass computes it, what it needs and costs,
    the paper it comes from, the function over what the pass captured (``compute``), and how its
    map reads."""

    name: str
    family: str  # "cam" | "attention" | "gates" | "input": the pass that computes it (attnexplain.passes)
    needs_gradient: bool
    summary: str
    applies_to: str
    cost: str
    paper: str
    compute: Callable
    #: What the colour scale shows, from low to high ("{target}": the explained class), for the
    #: colour bar of every page.
    scale: str = "relative importance for {target}"
    #: Rewrites the backward of the model's own modules (Captum's hooks), so needs them (not TorchScript).
    needs_modules: bool = False
    #: Costs many forwards per image (one per channel, window, mask, step or sample): left out of
    #: ``attnexplain evaluate``'s default, whose perturbation metrics multiply every map's cost.
    many_forwards: bool = False
    #: Its map degrades when its own forwards run in reduced precision (``--precision bf16/fp16``):
    #: they run in float32 whatever the precision (see :mod:`attnexplain.precision`).
    full_precision: bool = False


__all__ = ["Method"]
