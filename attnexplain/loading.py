"""Loading a model the way people save them.

Supported: a state_dict (``.pt``/``.pth``, optionally wrapped in a training checkpoint) plus an
architecture name, ``.safetensors``, a whole pickled module (only with ``trust_model=True``: unpickling
can run arbitrary code), TorchScript, ``torch.export`` programs (``.pt2``) and ``PREFIX:NAME[:WEIGHTS]``
specifications built by a plugin (``torchvision:resnet50:DEFAULT``).
"""

from __future__ import annotations

import difflib
import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import ModelLoadError, UntrustedModelError
from .plugins import ModelPlugin, all_builders, find_builder, plugin_for_prefix, select_plugin
from .preprocess import Preprocessing, normalize_size

# Keys under which training scripts commonly nest the weights.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
# Prefixes added by DataParallel/DistributedDataParallel and torch.compile.
_KEY_PREFIXES = ("module.", "_orig_mod.")
_LABEL_KEYS = ("labels", "classes", "class_names", "categories")


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
    """Load ``spec`` (a file or ``PREFIX:NAME[:WEIGHTS]``) into an eval-mode model on ``device``."""
    path = Path(spec)
    if path.is_file():
        loaded = _load_file(path, arch=arch, num_classes=num_classes, trust_model=trust_model)
    elif path.is_dir():
        raise ModelLoadError(f"Model path is a folder, not a file: {path}")
    else:
        loaded = _load_named(str(spec), arch)
    if labels is not None:
        loaded.labels = read_labels(labels)
    _finish(loaded, plugin, device)
    return loaded


def _finish(loaded: LoadedModel, plugin_name: str | None, device: str) -> None:
    import torch

    module = loaded.module
    if isinstance(module, torch.nn.Module):
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
    if path.suffix == ".safetensors":
        return _load_safetensors(path, arch, num_classes)
    kind = _archive_kind(path)
    if kind == "torchscript":
        return _load_torchscript(path)
    if kind == "export":
        return _load_exported(path)
    return _load_pickle(path, arch, num_classes, trust_model)


