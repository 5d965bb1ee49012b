"""Checkpoint unwrapping: the weights and plain values inside the dicts training scripts save.

A state_dict may be nested under a training script's keys (``state_dict``, ``model``, ...), carry an
exponential moving average beside it (timm's ``state_dict_ema``, for ``--ema``), be a
LightningModule's (its network's keys under an attribute name, its ``hyper_parameters`` holding the
architecture), or carry DataParallel/``torch.compile`` key prefixes. Everything here reads values
that came from a file (only tensors and plain data reach it: see :mod:`.trust`), so each is checked
for type and range before it is used.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..errors import AttnExplainError, ModelLoadError, shown
from ..preprocess import FILE_MAX_SIZE, Preprocessing, normalization_values, normalize_size

# Keys under which training scripts commonly nest the weights.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
# Keys under which training scripts keep an exponential moving average of the weights (timm's
# train.py: state_dict_ema), used with --ema.
EMA_KEYS = ("state_dict_ema", "model_ema", "ema_state_dict")
# Prefixes added by DataParallel/DistributedDataParallel and torch.compile.
_KEY_PREFIXES = ("module.", "_orig_mod.")
# Top-level keys only PyTorch Lightning's checkpoints have: its LightningModule may hold more than the
# architecture (a loss's weights, metric states), whose keys are then left out.
LIGHTNING_KEYS = ("pytorch-lightning_version", "lightning_version", "global_step", "loops")
LABEL_KEYS = ("labels", "classes", "class_names", "categories")
# More class names than any real label set (ImageNet-21k has 21,843): a longer list is not labels.
MAX_LABELS = 100_000


@dataclass(frozen=True)
class Asked:
    """What the user said about a file's weights (``--arch``, ``--arch-kwargs``, ...)."""

    arch: str | None = None
    arch_kwargs: dict[str, Any] | None = None  # None: not given (a checkpoint's own then apply)
    num_classes: int | None = None
    ema: bool = False


def no_ema(ema: bool, reason: str) -> None:
    if ema:
        raise ModelLoadError(f"--ema (ema=True) loads a training checkpoint's EMA weights, but {reason}.")


def hyper_parameters(checkpoint: Mapping[str, Any]) -> tuple[Any, int | None]:
    """``arch`` and ``num_classes`` of a Lightning checkpoint's ``hyper_parameters`` (what
    ``save_hyperparameters()`` kept of the LightningModule's arguments), each None where absent.
    The values come from a file: the arch is checked as the top level's is, where it is used; a
    class count is used only where it is a plausible integer (the head's shape is the other witness)."""
    hyper = checkpoint.get("hyper_parameters")
    if not isinstance(hyper, Mapping):
        return None, None
    classes = hyper.get("num_classes")
    if type(classes) is not int or not 1 <= classes <= MAX_LABELS:
        classes = None  # e.g. a float or 10**400: the head's shape says it instead
    return hyper.get("arch"), classes


#: Builder arguments that fetch weights (torchvision's ``weights``/``weights_backbone``, the older
#: ``pretrained``/``pretrained_backbone`` that timm and many plugins' builders still take): the file's
#: weights are what is loaded, so neither a checkpoint nor the user may ask a builder for others.
PRETRAINED_ARGUMENTS = ("weights", "weights_backbone", "pretrained", "pretrained_backbone")


def checkpoint_arch_kwargs(value: Any, path: Path) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
        raise ModelLoadError(
            f"The 'arch_kwargs' entry of {path} is not a mapping of argument names to values: {shown(value)}"
        )
    if any(name in value for name in PRETRAINED_ARGUMENTS):
        raise ModelLoadError(f"{path}: 'arch_kwargs' may not name pretrained weights.")
    return dict(value)


def checkpoint_scores(checkpoint: Mapping[str, Any]) -> str:
    """``sigmoid`` where the checkpoint (or a Lightning checkpoint's ``hyper_parameters``) says its
    model is multi-label (``"multilabel": true``), else ``auto`` (see :mod:`attnexplain.scoring`)."""
    hyper = checkpoint.get("hyper_parameters")
    for where in (checkpoint, hyper if isinstance(hyper, Mapping) else {}):
        if where.get("multilabel") is True or where.get("multi_label") is True:
            return "sigmoid"
    return "auto"


def checkpoint_labels(checkpoint: Mapping[str, Any], path: Path) -> list[str] | None:
    """Class names stored in the checkpoint: a list of strings (or numbers), if any."""
    for key in LABEL_KEYS:
        value = checkpoint.get(key)
        if not isinstance(value, (list, tuple)):
            continue  # e.g. "classes": 10, a count, says nothing about names
        if len(value) > MAX_LABELS:
            raise ModelLoadError(
                f"The {key!r} entry of {path} lists {len(value):,} class names; at most {MAX_LABELS:,} are accepted."
            )
        if not all(isinstance(label, (str, int)) and not isinstance(label, bool) for label in value):
            odd = next(label for label in value if not isinstance(label, (str, int)) or isinstance(label, bool))
            raise ModelLoadError(f"The {key!r} entry of {path} is not a list of class names: it holds {shown(odd)}.")
        return [str(label) for label in value]
    return None


