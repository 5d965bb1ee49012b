"""The trust boundary: every decision whether a model file's content may run code. Audit it here.

**What runs without ``--trust-model`` (``trust_model=False``): nothing the file holds.** Every model
file attnexplain reads itself goes through :func:`read_model_file`, which hands back either plain data
(:class:`FileCheckpoint`: tensors and plain values, nothing callable) or, only when trusted, a module
the file's own code built. A ``.safetensors`` file is read by the safetensors library alone; any other
file's kind is told by its content (a zip archive's members), never by its name, so a TorchScript
archive renamed ``.pt`` is still refused:

- **safetensors** (``.safetensors``): the safetensors library reads a JSON header and raw tensor
  bytes, and cannot run code; its metadata is text (structured entries parsed as JSON). Plain data.
- **torch.save files** (state_dicts, training checkpoints, PyTorch Lightning's ``.ckpt``): unpickled
  by PyTorch's ``weights_only`` unpickler, which builds tensors, containers and primitive values
  only, plus :func:`_harmless_globals`, an allow-list of classes that make plain data whatever their
  arguments (argparse ``Namespace``, NumPy scalars, arrays and dtypes, ``pathlib`` paths,
  ``datetime``, Lightning's ``AttributeDict`` read as a plain dict), allowed for this load only.
  A pickle that names any other Python object is refused, and the message names what it would
  import (read from its opcodes by :func:`_unsafe_globals`, never run). Plain data.
- **a whole pickled module** (``torch.save(model)``): unpickling imports and calls its classes, which
  is running code: refused (the ``weights_only`` unpickler refuses it, as above).
- **TorchScript** (``torch.jit.save``): a program, run while loading (a scripted ``__setstate__``
  can read and write any file): refused.
- **torch.export** (``.pt2``): ``torch.export.load`` unpickles parts of the archive: refused.
- an archive that would inflate far beyond its own size (a zip bomb) is refused before PyTorch reads it.
- **a checkpoint's ``arch`` entry** (text the file gives) names an architecture that only the
  installed plugins' builders are asked for; a Python class to import (``model.py:Net``,
  ``package.module:Net``) is refused by :func:`refuse_class_named_by_file`, since importing runs code
  (``architectures.from_checkpoint`` resolves a file's name with ``user_classes=False``).

With ``--trust-model``, anything the file's code raises, ``sys.exit()`` included, becomes one error
line (:func:`.failures.load_failures_reported`). What does run code, and why it is not the file's:

- the architecture's constructor, a plugin's builder installed by the user (torchvision's, timm's),
  built with the keyword arguments the file gives (never naming weights to fetch:
  :func:`.checkpoints.checkpoint_arch_kwargs`; a builder builds random weights, downloading nothing)
  and bounded by the file's own size (:mod:`.architectures`);
- ``--arch path/net.py:Net`` imports the user's own file (:mod:`.user_class`): the user named it on
  the command line, as ``python net.py`` would run it; a file can never name one (above);
- a path a plugin claims (a Hugging Face folder) is loaded by that plugin, which is given
  ``trust_model`` and promises to run no code from the path without it (``ModelPlugin.load_path``);
  ``PREFIX:NAME[:WEIGHTS]`` is built by its plugin.
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NoReturn

from ..errors import ModelLoadError, UntrustedModelError
from ..preprocess import Preprocessing
from .checkpoints import EMA_KEYS, LABEL_KEYS, WRAPPER_KEYS, Asked, no_ema, size_from_file
from .failures import first_line, load_failures_reported, torch_logs_kept
from .loaded import LoadedModel

_TRUST_HINT = (
    "If you trust where it came from, pass --trust-model (trust_model=True); or save model.state_dict() and use --arch."
)


@dataclass(frozen=True)
class FileCheckpoint:
    """What a file held that is no code: tensors and plain values (a state_dict, maybe inside a
    training checkpoint, or safetensors with their metadata), for :func:`.architectures.from_checkpoint`."""

    checkpoint: Mapping[str, Any]
    loader: str  # state_dict | safetensors


def refuse_class_named_by_file(arch: str) -> NoReturn:
    """Refuse an architecture that a file names (a checkpoint's ``arch``) and that is a Python class
    to import: only the user may ask for that, with ``--arch``."""
    raise ModelLoadError(
        f"The architecture {arch[:120]!r} that the file names is a Python "
        f"class to import, which a file may not ask for (importing "
        f"runs code); if you trust it, pass --arch {arch[:120]} yourself."
    )


def read_model_file(path: Path, asked: Asked, trust_model: bool) -> LoadedModel | FileCheckpoint:
    """``path``'s content: a module its own code builds (TorchScript, torch.export, a pickled module:
    only with ``trust_model``, else :class:`~attnexplain.errors.UntrustedModelError`), or the plain
    data of a checkpoint."""
    if path.stat().st_size == 0:
        raise ModelLoadError(f"Model file is empty: {path}")
    try:  # a regular file: opening it cannot block
        with path.open("rb") as handle:
            handle.read(1)
    except OSError as error:
        raise ModelLoadError(f"Cannot read model file {path}: {error.strerror or error}") from None
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    # The kind is read from the archive's members, never from the suffix: a TorchScript or
    # torch.export archive renamed to .pt is still code.
    kind = _archive_kind(path)
    if kind == "torchscript":
        if not trust_model:
            raise UntrustedModelError(
                f"{path} is a TorchScript program: loading it runs code stored in the file (which can "
                f"read and write any file), so it is refused. {_TRUST_HINT}"
            )
        no_ema(asked.ema, f"{path} is a TorchScript program, not a training checkpoint")
        return _load_torchscript(path)
    if kind == "export":
        if not trust_model:
            raise UntrustedModelError(
                f"{path} is a torch.export program: loading it unpickles parts of the archive, which "
                f"can run arbitrary code, so it is refused. {_TRUST_HINT}"
            )
        no_ema(asked.ema, f"{path} is a torch.export program, not a training checkpoint")
        return _load_exported(path)
    return _load_pickle(path, asked, trust_model)


def _archive_kind(path: Path) -> str | None:
    """Tell TorchScript and torch.export archives from torch.save ones by their members."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError) as error:
        raise ModelLoadError(f"Model file is a damaged archive: {path}: {error}") from None
    # PyTorch stores tensors uncompressed (only TorchScript's small code files are compressed):
    # an archive that inflates to far more than its own size is a zip bomb, which would fill memory.
    expanded, size = sum(member.file_size for member in members), path.stat().st_size
    if expanded > 2 * size + 16 * 1024 * 1024:
        raise ModelLoadError(
            f"{path} is an archive that expands to {expanded:,} bytes from "
            f"{size:,}: PyTorch does not compress tensors, so it is refused."
        )
    names = [member.filename for member in members]
    if any(n.endswith("/archive_format") or "serialized_exported_program" in n for n in names):
        return "export"
    if any("/code/__torch__" in n or n.endswith("/constants.pkl") for n in names):
        return "torchscript"
    return "pickle"


