"""The cache of what each plugin offers: small JSON files in the user's cache folder, keyed by what
they were read from (the plugin's module file, the versions of its distribution and of everything that
distribution requires), so that listing models or resolving an architecture name need not import a
plugin's library (torchvision's, timm's registries take seconds to import).

It holds the files' reading and writing, read as if anyone could have written them, and the cached
builder names that :func:`plugins_for_arch` consults when a bare architecture name is loaded;
:mod:`attnexplain.catalog` keeps the catalogs' own entries here too.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from .plugins import ModelPlugin, PluginInfo, builder_order, plugin_infos

#: Where the cache files live (catalogs, builder names); default ``$XDG_CACHE_HOME/attnexplain`` or
#: ``~/.cache/attnexplain``.
CACHE_ENV = "ATTNEXPLAIN_CACHE_DIR"
#: Bumped when the cached file's layout changes, so that an older file is simply recomputed.
_CACHE_FORMAT = 1
#: A cache file is the user's, but still a file: one larger than this is not read (timm's ~1,400
#: entries take ~150 kB).
_CACHE_MAX_BYTES = 16 * 1024 * 1024


def cache_folder() -> Path:
    """Where cache files are kept: ``$ATTNEXPLAIN_CACHE_DIR``, else the XDG cache folder."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "attnexplain"


def cache_key(info: PluginInfo) -> str:
    """What a plugin's catalog is read from: its code, its distribution and every distribution that
    requires (torchvision, timm), by version. A new version of any of them, or an edited plugin
    module, gives another key."""
    from importlib import metadata

    module = sys.modules.get(type(info.plugin).__module__)
    source = getattr(module, "__file__", None)
    try:
        stat = os.stat(source) if source else None
    except OSError:
        stat = None
    parts: list[Any] = [
        _CACHE_FORMAT,
        info.name,
        type(info.plugin).__qualname__,
        source,
        stat and (stat.st_mtime_ns, stat.st_size),
        info.distribution,
        info.version,
    ]
    requires: list[str] = []
    if info.distribution is not None:
        try:
            requires = metadata.requires(info.distribution) or []
        except metadata.PackageNotFoundError:
            pass
    for requirement in sorted(requires):
        if "extra ==" in requirement.replace('"', "").replace("'", ""):
            continue  # an optional extra does not feed the catalog
        name = re.split(r"[\s\[<>=!~;(@]", requirement, maxsplit=1)[0]
        try:
            parts.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            parts.append((name, None))
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def cached_entries(path: Path, key: str) -> Any:
    """The ``entries`` of a cache file written for ``key``, or None where the file is absent, stale,
    too large or not JSON (read as if anyone could have written it: deep nesting included)."""
    try:
        with open(path, "rb") as file:
            data = file.read(_CACHE_MAX_BYTES + 1)
        if len(data) > _CACHE_MAX_BYTES:
            return None
        document = json.loads(data)
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(document, dict) or document.get("key") != key:
        return None
    return document.get("entries")


def write_cache(path: Path, key: str, items: Any) -> None:
    """Write ``items`` as the cache file for ``key``, atomically; a cache folder that cannot be written
    is no error."""
    from ._atomic import write_bytes_atomic

    try:
        write_bytes_atomic(path, json.dumps({"key": key, "entries": items}).encode())
    except OSError:
        pass  # a read-only home: every listing asks the plugins, as without a cache


#: Bounds on a cached list of builder names (timm's ~5,000 names take ~150 kB).
_MAX_BUILDER_NAMES = 200_000
_MAX_NAME_LENGTH = 300


def plugins_for_arch(arch: str) -> list[tuple[ModelPlugin, bool]]:
    """The plugins to ask for the builder of a bare architecture name, in builder order, each with
    whether its cached names hold the name (False: it is to be asked live).

    attnexplain's own plugins are always asked (their ``builders()`` import only the library that
    builds the model anyway). A plugin from another distribution is asked only when its builder
    names, cached as its catalog is, hold ``arch`` or ``PREFIX:arch``: asking timm's plugin imports
    all of timm (18 s of the 24 s it took to load a ResNet-18 state_dict), which a torchvision name
    must not cost. Plugins without a distribution (built in memory) have no version to key a cache
    by and are asked live.
    """
    infos = {id(info.plugin): info for info in plugin_infos() if info.plugin is not None}
    chosen = []
    for plugin in builder_order():
        info = infos[id(plugin)]
        if info.distribution in (None, "attnexplain"):
            chosen.append((plugin, False))
            continue
        try:
            names = _cached_builder_names(info)
        except Exception:  # a plugin that fails listing its names is asked as before, live
            chosen.append((plugin, False))
            continue
        if arch in names or (plugin.source_prefix and f"{plugin.source_prefix}:{arch}" in names):
            chosen.append((plugin, True))
    return chosen


def _cached_builder_names(info: PluginInfo) -> frozenset[str]:
    path = cache_folder() / "builders" / f"{hashlib.sha256(info.name.encode()).hexdigest()[:24]}.json"
    return _builder_names_for_key(info, cache_key(info), path)


@functools.lru_cache(maxsize=None)
def _builder_names_for_key(info: PluginInfo, key: str, path: Path) -> frozenset[str]:
    names = _read_builder_names(path, key)
    if names is None:
        names = [name for name in info.plugin.builders() if isinstance(name, str)]
        if len(names) <= _MAX_BUILDER_NAMES and all(_plain_name(name) for name in names):
            write_cache(path, key, names)
    return frozenset(names)


def _plain_name(name: Any) -> bool:
    return (
        isinstance(name, str)
        and 0 < len(name) <= _MAX_NAME_LENGTH
        and not any(ord(character) < 32 for character in name)
    )


def _read_builder_names(path: Path, key: str) -> list[str] | None:
    """The cached names, or None where the file is absent, stale or not what this writes (it is
    read as if anyone could have written it: a wrong name only makes a plugin be asked for nothing)."""
    names = cached_entries(path, key)
    if not isinstance(names, list) or len(names) > _MAX_BUILDER_NAMES or not all(map(_plain_name, names)):
        return None
    return names