def find_state_dict(checkpoint: Mapping[str, Any], path: Path, *, ema: bool = False) -> OrderedDict[str, Any]:
    import torch

    if ema:
        found = next((checkpoint[key] for key in EMA_KEYS if isinstance(checkpoint.get(key), Mapping)), None)
        if found is None:
            held = ", ".join(str(key)[:40] for key in list(checkpoint)[:8])
            raise ModelLoadError(
                f"--ema asks for EMA weights, but {path} has none (no "
                f"{' / '.join(EMA_KEYS)} entry; it holds {held}). Leave out --ema."
            )
        checkpoint = found
    current: Any = checkpoint
    for _ in range(3):  # {"model": {"state_dict": ...}} and the like
        if isinstance(current, Mapping) and current and all(isinstance(v, torch.Tensor) for v in current.values()):
            return _strip_prefixes(current)
        inner = next(
            (current[k] for k in WRAPPER_KEYS if isinstance(current, Mapping) and isinstance(current.get(k), Mapping)),
            None,
        )
        if inner is None:
            break
        current = inner
    raise ModelLoadError(
        f"No state_dict found in {path}: expected tensors at the top level or under one of {', '.join(WRAPPER_KEYS)}."
    )


def _strip_prefixes(state_dict: Mapping[str, Any]) -> OrderedDict[str, Any]:
    """Keys without DataParallel/torch.compile prefixes (see :func:`under_prefix`)."""
    changed = True
    while changed:
        changed = False
        for prefix in _KEY_PREFIXES:
            if all(key.startswith(prefix) for key in state_dict):
                state_dict, changed = under_prefix(state_dict, prefix), True
    return state_dict if isinstance(state_dict, OrderedDict) else under_prefix(state_dict, "")


def under_prefix(state_dict: Mapping[str, Any], prefix: str) -> OrderedDict[str, Any]:
    """The entries whose keys start with ``prefix``, without it, keeping torch's per-module
    ``_metadata`` (module versions that some modules' loading depends on) for the modules under it."""
    metadata = getattr(state_dict, "_metadata", None)
    kept = OrderedDict((key[len(prefix) :], value) for key, value in state_dict.items() if key.startswith(prefix))
    if metadata is not None:  # module names: the prefix's module becomes the root
        root = prefix.rstrip(".")
        kept._metadata = (
            OrderedDict(  # type: ignore[attr-defined]
                ("" if key == root else key[len(prefix) :], value)
                for key, value in metadata.items()
                if key == root or key.startswith(prefix)
            )
            if prefix
            else metadata
        )
    return kept


def checkpoint_preprocessing(spec: Any, path: Path) -> Preprocessing | None:
    if spec is None:
        return None
    if not isinstance(spec, Mapping) or "size" not in spec:
        raise ModelLoadError(f"The 'preprocessing' entry of {path} needs at least a 'size'.")
    size = size_from_file(spec["size"], path, "'preprocessing' entry")
    try:
        resize = spec.get("resize")
        # The shorter side before the centre crop: at least the crop, and not far beyond it.
        if resize is not None and (
            isinstance(resize, bool) or not isinstance(resize, int) or not min(size) <= resize <= 2 * max(size)
        ):
            raise ValueError(
                f"resize must be an integer between {min(size)} and {2 * max(size)} "
                f"for size {list(size)}, got {shown(resize)}"
            )
        mean = normalization_values(_three_given(spec.get("mean", Preprocessing.mean), "mean"), "mean")
        std = normalization_values(_three_given(spec.get("std", Preprocessing.std), "std"), "std", positive=True)
        interpolation = str(spec.get("interpolation", "bilinear"))
        if interpolation not in ("nearest", "nearest-exact", "bilinear", "bicubic"):
            raise ValueError(f"interpolation must be nearest, bilinear or bicubic, got {interpolation[:40]!r}")
        letterbox = spec.get("letterbox", False)
        if not isinstance(letterbox, bool):
            raise ValueError(f"letterbox must be true or false, got {shown(letterbox)}")
        return Preprocessing(
            size=size,
            resize=resize,
            mean=mean,
            std=std,
            interpolation=interpolation,
            letterbox=letterbox,
            source="checkpoint",
        )
    except (TypeError, ValueError, AttnExplainError) as error:
        raise ModelLoadError(f"The 'preprocessing' entry of {path} is invalid: {error}") from None


def size_from_file(value: Any, path: Path, what: str) -> tuple[int, int]:
    try:
        return normalize_size(value, limit=FILE_MAX_SIZE)
    except (AttnExplainError, TypeError, ValueError, OverflowError):
        raise ModelLoadError(
            f"The {what} of {path} asks for size {shown(value)}; a model file may "
            f"ask for one or two integers between 8 and {FILE_MAX_SIZE} (a larger "
            f"--size can be given explicitly)."
        ) from None


def _three_given(values: Any, what: str) -> Any:
    """A file must spell out all three channels (a user's --mean may give one for all)."""
    if not isinstance(values, (list, tuple)) or len(values) != 3:
        raise ValueError(f"{what} must be three numbers (R, G, B), got {shown(values)}")
    return values
