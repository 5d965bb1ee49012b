"""One writer per output folder: an advisory lock (``flock``) on a file inside it.

The kernel releases the lock when its holder exits, killed or not, so a dead run never leaves a lock
that blocks; the file only holds who took it (pid, host, start time) for the message the next run
shows.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import stat
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import AttnExplainError

LOCK_NAME = ".attnexplain.lock"


class OutputInUse(AttnExplainError):
    """Another run writes into the same output folder."""


def _holder(fd: int) -> str:
    try:
        note = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return f"pid {int(note['pid'])} on {note['host']}, started {note['started']}"
    # The note is in --out, anyone's to edit: a pid of Infinity or deep nesting leaves the holder unknown.
    except (OSError, ValueError, KeyError, TypeError, OverflowError, RecursionError):
        return "holder unknown"


@contextmanager
def output_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s lock while the block runs, or raise :class:`OutputInUse` at once."""
    # O_NOFOLLOW: a link planted there must not make us write elsewhere.
    fd = _open_lock(folder, os.O_RDWR | os.O_CREAT)
    try:
        _take(
            fd,
            folder,
            fcntl.LOCK_EX,
            "is in use by another attnexplain run",
            "wait for it to finish or choose another --out",
        )
        note = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(note).encode("utf-8"), 0)
        except OSError:
            pass  # a full disk: the lock holds without the note
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def reading_lock(folder: Path) -> Iterator[None]:
    """While the block runs, no run writes into ``folder`` (a shared lock, so several readers may
    hold it), or raise :class:`OutputInUse` at once. Needs no write access: a folder without a lock
    file has no run writing into it."""
    fd = _open_lock(folder, os.O_RDONLY)
    if fd is None:
        yield
        return
    try:
        _take(fd, folder, fcntl.LOCK_SH, "is being written by another attnexplain run", "wait for it to finish")
        yield
    finally:
        os.close(fd)


def _open_lock(folder: Path, flags: int) -> int | None:
    """The lock file's descriptor (None where it does not exist and ``flags`` do not create it)."""
    path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except FileNotFoundError:
        if flags & os.O_CREAT:
            raise AttnExplainError(f"Cannot lock {folder}: it does not exist.") from None
        return None
    except OSError as error:
        raise AttnExplainError(f"Cannot lock {folder}: {path} cannot be opened ({error.strerror or error}).") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise AttnExplainError(f"Cannot lock {folder}: {path} is not a regular file.")
    return fd


def _take(fd: int, folder: Path, kind: int, busy: str, advice: str) -> None:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OutputInUse(f"{folder} {busy} ({_holder(fd)}); {advice}.") from None
    except OSError as error:
        raise AttnExplainError(f"Cannot lock {folder} ({error.strerror or error}).") from None
