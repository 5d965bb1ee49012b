"""Loading a model the way people save them.

Supported: a state_dict (``.pt``/``.pth``, optionally wrapped in a training checkpoint) plus an
architecture name, ``.safetensors``, and ``PREFIX:NAME[:WEIGHTS]`` specifications built by a plugin
(``torchvision:resnet50:DEFAULT``). Files that hold code load only with ``trust_model=True``: a whole
pickled module (unpickling runs code), TorchScript (a program, run while loading) and ``torch.export``
programs (``.pt2``: torch.export.load unpickles parts of the archive).

Nothing a file says may cost more than the file itself: an architecture is built on the meta device
and compared with the file's tensors before it is built for real, and the sizes a file asks for have
their own, lower, bound (preprocess.FILE_MAX_SIZE).
"""

from __future__ import annotations

import difflib
import json
import logging
import re
import threading
import warnings
import zipfile
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from ._files import not_a_regular_file
from .errors import AttnExplainError, ModelLoadError, UntrustedModelError, WeightsDoNotFit, shown
from .plugins import ModelPlugin, all_builders, find_builder, plugin_for_prefix, select_plugin
from .preprocess import FILE_MAX_SIZE, Preprocessing, normalization_values, normalize_size

# Keys under which training scripts commonly nest the weights.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
# Prefixes added by DataParallel/DistributedDataParallel and torch.compile.
_KEY_PREFIXES = ("module.", "_orig_mod.")
_LABEL_KEYS = ("labels", "classes", "class_names", "categories")
# More class names than any real label set (ImageNet-21k has 21,843): a longer list is not labels.
_MAX_LABELS = 100_000
# A labels file of one name per line beyond this is not a labels file (21,843 names take ~1 MB).
_MAX_LABELS_FILE_BYTES = 16 * 1024 * 1024
_TRUST_HINT = ("If you trust where it came from, pass --trust-model (trust_model=True); or save "
               "model.state_dict() and use --arch.")


@dataclass
class LoadedModel:
    """A model ready to explain, with everything known about where it came from."""

    module: Any  # torch.nn.Module (or a TorchScript module)
    source: str
    loader: str  # state_dict | safetensors | pickle | torchscript | export | a plugin prefix
    architecture: str | None = None
    weights: str | None = None
    labels: list[str] | None = None
    preprocessing: Preprocessing | None = None
    plugin: ModelPlugin = field(default_factory=ModelPlugin)
    #: False where inner layers cannot be hooked (TorchScript): layer methods are then unavailable.
    inner_layers: bool = True
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "loader": self.loader, "architecture": self.architecture,
                "weights": self.weights, "plugin": self.plugin.name, "task": self._task(),
                "notes": list(self.notes)}

    def _task(self) -> str:
        try:
            return self.plugin.task(self.module)
        except Exception:  # a plugin's answer is for the report only; never fail a report on it
            return "unknown"


def load_model(spec: str | Path, *, arch: str | None = None, num_classes: int | None = None,
               labels: str | Path | list[str] | None = None, trust_model: bool = False,
               plugin: str | None = None, device: str = "cpu") -> LoadedModel:
    """Load ``spec`` (a file or ``PREFIX:NAME[:WEIGHTS]``) into an eval-mode model on ``device``
    (``"auto"``: CUDA, else MPS, else the CPU)."""
    path = Path(spec)
    problem = check_model_path(path)
    # What can be checked without torch is checked before importing it (~2 s).
    given_labels = read_labels(labels) if labels is not None else None
    run_device = resolve_device(device)
    if problem is None:
        loaded = _load_file(path, arch=arch, num_classes=num_classes, trust_model=trust_model)
    else:
        loaded = _load_named(str(spec), arch)
    if given_labels is not None:
        loaded.labels = given_labels
    _finish(loaded, plugin, run_device)
    return loaded