def _load_torchscript(path: Path) -> LoadedModel:
    import torch

    with load_failures_reported(f"Cannot load TorchScript program {path}"):
        module = torch.jit.load(str(path), map_location="cpu")
    return LoadedModel(
        module=module,
        source=str(path),
        loader="torchscript",
        architecture=getattr(module, "original_name", None),
        inner_layers=False,
        notes=[
            "TorchScript hides inner layers from hooks: only input-gradient "
            "methods (saliency) apply; save a state_dict for Grad-CAM"
        ],
    )


def _load_exported(path: Path) -> LoadedModel:
    import torch

    with load_failures_reported(f"Cannot load torch.export program {path}"):
        program = torch.export.load(str(path))
    # unflatten() rebuilds the original module tree (as interpreter modules running the exported
    # graph), so layer hooks, and with them Grad-CAM, work as on the eager model.
    try:
        with torch_logs_kept():
            module, inner_layers = torch.export.unflatten(program), True
        notes = [
            "torch.export keeps layers but not attention modules: attention rollout is "
            "unavailable, layer methods (Grad-CAM) and saliency work"
        ]
    except Exception:
        module, inner_layers = program.module(), False
        notes = [
            "this exported program could not be unflattened into its layers: only "
            "input-gradient methods (saliency) apply"
        ]
    # An exported program is specialised to its example input: explain at that size.
    size = None
    user_inputs = set(program.graph_signature.user_inputs)  # parameters are placeholders too
    for node in program.graph.nodes:
        value = node.meta.get("val")
        if node.op == "placeholder" and node.name in user_inputs and len(getattr(value, "shape", ())) == 4:
            size = size_from_file([int(value.shape[2]), int(value.shape[3])], path, "input shape")
            break
    preprocessing = Preprocessing(size=size, source="torch.export input shape") if size else None
    return LoadedModel(
        module=module,
        source=str(path),
        loader="export",
        preprocessing=preprocessing,
        inner_layers=inner_layers,
        notes=notes,
    )


