"""The passes of the method families, registered in one place.

A *pass* runs the model once (or as often as its family needs) for every requested method of one
family and returns their maps: ``cam`` captures a layer's activations and gradients, ``attention``
the attention probabilities, ``gates`` the channel gates, ``input`` hands the model to Captum. The
engine (:func:`attnexplain.engine.compute_maps`) runs, in registration order, the pass of each
family that a requested method belongs to; a method a plugin adds under its own name
(:meth:`attnexplain.plugins.ModelPlugin.methods`) belongs to an existing family and runs in that
family's pass. A new family is a new module here whose pass is decorated with :func:`register_pass`
(:mod:`.registry`) and that is imported below.
"""

from .base import PassOutput, PassRun
from .registry import PASSES, Pass, register_pass

# Each module registers its family's pass on import, and the engine runs the passes in that order
# (``input`` last: guided Grad-CAM reuses Grad-CAM's map), so this order is not alphabetical.
from . import cam, attention, gates, inputs  # noqa: F401  # isort: skip

__all__ = ["PASSES", "Pass", "PassOutput", "PassRun", "register_pass"]