def check_model_path(path: Path) -> str | None:
    """Refuse a model path that is a FIFO or a device; return ``"does not exist"`` for a name that
    is not a file (a ``PREFIX:NAME`` specification, or a missing file), else None. Decided with stat
    before anything opens the path: opening a FIFO blocks, a device never ends."""
    problem = not_a_regular_file(path)
    if problem not in (None, "does not exist"):
        raise ModelLoadError(f"Model path {path} {problem}.")
    return problem


def resolve_device(name: str) -> str:
    """``name`` (auto, cpu, cuda, mps, or any torch device string) as a device this machine has."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AttnExplainError(f"--device {name} was asked for, but PyTorch sees no CUDA GPU here.")
    if name == "mps" and not torch.backends.mps.is_available():
        raise AttnExplainError("--device mps was asked for, but this PyTorch has no MPS device.")
    return name


def _finish(loaded: LoadedModel, plugin_name: str | None, device: str) -> None:
    import torch

    module = loaded.module
    if isinstance(module, torch.nn.Module):
        # A trusted pickle's classes are the file's code: whatever they raise is a load failure.
        with _load_failures_reported(f"Preparing the model from {loaded.source} failed"):
            try:
                module.eval()
            except NotImplementedError:
                pass  # exported programs keep the mode they were exported in
            # We never train: no parameter needs a gradient (see capture.frozen_parameters).
            for parameter in module.parameters():  # (ScriptModules refuse module.requires_grad_)
                parameter.requires_grad_(False)
            module.to(device)
    loaded.plugin = select_plugin(module, plugin_name)
    if loaded.preprocessing is None:
        loaded.preprocessing = loaded.plugin.preprocessing(module)


def read_labels(labels: str | Path | list[str]) -> list[str]:
    """Class names from a list or a text file with one label per line."""
    if isinstance(labels, (list, tuple)):
        return [str(label) for label in labels]
    path = Path(labels)
    problem = not_a_regular_file(path)
    if problem == "does not exist":
        raise ModelLoadError(f"Labels file not found: {path}")
    if problem is not None:
        raise ModelLoadError(f"Labels file {path} {problem}.")
    if path.stat().st_size > _MAX_LABELS_FILE_BYTES:
        raise ModelLoadError(f"Labels file {path} is {path.stat().st_size:,} bytes: a labels file "
                             f"has one class name per line, and is far smaller.")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ModelLoadError(f"Labels file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"Cannot read labels file {path}: {error}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ModelLoadError(f"Labels file is empty: {path}")
    if len(lines) > _MAX_LABELS:
        raise ModelLoadError(f"Labels file {path} has {len(lines):,} lines; at most "
                             f"{_MAX_LABELS:,} class names are accepted.")
    return [line.strip() for line in lines]


# --- named models ------------------------------------------------------------------------------

def _load_named(spec: str, arch: str | None) -> LoadedModel:
    prefix, _, rest = spec.partition(":")
    plugin = plugin_for_prefix(prefix) if rest else None
    if plugin is None:
        if rest:
            raise ModelLoadError(f"Model file not found, and no installed plugin builds "
                                 f"'{prefix}:' models: {spec}")
        raise ModelLoadError(f"Model file not found: {spec}")
    name, _, weights = rest.partition(":")
    named = plugin.load_named(name, weights or None)
    loaded = LoadedModel(module=named.module, source=spec, loader=prefix,
                         architecture=named.architecture, weights=named.weights,
                         labels=named.labels, preprocessing=named.preprocessing,
                         notes=list(named.notes))
    if weights == "":
        loaded.notes.append("random weights: no WEIGHTS were named, so predictions mean nothing")
    return loaded


# --- files -------------------------------------------------------------------------------------

def _load_file(path: Path, *, arch: str | None, num_classes: int | None,
               trust_model: bool) -> LoadedModel:
    if path.stat().st_size == 0:
        raise ModelLoadError(f"Model file is empty: {path}")
    try:  # a regular file: opening it cannot block
        with path.open("rb") as handle:
            handle.read(1)
    except OSError as error:
        raise ModelLoadError(f"Cannot read model file {path}: {error.strerror or error}") from None
    if path.suffix == ".safetensors":
        return _load_safetensors(path, arch, num_classes)
    # The kind is read from the archive's members, never from the suffix: a TorchScript or
    # torch.export archive renamed to .pt is still code.
    kind = _archive_kind(path)
    if kind == "torchscript":
        if not trust_model:
            raise UntrustedModelError(
                f"{path} is a TorchScript program: loading it runs code stored in the file (which can "
                f"read and write any file), so it is refused. {_TRUST_HINT}")
        return _load_torchscript(path)
    if kind == "export":
        if not trust_model:
            raise UntrustedModelError(
                f"{path} is a torch.export program: loading it unpickles parts of the archive, which "
                f"can run arbitrary code, so it is refused. {_TRUST_HINT}")
        return _load_exported(path)
    return _load_pickle(path, arch, num_classes, trust_model)


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
        raise ModelLoadError(f"{path} is an archive that expands to {expanded:,} bytes from "
                             f"{size:,}: PyTorch does not compress tensors, so it is refused.")
    names = [member.filename for member in members]
    if any(n.endswith("/archive_format") or "serialized_exported_program" in n for n in names):
        return "export"
    if any("/code/__torch__" in n or n.endswith("/constants.pkl") for n in names):
        return "torchscript"
    return "pickle"


def _load_torchscript(path: Path) -> LoadedModel:
    import torch

    with _load_failures_reported(f"Cannot load TorchScript program {path}"):
        module = torch.jit.load(str(path), map_location="cpu")
    return LoadedModel(module=module, source=str(path), loader="torchscript",
                       architecture=getattr(module, "original_name", None), inner_layers=False,
                       notes=["TorchScript hides inner layers from hooks: only input-gradient "
                              "methods (saliency) apply; save a state_dict for Grad-CAM"])


def _load_exported(path: Path) -> LoadedModel:
    import torch

    with _load_failures_reported(f"Cannot load torch.export program {path}"):
        program = torch.export.load(str(path))
    # unflatten() rebuilds the original module tree (as interpreter modules running the exported
    # graph), so layer hooks, and with them Grad-CAM, work as on the eager model.
    try:
        with _torch_logs_kept():
            module, inner_layers = torch.export.unflatten(program), True
        notes = ["torch.export keeps layers but not attention modules: attention rollout is "
                 "unavailable, layer methods (Grad-CAM) and saliency work"]
    except Exception:
        module, inner_layers = program.module(), False
        notes = ["this exported program could not be unflattened into its layers: only "
                 "input-gradient methods (saliency) apply"]
    # An exported program is specialised to its example input: explain at that size.
    size = None
    user_inputs = set(program.graph_signature.user_inputs)  # parameters are placeholders too
    for node in program.graph.nodes:
        value = node.meta.get("val")
        if node.op == "placeholder" and node.name in user_inputs and len(getattr(value, "shape", ())) == 4:
            size = _file_size([int(value.shape[2]), int(value.shape[3])], path, "input shape")
            break
    preprocessing = Preprocessing(size=size, source="torch.export input shape") if size else None
    return LoadedModel(module=module, source=str(path), loader="export", preprocessing=preprocessing,
                       inner_layers=inner_layers, notes=notes)


@contextmanager
def _load_failures_reported(what: str) -> Iterator[None]:
    """Turn anything a trusted file's code raises into one ModelLoadError line.

    SystemExit included: a pickle that calls ``sys.exit(0)`` must not end the program silently with
    success. torch's own log lines and warnings are kept back (torch.export.load logs a whole
    traceback before it raises); the first error it logged is the cause worth showing.
    """
    with _torch_logs_kept() as logged:
        try:
            yield
        except KeyboardInterrupt:
            raise
        except AttnExplainError:
            raise
        except BaseException as error:  # noqa: BLE001 - SystemExit and friends too, see above
            cause = next((record.exc_info[1] for record in logged if record.exc_info), error)
            raise ModelLoadError(f"{what}: {type(cause).__name__}: {_first_line(cause)}") from None


class _KeptRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def _torch_logs_kept() -> Iterator[list[logging.LogRecord]]:
    """Keep torch's log records and warnings from the terminal for the duration; yield the records."""
    logger = logging.getLogger("torch")
    handler, propagate = _KeptRecords(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _harmless_globals() -> list[Any]:
    """Classes and functions that real checkpoints pickle and that only ever make plain data.

    Training scripts save their ``argparse.Namespace`` (torchvision's and timm's references), metrics
    as numpy scalars, numpy arrays and dtypes, paths and timestamps. Each of these, called with any
    arguments, builds a value and does nothing else, so allowing them lets those checkpoints load
    without --trust-model while unpickling still cannot run code.
    """
    import argparse
    import datetime
    import pathlib

    import numpy as np

    try:
        from numpy._core import multiarray  # numpy 2
    except ImportError:  # pragma: no cover - numpy 1
        from numpy.core import multiarray
    dtype_classes = [cls for cls in vars(getattr(np, "dtypes", object)).values()
                     if isinstance(cls, type) and issubclass(cls, np.dtype)]
    return [argparse.Namespace, frozenset,
            multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype, *dtype_classes,
            pathlib.Path, pathlib.PurePath, pathlib.PosixPath, pathlib.PurePosixPath,
            pathlib.WindowsPath, pathlib.PureWindowsPath,
            datetime.datetime, datetime.date, datetime.time, datetime.timedelta, datetime.timezone]


def _global_name(value: Any) -> str:
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


def _load_pickle(path: Path, arch: str | None, num_classes: int | None,
                 trust_model: bool) -> LoadedModel:
    import torch

    try:
        with _torch_logs_kept(), torch.serialization.safe_globals(_harmless_globals()):
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
        with _load_failures_reported(f"Cannot unpickle {path} (it needs {shown})"):
            content = torch.load(str(path), map_location="cpu", weights_only=False)

    if isinstance(content, torch.nn.Module):
        return LoadedModel(module=content, source=str(path), loader="pickle",
                           architecture=type(content).__name__)
    if isinstance(content, Mapping):
        inner = next((content[k] for k in _WRAPPER_KEYS if isinstance(content.get(k), torch.nn.Module)),
                     None)
        if inner is not None:
            return LoadedModel(module=inner, source=str(path), loader="pickle",
                               architecture=type(inner).__name__)
        return _from_checkpoint(content, path, "state_dict", arch, num_classes)
    raise ModelLoadError(f"{path} holds a {type(content).__name__}, not a model or a state_dict.")


def _load_safetensors(path: Path, arch: str | None, num_classes: int | None) -> LoadedModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        state_dict = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelLoadError(f"Not a valid safetensors file: {path}: {_first_line(error)}") from None
    checkpoint: dict[str, Any] = {"state_dict": state_dict}
    # safetensors metadata is str → str; structured values are stored as JSON.
    for key in ("arch", "arch_kwargs", "preprocessing", *_LABEL_KEYS):
        if key in metadata:
            value = metadata[key]
            if key != "arch":
                try:
                    value = json.loads(value)
                except (json.JSONDecodeError, RecursionError):
                    raise ModelLoadError(f"Metadata {key!r} of {path} is not valid JSON.") from None
            checkpoint[key] = value
    return _from_checkpoint(checkpoint, path, "safetensors", arch, num_classes)


def _from_checkpoint(checkpoint: Mapping[str, Any], path: Path, loader: str, arch: str | None,
                     num_classes: int | None) -> LoadedModel:
    """Build the architecture named by ``arch`` (or the checkpoint) and load the weights into it."""
    state_dict = _find_state_dict(checkpoint, path)
    arch_name = arch or checkpoint.get("arch")
    if not arch_name:
        raise ModelLoadError(
            f"{path} holds only weights (a state_dict); name the architecture they belong to with "
            f"--arch NAME, e.g. --arch resnet50 (any torchvision builder works)."
        )
    if not isinstance(arch_name, str):
        raise ModelLoadError(f"The 'arch' entry of {path} is not a name: {shown(arch_name)}")
    arch_kwargs = _checkpoint_arch_kwargs(checkpoint.get("arch_kwargs"), path) if arch is None else {}
    labels = _checkpoint_labels(checkpoint, path)
    preprocessing = _checkpoint_preprocessing(checkpoint.get("preprocessing"), path)
    try:
        module = build_architecture(arch_name, state_dict, arch_kwargs, num_classes, initialise=False)
    except WeightsDoNotFit as mismatch:
        raise ModelLoadError(f"The weights in {path} do not fit {arch_name}: {mismatch.detail}. "
                             f"Is --arch right?") from None
    own = module.state_dict()
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is None:
        # Files without torch's per-module versions (safetensors, re-keyed dicts) were saved by
        # current code: load them as the current version (MNASNet refuses a missing version).
        state_dict._metadata = own._metadata  # type: ignore[attr-defined]
    # The file's tensors become the model's where their types agree: copying 100 MB into freshly
    # allocated (never touched) memory costs 0.5 s of page faults for ResNet-50.
    assign = all(getattr(state_dict[key], "dtype", None) == tensor.dtype for key, tensor in own.items())
    try:
        module.load_state_dict(state_dict, strict=True, assign=assign)
    except Exception as error:  # a builder's own _load_from_state_dict may raise anything
        raise ModelLoadError(f"The weights in {path} do not fit {arch_name}: "
                             f"{_first_mismatch(error)}. Is --arch right?") from None
    return LoadedModel(module=module, source=str(path), loader=loader, architecture=arch_name,
                       labels=labels, preprocessing=preprocessing)


def _checkpoint_arch_kwargs(value: Any, path: Path) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
        raise ModelLoadError(f"The 'arch_kwargs' entry of {path} is not a mapping of argument "
                             f"names to values: {shown(value)}")
    if "weights" in value or "weights_backbone" in value:
        raise ModelLoadError(f"{path}: 'arch_kwargs' may not name pretrained weights.")
    return dict(value)


def _checkpoint_labels(checkpoint: Mapping[str, Any], path: Path) -> list[str] | None:
    """Class names stored in the checkpoint: a list of strings (or numbers), if any."""
    for key in _LABEL_KEYS:
        value = checkpoint.get(key)
        if not isinstance(value, (list, tuple)):
            continue  # e.g. "classes": 10, a count, says nothing about names
        if len(value) > _MAX_LABELS:
            raise ModelLoadError(f"The {key!r} entry of {path} lists {len(value):,} class names; "
                                 f"at most {_MAX_LABELS:,} are accepted.")
        if not all(isinstance(label, (str, int)) and not isinstance(label, bool) for label in value):
            odd = next(label for label in value if not isinstance(label, (str, int)) or isinstance(label, bool))
            raise ModelLoadError(f"The {key!r} entry of {path} is not a list of class names: "
                                 f"it holds {shown(odd)}.")
        return [str(label) for label in value]
    return None


def _find_state_dict(checkpoint: Mapping[str, Any], path: Path) -> OrderedDict[str, Any]:
    import torch

    current: Any = checkpoint
    for _ in range(3):  # {"model": {"state_dict": ...}} and the like
        if isinstance(current, Mapping) and current and all(
                isinstance(v, torch.Tensor) for v in current.values()):
            return _strip_prefixes(current)
        inner = next((current[k] for k in _WRAPPER_KEYS
                      if isinstance(current, Mapping) and isinstance(current.get(k), Mapping)), None)
        if inner is None:
            break
        current = inner
    raise ModelLoadError(f"No state_dict found in {path}: expected tensors at the top level or "
                         f"under one of {', '.join(_WRAPPER_KEYS)}.")


def _strip_prefixes(state_dict: Mapping[str, Any]) -> OrderedDict[str, Any]:
    """Keys without DataParallel/torch.compile prefixes, keeping torch's per-module ``_metadata``
    (module versions that some modules' loading depends on)."""
    metadata = getattr(state_dict, "_metadata", None)
    keys = list(state_dict)
    changed = True
    while changed:
        changed = False
        for prefix in _KEY_PREFIXES:
            if all(key.startswith(prefix) for key in keys):
                keys = [key[len(prefix):] for key in keys]
                if metadata is not None:  # module names: the wrapper's root goes, its child is root
                    root = prefix.rstrip(".")
                    metadata = OrderedDict(("" if key == root else key[len(prefix):], value)
                                           for key, value in metadata.items()
                                           if key == root or key.startswith(prefix))
                changed = True
    stripped = OrderedDict(zip(keys, state_dict.values()))
    if metadata is not None:
        stripped._metadata = metadata  # type: ignore[attr-defined]
    return stripped


def build_architecture(arch: str, state_dict: Mapping[str, Any], arch_kwargs: dict[str, Any],
                       num_classes: int | None, *, initialise: bool = True) -> Any:
    """Construct ``arch`` with random weights, its number of classes read off the state_dict.

    It is first built on the meta device (no memory for tensors) and compared with ``state_dict``;
    only an architecture whose every tensor matches the file's is built for real, so memory is
    bounded by the file, whatever ``arch_kwargs`` say. Raises :class:`WeightsDoNotFit` otherwise.
    ``initialise=False`` leaves the weights as allocated (not random), for a caller that loads every
    one of them next (``load_state_dict(strict=True)``): random initialisation is most of the build
    (ResNet-50: 0.2 s of 0.21 s).
    """
    found = find_builder(arch)
    if found is None:
        close = difflib.get_close_matches(arch, all_builders(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelLoadError(f"Unknown architecture {arch[:80]!r}.{hint}")
    _, builder = found
    budget = _BuildBudget(state_dict)
    if num_classes is None and "num_classes" not in arch_kwargs:
        num_classes = _infer_num_classes(builder, arch_kwargs, state_dict, budget)
    if num_classes is not None:
        arch_kwargs = {**arch_kwargs, "num_classes": int(num_classes)}

    def build(meta: bool) -> Any:
        try:
            return budget.build(builder, arch_kwargs, meta=meta, initialise=initialise)
        except _TooLarge as error:
            raise ModelLoadError(f"{arch} built with {shown(arch_kwargs)} is far larger than the "
                                 f"weights it should hold ({error}); refused before it fills "
                                 f"memory.") from None
        except Exception as error:
            if meta:
                return None  # some builders compute with tensors while constructing (RegNet)
            if isinstance(error, (TypeError, ValueError)):
                raise ModelLoadError(f"Cannot build {arch} with {shown(arch_kwargs)}: "
                                     f"{_first_line(error)}") from None
            # builders are third-party code; report, don't crash
            raise ModelLoadError(f"Building {arch} failed: {type(error).__name__}: "
                                 f"{_first_line(error)}") from None

    skeleton = build(meta=True)
    module = skeleton if skeleton is not None else build(meta=False)
    _check_fit(arch, module.state_dict(), state_dict)
    return build(meta=False) if skeleton is not None else module


class _TooLarge(Exception):
    """A build went past its :class:`_BuildBudget`."""


class _BuildBudget:
    """Stops a build, as soon as it registers them, at far more modules or tensor elements than the
    file's state_dict holds, so that metadata such as ``{"layers": [100000, 1, 1, 1]}`` fails at
    once instead of building 100,000 blocks (even on the meta device that takes minutes).

    The margins are wide: builders replace heads after construction (registering tensors twice),
    some build a whole backbone and keep part of it (SSD300 builds VGG-16's 120M-parameter
    classifier and drops it), and parameterless modules (activations, dropout, containers) come on
    top of the tensors. The shape check after the meta build is what keeps the real build to the
    file's size; this budget only cuts absurd builds short.
    """

    def __init__(self, state_dict: Mapping[str, Any]) -> None:
        self.max_modules = 4 * len(state_dict) + 64
        self.max_elements = 4 * sum(int(t.numel()) for t in state_dict.values()) + 200_000_000

    def build(self, builder: Callable[..., Any], kwargs: dict[str, Any], *, meta: bool,
              initialise: bool = True) -> Any:
        import torch
        from torch.nn.modules import module as torch_module

        counts = {"modules": 0, "elements": 0}
        # The hooks are process-wide: count only what this thread builds.
        builder_thread = threading.get_ident()

        def count_module(parent: Any, name: str, submodule: Any) -> None:
            if threading.get_ident() != builder_thread:
                return
            counts["modules"] += 1
            if counts["modules"] > self.max_modules:
                raise _TooLarge(f"over {self.max_modules:,} modules")

        def count_tensor(parent: Any, name: str, tensor: Any) -> None:
            if threading.get_ident() != builder_thread:
                return
            counts["elements"] += int(tensor.numel()) if tensor is not None else 0
            if counts["elements"] > self.max_elements:  # checked before the tensor is initialised
                raise _TooLarge(f"over {self.max_elements:,} tensor elements")

        handles = [torch_module.register_module_module_registration_hook(count_module),
                   torch_module.register_module_parameter_registration_hook(count_tensor),
                   torch_module.register_module_buffer_registration_hook(count_tensor)]
        try:
            with _torch_logs_kept(), _initialisation_skipped(meta or not initialise):
                if meta:  # the meta device builds without allocating or initialising anything
                    with torch.device("meta"):
                        return builder(**kwargs)
                return builder(**kwargs)
        finally:
            for handle in handles:
                handle.remove()


@contextmanager
def _initialisation_skipped(skipped: bool) -> Iterator[None]:
    """Make ``torch.nn.init``'s in-place initialisers do nothing in this thread for the duration.

    Builders initialise through that module (``nn.init.kaiming_normal_`` and the ``reset_parameters``
    of torch's layers); other threads, which may be building models they mean to use with random
    weights, still get them.
    """
    if not skipped:
        yield
        return
    import torch.nn.init as init

    builder_thread = threading.get_ident()
    originals = {name: getattr(init, name) for name in dir(init)
                 if name.endswith("_") and not name.startswith("_") and callable(getattr(init, name))}

    def skipping(original: Callable[..., Any]) -> Callable[..., Any]:
        def initialiser(tensor: Any, *args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() == builder_thread:
                return tensor
            return original(tensor, *args, **kwargs)

        return initialiser

    with _initialisers_lock:
        for name, original in originals.items():
            setattr(init, name, skipping(original))
        try:
            yield
        finally:
            for name, original in originals.items():
                setattr(init, name, original)


_initialisers_lock = threading.Lock()


def _check_fit(arch: str, expected: Mapping[str, Any], given: Mapping[str, Any]) -> None:
    missing, unexpected = _compare_keys(expected, given)
    if missing or unexpected:
        raise WeightsDoNotFit(arch, f"{_few(missing, 'missing')}{'; ' if missing and unexpected else ''}"
                               f"{_few(unexpected, 'unexpected')}")
    for key, tensor in expected.items():
        if tuple(tensor.shape) != tuple(given[key].shape):
            raise WeightsDoNotFit(arch, f"size mismatch for {key}: the file has "
                                   f"{list(given[key].shape)}, the architecture "
                                   f"{list(tensor.shape)}")


def _infer_num_classes(builder: Any, arch_kwargs: dict[str, Any], state_dict: Mapping[str, Any],
                       budget: _BuildBudget) -> int | None:
    """The class count that makes every head's shape match, found by building on the meta device.

    A head's leading size grows linearly with the number of classes: ``classes`` for a classifier,
    ``anchors × classes`` for the classification heads of SSD, SSDlite, RetinaNet and FCOS,
    ``4 × classes`` for a box regressor. Two builds (2 and 3 classes) give each tensor's slope and
    offset, from which the file's leading sizes give the candidates, each checked by a build.
    """
    def shapes_of(**kwargs: Any) -> dict[str, tuple[int, ...]]:
        try:
            module = budget.build(builder, kwargs, meta=True)
        except _TooLarge:
            raise
        except Exception:  # some builders compute with tensors while constructing
            module = budget.build(builder, kwargs, meta=False)
        return {k: tuple(v.shape) for k, v in module.state_dict().items()}

    try:
        two, three = shapes_of(**arch_kwargs, num_classes=2), shapes_of(**arch_kwargs, num_classes=3)
    except Exception:
        return None
    candidates: set[int] = set()
    for key, shape in two.items():
        other, given = three.get(key), state_dict.get(key)
        if other is None or given is None or not shape or len(other) != len(shape):
            continue
        slope = other[0] - shape[0]
        if slope <= 0 or tuple(given.shape[1:]) != shape[1:] or not given.dim():
            continue
        classes, remainder = divmod(int(given.shape[0]) - (shape[0] - 2 * slope), slope)
        if remainder == 0 and classes >= 1:
            candidates.add(classes)
    for candidate in sorted(candidates):
        try:
            shapes = shapes_of(**arch_kwargs, num_classes=candidate)
        except Exception:
            continue
        if all(tuple(state_dict[k].shape) == s for k, s in shapes.items() if k in state_dict):
            return candidate
    return None


def _file_size(value: Any, path: Path, what: str) -> tuple[int, int]:
    try:
        return normalize_size(value, limit=FILE_MAX_SIZE)
    except (AttnExplainError, TypeError, ValueError, OverflowError):
        raise ModelLoadError(f"The {what} of {path} asks for size {shown(value)}; a model file may "
                             f"ask for one or two integers between 8 and {FILE_MAX_SIZE} (a larger "
                             f"--size can be given explicitly).") from None


def _checkpoint_preprocessing(spec: Any, path: Path) -> Preprocessing | None:
    if spec is None:
        return None
    if not isinstance(spec, Mapping) or "size" not in spec:
        raise ModelLoadError(f"The 'preprocessing' entry of {path} needs at least a 'size'.")
    size = _file_size(spec["size"], path, "'preprocessing' entry")
    try:
        resize = spec.get("resize")
        # The shorter side before the centre crop: at least the crop, and not far beyond it.
        if resize is not None and (isinstance(resize, bool) or not isinstance(resize, int)
                                   or not min(size) <= resize <= 2 * max(size)):
            raise ValueError(f"resize must be an integer between {min(size)} and {2 * max(size)} "
                             f"for size {list(size)}, got {shown(resize)}")
        mean = normalization_values(_three_given(spec.get("mean", Preprocessing.mean), "mean"), "mean")
        std = normalization_values(_three_given(spec.get("std", Preprocessing.std), "std"), "std",
                                   positive=True)
        interpolation = str(spec.get("interpolation", "bilinear"))
        if interpolation not in ("nearest", "nearest-exact", "bilinear", "bicubic"):
            raise ValueError(f"interpolation must be nearest, bilinear or bicubic, got {interpolation[:40]!r}")
        letterbox = spec.get("letterbox", False)
        if not isinstance(letterbox, bool):
            raise ValueError(f"letterbox must be true or false, got {shown(letterbox)}")
        return Preprocessing(size=size, resize=resize, mean=mean, std=std,
                             interpolation=interpolation, letterbox=letterbox, source="checkpoint")
    except (TypeError, ValueError, AttnExplainError) as error:
        raise ModelLoadError(f"The 'preprocessing' entry of {path} is invalid: {error}") from None


def _three_given(values: Any, what: str) -> Any:
    """A file must spell out all three channels (a user's --mean may give one for all)."""
    if not isinstance(values, (list, tuple)) or len(values) != 3:
        raise ValueError(f"{what} must be three numbers (R, G, B), got {shown(values)}")
    return values


def _compare_keys(expected: Mapping[str, Any], given: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    return sorted(set(expected) - set(given)), sorted(set(given) - set(expected))


def _few(keys: list[str], what: str) -> str:
    if not keys:
        return ""
    shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
    return f"{len(keys)} {what} keys ({shown})"


def _first_mismatch(error: Exception) -> str:
    match = re.search(r"size mismatch for [^:]+: .*?(?=\n|$)", str(error))
    return match.group(0).strip().rstrip(".") if match else _first_line(error)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
