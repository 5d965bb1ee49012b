"""Loading a model the way people save them.

Supported: a state_dict (``.pt``/``.pth``, optionally wrapped in a training checkpoint: PyTorch
Lightning's ``.ckpt``, timm ``train.py``'s with its EMA weights) plus an architecture name (a plugin's
builder, ``PREFIX:NAME`` where two plugins know a name, or the user's own class ``model.py:MyNet``),
``.safetensors``, ``PREFIX:NAME[:WEIGHTS]`` specifications built by a plugin
(``torchvision:resnet50:DEFAULT``), paths (folders) a plugin claims, and modules already in memory.
Files that hold code load only with ``trust_model=True``: a whole pickled module (unpickling runs
code), TorchScript (a program, run while loading) and ``torch.export`` programs (``.pt2``:
torch.export.load unpickles parts of the archive); see :mod:`.trust`.

Nothing a file says may cost more than the file itself: an architecture is built on the meta device
and compared with the file's tensors before it is built for real, and the sizes a file asks for have
their own, lower, bound (preprocess.FILE_MAX_SIZE).

This module is the public API (:func:`load_model`, :class:`LoadedModel`, the device and the labels,
named models and paths plugins load); its parts:

- :mod:`.trust`: **the trust boundary alone**, everything that decides whether code runs while a
  file is read (TorchScript, torch.export, the pickle allow-list, safetensors). To audit what runs
  without ``--trust-model``, read that module.
- :mod:`.checkpoints`: unwrapping training checkpoints (EMA weights, Lightning, key prefixes).
- :mod:`.architectures`: fitting an architecture to the file's weights, and the build budget.
- :mod:`.user_class`: the user's own class (``--arch path/net.py:Net``).
- :mod:`.loaded` (:class:`LoadedModel`) and :mod:`.failures` (one error line for code that fails).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from .._files import not_a_regular_file
from ..errors import AttnExplainError, ModelLoadError, shown
from ..plugins import ModelPlugin, NamedModel, builder_order, plugin_for_prefix, select_plugin
from ..scoring import Scoring
from .architectures import architecture_candidates, build_architecture, from_checkpoint
from .checkpoints import MAX_LABELS, PRETRAINED_ARGUMENTS, Asked, no_ema
from .failures import first_line, load_failures_reported
from .loaded import LoadedModel
from .trust import read_model_file
from .user_class import class_file

if TYPE_CHECKING:
    from torch import nn

#: The public API, and what other modules import from here.
__all__ = [
    "LoadedModel",
    "arch_kwargs_from_json",
    "architecture_candidates",
    "build_architecture",
    "check_model_path",
    "class_file",
    "load_model",
    "read_labels",
    "resolve_device",
    "with_prompts",
]

# What not_a_regular_file says of a folder: a path only a plugin can load.
_FOLDER = "is a folder, not a file"
# A labels file of one name per line beyond this is not a labels file (21,843 names take ~1 MB).
_MAX_LABELS_FILE_BYTES = 16 * 1024 * 1024


def load_model(
    spec: "str | Path | nn.Module",
    *,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    num_classes: int | None = None,
    labels: str | Path | Sequence[str] | None = None,
    trust_model: bool = False,
    plugin: str | None = None,
    device: str | None = None,
    ema: bool = False,
    prompts: Sequence[str] | None = None,
    scores: str = "auto",
) -> LoadedModel:
    """Load ``spec`` into an eval-mode model on ``device`` (``"auto"``: CUDA, else MPS, else the CPU;
    None: the CPU, or where an in-memory module already is).

    ``spec`` is a model file, a path a plugin claims (a folder), ``PREFIX:NAME[:WEIGHTS]``, or an
    ``nn.Module`` already in memory (left where it is and as it is, but for ``eval()``). ``arch``
    names the architecture of a state_dict: a builder name (``resnet50``), one plugin's
    (``timm:convnext_tiny``), or the user's own class, ``path/to/model.py:MyNet`` or
    ``package.module:MyNet`` (imported: the user named it), built with ``arch_kwargs``. ``ema``
    loads a training checkpoint's EMA weights (timm's ``state_dict_ema``). ``labels`` (a list or a
    file of one name per line) wins over the class names the file or the model's plugin knows.
    ``prompts``: texts a vision-language model compares the image with, which its plugin makes the
    classes of the model (:func:`with_prompts`); checked by :func:`attnexplain.prompts.read_prompts`.
    ``scores`` (softmax, sigmoid: multi-label) overrides how class scores become probabilities;
    ``auto`` keeps the plugin's (or a checkpoint's ``"multilabel": true``).
    """
    # What can be checked without torch is checked before importing it (~2 s).
    given_labels = read_labels(labels) if labels is not None else None
    given_kwargs = _given_arch_kwargs(arch_kwargs) if arch_kwargs is not None else None
    if not isinstance(spec, (str, Path)):
        if arch is not None or arch_kwargs is not None or num_classes is not None or ema:
            raise ModelLoadError(
                "arch, arch_kwargs, num_classes and ema describe a file's weights; a module in memory is already built."
            )
        loaded = _in_memory(spec)
        run_device = resolve_device(device) if device is not None else None
    else:
        run_device = resolve_device(device or "cpu")
        loaded = _load_spec(
            spec, arch=arch, arch_kwargs=given_kwargs, num_classes=num_classes, trust_model=trust_model, ema=ema
        )
    if given_labels is not None:
        loaded.labels = given_labels
    if scores != "auto":
        loaded.scoring = Scoring(kind=scores)
    _finish(loaded, plugin, run_device)
    return with_prompts(loaded, prompts, plugin_name=plugin, labels_given=given_labels is not None)


def with_prompts(
    loaded: LoadedModel, prompts: Sequence[str] | None, *, plugin_name: str | None = None, labels_given: bool = False
) -> LoadedModel:
    """``loaded`` with its plugin's answer to ``prompts`` (the hook :meth:`ModelPlugin.with_prompts`):
    a new :class:`LoadedModel` whose module is a classifier of the prompts, labelled by them, or
    ``loaded`` itself where the plugin keeps the model as it is. The plugin refuses prompts for a
    model that reads no text, and a model that needs them without any."""
    from dataclasses import replace

    from ..prompts import read_prompts

    checked = read_prompts(prompts=prompts) if prompts is not None else None
    if checked is not None and labels_given:
        raise ModelLoadError("Prompts are the classes of the model: give them or class names (labels), not both.")
    plugin = loaded.plugin
    named = _plugin_load(
        plugin, f"Plugin {plugin.name} could not read the prompts", lambda: plugin.with_prompts(loaded.module, checked)
    )
    if named is None:
        return loaded
    if checked is None or not isinstance(named, NamedModel):
        raise ModelLoadError(f"Plugin {plugin.name} answered prompts with {shown(named)}, not a NamedModel.")
    prompted = replace(
        loaded,
        module=named.module,
        architecture=named.architecture or loaded.architecture,
        labels=list(named.labels) if named.labels is not None else list(checked),
        notes=[*loaded.notes, *named.notes],
    )
    prompted.plugin = select_plugin(named.module, plugin_name)
    return prompted


def _load_spec(
    spec: str | Path,
    *,
    arch: str | None,
    arch_kwargs: dict[str, Any] | None,
    num_classes: int | None,
    trust_model: bool,
    ema: bool,
) -> LoadedModel:
    path = Path(spec)
    problem = check_model_path(path)
    notes: list[str] = []
    if problem in (None, _FOLDER):
        claimant = _claiming_plugin(path, notes)
        if claimant is not None:
            no_ema(ema, f"{path} is loaded by plugin {claimant.name}, not from a training checkpoint")
            named = _plugin_load(
                claimant,
                f"Plugin {claimant.name} could not load {path}",
                lambda: claimant.load_path(path, trust_model=trust_model),
            )
            loaded = _from_named(named, str(path), claimant.source_prefix or claimant.name, random_unless_said=False)
        elif problem == _FOLDER:
            raise ModelLoadError(
                f"Model path {path} is a folder, and no installed plugin loads folders like it; give a model file."
            )
        else:
            asked = Asked(arch, arch_kwargs, num_classes, ema)
            content = read_model_file(path, asked, trust_model)
            loaded = (
                content
                if isinstance(content, LoadedModel)
                else from_checkpoint(content.checkpoint, path, content.loader, asked)
            )
    else:
        no_ema(ema, f"{spec} is a named model, not a training checkpoint")
        loaded = _load_named(str(spec))
    loaded.notes[:0] = notes
    return loaded


def _in_memory(module: Any) -> LoadedModel:
    import torch

    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(
            f"A model is a path, a PREFIX:NAME specification or a torch.nn.Module, not a {type(module).__name__}."
        )
    return LoadedModel(
        module=module, source=f"<{type(module).__name__} object>", loader="object", architecture=type(module).__name__
    )


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
        raise AttnExplainError(
            f"Device {name} was asked for (--device, device=), but PyTorch sees no CUDA GPU here; use cpu or auto."
        )
    if name == "mps" and not torch.backends.mps.is_available():
        raise AttnExplainError(
            "Device mps was asked for (--device, device=), but this PyTorch has no MPS device; use cpu or auto."
        )
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
        with load_failures_reported(f"Preparing the model from {loaded.source} failed"):
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
    if loaded.preprocessing is None and loaded.loader != "object" and _classifies(loaded):
        # A classifier's file that says nothing (a state_dict with --arch): run it as it was most
        # likely trained and evaluated, not squashed. A module from memory is the caller's to say.
        from ..preprocess import DEFAULT_PREPROCESSING

        loaded.preprocessing = DEFAULT_PREPROCESSING
    if loaded.labels is None:
        loaded.labels = _plugin_labels(loaded)


def _classifies(loaded: LoadedModel) -> bool:
    try:
        return loaded.plugin.task(loaded.module) == "classification"
    except Exception:  # a plugin that cannot say: as before, the whole photo
        return False


def _plugin_labels(loaded: LoadedModel) -> list[str] | None:
    """The class names the model's plugin reads off the model (API v2's ``labels`` hook). A plugin
    that fails here costs the names, not the explanation: the failure is a note."""
    plugin = loaded.plugin
    try:
        names = plugin.labels(loaded.module)
    except Exception as error:  # noqa: BLE001 - third-party code
        loaded.notes.append(
            f"plugin {plugin.name} could not read the model's class names "
            f"({type(error).__name__}: {first_line(error)}); none are shown"
        )
        return None
    if names is None:
        return None
    if (
        not isinstance(names, (list, tuple))
        or len(names) > MAX_LABELS
        or not all(isinstance(name, (str, int)) for name in names)
    ):
        loaded.notes.append(f"plugin {plugin.name} gave class names that are not a list of names; none are shown")
        return None
    return [str(name) for name in names]


def read_labels(labels: str | Path | Sequence[str]) -> list[str]:
    """Class names from a list or a text file with one label per line."""
    if not isinstance(labels, (str, Path)):  # the names themselves
        return [str(label) for label in labels]
    path = Path(labels)
    problem = not_a_regular_file(path)
    if problem == "does not exist":
        raise ModelLoadError(f"Labels file not found: {path}")
    if problem is not None:
        raise ModelLoadError(f"Labels file {path} {problem}.")
    if path.stat().st_size > _MAX_LABELS_FILE_BYTES:
        raise ModelLoadError(
            f"Labels file {path} is {path.stat().st_size:,} bytes: a labels file "
            f"has one class name per line, and is far smaller."
        )
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
    if len(lines) > MAX_LABELS:
        raise ModelLoadError(
            f"Labels file {path} has {len(lines):,} lines; at most {MAX_LABELS:,} class names are accepted."
        )
    return [line.strip() for line in lines]


# --- named models ------------------------------------------------------------------------------
def _load_named(spec: str) -> LoadedModel:
    prefix, _, rest = spec.partition(":")
    plugin = plugin_for_prefix(prefix) if rest else None
    if plugin is None:
        if rest:
            raise ModelLoadError(f"Model file not found, and no installed plugin builds '{prefix}:' models: {spec}")
        raise ModelLoadError(f"Model file not found: {spec}")
    parts = _plugin_load(plugin, f"Plugin {plugin.name} could not read {spec}", lambda: plugin.split_spec(rest))
    if not (
        isinstance(parts, tuple)
        and len(parts) == 2
        and isinstance(parts[0], str)
        and (parts[1] is None or isinstance(parts[1], str))
    ):
        raise ModelLoadError(f"Plugin {plugin.name} split {spec} into {shown(parts)}, not (name, weights or None).")
    name, weights = parts
    named = _plugin_load(
        plugin, f"Plugin {plugin.name} could not build {spec}", lambda: plugin.load_named(name, weights)
    )
    return _from_named(named, spec, prefix, random_unless_said=not weights)


def _from_named(named: NamedModel, source: str, loader: str, *, random_unless_said: bool) -> LoadedModel:
    """A plugin's :class:`NamedModel` as a :class:`LoadedModel`. ``random_unless_said``: whether the
    weights are random where the plugin does not say (``NamedModel.random_weights`` None, as plugins
    of API version 1 leave it): a name without WEIGHTS is; a path a plugin loads is not."""
    import torch

    if not isinstance(named, NamedModel) or not isinstance(named.module, torch.nn.Module):
        raise ModelLoadError(
            f"Loading {source} gave a {type(named).__name__}, not the NamedModel "
            f"(holding an nn.Module) a plugin must return."
        )
    loaded = LoadedModel(
        module=named.module,
        source=source,
        loader=loader,
        architecture=named.architecture,
        weights=named.weights,
        labels=list(named.labels) if named.labels is not None else None,
        preprocessing=named.preprocessing,
        notes=list(named.notes),
    )
    random_weights = named.random_weights if named.random_weights is not None else random_unless_said
    if random_weights:
        loaded.notes.append(
            "random weights: no WEIGHTS were named, so predictions mean nothing"
            if named.random_weights is None
            else "random weights: predictions mean nothing"
        )
    return loaded


def _plugin_load(plugin: ModelPlugin, what: str, call: Callable[[], Any]) -> Any:
    """``call()`` into a plugin, whatever it raises reported as one line that names it."""
    with load_failures_reported(what):
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
            notes.append(
                f"plugin {plugin.name} failed while checking whether it loads {path.name} "
                f"({type(error).__name__}: {first_line(error)}); ignored"
            )
            continue
        if claims is True:
            return plugin
    return None


def arch_kwargs_from_json(text: str) -> dict[str, Any]:
    """``--arch-kwargs`` (a JSON object of the architecture's keyword arguments) as a dict."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as error:
        raise ModelLoadError(f"--arch-kwargs is not valid JSON ({first_line(error)}): {shown(text)}") from None
    if not isinstance(value, dict):
        raise ModelLoadError(
            f"--arch-kwargs must be a JSON object such as '{{\"num_classes\": 7}}', not {shown(value)}"
        )
    return _given_arch_kwargs(value)


def _given_arch_kwargs(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
        raise ModelLoadError(f"arch_kwargs must map argument names to values, not {shown(value)}")
    if any(name in value for name in PRETRAINED_ARGUMENTS):
        raise ModelLoadError(
            "arch_kwargs may not ask for pretrained weights: the file's weights are loaded into the architecture."
        )
    return dict(value)
