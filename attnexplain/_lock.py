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
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


@contextmanager
def output_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s lock while the block runs, or raise :class:`OutputInUse` at once."""
    path = Path(folder) / LOCK_NAME
    try:  # O_NOFOLLOW: a link planted there must not make us write elsewhere
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     0o666)
    except OSError as error:
        raise AttnExplainError(f"Cannot lock {folder}: {path} cannot be opened "
                               f"({error.strerror or error}).") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise AttnExplainError(f"Cannot lock {folder}: {path} is not a regular file.")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputInUse(f"{folder} is in use by another attnexplain run ({_holder(fd)}); wait "
                              f"for it to finish or choose another --out.") from None
        except OSError as error:
            raise AttnExplainError(f"Cannot lock {folder} ({error.strerror or error}).") from None
        note = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
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
    path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        yield
        return
    except OSError as error:
        raise AttnExplainError(f"Cannot check whether a run writes into {folder}: {path} cannot be "
                               f"opened ({error.strerror or error}).") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise AttnExplainError(f"Cannot lock {folder}: {path} is not a regular file.")
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputInUse(f"{folder} is being written by another attnexplain run "
                              f"({_holder(fd)}); wait for it to finish.") from None
        yield
    finally:
        os.close(fd)
