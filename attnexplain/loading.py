"""Loading a model the way people save them.

Supported: a state_dict (``.pt``/``.pth``, optionally wrapped in a training checkpoint: PyTorch
Lightning's ``.ckpt``, timm ``train.py``'s with its EMA weights) plus an architecture name (a plugin's
builder, ``PREFIX:NAME`` where two plugins know a name, or the user's own class ``model.py:MyNet``),
``.safetensors``, ``PREFIX:NAME[:WEIGHTS]`` specifications built by a plugin
(``torchvision:resnet50:DEFAULT``), paths (folders) a plugin claims, and modules already in memory. Files that hold code load only with ``trust_model=True``: a whole
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
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from ._files import not_a_regular_file
from .errors import AttnExplainError, ModelLoadError, UntrustedModelError, WeightsDoNotFit, shown
from .plugins import ModelPlugin, NamedModel, builder_order, plugin_for_prefix, select_plugin
from .preprocess import FILE_MAX_SIZE, Preprocessing, normalization_values, normalize_size

if TYPE_CHECKING:
    from torch import nn

# Keys under which training scripts commonly nest the weights.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
# Keys under which training scripts keep an exponential moving average of the weights (timm's
# train.py: state_dict_ema), used with --ema.
_EMA_KEYS = ("state_dict_ema", "model_ema", "ema_state_dict")
# Prefixes added by DataParallel/DistributedDataParallel and torch.compile.
_KEY_PREFIXES = ("module.", "_orig_mod.")
# Top-level keys only PyTorch Lightning's checkpoints have: its LightningModule may hold more than the
# architecture (a loss's weights, metric states), whose keys are then left out.
_LIGHTNING_KEYS = ("pytorch-lightning_version", "lightning_version", "global_step", "loops")
# What not_a_regular_file says of a folder: a path only a plugin can load.
_FOLDER = "is a folder, not a file"
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


def load_model(spec: "str | Path | nn.Module", *, arch: str | None = None,
               arch_kwargs: Mapping[str, Any] | None = None, num_classes: int | None = None,
               labels: str | Path | Sequence[str] | None = None, trust_model: bool = False,
               plugin: str | None = None, device: str | None = None, ema: bool = False) -> LoadedModel:
    """Load ``spec`` into an eval-mode model on ``device`` (``"auto"``: CUDA, else MPS, else the CPU;
    None: the CPU, or where an in-memory module already is).

    ``spec`` is a model file, a path a plugin claims (a folder), ``PREFIX:NAME[:WEIGHTS]``, or an
    ``nn.Module`` already in memory (left where it is and as it is, but for ``eval()``). ``arch``
    names the architecture of a state_dict: a builder name (``resnet50``), one plugin's
    (``timm:convnext_tiny``), or the user's own class, ``path/to/model.py:MyNet`` or
    ``package.module:MyNet`` (imported: the user named it), built with ``arch_kwargs``. ``ema``
    loads a training checkpoint's EMA weights (timm's ``state_dict_ema``). ``labels`` (a list or a
    file of one name per line) wins over the class names the file or the model's plugin knows.
    """
    # What can be checked without torch is checked before importing it (~2 s).
    given_labels = read_labels(labels) if labels is not None else None
    given_kwargs = _given_arch_kwargs(arch_kwargs) if arch_kwargs is not None else None
    if not isinstance(spec, (str, Path)):
        if arch is not None or arch_kwargs is not None or num_classes is not None or ema:
            raise ModelLoadError("arch, arch_kwargs, num_classes and ema describe a file's weights; "
                                 "a module in memory is already built.")
        loaded = _in_memory(spec)
        run_device = resolve_device(device) if device is not None else None
    else:
        run_device = resolve_device(device or "cpu")
        loaded = _load_spec(spec, arch=arch, arch_kwargs=given_kwargs, num_classes=num_classes,
                            trust_model=trust_model, ema=ema)
    if given_labels is not None:
        loaded.labels = given_labels
    _finish(loaded, plugin, run_device)
    return loaded


def _load_spec(spec: str | Path, *, arch: str | None, arch_kwargs: dict[str, Any] | None,
               num_classes: int | None, trust_model: bool, ema: bool) -> LoadedModel:
    path = Path(spec)
    problem = check_model_path(path)
    notes: list[str] = []
    if problem in (None, _FOLDER):
        claimant = _claiming_plugin(path, notes)
        if claimant is not None:
            _no_ema(ema, f"{path} is loaded by plugin {claimant.name}, not from a training checkpoint")
            named = _plugin_load(claimant, f"Plugin {claimant.name} could not load {path}",
                                 lambda: claimant.load_path(path, trust_model=trust_model))
            loaded = _from_named(named, str(path), claimant.source_prefix or claimant.name,
                                 random_unless_said=False)
        elif problem == _FOLDER:
            raise ModelLoadError(f"Model path {path} is a folder, and no installed plugin loads "
                                 f"folders like it; give a model file.")
        else:
            loaded = _load_file(path, _Asked(arch, arch_kwargs, num_classes, ema), trust_model)
    else:
        _no_ema(ema, f"{spec} is a named model, not a training checkpoint")
        loaded = _load_named(str(spec))
    loaded.notes[:0] = notes
    return loaded


def _in_memory(module: Any) -> LoadedModel:
    import torch

    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(f"A model is a path, a PREFIX:NAME specification or a torch.nn.Module, "
                             f"not a {type(module).__name__}.")
    return LoadedModel(module=module, source=f"<{type(module).__name__} object>", loader="object",
                       architecture=type(module).__name__)


def check_model_path(path: Path) -> str | None:
    """Refuse a model path that is a FIFO or a device; return ``"does not exist"`` for a name that
    is not a file (a ``PREFIX:NAME`` specification, or a missing file), :data:`_FOLDER` for a folder
    (which a plugin may load), else None. Decided with stat before anything opens the path: opening a
    FIFO blocks, a device never ends."""
    problem = not_a_regular_file(path)
    if problem not in (None, "does not exist", _FOLDER):
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
        raise AttnExplainError(f"Device {name} was asked for (--device, device=), but PyTorch sees "
                               f"no CUDA GPU here; use cpu or auto.")
    if name == "mps" and not torch.backends.mps.is_available():
        raise AttnExplainError("Device mps was asked for (--device, device=), but this PyTorch has no "
                               "MPS device; use cpu or auto.")
    return name


def _finish(loaded: LoadedModel, plugin_name: str | None, device: str | None) -> None:
    """Eval mode, no gradients, on ``device`` (None: a module from memory, left where and as it is but
    for eval mode); the plugin, its preprocessing and its class names where none were given."""
    import torch

    module = loaded.module
    if loaded.loader == "object":
        module.eval()
        if device is not None:
            module.to(device)
    elif isinstance(module, torch.nn.Module):
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
    if loaded.labels is None:
        loaded.labels = _plugin_labels(loaded)


def _plugin_labels(loaded: LoadedModel) -> list[str] | None:
    """The class names the model's plugin reads off the model (API v2's ``labels`` hook). A plugin
    that fails here costs the names, not the explanation: the failure is a note."""
    plugin = loaded.plugin
    try:
        names = plugin.labels(loaded.module)
    except Exception as error:  # noqa: BLE001 - third-party code
        loaded.notes.append(f"plugin {plugin.name} could not read the model's class names "
                            f"({type(error).__name__}: {_first_line(error)}); none are shown")
        return None
    if names is None:
        return None
    if (not isinstance(names, (list, tuple)) or len(names) > _MAX_LABELS
            or not all(isinstance(name, (str, int)) for name in names)):
        loaded.notes.append(f"plugin {plugin.name} gave class names that are not a list of names; "
                            f"none are shown")
        return None
    return [str(name) for name in names]


def read_labels(labels: str | Path | Sequence[str]) -> list[str]:
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

def _load_named(spec: str) -> LoadedModel:
    prefix, _, rest = spec.partition(":")
    plugin = plugin_for_prefix(prefix) if rest else None
    if plugin is None:
        if rest:
            raise ModelLoadError(f"Model file not found, and no installed plugin builds "
                                 f"'{prefix}:' models: {spec}")
        raise ModelLoadError(f"Model file not found: {spec}")
    parts = _plugin_load(plugin, f"Plugin {plugin.name} could not read {spec}",
                         lambda: plugin.split_spec(rest))
    if not (isinstance(parts, tuple) and len(parts) == 2 and isinstance(parts[0], str)
            and (parts[1] is None or isinstance(parts[1], str))):
        raise ModelLoadError(f"Plugin {plugin.name} split {spec} into {shown(parts)}, not "
                             f"(name, weights or None).")
    name, weights = parts
    named = _plugin_load(plugin, f"Plugin {plugin.name} could not build {spec}",
                         lambda: plugin.load_named(name, weights))
    return _from_named(named, spec, prefix, random_unless_said=not weights)


def _from_named(named: NamedModel, source: str, loader: str, *, random_unless_said: bool) -> LoadedModel:
    """A plugin's :class:`NamedModel` as a :class:`LoadedModel`. ``random_unless_said``: whether the
    weights are random where the plugin does not say (``NamedModel.random_weights`` None, as plugins
    of API version 1 leave it): a name without WEIGHTS is; a path a plugin loads is not."""
    import torch

    if not isinstance(named, NamedModel) or not isinstance(named.module, torch.nn.Module):
        raise ModelLoadError(f"Loading {source} gave a {type(named).__name__}, not the NamedModel "
                             f"(holding an nn.Module) a plugin must return.")
    loaded = LoadedModel(module=named.module, source=source, loader=loader,
                         architecture=named.architecture, weights=named.weights,
                         labels=list(named.labels) if named.labels is not None else None,
                         preprocessing=named.preprocessing, notes=list(named.notes))
    random_weights = named.random_weights if named.random_weights is not None else random_unless_said
    if random_weights:
        loaded.notes.append("random weights: no WEIGHTS were named, so predictions mean nothing"
                            if named.random_weights is None else
                            "random weights: predictions mean nothing")
    return loaded


def _plugin_load(plugin: ModelPlugin, what: str, call: Callable[[], Any]) -> Any:
    """``call()`` into a plugin, whatever it raises reported as one line that names it."""
    with _load_failures_reported(what):
        return call()


def _claiming_plugin(path: Path, notes: list[str]) -> ModelPlugin | None:
    """The plugin that loads ``path`` itself (API v2's ``claims_path``): attnexplain's own plugins
    first, then the others by name, as for builders. A plugin that raises while looking is taken as
    not claiming the path: one broken plugin must not stop every model file from loading. The
    failure is kept in ``notes`` (the report says it)."""
    for plugin in builder_order():
        try:
            claims = plugin.claims_path(path)
        except Exception as error:  # noqa: BLE001 - third-party code
            notes.append(f"plugin {plugin.name} failed while checking whether it loads {path.name} "
                         f"({type(error).__name__}: {_first_line(error)}); ignored")
            continue
        if claims is True:
            return plugin
    return None


def _no_ema(ema: bool, reason: str) -> None:
    if ema:
        raise ModelLoadError(f"--ema (ema=True) loads a training checkpoint's EMA weights, but {reason}.")


# --- files -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Asked:
    """What the user said about a file's weights (``--arch``, ``--arch-kwargs``, ...)."""

    arch: str | None = None
    arch_kwargs: dict[str, Any] | None = None  # None: not given (a checkpoint's own then apply)
    num_classes: int | None = None
    ema: bool = False


def _load_file(path: Path, asked: _Asked, trust_model: bool) -> LoadedModel:
    if path.stat().st_size == 0:
        raise ModelLoadError(f"Model file is empty: {path}")
    try:  # a regular file: opening it cannot block
        with path.open("rb") as handle:
            handle.read(1)
    except OSError as error:
        raise ModelLoadError(f"Cannot read model file {path}: {error.strerror or error}") from None
    if path.suffix == ".safetensors":
        return _load_safetensors(path, asked)
    # The kind is read from the archive's members, never from the suffix: a TorchScript or
    # torch.export archive renamed to .pt is still code.
    kind = _archive_kind(path)
    if kind == "torchscript":
        if not trust_model:
            raise UntrustedModelError(
                f"{path} is a TorchScript program: loading it runs code stored in the file (which can "
                f"read and write any file), so it is refused. {_TRUST_HINT}")
        _no_ema(asked.ema, f"{path} is a TorchScript program, not a training checkpoint")
        return _load_torchscript(path)
    if kind == "export":
        if not trust_model:
            raise UntrustedModelError(
                f"{path} is a torch.export program: loading it unpickles parts of the archive, which "
                f"can run arbitrary code, so it is refused. {_TRUST_HINT}")
        _no_ema(asked.ema, f"{path} is a torch.export program, not a training checkpoint")
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
    dtype_classes = [cls for cls in vars(getattr(np, "dtypes", object)).values()
                     if isinstance(cls, type) and issubclass(cls, np.dtype)]
    paths = [pathlib.Path, pathlib.PurePath, pathlib.PosixPath, pathlib.PurePosixPath,
             pathlib.WindowsPath, pathlib.PureWindowsPath]
    path_aliases = [(cls, f"{module}.{cls.__name__}") for cls in paths
                    for module in ("pathlib", "pathlib._local") if cls.__module__ != module]
    attribute_dicts = [(dict, name) for name in (
        "lightning.fabric.utilities.data.AttributeDict", "lightning_fabric.utilities.data.AttributeDict",
        "lightning.pytorch.utilities.parsing.AttributeDict",
        "pytorch_lightning.utilities.parsing.AttributeDict")]
    return [argparse.Namespace, frozenset,
            multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype, *dtype_classes,
            *paths, *path_aliases, *attribute_dicts,
            datetime.datetime, datetime.date, datetime.time, datetime.timedelta, datetime.timezone]


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


def _load_pickle(path: Path, asked: _Asked, trust_model: bool) -> LoadedModel:
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
        _no_ema(asked.ema, f"{path} holds a whole model, not a training checkpoint")
        return LoadedModel(module=content, source=str(path), loader="pickle",
                           architecture=type(content).__name__)
    if isinstance(content, Mapping):
        keys = _EMA_KEYS if asked.ema else _WRAPPER_KEYS
        inner = next((content[k] for k in keys if isinstance(content.get(k), torch.nn.Module)), None)
        if inner is not None:
            return LoadedModel(module=inner, source=str(path), loader="pickle",
                               architecture=type(inner).__name__)
        return _from_checkpoint(content, path, "state_dict", asked)
    raise ModelLoadError(f"{path} holds a {type(content).__name__}, not a model or a state_dict.")


def _load_safetensors(path: Path, asked: _Asked) -> LoadedModel:
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
    return _from_checkpoint(checkpoint, path, "safetensors", asked)


def _from_checkpoint(checkpoint: Mapping[str, Any], path: Path, loader: str,
                     asked: _Asked) -> LoadedModel:
    """Build the architecture named by ``asked.arch`` (or the checkpoint) and load the weights into it."""
    state_dict = _find_state_dict(checkpoint, path, ema=asked.ema)
    hyper_arch, hyper_classes = _hyper_parameters(checkpoint)
    arch_name = asked.arch or checkpoint.get("arch") or hyper_arch
    if not arch_name:
        raise ModelLoadError(
            f"{path} holds only weights (a state_dict); name the architecture they belong to with "
            f"--arch NAME, e.g. --arch resnet50 (any torchvision builder works), or your own class "
            f"with --arch model.py:MyNet."
        )
    if not isinstance(arch_name, str):
        raise ModelLoadError(f"The 'arch' entry of {path} is not a name: {shown(arch_name)}")
    if asked.arch_kwargs is not None:
        arch_kwargs = asked.arch_kwargs
    else:
        arch_kwargs = _checkpoint_arch_kwargs(checkpoint.get("arch_kwargs"), path) if asked.arch is None else {}
    labels = _checkpoint_labels(checkpoint, path)
    preprocessing = _checkpoint_preprocessing(checkpoint.get("preprocessing"), path)
    notes: list[str] = []
    # The hyper-parameters' class count goes with their arch: an --arch of the user's own may
    # have another head.
    num_classes = asked.num_classes
    if num_classes is None and asked.arch is None and arch_name == hyper_arch:
        num_classes = hyper_classes
    try:
        module, state_dict = _fitted_architecture(
            arch_name, state_dict, arch_kwargs, num_classes, initialise=False,
            outside_ok=any(key in checkpoint for key in _LIGHTNING_KEYS), notes=notes,
            user_classes=asked.arch is not None)
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
    if asked.ema:
        notes.append("EMA weights (the checkpoint's moving average of the trained weights)")
    return LoadedModel(module=module, source=str(path), loader=loader, architecture=arch_name,
                       labels=labels, preprocessing=preprocessing, notes=notes)


def _hyper_parameters(checkpoint: Mapping[str, Any]) -> tuple[Any, int | None]:
    """``arch`` and ``num_classes`` of a Lightning checkpoint's ``hyper_parameters`` (what
    ``save_hyperparameters()`` kept of the LightningModule's arguments), each None where absent.
    The values come from a file: the arch is checked as the top level's is, where it is used; a
    class count is used only where it is a plausible integer (the head's shape is the other witness)."""
    hyper = checkpoint.get("hyper_parameters")
    if not isinstance(hyper, Mapping):
        return None, None
    classes = hyper.get("num_classes")
    if type(classes) is not int or not 1 <= classes <= _MAX_LABELS:
        classes = None  # e.g. a float or 10**400: the head's shape says it instead
    return hyper.get("arch"), classes


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


def _find_state_dict(checkpoint: Mapping[str, Any], path: Path, *, ema: bool = False) -> OrderedDict[str, Any]:
    import torch

    if ema:
        found = next((checkpoint[key] for key in _EMA_KEYS if isinstance(checkpoint.get(key), Mapping)),
                     None)
        if found is None:
            held = ", ".join(str(key)[:40] for key in list(checkpoint)[:8])
            raise ModelLoadError(f"--ema asks for EMA weights, but {path} has none (no "
                                 f"{' / '.join(_EMA_KEYS)} entry; it holds {held}). Leave out --ema.")
        checkpoint = found
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
    """Keys without DataParallel/torch.compile prefixes (see :func:`_under_prefix`)."""
    changed = True
    while changed:
        changed = False
        for prefix in _KEY_PREFIXES:
            if all(key.startswith(prefix) for key in state_dict):
                state_dict, changed = _under_prefix(state_dict, prefix), True
    return state_dict if isinstance(state_dict, OrderedDict) else _under_prefix(state_dict, "")


def _under_prefix(state_dict: Mapping[str, Any], prefix: str) -> OrderedDict[str, Any]:
    """The entries whose keys start with ``prefix``, without it, keeping torch's per-module
    ``_metadata`` (module versions that some modules' loading depends on) for the modules under it."""
    metadata = getattr(state_dict, "_metadata", None)
    kept = OrderedDict((key[len(prefix):], value) for key, value in state_dict.items()
                       if key.startswith(prefix))
    if metadata is not None:  # module names: the prefix's module becomes the root
        root = prefix.rstrip(".")
        kept._metadata = OrderedDict(  # type: ignore[attr-defined]
            ("" if key == root else key[len(prefix):], value) for key, value in metadata.items()
            if key == root or key.startswith(prefix)) if prefix else metadata
    return kept


def build_architecture(arch: str, state_dict: Mapping[str, Any], arch_kwargs: dict[str, Any],
                       num_classes: int | None, *, initialise: bool = True) -> Any:
    """Construct ``arch`` with random weights, its number of classes read off the state_dict.

    It is first built on the meta device (no memory for tensors) and compared with ``state_dict``;
    only an architecture whose every tensor matches the file's is built for real, so memory is
    bounded by the file, whatever ``arch_kwargs`` say. Raises :class:`WeightsDoNotFit` otherwise.
    ``initialise=False`` leaves the weights as allocated (not random), for a caller that loads every
    one of them next (``load_state_dict(strict=True)``): random initialisation is most of the build
    (ResNet-50: 0.2 s of 0.21 s). ``arch`` is resolved as :func:`architecture_candidates` says.
    """
    module, _ = _fitted_architecture(arch, state_dict, arch_kwargs, num_classes, initialise=initialise)
    return module


def architecture_candidates(arch: str, known: "list[tuple[ModelPlugin, Mapping[str, Any]]] | None" = None,
                            *, user_classes: bool = True) -> list[tuple[str, Callable[..., Any]]]:
    """Every (name, constructor) ``arch`` may mean, the one to try first first.

    ``PREFIX:NAME`` is that plugin's builder. ``path/model.py:Class`` and ``package.module:Class`` are
    the user's own class (imported here: the user named it). A bare name is every plugin's builder of
    that name or of ``PREFIX:NAME``, attnexplain's own plugins first (``convnext_tiny`` is
    torchvision's and ``timm:convnext_tiny``), each named with its plugin's prefix. ``known``: every
    plugin's builders, for a caller that asks about many names. ``user_classes=False`` refuses a
    class to import: a name a file gives (a checkpoint's ``arch``) must not make us run code.
    """
    found = []
    for name, builder in _lazy_candidates(arch, known, user_classes=user_classes):
        resolved = builder()
        if resolved is not None:
            found.append((name, resolved))
    return found


def _lazy_candidates(arch: str, known: "list[tuple[ModelPlugin, Mapping[str, Any]]] | None" = None,
                     *, user_classes: bool = True) -> list[tuple[str, Callable[[], Any]]]:
    """:func:`architecture_candidates` with each constructor looked up only when called (None where
    the plugin no longer has it): a plugin whose cached names hold a bare name is asked for its
    builders only if the candidates before it do not fit (see :func:`plugin_cache.plugins_for_arch`)."""
    prefix, colon, rest = arch.partition(":")
    if colon:
        plugin = plugin_for_prefix(prefix)
        if plugin is not None:
            builders = plugin.builders()
            builder = builders.get(arch) or builders.get(rest)
            return [(arch, lambda: builder)] if builder is not None else []
        if _names_a_class(arch):
            if not user_classes:
                raise ModelLoadError(f"The architecture {arch[:120]!r} that the file names is a Python "
                                     f"class to import, which a file may not ask for (importing "
                                     f"runs code); if you trust it, pass --arch {arch[:120]} yourself.")
            found_class = _user_class(arch)
            return [(found_class[0], lambda: found_class[1])]
    if known is not None:
        return _plugin_candidates(arch, [(plugin, builders, False) for plugin, builders in known])
    if not colon:
        from .plugin_cache import plugins_for_arch

        lazy = _plugin_candidates(arch, [(plugin, None, cached) for plugin, cached in plugins_for_arch(arch)])
        if lazy:
            return lazy
        # No plugin's cached names hold it: ask every plugin (a stale cache must not hide a name).
    return _plugin_candidates(arch, [(plugin, None, False) for plugin in builder_order()])


def _plugin_candidates(arch: str, plugins: "list[tuple[ModelPlugin, Mapping[str, Any] | None, bool]]",
                       ) -> list[tuple[str, Callable[[], Any]]]:
    """The plugins' builders of ``arch`` (or ``PREFIX:arch``), as (plugin, its builders or None,
    whether its cached names hold ``arch``). A plugin whose cached names hold it is asked for its
    builders only when called, if a candidate comes before it; the others are asked at once."""
    _, colon, _ = arch.partition(":")

    def lookup(plugin: ModelPlugin, builders: "Mapping[str, Any] | None") -> Callable[[], Any]:
        def builder() -> Any:
            table = builders if builders is not None else plugin.builders()
            found = table.get(arch)
            if found is None and plugin.source_prefix and not colon:
                found = table.get(f"{plugin.source_prefix}:{arch}")
            return found

        return builder

    found: list[tuple[str, Callable[[], Any]]] = []
    for plugin, builders, cached in plugins:
        builder = lookup(plugin, builders)
        if not (cached and found):
            resolved = builder()
            if resolved is None:
                continue
            builder = lambda resolved=resolved: resolved  # noqa: E731 - looked up already
        found.append((f"{plugin.source_prefix}:{arch}" if plugin.source_prefix and not colon
                      else arch, builder))
    return found


def _fitted_architecture(arch: str, state_dict: Mapping[str, Any], arch_kwargs: dict[str, Any],
                         num_classes: int | None, *, initialise: bool, outside_ok: bool = False,
                         notes: list[str] | None = None,
                         user_classes: bool = True) -> tuple[Any, OrderedDict[str, Any]]:
    """:func:`build_architecture`, also finding where in ``state_dict`` the architecture's keys are
    (a LightningModule's ``model.``) and trying each of :func:`architecture_candidates` in turn.

    Returns the module and the state_dict re-keyed to fit it; says what it did in ``notes``. The
    first candidate whose keys fit is taken (a name two plugins know keeps attnexplain's meaning when
    both fit, and the other plugin is not even asked); when none fits, the error lists them all
    with their plugin prefix.
    """
    notes = notes if notes is not None else []
    candidates = _lazy_candidates(arch, user_classes=user_classes)
    if not candidates:
        raise ModelLoadError(f"Unknown architecture {arch[:80]!r}.{_did_you_mean(arch, state_dict)}")
    failures: list[str] = []
    for index, (name, lookup) in enumerate(candidates):
        builder = lookup()
        if builder is None:
            failures.append(f"{name} (its plugin no longer builds it)")
            continue
        try:
            kwargs, built, fitted, found = _fit(name, builder, state_dict, arch_kwargs, num_classes,
                                                outside_ok)
        except ModelLoadError as error:
            if len(candidates) == 1 and not isinstance(error, WeightsDoNotFit):
                raise
            failures.append(f"{name} ({getattr(error, 'detail', error)})")
            continue
        if index:
            notes.append(f"the weights fit {name}, not {candidates[0][0]} (the other plugin that "
                         f"builds {arch})")
        notes.extend(found)
        module = built if built is not None else _build(name, builder, _BuildBudget(fitted), kwargs,
                                                         meta=False, initialise=initialise)
        return module, fitted
    if len(candidates) == 1:
        detail = failures[0][len(candidates[0][0]) + 2:-1]
        raise WeightsDoNotFit(arch, detail + _did_you_mean(arch, state_dict, exclude=arch))
    raise WeightsDoNotFit(arch, f"{len(candidates)} plugins build {arch} and the weights fit none of "
                                f"them: {'; '.join(failures)}")


def _fit(name: str, builder: Callable[..., Any], state_dict: Mapping[str, Any],
         arch_kwargs: dict[str, Any], num_classes: int | None, outside_ok: bool,
         ) -> tuple[dict[str, Any], Any, OrderedDict[str, Any], list[str]]:
    """Whether ``builder``'s tensors match ``state_dict``'s, decided on the meta device.

    Returns the constructor's keyword arguments, the module when it had to be built for real already
    (some builders cannot build on the meta device), the state_dict keyed as the module's, and notes.
    Raises :class:`WeightsDoNotFit`.
    """
    budget = _BuildBudget(state_dict)
    _check_arch_kwargs(name, builder, {**arch_kwargs, **({"num_classes": num_classes}
                                                         if num_classes is not None else {})})
    fitted, notes, expected = _keys_for(name, builder, arch_kwargs, state_dict, budget, outside_ok)
    if expected is not None:  # names first: a mismatch needs no more builds
        _check_fit(name, dict.fromkeys(expected), dict.fromkeys(fitted), shapes=False)
    if num_classes is None and "num_classes" not in arch_kwargs and _takes(builder, "num_classes"):
        num_classes = _infer_num_classes(builder, arch_kwargs, fitted, budget)
    kwargs = {**arch_kwargs, "num_classes": int(num_classes)} if num_classes is not None else arch_kwargs
    skeleton = _build(name, builder, budget, kwargs, meta=True)
    module = skeleton if skeleton is not None else _build(name, builder, budget, kwargs, meta=False,
                                                          initialise=False)
    _check_fit(name, module.state_dict(), fitted)
    return kwargs, None if skeleton is not None else module, fitted, notes


def _build(name: str, builder: Callable[..., Any], budget: "_BuildBudget", kwargs: dict[str, Any], *,
           meta: bool, initialise: bool = True) -> Any:
    """``builder(**kwargs)`` within ``budget``; on the meta device, None where the builder cannot."""
    try:
        return budget.build(builder, kwargs, meta=meta, initialise=initialise)
    except _TooLarge as error:
        raise ModelLoadError(f"{name} built with {shown(kwargs)} is far larger than the "
                             f"weights it should hold ({error}); refused before it fills "
                             f"memory.") from None
    except AttnExplainError:
        raise
    except Exception as error:
        if meta:
            return None  # some builders compute with tensors while constructing (RegNet)
        if isinstance(error, (TypeError, ValueError)):
            raise ModelLoadError(f"Cannot build {name} with {shown(kwargs)}: "
                                 f"{_first_line(error)}") from None
        # builders are third-party (or the user's) code; report, don't crash
        raise ModelLoadError(f"Building {name} failed: {type(error).__name__}: "
                             f"{_first_line(error)}") from None
    except BaseException as error:  # noqa: BLE001 - a user's class calling sys.exit()
        if isinstance(error, KeyboardInterrupt):
            raise
        raise ModelLoadError(f"Building {name} failed: {type(error).__name__}: "
                             f"{_first_line(error)}") from None


def _keys_for(name: str, builder: Callable[..., Any], arch_kwargs: dict[str, Any],
              state_dict: Mapping[str, Any], budget: "_BuildBudget",
              outside_ok: bool) -> tuple[OrderedDict[str, Any], list[str], list[str] | None]:
    """``state_dict`` keyed as ``builder``'s module: under the prefix where its keys all are, with
    notes and the module's keys (None where it could not be built).

    A LightningModule saves its network's keys under its attribute's name (``model.``, ``net.``,
    ``model.backbone.``) beside other modules' (a loss's ``criterion.weight``); those outside the
    prefix are left out (and counted in the note). Without a prefix, keys the architecture does not
    have are left out only where ``outside_ok`` (a Lightning checkpoint); elsewhere they are a
    mismatch, which the shape check reports.
    """
    skeleton = _build(name, builder, budget, arch_kwargs, meta=True)
    if skeleton is None:
        try:
            skeleton = budget.build(builder, arch_kwargs, meta=False, initialise=False)
        except Exception:  # noqa: BLE001 - the real build reports it
            return _under_prefix(state_dict, ""), [], None
    expected = list(skeleton.state_dict())
    given = set(state_dict)
    if not expected or all(key in given for key in expected):
        prefix = ""
    else:
        first = expected[0]
        prefixes = {key[:-len(first)] for key in given if key.endswith("." + first)}
        prefixes = {prefix for prefix in prefixes if all(prefix + key in given for key in expected)}
        if not prefixes:
            return _under_prefix(state_dict, ""), [], expected
        # The prefix with the fewest other keys under it (the architecture itself), then the shortest.
        prefix = min(prefixes, key=lambda p: (sum(key.startswith(p) for key in given), len(p)))
    wanted = set(expected)
    fitted = _under_prefix(state_dict, prefix)
    if not prefix and not outside_ok:
        return fitted, [], expected
    outside = sorted(key for key in given if not key.startswith(prefix) or key[len(prefix):] not in wanted)
    if prefix:  # keys under the prefix that the architecture lacks are a mismatch, not outside it
        outside = [key for key in outside if not key.startswith(prefix)]
    for key in outside:
        fitted.pop(key[len(prefix):] if key.startswith(prefix) else key, None)
    notes = [f"the weights are under '{prefix}' in the checkpoint"] if prefix else []
    if outside:
        notes.append(f"{len(outside)} tensor{'' if len(outside) == 1 else 's'} outside {name} left out ({', '.join(outside[:3])}"
                     f"{', ...' if len(outside) > 3 else ''})")
    return fitted, notes, expected


def _takes(builder: Callable[..., Any], argument: str) -> bool:
    """Whether ``builder`` accepts the keyword ``argument`` (True when it cannot be told)."""
    parameters = _parameters(builder)
    return parameters is None or argument in parameters


def _parameters(builder: Callable[..., Any]) -> list[str] | None:
    """The keyword arguments ``builder`` takes; None when it takes any (``**kwargs``) or cannot be told."""
    import inspect

    try:
        signature = inspect.signature(builder)
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return None
    return [name for name, p in signature.parameters.items()
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]


def _check_arch_kwargs(name: str, builder: Callable[..., Any], kwargs: Mapping[str, Any]) -> None:
    parameters = _parameters(builder)
    unknown = [key for key in kwargs if parameters is not None and key not in parameters]
    if unknown:
        takes = ", ".join(parameters[:12]) if parameters else "no arguments"
        raise ModelLoadError(f"{name} takes no argument {', '.join(map(repr, unknown))} (it takes "
                             f"{takes}); check --arch-kwargs / --num-classes.")


def _did_you_mean(arch: str, state_dict: Mapping[str, Any], exclude: str | None = None) -> str:
    """" Did you mean ...?" for an architecture name that is unknown or whose weights do not fit
    (a checkpoint's ``arch`` that is a class name: ``convnext``, ``ResNet``): the close names whose
    builders the weights fit, else the close names. Nothing is built but on the meta device."""
    known = [(plugin, plugin.builders()) for plugin in builder_order()]
    names = [name for _, builders in known for name in builders if "." not in name and name != exclude]
    lowered: dict[str, str] = {}
    for name in names:
        lowered.setdefault(name.lower().split(":")[-1], name.split(":")[-1])
    wanted = arch.lower().split(":")[-1]
    close = difflib.get_close_matches(wanted, lowered, n=5, cutoff=0.6)
    starting = sorted((name for name in lowered if name.startswith(wanted)), key=lambda n: (len(n), n))
    pool = [lowered[name] for name in dict.fromkeys(close + starting[:8]) if lowered[name] != exclude]
    fitting: list[str] = []
    if state_dict:
        for name in pool[:8]:
            for index, (label, builder) in enumerate(architecture_candidates(name, known)):
                try:
                    _fit(label, builder, state_dict, {}, None, outside_ok=False)
                except AttnExplainError:
                    continue
                fitting.append(label if index else name)  # a bare name means the first candidate
                break
    if fitting:
        return f" Did you mean {', '.join(fitting[:3])}? (the weights fit {'it' if len(fitting) == 1 else 'each'})"
    return f" Did you mean {', '.join(pool[:3])}?" if pool else ""


def class_file(arch: str) -> Path | None:
    """The file ``--arch path/model.py:Class`` names (a Windows path's drive colon aside); None for a
    builder's name or ``package.module:Class``."""
    where = arch.rpartition(":")[0]
    return Path(where) if where.endswith(".py") or "/" in where or "\\" in where else None


def _names_a_class(arch: str) -> bool:
    """``path/model.py:Class`` or ``package.module:Class`` (a Windows path's drive colon aside)."""
    where, _, name = arch.rpartition(":")
    return name.isidentifier() and (class_file(arch) is not None
                                    or all(part.isidentifier() for part in where.split(".")))


def _user_class(arch: str) -> tuple[str, Callable[..., Any]]:
    """The user's own ``nn.Module`` class named by ``arch``, imported (which runs the user's file:
    the user named it on the command line, as ``python model.py`` would)."""
    import importlib
    import importlib.util
    import sys

    import torch

    where, _, name = arch.rpartition(":")
    path = class_file(arch)
    if path is not None:
        problem = not_a_regular_file(path)
        if problem is not None:
            raise ModelLoadError(f"The model class file {path} {problem} (--arch {arch[:120]}).")
        described = str(path)
        module_name = f"attnexplain_user_model_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ModelLoadError(f"{path} cannot be imported as Python (--arch {arch[:120]}).")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and pickling look classes up there
        # Its own imports (``from layers import Block``) are found beside it.
        sys.path.insert(0, str(path.resolve().parent))
        try:
            with _load_failures_reported(f"Importing {path} failed"):
                spec.loader.exec_module(module)
        except AttnExplainError:
            sys.modules.pop(module_name, None)
            raise
        finally:
            if str(path.resolve().parent) in sys.path:
                sys.path.remove(str(path.resolve().parent))
    else:
        described = f"module {where}"
        with _load_failures_reported(f"Importing {where} (--arch {arch[:120]}) failed"):
            module = importlib.import_module(where)
    found = getattr(module, name, None)
    if found is None:
        classes = sorted(key for key, value in vars(module).items() if isinstance(value, type)
                         and issubclass(value, torch.nn.Module) and value.__module__ == module.__name__)
        defined = f"; its nn.Module classes: {', '.join(classes[:8])}" if classes else ""
        raise ModelLoadError(f"{described} has no class {name}{defined}.")
    if not (isinstance(found, type) and issubclass(found, torch.nn.Module)):
        raise ModelLoadError(f"{name} in {described} is a {type(found).__name__}, not a "
                             f"torch.nn.Module class.")
    return arch, found


def arch_kwargs_from_json(text: str) -> dict[str, Any]:
    """``--arch-kwargs`` (a JSON object of the architecture's keyword arguments) as a dict."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as error:
        raise ModelLoadError(f"--arch-kwargs is not valid JSON ({_first_line(error)}): "
                             f"{shown(text)}") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"--arch-kwargs must be a JSON object such as '{{\"num_classes\": 7}}', "
                             f"not {shown(value)}")
    return _given_arch_kwargs(value)


def _given_arch_kwargs(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
        raise ModelLoadError(f"arch_kwargs must map argument names to values, not {shown(value)}")
    if "weights" in value or "weights_backbone" in value or "pretrained" in value:
        raise ModelLoadError("arch_kwargs may not ask for pretrained weights: the file's weights are "
                             "loaded into the architecture.")
    return dict(value)


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


def _check_fit(arch: str, expected: Mapping[str, Any], given: Mapping[str, Any], *,
               shapes: bool = True) -> None:
    missing, unexpected = _compare_keys(expected, given)
    if missing or unexpected:
        raise WeightsDoNotFit(arch, f"{_few(missing, 'missing')}{'; ' if missing and unexpected else ''}"
                               f"{_few(unexpected, 'unexpected')}")
    if not shapes:
        return
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