def _archive_kind(path: Path) -> str | None:
    """Tell TorchScript and torch.export archives from torch.save ones by their members."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        raise ModelLoadError(f"Model file is a damaged archive: {path}: {error}") from None
    if any(n.endswith("/archive_format") or "serialized_exported_program" in n for n in names):
        return "export"
    if any("/code/__torch__" in n or n.endswith("/constants.pkl") for n in names):
        return "torchscript"
    return "pickle"


def _load_torchscript(path: Path) -> LoadedModel:
    import torch

    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as error:
        raise ModelLoadError(f"Cannot load TorchScript program {path}: {_first_line(error)}") from None
    return LoadedModel(module=module, source=str(path), loader="torchscript",
                       architecture=getattr(module, "original_name", None), inner_layers=False,
                       notes=["TorchScript hides inner layers from hooks: only input-gradient "
                              "methods (saliency) apply; save a state_dict for Grad-CAM"])


def _load_exported(path: Path) -> LoadedModel:
    import torch

    try:
        program = torch.export.load(str(path))
    except Exception as error:
        raise ModelLoadError(f"Cannot load torch.export program {path}: {_first_line(error)}") from None
    # unflatten() rebuilds the original module tree (as interpreter modules running the exported
    # graph), so layer hooks, and with them Grad-CAM, work as on the eager model.
    try:
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
            size = normalize_size([int(value.shape[2]), int(value.shape[3])])
            break
    preprocessing = Preprocessing(size=size, source="torch.export input shape") if size else None
    return LoadedModel(module=module, source=str(path), loader="export", preprocessing=preprocessing,
                       inner_layers=inner_layers, notes=notes)


def _load_pickle(path: Path, arch: str | None, num_classes: int | None,
                 trust_model: bool) -> LoadedModel:
    import pickle

    import torch

    try:
        content = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        if unsafe is None:
            raise ModelLoadError(f"Not a PyTorch model file (or it is damaged): {path}") from None
        if not trust_model:
            raise UntrustedModelError(
                f"{path} is a pickled Python object ({unsafe.group(1)}); unpickling it can run "
                f"arbitrary code, so it is refused. If you trust where it came from, pass "
                f"--trust-model (trust_model=True); or save model.state_dict() and use --arch."
            ) from None
        try:
            content = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as error2:
            raise ModelLoadError(f"Cannot unpickle {path}: {_first_line(error2)} "
                                 f"(the classes it needs must be importable)") from None
    except Exception:
        raise ModelLoadError(f"Not a PyTorch model file (or it is damaged): {path}") from None

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
                except json.JSONDecodeError:
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
        raise ModelLoadError(f"The 'arch' entry of {path} is not a name: {arch_name!r}")
    arch_kwargs = dict(checkpoint.get("arch_kwargs") or {}) if arch is None else {}
    if "weights" in arch_kwargs:
        raise ModelLoadError(f"{path}: 'arch_kwargs' may not name pretrained weights.")
    module = build_architecture(arch_name, state_dict, arch_kwargs, num_classes)
    missing, unexpected = _compare_keys(module.state_dict(), state_dict)
    if missing or unexpected:
        raise ModelLoadError(
            f"The weights in {path} do not fit {arch_name}: "
            f"{_few(missing, 'missing')}{'; ' if missing and unexpected else ''}"
            f"{_few(unexpected, 'unexpected')}. Is --arch right?"
        )
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise ModelLoadError(f"The weights in {path} do not fit {arch_name}: "
                             f"{_first_mismatch(error)}. Is --arch right?") from None
    labels = next((list(map(str, checkpoint[k])) for k in _LABEL_KEYS
                   if isinstance(checkpoint.get(k), (list, tuple))), None)
    preprocessing = _checkpoint_preprocessing(checkpoint.get("preprocessing"), path)
    return LoadedModel(module=module, source=str(path), loader=loader, architecture=arch_name,
                       labels=labels, preprocessing=preprocessing)


def _find_state_dict(checkpoint: Mapping[str, Any], path: Path) -> dict[str, Any]:
    import torch

    current: Any = checkpoint
    for _ in range(3):  # {"model": {"state_dict": ...}} and the like
        if isinstance(current, Mapping) and current and all(
                isinstance(v, torch.Tensor) for v in current.values()):
            return _strip_prefixes(dict(current))
        inner = next((current[k] for k in _WRAPPER_KEYS
                      if isinstance(current, Mapping) and isinstance(current.get(k), Mapping)), None)
        if inner is None:
            break
        current = inner
    raise ModelLoadError(f"No state_dict found in {path}: expected tensors at the top level or "
                         f"under one of {', '.join(_WRAPPER_KEYS)}.")


def _strip_prefixes(state_dict: dict[str, Any]) -> dict[str, Any]:
    changed = True
    while changed:
        changed = False
        for prefix in _KEY_PREFIXES:
            if all(key.startswith(prefix) for key in state_dict):
                state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
                changed = True
    return state_dict


def build_architecture(arch: str, state_dict: Mapping[str, Any], arch_kwargs: dict[str, Any],
                       num_classes: int | None) -> Any:
    """Construct ``arch`` with random weights, its number of classes read off the state_dict."""
    import torch

    found = find_builder(arch)
    if found is None:
        close = difflib.get_close_matches(arch, all_builders(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelLoadError(f"Unknown architecture {arch!r}.{hint}")
    _, builder = found
    if num_classes is None and "num_classes" not in arch_kwargs:
        num_classes = _infer_num_classes(builder, arch_kwargs, state_dict)
    if num_classes is not None:
        arch_kwargs = {**arch_kwargs, "num_classes": int(num_classes)}
    try:
        return builder(**arch_kwargs)
    except (TypeError, ValueError) as error:
        raise ModelLoadError(f"Cannot build {arch} with {arch_kwargs}: {_first_line(error)}") from None
    except Exception as error:  # builders are third-party code; report, don't crash
        raise ModelLoadError(f"Building {arch} failed: {type(error).__name__}: "
                             f"{_first_line(error)}") from None


def _infer_num_classes(builder: Any, arch_kwargs: dict[str, Any],
                       state_dict: Mapping[str, Any]) -> int | None:
    """The class count that makes the head's shape match, found by building on the meta device.

    Only the leading dimension of the head's weights depends on the number of classes, so the
    candidates are the leading sizes of the tensors whose shape differs from the default build's.
    """
    import torch

    def shapes_of(**kwargs: Any) -> dict[str, tuple[int, ...]]:
        try:  # the meta device builds without allocating or initialising anything
            with torch.device("meta"):
                module = builder(**kwargs)
        except Exception:  # some builders compute with tensors while constructing
            module = builder(**kwargs)
        return {k: tuple(v.shape) for k, v in module.state_dict().items()}

    try:
        default_shapes = shapes_of(**arch_kwargs)
    except Exception:
        return None
    candidates = sorted({
        int(state_dict[key].shape[0]) for key, shape in default_shapes.items()
        if key in state_dict and tuple(state_dict[key].shape) != shape
        and len(shape) >= 1 and tuple(state_dict[key].shape[1:]) == shape[1:]
    })
    for candidate in candidates:
        try:
            shapes = shapes_of(**arch_kwargs, num_classes=candidate)
        except Exception:
            continue
        if all(tuple(state_dict[k].shape) == s for k, s in shapes.items() if k in state_dict):
            return candidate
    return None


def _checkpoint_preprocessing(spec: Any, path: Path) -> Preprocessing | None:
    if spec is None:
        return None
    if not isinstance(spec, Mapping) or "size" not in spec:
        raise ModelLoadError(f"The 'preprocessing' entry of {path} needs at least a 'size'.")
    try:
        return Preprocessing(size=normalize_size(spec["size"]), resize=spec.get("resize"),
                             mean=tuple(spec.get("mean", Preprocessing.mean)),
                             std=tuple(spec.get("std", Preprocessing.std)),
                             interpolation=str(spec.get("interpolation", "bilinear")),
                             letterbox=bool(spec.get("letterbox", False)), source="checkpoint")
    except (TypeError, ValueError) as error:
        raise ModelLoadError(f"The 'preprocessing' entry of {path} is invalid: {error}") from None


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
