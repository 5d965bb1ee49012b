"""Write files and folders so that a reader never sees half of them.

Staging names never contain the final name: a valid file name of 255 bytes must still work, so a
staging file or folder is ``.attnexplain-XXXXXXXX.tmp`` (``.old`` for a folder being replaced) beside
its final place. :func:`is_staging_name` recognises exactly those names, so that a run holding its
output folder's lock can remove what a killed run left behind, and nothing else.

``mkstemp``/``mkdtemp`` create private entries (0600/0700); they are set to what the user's umask
gives an ordinary file or folder, so that every output has the same permissions.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

STAGING_PREFIX = ".attnexplain-"
_STAGING_NAME = re.compile(r"\.attnexplain-[a-z0-9_]{8}\.(tmp|old)")

_umask_lock = threading.Lock()
_umask: int | None = None


def current_umask() -> int:
    """The process's umask, read once. Linux shows it in /proc without changing it; elsewhere it
    is set and restored under a lock (the only way to read it)."""
    global _umask
    with _umask_lock:
        if _umask is None:
            try:
                with open("/proc/self/status", encoding="ascii") as status:
                    line = next(line for line in status if line.startswith("Umask:"))
                _umask = int(line.split()[1], 8)
            except (OSError, StopIteration, ValueError, IndexError):
                _umask = os.umask(0o022)
                os.umask(_umask)
        return _umask


def is_staging_name(name: str) -> bool:
    """Whether ``name`` is one this module gives a staging file or folder."""
    return _STAGING_NAME.fullmatch(name) is not None


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it over ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=STAGING_PREFIX, suffix=".tmp", dir=final.parent)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        os.close(fd)
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(final: Path, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces ``final`` as a whole.

    The staging folder sits beside ``final`` (same filesystem, so the rename is atomic). An existing
    ``final`` is moved aside first and removed only once the new one is in place.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, suffix=".tmp", dir=final.parent))
    try:
        os.chmod(staging, 0o777 & ~current_umask())
        yield staging
        old = None
        if os.path.lexists(final):
            old = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, suffix=".old", dir=final.parent))
            os.replace(final, old / "previous")
        os.replace(staging, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def remove_stale_staging(folder: Path) -> list[Path]:
    """Remove the staging files and folders a killed writer left anywhere under ``folder`` (symbolic
    links are neither followed nor removed). Only for a folder whose lock the caller holds: another
    writer's staging entries are not stale."""
    removed = []
    for parent, folders, files in os.walk(folder):
        for name in [*folders, *files]:
            path = Path(parent) / name
            if not is_staging_name(name) or path.is_symlink():
                continue
            if name in folders:
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    path.unlink(missing_ok=True)
                except OSError:
                    continue  # left for a later run; it is never read
            removed.append(path)
        folders[:] = [name for name in folders if not is_staging_name(name)]
    return removed
