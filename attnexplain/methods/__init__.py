"""Every explanation method, as a small function over what a forward (and backward) pass captured.

Families, by what they need:

- ``cam``: one layer's activation (and, for most, the gradient of the target score with respect to
  it): one forward and one backward down to that layer serve every CAM method requested;
- ``attention``: the attention probabilities of every attention layer (and their gradients for
  ``chefer``; for ``legrad`` each layer's own prediction's gradient), recorded in one forward;
- ``gates``: the channel gates of squeeze-and-excitation blocks, recorded in one forward;
- ``input``: the model as a function of its input; Captum computes these, except ``rise``
  (:mod:`.rise`), which only needs forward passes.

What a method is, :class:`Method`, is in :mod:`.method`; the built-in ones, :data:`METHODS`, in
:mod:`.builtin`. Looking a name up among them and the methods plugins add (which must be of a
family that has a pass) is :mod:`attnexplain.method_registry`'s.
"""

from .builtin import METHODS
from .method import Method

__all__ = ["METHODS", "Method"]