def _harmless_globals() -> list[Any]:
    """Classes and functions that real checkpoints pickle and that only ever make plain data.

    Training scripts save their ``argparse.Namespace`` (torchvision's and timm's references), metrics
    as numpy scalars, numpy arrays and dtypes, paths and timestamps. Each of these, called with any
    arguments, builds a value and does nothing else, so allowing them lets those checkpoints load
    without --trust-model while unpickling still cannot run code.

    PyTorch Lightning's ``AttributeDict`` (a dict whose keys read as attributes, in
    ``hyper_parameters``) is read as the plain dict it is, under each name Lightning has given it:
    Lightning need not be installed, and its class is never imported. Paths are allowed under the
    names Python 3.13 gives them too (``pathlib._local``), so a checkpoint saved there loads here.
    """
    import argparse
    import datetime
    import pathlib

    import numpy as np

    try:
        from numpy._core import multiarray  # numpy 2
    except ImportError:  # pragma: no cover - numpy 1
        from numpy.core import multiarray
    dtype_classes = [
        cls
        for cls in vars(getattr(np, "dtypes", object)).values()
        if isinstance(cls, type) and issubclass(cls, np.dtype)
    ]
    paths = [
        pathlib.Path,
        pathlib.PurePath,
        pathlib.PosixPath,
        pathlib.PurePosixPath,
        pathlib.WindowsPath,
        pathlib.PureWindowsPath,
    ]
    path_aliases = [
        (cls, f"{module}.{cls.__name__}")
        for cls in paths
        for module in ("pathlib", "pathlib._local")
        if cls.__module__ != module
    ]
    attribute_dicts = [
        (dict, name)
        for name in (
            "lightning.fabric.utilities.data.AttributeDict",
            "lightning_fabric.utilities.data.AttributeDict",
            "lightning.pytorch.utilities.parsing.AttributeDict",
            "pytorch_lightning.utilities.parsing.AttributeDict",
        )
    ]
    return [
        argparse.Namespace,
        frozenset,
        multiarray._reconstruct,
        multiarray.scalar,
        np.ndarray,
        np.dtype,
        *dtype_classes,
        *paths,
        *path_aliases,
        *attribute_dicts,
        datetime.datetime,
        datetime.date,
        datetime.time,
        datetime.timedelta,
        datetime.timezone,
    ]


def _global_name(value: Any) -> str:
    if isinstance(value, tuple):  # (object, the name a pickle gives it)
        return value[1]
    return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', '')}"


def _unsafe_globals(path: Path, error: Exception) -> list[str]:
    """The Python objects a pickle would import and call, read from its opcodes without running it."""
    import torch

    harmless = {_global_name(value) for value in _harmless_globals()}
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # the legacy (pre-1.6, non-zip) format: torch's refusal names the first one
        names = re.findall(r"GLOBAL ([\w.]+)", str(error))
    return [name for name in dict.fromkeys(names) if name not in harmless]


def _load_pickle(path: Path, asked: Asked, trust_model: bool) -> LoadedModel | FileCheckpoint:
    import torch

    try:
        with torch_logs_kept(), torch.serialization.safe_globals(_harmless_globals()):
            content = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:
        unsafe = _unsafe_globals(path, error)
        if not unsafe:
            raise ModelLoadError(f"Not a PyTorch model file (or it is damaged): {path}") from None
        shown = ", ".join(unsafe[:5]) + (f" and {len(unsafe) - 5} more" if len(unsafe) > 5 else "")
        if not trust_model:
            raise UntrustedModelError(
                f"{path} holds pickled Python objects that unpickling would import and run "
                f"({shown}); unpickling it can run arbitrary code, so it is refused. {_TRUST_HINT}"
            ) from None
        with load_failures_reported(f"Cannot unpickle {path} (it needs {shown})"):
            content = torch.load(str(path), map_location="cpu", weights_only=False)

    if isinstance(content, torch.nn.Module):
        no_ema(asked.ema, f"{path} holds a whole model, not a training checkpoint")
        return LoadedModel(module=content, source=str(path), loader="pickle", architecture=type(content).__name__)
    if isinstance(content, Mapping):
        keys = EMA_KEYS if asked.ema else WRAPPER_KEYS
        inner = next((content[k] for k in keys if isinstance(content.get(k), torch.nn.Module)), None)
        if inner is not None:
            return LoadedModel(module=inner, source=str(path), loader="pickle", architecture=type(inner).__name__)
        return FileCheckpoint(content, "state_dict")
    raise ModelLoadError(f"{path} holds a {type(content).__name__}, not a model or a state_dict.")


def _load_safetensors(path: Path) -> FileCheckpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        state_dict = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelLoadError(f"Not a valid safetensors file: {path}: {first_line(error)}") from None
    checkpoint: dict[str, Any] = {"state_dict": state_dict}
    # safetensors metadata is str → str; structured values are stored as JSON.
    for key in ("arch", "arch_kwargs", "preprocessing", *LABEL_KEYS):
        if key in metadata:
            value = metadata[key]
            if key != "arch":
                try:
                    value = json.loads(value)
                except (json.JSONDecodeError, RecursionError):
                    raise ModelLoadError(f"Metadata {key!r} of {path} is not valid JSON.") from None
            checkpoint[key] = value
    return FileCheckpoint(checkpoint, "safetensors")
