"""SIGTERM and SIGHUP handled like Ctrl-C, so that a stopped run still writes its partial report."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


class Stopped(KeyboardInterrupt):
    """The process was asked to stop by ``signum``; like Ctrl-C, with the shell's exit code."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # 143 for SIGTERM, 129 for SIGHUP, as a shell reports them


def stop_reason(error: BaseException) -> str:
    """Why a run stopped early, as a partial report says it: the signal's name, Ctrl-C, or the
    error's first 300 characters on one line."""
    if isinstance(error, KeyboardInterrupt):
        return str(error) if isinstance(error, Stopped) else "Ctrl-C"
    return f"an error ({' '.join(str(error).split())[:300] or type(error).__name__})"


@contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """While the block runs, the first SIGTERM or SIGHUP raises :class:`Stopped` on the main thread;
    later ones are ignored, so that the cleanup it starts (the partial report) can finish. A signal
    already ignored (``nohup``) stays ignored; elsewhere than on the main thread nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = False

    def stop(signum: int, frame) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise Stopped(signum)

    previous = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is signal.SIG_DFL:
            previous[signum] = signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
