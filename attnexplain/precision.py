"""Reduced precision (``--precision``): the model's forward under :func:`torch.autocast`, everything
after it in float32.

One context manager, :func:`model_precision`, applied where the model runs
(:func:`attnexplain.engine.compute_maps`, the perturbation metrics): while it is active every call of
the model's forward runs under autocast, and what the forward returns comes back as float32, so that
scores, softmax, targets and every map computed from them (CAM weights, rollout's products, the metric
curves) are float32. The passes cast what they captured inside the forward (activations, attention,
gates, gradients) to float32 before a method reads it. A method whose map degrades when its forwards
run in reduced precision (:attr:`attnexplain.methods.Method.full_precision`) has its forwards run in
float32 by :func:`full_precision_forwards`: occlusion, feature_ablation, kernelshap, lime and
ablationcam, which rank score differences of perturbed copies (in bf16 occlusion's map fell to a
Spearman correlation of 0.90 with fp32's, Ablation-CAM's on a ViT to -0.09).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from typing import Any, Iterator, MutableMapping

import torch

from .capture import replaced_forward
from .errors import MethodError
from .running import model_device

#: Name → the autocast dtype (fp32: no autocast).
DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

#: Set inside :func:`full_precision_forwards`: the model's forwards run in float32 there.
_FLOAT32_ONLY: ContextVar[bool] = ContextVar("attnexplain_float32_only", default=False)


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """What ``precision`` (one of :data:`attnexplain.options.PRECISIONS`, which
    :class:`~attnexplain.options.MethodOptions` checks) means on ``device``: fp32,
    bf16 or fp16. ``auto`` is fp32 on the CPU (and MPS), bf16 on a CUDA GPU that supports it, fp16 on
    one that does not. fp16 on the CPU is refused: CPU autocast in fp16 is slower than float32 and
    its gradients underflow; bf16 is the CPU's reduced precision."""
    device = torch.device(device)
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and device.type == "cpu":
        raise MethodError("--precision fp16 is for CUDA GPUs; on the CPU use --precision bf16 (or fp32).")
    if precision != "fp32" and device.type not in ("cpu", "cuda"):
        raise MethodError(f"--precision {precision} runs on the CPU or a CUDA GPU, not on {device.type}; use fp32.")
    return precision


@contextmanager
def model_precision(module: torch.nn.Module, precision: str) -> Iterator[str]:
    """In the block, ``module``'s forward runs under autocast in ``precision`` (resolved for the
    device its parameters are on; see :func:`resolve_precision`) and returns its tensors as float32.
    Yields the precision it resolved to (fp32: the module is left as it is)."""
    device = model_device(module)
    resolved = resolve_precision(precision, device)
    dtype = DTYPES[resolved]
    if dtype is None:
        yield resolved
        return

    def autocast_forward(forward, *args, **kwargs):
        if _FLOAT32_ONLY.get():
            return forward(*args, **kwargs)
        with torch.autocast(device.type, dtype=dtype):
            output = forward(*args, **kwargs)
        return as_float32(output)

    with replaced_forward(module, autocast_forward):
        yield resolved


@contextmanager
def full_precision_forwards() -> Iterator[None]:
    """The model's forwards run in float32 in the block, whatever :func:`model_precision` is active
    (the sensitive step of a method whose map degrades in reduced precision)."""
    token = _FLOAT32_ONLY.set(True)
    try:
        yield
    finally:
        _FLOAT32_ONLY.reset(token)


def method_forwards(method: Any) -> AbstractContextManager[None]:
    """Where ``method`` (a :class:`~attnexplain.methods.Method`) runs the model: in float32 if its map
    degrades in reduced precision (its ``full_precision``), else as :func:`model_precision` says."""
    return full_precision_forwards() if getattr(method, "full_precision", False) else nullcontext()


def as_float32(value: Any) -> Any:
    """``value`` with its reduced-precision floating tensors cast to float32 (differentiably): a
    tensor, or the tensors of a tuple, list or mapping (a ``ModelOutput``, a detector's dicts), one
    level down and in lists of dicts."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in (torch.float16, torch.bfloat16) else value
    if isinstance(value, (tuple, list)):
        items = [as_float32(item) for item in value]
        if all(new is old for new, old in zip(items, value)):
            return value
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, MutableMapping):
        for key, item in list(value.items()):
            value[key] = as_float32(item)
    return value


__all__ = ["DTYPES", "as_float32", "full_precision_forwards", "method_forwards", "model_precision", "resolve_precision"]
