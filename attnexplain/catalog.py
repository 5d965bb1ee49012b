"""What attnexplain can explain out of the box: every plugin's models (listed, described, checked
by running) and every method, for ``attnexplain models``, ``plugins`` and ``methods``.

A listing must answer at once, but a plugin reads its catalog from its library's registry
(torchvision's, timm's), whose import alone takes seconds. So each plugin's catalog is kept as a
small JSON file in the user's cache folder (:mod:`attnexplain.plugin_cache`, keyed by what it was
read from: the plugin's module file, the versions of its distribution and of everything that
distribution requires): a listing from the cache imports no torch. An entry read from the cache
builds its model through the plugin's live catalog, and only when asked (``--check``, ``--details``).
"""

from __future__ import annotations

import functools
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .errors import PluginError, error_line
from .plugin_cache import cache_folder, cache_key, cached_entries, write_cache
from .plugins import CatalogEntry, ModelPlugin, PluginInfo, plugin_infos, plugin_named

if TYPE_CHECKING:
    from .loading import LoadedModel
    from .methods import Method

_CACHED_FIELDS = ("name", "task", "input_size", "supported", "note", "default_size")
_MAX_SIDE = 8192


@dataclass(frozen=True)
class CatalogRow:
    """One catalog entry as ``attnexplain models`` lists it; method and layer only once described
    or checked."""

    entry: CatalogEntry
    plugin: str
    method: str | None = None
    layer: str | None = None
    status: str = "not checked"  # "supported", "ok", "failed: ...", "not supported: ..."
    seconds: float | None = None
    spec: str | None = None  # PREFIX:NAME when the plugin builds models by name

    def as_dict(self) -> dict[str, Any]:
        """The row as ``attnexplain models --json`` prints it."""
        return {
            "name": self.entry.name,
            "spec": self.spec,
            "plugin": self.plugin,
            "task": self.entry.task,
            "input_size": self.entry.real_size,
            "check_size": self.entry.input_size,
            "supported": self.entry.supported,
            "note": self.entry.note,
            "method": self.method,
            "layer": self.layer,
            "status": self.status,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class Catalog:
    """Every installed plugin's catalog: the entries, and why a plugin's could not be read."""

    entries: list[tuple[ModelPlugin, CatalogEntry]]
    errors: dict[str, str]  # plugin name → one line


#: Told the name of each plugin whose catalog (or methods) is read from the plugin itself, with how
#: many of them are and which this is (from 1): the first listing after an install takes seconds.
Reading = Callable[[str, int, int], None]


def read_catalog(plugin: str | None = None, *, reading: Reading | None = None) -> Catalog:
    """The catalog of every working plugin (or of the plugin named ``plugin``), plugins by name,
    from the cache when it is current (written when not; ``reading`` is told of each plugin asked).

    A plugin whose ``catalog()`` raises or returns something else than :class:`CatalogEntry`
    objects is left out with its error, so it cannot break the listing.
    """
    infos = sorted((info for info in plugin_infos() if info.plugin is not None), key=lambda i: i.name)
    if plugin is not None:
        wanted = plugin_named(plugin)
        infos = [info for info in infos if info.plugin is wanted]
    entries: list[tuple[ModelPlugin, CatalogEntry]] = []
    errors: dict[str, str] = {}
    found: dict[str, list[CatalogEntry] | Exception] = {}
    for info in infos:
        try:
            found[info.name] = _catalog_from_cache(info)
        except Exception as error:  # a broken plugin must not break the listing
            found[info.name] = error
    stale = [info for info in infos if found[info.name] is None]
    for number, info in enumerate(stale, start=1):
        if reading is not None:
            reading(info.name, number, len(stale))
        try:
            found[info.name] = _catalog_from_plugin(info)
        except Exception as error:
            found[info.name] = error
    for info in infos:
        answer = found[info.name]
        if isinstance(answer, Exception):
            errors[info.name] = error_line(answer, limit=300)
        else:
            entries += [(info.plugin, entry) for entry in answer]
    return Catalog(entries, errors)


def catalog_entries() -> list[tuple[ModelPlugin, CatalogEntry]]:
    """Every working plugin's catalog entries (plugins by name), from the cache when current."""
    return read_catalog().entries


def select_entries(
    entries: list[tuple[ModelPlugin, CatalogEntry]], *, pattern: str | None = None, task: str | None = None
) -> list[tuple[ModelPlugin, CatalogEntry]]:
    """The entries of ``task`` whose name (or ``PREFIX:NAME``) contains ``pattern``, or matches it as
    a glob when it has ``*``, ``?`` or ``[``; case-insensitive."""
    from fnmatch import fnmatchcase

    def matches(plugin: ModelPlugin, entry: CatalogEntry) -> bool:
        if pattern is None:
            return True
        names = [entry.name.lower()]
        if plugin.source_prefix:
            names.append(f"{plugin.source_prefix}:{entry.name}".lower())
        wanted = pattern.lower()
        if any(character in wanted for character in "*?["):
            return any(fnmatchcase(name, wanted) for name in names)
        return any(wanted in name for name in names)

    return [
        (plugin, entry) for plugin, entry in entries if (task is None or entry.task == task) and matches(plugin, entry)
    ]


def plugin_listing(*, reading: Reading | None = None) -> list[dict[str, Any]]:
    """Every installed plugin, working or broken, as ``attnexplain plugins --json`` prints it: how
    many models its catalog lists (None when it cannot be read: ``error`` says why; ``reading``: as
    for :func:`read_catalog`)."""
    catalog = read_catalog(reading=reading)
    counts: dict[str, int] = {}
    for plugin, _ in catalog.entries:
        counts[plugin.name] = counts.get(plugin.name, 0) + 1
    listed = []
    for info in plugin_infos():
        plugin = info.plugin
        error = info.error or catalog.errors.get(info.name)
        listed.append(
            {
                "name": info.name,
                "entry_point": info.entry_point,
                "distribution": info.distribution,
                "version": info.version,
                "api_version": plugin.api_version if plugin is not None else None,
                "source_prefix": plugin.source_prefix if plugin is not None else None,
                "families": [str(family) for family in plugin.families] if plugin is not None else [],
                "models": counts.get(info.name, 0) if plugin is not None and info.name not in catalog.errors else None,
                "error": error,
            }
        )
    return listed


def method_listing(*, reading: Reading | None = None) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Every method ``--method`` takes, as ``attnexplain methods --json`` prints it: the built-in
    ones, then each working plugin's own (:meth:`ModelPlugin.methods`, ``plugin`` naming it); and
    why a plugin's methods are left out (a plugin that raises, returns something else than methods,
    or reuses a taken name), which leaves the others listed.

    A plugin's methods are read from the cache as its catalog is (asking a plugin for them imports
    torch; ``reading`` is told of each plugin asked), so that the listing imports no torch once
    cached; the check against names other plugins took is made here, plugins in the order
    :func:`attnexplain.method_registry.plugin_methods` asks them."""
    from .methods import METHODS

    infos = [info for info in plugin_infos() if info.plugin is not None]
    found = {info.name: _methods_from_cache(info) for info in infos}
    stale = [info for info in infos if found[info.name] is None]
    # A plugin built in memory is asked at every listing: not worth a word.
    told = [info for info in stale if info.distribution is not None]
    for info in stale:
        if reading is not None and info in told:
            reading(info.name, told.index(info) + 1, len(told))
        found[info.name] = _methods_from_plugin(info)
    listed = [_method_record(method, None) for method in METHODS.values()]
    taken: dict[str, str] = {}
    added: list[dict[str, Any]] = []
    refused: dict[str, str] = {}
    for info in infos:
        records, problem = found[info.name] or ([], None)
        clash = next((record["name"] for record in records if record["name"] in taken), None)
        if problem is None and clash is not None:
            problem = f"its method {clash!r} is plugin {taken[clash]}'s already"
        if problem is not None:
            refused[info.name] = problem
            continue
        taken.update((record["name"], info.name) for record in records)
        added += [{**record, "plugin": info.name} for record in records]
    listed += sorted(added, key=lambda record: (record["plugin"], record["name"]))
    return listed, refused


_METHOD_TEXTS = ("name", "family", "summary", "applies_to", "cost", "paper")
PluginMethods = tuple[list[dict[str, Any]], str | None]


def _method_record(method: "Method", plugin: str | None) -> dict[str, Any]:
    record: dict[str, Any] = {field: str(getattr(method, field)) for field in _METHOD_TEXTS}
    return {**record, "needs_gradient": bool(method.needs_gradient), "plugin": plugin}


def _methods_path(info: PluginInfo) -> Path:
    return cache_folder() / "methods" / f"{hashlib.sha256(info.name.encode()).hexdigest()[:24]}.json"


def _methods_from_cache(info: PluginInfo) -> PluginMethods | None:
    """``info``'s plugin's own methods as listed (without ``plugin``) and why they cannot be
    registered, from the cache; None where it is not current. A plugin built in memory has no
    version to key a cache by: it is always asked."""
    if info.distribution is None:
        return None
    return _read_methods_cache(_methods_path(info), cache_key(info))


def _methods_from_plugin(info: PluginInfo) -> PluginMethods:
    """``info``'s plugin's own methods, asked from the plugin, and cached."""
    from .method_registry import own_methods

    methods, problem = own_methods(info.plugin)
    records = [{field: value for field, value in _method_record(m, None).items() if field != "plugin"} for m in methods]
    if info.distribution is not None:
        write_cache(_methods_path(info), cache_key(info), {"methods": records, "problem": problem})
    return records, problem


def _read_methods_cache(path: Path, key: str) -> PluginMethods | None:
    """The cached methods and problem, or None where the file is absent, stale or not what this
    writes (read as if anyone could have written it: a method record's texts are printed)."""
    from .methods import METHODS

    entries = cached_entries(path, key)
    if not isinstance(entries, dict) or set(entries) != {"methods", "problem"}:
        return None
    records, problem = entries["methods"], entries["problem"]
    if problem is not None and not _plain_text(problem, 300):
        return None
    if not isinstance(records, list) or len(records) > 1000 or (problem is not None and records):
        return None
    for record in records:
        if not isinstance(record, dict) or set(record) != {*_METHOD_TEXTS, "needs_gradient"}:
            return None
        if not all(_plain_text(record[field], 1000) for field in _METHOD_TEXTS):
            return None
        if type(record["needs_gradient"]) is not bool or record["name"] in (*METHODS, "auto"):
            return None
    return records, problem


def _plain_text(text: Any, limit: int) -> bool:
    return isinstance(text, str) and len(text) <= limit and not any(ord(character) < 32 for character in text)


def catalog_row(plugin: ModelPlugin, entry: CatalogEntry, **found: Any) -> CatalogRow:
    """``entry`` as listed without building anything (``found``: method, layer, status, seconds)."""
    spec = f"{plugin.source_prefix}:{entry.name}" if plugin.source_prefix else None
    status = "supported" if entry.supported else f"not supported: {entry.note}"
    return CatalogRow(entry, plugin.name, spec=spec, **{"status": status, **found})


def live_catalog(plugin: ModelPlugin) -> list[CatalogEntry]:
    """``plugin.catalog()``, asked once per process, each entry checked."""
    return list(_live_catalog(plugin))


@functools.lru_cache(maxsize=None)
def _live_catalog(plugin: ModelPlugin) -> tuple[CatalogEntry, ...]:
    entries = tuple(plugin.catalog())
    for entry in entries:
        if not isinstance(entry, CatalogEntry) or _plain_fields(_cached_fields(entry)) is None:
            raise PluginError(
                f"plugin {plugin.name}'s catalog() returned {type(entry).__name__} "
                f"{str(entry)[:80]!r}, not a CatalogEntry of plain values"
            )
    return entries


def _cached_fields(entry: CatalogEntry) -> dict[str, Any]:
    """What the cache keeps of ``entry``: everything but its builder."""
    return {field: getattr(entry, field) for field in _CACHED_FIELDS}


def _plain_fields(item: Any) -> dict[str, Any] | None:
    """A cached entry's fields when every one has the type and range a CatalogEntry's must, else
    None. The cache is a file: it is read as if anyone could have written it."""
    if not isinstance(item, dict) or set(item) != set(_CACHED_FIELDS):
        return None
    texts_ok = all(isinstance(item[key], str) for key in ("name", "task", "note"))
    if not texts_ok or not 0 < len(item["name"]) <= 200 or len(item["task"]) > 50 or len(item["note"]) > 500:
        return None
    if any(ord(character) < 32 for key in ("name", "task", "note") for character in item[key]):
        return None  # a newline or tab would forge rows of the plain-text listing
    sizes = (item["input_size"], item["default_size"])
    if any(type(size) is not int or not 1 <= size <= _MAX_SIDE for size in sizes if size is not None):
        return None
    if item["input_size"] is None or type(item["supported"]) is not bool:
        return None
    return item


def _catalog_path(info: PluginInfo) -> Path:
    # The file is named by a hash of the plugin's name: a plugin's name is not a safe path.
    return cache_folder() / "catalogs" / f"{hashlib.sha256(info.name.encode()).hexdigest()[:24]}.json"


def _catalog_from_cache(info: PluginInfo) -> list[CatalogEntry] | None:
    """``info``'s catalog from the cache, or None where it is not current."""
    plugin = info.plugin
    items = _read_cache(_catalog_path(info), cache_key(info))
    if items is None:
        return None
    return [CatalogEntry(build=functools.partial(_build_live, plugin, item["name"]), **item) for item in items]


def _catalog_from_plugin(info: PluginInfo) -> list[CatalogEntry]:
    """``info``'s catalog asked from the plugin, and cached."""
    live = live_catalog(info.plugin)
    write_cache(_catalog_path(info), cache_key(info), [_cached_fields(entry) for entry in live])
    return live


def _read_cache(path: Path, key: str) -> list[dict[str, Any]] | None:
    entries = cached_entries(path, key)
    if not isinstance(entries, list):
        return None
    checked = [_plain_fields(item) for item in entries]
    return None if any(item is None for item in checked) else checked


def _build_live(plugin: ModelPlugin, name: str) -> Any:
    """Build catalog entry ``name`` of ``plugin`` through its live catalog (the cache holds no code)."""
    for entry in live_catalog(plugin):
        if entry.name == name:
            return entry.build()
    raise PluginError(f"Plugin {plugin.name}'s catalog no longer has {name!r}.")


def _loaded(plugin: ModelPlugin, entry: CatalogEntry, module) -> "LoadedModel":
    """A catalog model as ``load_model`` would hand it over: the plugin that claims it, its
    preprocessing."""
    from .loading import LoadedModel
    from .plugins import select_plugin

    chosen = select_plugin(module)
    return LoadedModel(
        module=module,
        source=f"{plugin.name}:{entry.name}",
        loader=plugin.name,
        architecture=entry.name,
        plugin=chosen,
        preprocessing=chosen.preprocessing(module),
    )


def describe_entry(plugin: ModelPlugin, entry: CatalogEntry) -> CatalogRow:
    """What ``--method auto`` means for ``entry`` and which layer it uses, without computing anything:
    the model is built on the meta device (no memory, no initialisation) and its default layer
    found from shapes alone. Status ``supported`` means listed as explained, not yet checked."""
    import torch

    from .planning import default_layer, resolve_methods

    if not entry.supported:
        return catalog_row(plugin, entry)
    try:
        with torch.device("meta"):
            module = entry.build().eval()
        loaded = _loaded(plugin, entry, module)
        methods = resolve_methods(loaded, "auto")
        layer = None
        if any(method.family == "cam" for method in methods):
            probe = torch.zeros(1, 3, entry.input_size, entry.input_size, device="meta")
            layer = default_layer(loaded, probe)
    except Exception:  # a builder that computes with real tensors while constructing
        return catalog_row(plugin, entry, status="supported (method and layer: see --check)")
    return catalog_row(plugin, entry, method=",".join(m.name for m in methods), layer=layer)


#: The status note of a builder whose random weights give every class the same score, even with
#: BatchNorm statistics of the check's image (see :func:`_brought_to_life`).
RANDOM_UNIFORM = "random weights score every class alike, no map checked"


def _brought_to_life(module: Any, batch: Any) -> None:
    """Random weights whose scores depend on the image: every all-zero weight matrix drawn from
    N(0, 0.02²) and every BatchNorm2d's running statistics those of ``batch`` (one forward, only
    the norm layers in training mode: a detector's own forward stays as in eval)."""
    import torch

    norms = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.dim() >= 2 and not bool(parameter.any()):
                parameter.normal_(0.0, 0.02)
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average: after one forward, that batch's statistics
            norm.train()
        try:
            module(batch.to(next(module.parameters()).device))
        finally:
            for norm in norms:
                norm.eval()


def check_entry(plugin: ModelPlugin, entry: CatalogEntry, seed: int = 0) -> CatalogRow:
    """Build ``entry`` with random weights and explain a synthetic image with ``--method auto``.

    Passes when the heatmap is finite and not constant and the overlay has the image's size (and, for
    a detector, the explained box is among the detections); ``ok (...)`` when the random weights
    score every class alike, so that there is no map to check.
    """
    import numpy as np
    import torch

    from .explanation import explain
    from .planning import plan_preprocessing
    from .preprocess import prepare
    from .targets import UniformScores

    if not entry.supported:
        return catalog_row(plugin, entry)
    started = time.perf_counter()
    try:
        torch.manual_seed(seed)
        module = entry.build().eval()
        loaded = _loaded(plugin, entry, module)
        height, width = entry.input_size + 16, entry.input_size + 40  # not square, not input-sized
        image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
        try:
            result = explain(loaded, image, "auto", size=entry.input_size)
        except UniformScores:
            # Random EfficientNets, MobileNetV3s, MNASNets (signals that die out layer by layer: fan-out
            # initialisation under identity BatchNorm statistics) and ViTs (a zero-initialised head)
            # score every class alike, which explain() refuses. Give them what training would: norm
            # statistics of a real input, and no all-zero weight matrix; then check as any other.
            _brought_to_life(module, prepare(image, plan_preprocessing(loaded, size=entry.input_size)).tensor)
            try:
                result = explain(loaded, image, "auto", size=entry.input_size)
            except UniformScores:
                return catalog_row(plugin, entry, status=f"ok: {RANDOM_UNIFORM}", seconds=time.perf_counter() - started)
        heatmap = result.heatmap
        problems = []
        if not np.isfinite(heatmap).all():
            problems.append("heatmap has NaN or inf")
        elif float(heatmap.std()) == 0.0:
            problems.append("heatmap is constant")
        if result.overlay().shape != (height, width, 3):
            problems.append("overlay is not the image's size")
        if entry.task == "detection" and not any(box["explained"] for box in result.detections or []):
            problems.append("no detected box is marked as the one explained")
        status = "ok" if not problems else "failed: " + "; ".join(problems)
        return catalog_row(
            plugin,
            entry,
            method=",".join(result.maps),
            layer=result.layer,
            status=status,
            seconds=time.perf_counter() - started,
        )
    except Exception as error:
        text = " ".join(str(error).split())[:200]
        return catalog_row(
            plugin, entry, status=f"failed: {type(error).__name__}: {text}", seconds=time.perf_counter() - started
        )
