"""Architecture fitting and the build budget: which constructor a file's weights belong to, built
within the file's own size, with the weights loaded into it.

An architecture name is resolved to candidates (a plugin's builder, ``PREFIX:NAME``, or the user's
own class: :mod:`.user_class`), each compared with the file's tensors on the meta device (no memory,
no initialisation) before the one that fits is built for real: nothing a file says may cost more
than the file itself. A :class:`_BuildBudget` cuts absurd builds short (a file asking for 100,000
blocks), and the class count, the keys' prefix (a LightningModule's ``model.``) and a "did you mean"
are all found the same way.
"""

from __future__ import annotations

import difflib
import re
import threading
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from ..errors import AttnExplainError, ModelLoadError, WeightsDoNotFit, shown
from ..plugin_cache import plugins_for_arch
from ..plugins import ModelPlugin, builder_order, plugin_for_prefix
from ..scoring import Scoring
from .checkpoints import (
    LIGHTNING_KEYS,
    Asked,
    checkpoint_arch_kwargs,
    checkpoint_labels,
    checkpoint_preprocessing,
    checkpoint_scores,
    find_state_dict,
    hyper_parameters,
    under_prefix,
)
from .failures import first_line, torch_logs_kept
from .loaded import LoadedModel
from .trust import refuse_class_named_by_file
from .user_class import names_a_class, user_class


def from_checkpoint(checkpoint: Mapping[str, Any], path: Path, loader: str, asked: Asked) -> LoadedModel:
    """Build the architecture named by ``asked.arch`` (or the checkpoint) and load the weights into it."""
    state_dict = find_state_dict(checkpoint, path, ema=asked.ema)
    hyper_arch, hyper_classes = hyper_parameters(checkpoint)
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
        arch_kwargs = checkpoint_arch_kwargs(checkpoint.get("arch_kwargs"), path) if asked.arch is None else {}
    labels = checkpoint_labels(checkpoint, path)
    preprocessing = checkpoint_preprocessing(checkpoint.get("preprocessing"), path)
    notes: list[str] = []
    # The hyper-parameters' class count goes with their arch: an --arch of the user's own may
    # have another head.
    num_classes = asked.num_classes
    if num_classes is None and asked.arch is None and arch_name == hyper_arch:
        num_classes = hyper_classes
    try:
        module, state_dict = _fitted_architecture(
            arch_name,
            state_dict,
            arch_kwargs,
            num_classes,
            initialise=False,
            outside_ok=any(key in checkpoint for key in LIGHTNING_KEYS),
            notes=notes,
            user_classes=asked.arch is not None,
        )
    except WeightsDoNotFit as mismatch:
        raise ModelLoadError(
            f"The weights in {path} do not fit {arch_name}: {mismatch.detail}. Is --arch right?"
        ) from None
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
        raise ModelLoadError(
            f"The weights in {path} do not fit {arch_name}: {_first_mismatch(error)}. Is --arch right?"
        ) from None
    if asked.ema:
        notes.append("EMA weights (the checkpoint's moving average of the trained weights)")
    return LoadedModel(
        module=module,
        source=str(path),
        loader=loader,
        architecture=arch_name,
        labels=labels,
        preprocessing=preprocessing,
        notes=notes,
        scoring=Scoring(kind=checkpoint_scores(checkpoint)),
    )


def build_architecture(
    arch: str,
    state_dict: Mapping[str, Any],
    arch_kwargs: dict[str, Any],
    num_classes: int | None,
    *,
    initialise: bool = True,
) -> Any:
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


def architecture_candidates(
    arch: str, known: "list[tuple[ModelPlugin, Mapping[str, Any]]] | None" = None, *, user_classes: bool = True
) -> list[tuple[str, Callable[..., Any]]]:
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


def _lazy_candidates(
    arch: str, known: "list[tuple[ModelPlugin, Mapping[str, Any]]] | None" = None, *, user_classes: bool = True
) -> list[tuple[str, Callable[[], Any]]]:
    """:func:`architecture_candidates` with each constructor looked up only when called (None where
    the plugin no longer has it): a plugin whose cached names hold a bare name is asked for its
    builders only if the candidates before it do not fit (see :func:`attnexplain.plugin_cache.plugins_for_arch`)."""
    prefix, colon, rest = arch.partition(":")
    if colon:
        plugin = plugin_for_prefix(prefix)
        if plugin is not None:
            builders = plugin.builders()
            builder = builders.get(arch) or builders.get(rest)
            return [(arch, lambda: builder)] if builder is not None else []
        if names_a_class(arch):
            if not user_classes:
                refuse_class_named_by_file(arch)
            found_class = user_class(arch)
            return [(found_class[0], lambda: found_class[1])]
    if known is not None:
        return _plugin_candidates(arch, [(plugin, builders, False) for plugin, builders in known])
    if not colon:
        lazy = _plugin_candidates(arch, [(plugin, None, cached) for plugin, cached in plugins_for_arch(arch)])
        if lazy:
            return lazy
        # No plugin's cached names hold it: ask every plugin (a stale cache must not hide a name).
    return _plugin_candidates(arch, [(plugin, None, False) for plugin in builder_order()])


def _plugin_candidates(
    arch: str,
    plugins: "list[tuple[ModelPlugin, Mapping[str, Any] | None, bool]]",
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
        found.append((f"{plugin.source_prefix}:{arch}" if plugin.source_prefix and not colon else arch, builder))
    return found


def _fitted_architecture(
    arch: str,
    state_dict: Mapping[str, Any],
    arch_kwargs: dict[str, Any],
    num_classes: int | None,
    *,
    initialise: bool,
    outside_ok: bool = False,
    notes: list[str] | None = None,
    user_classes: bool = True,
) -> tuple[Any, OrderedDict[str, Any]]:
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
            kwargs, built, fitted, found = _fit(name, builder, state_dict, arch_kwargs, num_classes, outside_ok)
        except ModelLoadError as error:
            if len(candidates) == 1 and not isinstance(error, WeightsDoNotFit):
                raise
            failures.append(f"{name} ({getattr(error, 'detail', error)})")
            continue
        if index:
            notes.append(f"the weights fit {name}, not {candidates[0][0]} (the other plugin that builds {arch})")
        notes.extend(found)
        module = (
            built
            if built is not None
            else _build(name, builder, _BuildBudget(fitted), kwargs, meta=False, initialise=initialise)
        )
        return module, fitted
    if len(candidates) == 1:
        detail = failures[0][len(candidates[0][0]) + 2 : -1]
        raise WeightsDoNotFit(arch, detail + _did_you_mean(arch, state_dict, exclude=arch))
    raise WeightsDoNotFit(
        arch, f"{len(candidates)} plugins build {arch} and the weights fit none of them: {'; '.join(failures)}"
    )


def _fit(
    name: str,
    builder: Callable[..., Any],
    state_dict: Mapping[str, Any],
    arch_kwargs: dict[str, Any],
    num_classes: int | None,
    outside_ok: bool,
) -> tuple[dict[str, Any], Any, OrderedDict[str, Any], list[str]]:
    """Whether ``builder``'s tensors match ``state_dict``'s, decided on the meta device.

    Returns the constructor's keyword arguments, the module when it had to be built for real already
    (some builders cannot build on the meta device), the state_dict keyed as the module's, and notes.
    Raises :class:`WeightsDoNotFit`.
    """
    budget = _BuildBudget(state_dict)
    _check_arch_kwargs(
        name, builder, {**arch_kwargs, **({"num_classes": num_classes} if num_classes is not None else {})}
    )
    fitted, notes, expected = _keys_for(name, builder, arch_kwargs, state_dict, budget, outside_ok)
    if expected is not None:  # names first: a mismatch needs no more builds
        _check_fit(name, dict.fromkeys(expected), dict.fromkeys(fitted), shapes=False)
    if num_classes is None and "num_classes" not in arch_kwargs and _takes(builder, "num_classes"):
        num_classes = _infer_num_classes(builder, arch_kwargs, fitted, budget)
    kwargs = {**arch_kwargs, "num_classes": int(num_classes)} if num_classes is not None else arch_kwargs
    skeleton = _build(name, builder, budget, kwargs, meta=True)
    module = skeleton if skeleton is not None else _build(name, builder, budget, kwargs, meta=False, initialise=False)
    _check_fit(name, module.state_dict(), fitted)
    return kwargs, None if skeleton is not None else module, fitted, notes


def _build(
    name: str,
    builder: Callable[..., Any],
    budget: "_BuildBudget",
    kwargs: dict[str, Any],
    *,
    meta: bool,
    initialise: bool = True,
) -> Any:
    """``builder(**kwargs)`` within ``budget``; on the meta device, None where the builder cannot."""
    try:
        return budget.build(builder, kwargs, meta=meta, initialise=initialise)
    except _TooLarge as error:
        raise ModelLoadError(
            f"{name} built with {shown(kwargs)} is far larger than the "
            f"weights it should hold ({error}); refused before it fills "
            f"memory."
        ) from None
    except AttnExplainError:
        raise
    except Exception as error:
        if meta:
            return None  # some builders compute with tensors while constructing (RegNet)
        if isinstance(error, (TypeError, ValueError)):
            raise ModelLoadError(f"Cannot build {name} with {shown(kwargs)}: {first_line(error)}") from None
        # builders are third-party (or the user's) code; report, don't crash
        raise ModelLoadError(f"Building {name} failed: {type(error).__name__}: {first_line(error)}") from None
    except BaseException as error:  # noqa: BLE001 - a user's class calling sys.exit()
        if isinstance(error, KeyboardInterrupt):
            raise
        raise ModelLoadError(f"Building {name} failed: {type(error).__name__}: {first_line(error)}") from None


def _keys_for(
    name: str,
    builder: Callable[..., Any],
    arch_kwargs: dict[str, Any],
    state_dict: Mapping[str, Any],
    budget: "_BuildBudget",
    outside_ok: bool,
) -> tuple[OrderedDict[str, Any], list[str], list[str] | None]:
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
            return under_prefix(state_dict, ""), [], None
    expected = list(skeleton.state_dict())
    given = set(state_dict)
    if not expected or all(key in given for key in expected):
        prefix = ""
    else:
        first = expected[0]
        prefixes = {key[: -len(first)] for key in given if key.endswith("." + first)}
        prefixes = {prefix for prefix in prefixes if all(prefix + key in given for key in expected)}
        if not prefixes:
            return under_prefix(state_dict, ""), [], expected
        # The prefix with the fewest other keys under it (the architecture itself), then the shortest.
        prefix = min(prefixes, key=lambda p: (sum(key.startswith(p) for key in given), len(p)))
    wanted = set(expected)
    fitted = under_prefix(state_dict, prefix)
    if not prefix and not outside_ok:
        return fitted, [], expected
    outside = sorted(key for key in given if not key.startswith(prefix) or key[len(prefix) :] not in wanted)
    if prefix:  # keys under the prefix that the architecture lacks are a mismatch, not outside it
        outside = [key for key in outside if not key.startswith(prefix)]
    for key in outside:
        fitted.pop(key[len(prefix) :] if key.startswith(prefix) else key, None)
    notes = [f"the weights are under '{prefix}' in the checkpoint"] if prefix else []
    if outside:
        notes.append(
            f"{len(outside)} tensor{'' if len(outside) == 1 else 's'} outside {name} left out "
            f"({', '.join(outside[:3])}{', ...' if len(outside) > 3 else ''})"
        )
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
    return [
        name
        for name, p in signature.parameters.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]


def _check_arch_kwargs(name: str, builder: Callable[..., Any], kwargs: Mapping[str, Any]) -> None:
    parameters = _parameters(builder)
    unknown = [key for key in kwargs if parameters is not None and key not in parameters]
    if unknown:
        takes = ", ".join(parameters[:12]) if parameters else "no arguments"
        raise ModelLoadError(
            f"{name} takes no argument {', '.join(map(repr, unknown))} (it takes "
            f"{takes}); check --arch-kwargs / --num-classes."
        )


def _did_you_mean(arch: str, state_dict: Mapping[str, Any], exclude: str | None = None) -> str:
    """ " Did you mean ...?" for an architecture name that is unknown or whose weights do not fit
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

    def build(self, builder: Callable[..., Any], kwargs: dict[str, Any], *, meta: bool, initialise: bool = True) -> Any:
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

        handles = [
            torch_module.register_module_module_registration_hook(count_module),
            torch_module.register_module_parameter_registration_hook(count_tensor),
            torch_module.register_module_buffer_registration_hook(count_tensor),
        ]
        try:
            with torch_logs_kept(), _initialisation_skipped(meta or not initialise):
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
    originals = {
        name: getattr(init, name)
        for name in dir(init)
        if name.endswith("_") and not name.startswith("_") and callable(getattr(init, name))
    }

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


def _check_fit(arch: str, expected: Mapping[str, Any], given: Mapping[str, Any], *, shapes: bool = True) -> None:
    missing, unexpected = _compare_keys(expected, given)
    if missing or unexpected:
        raise WeightsDoNotFit(
            arch, f"{_few(missing, 'missing')}{'; ' if missing and unexpected else ''}{_few(unexpected, 'unexpected')}"
        )
    if not shapes:
        return
    for key, tensor in expected.items():
        if tuple(tensor.shape) != tuple(given[key].shape):
            raise WeightsDoNotFit(
                arch,
                f"size mismatch for {key}: the file has "
                f"{list(given[key].shape)}, the architecture "
                f"{list(tensor.shape)}",
            )


def _infer_num_classes(
    builder: Any, arch_kwargs: dict[str, Any], state_dict: Mapping[str, Any], budget: _BuildBudget
) -> int | None:
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


def _compare_keys(expected: Mapping[str, Any], given: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    return sorted(set(expected) - set(given)), sorted(set(given) - set(expected))


def _few(keys: list[str], what: str) -> str:
    if not keys:
        return ""
    shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
    return f"{len(keys)} {what} keys ({shown})"


def _first_mismatch(error: Exception) -> str:
    match = re.search(r"size mismatch for [^:]+: .*?(?=\n|$)", str(error))
    return match.group(0).strip().rstrip(".") if match else first_line(error)
