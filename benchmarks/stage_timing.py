"""CPU time of named stages of a run: a light wrapper put in place of each stage's function.

The pipeline looks its functions up by module attribute when it runs, so a wrapper set there sees
every call. Light on purpose: a profiler's per-call overhead inflates the Python-heavy stages (a
detail page) several times.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from typing import Callable, Sequence


class StageClock:
    """``stages``: (label, module, attribute) triples, ``Class.method`` allowed; ``contexts``: the
    attributes that are context managers (timed on entering and on leaving, not in between).
    ``clock``: ``time.thread_time`` (the calling thread's CPU) or ``time.process_time``."""

    def __init__(
        self, stages: Sequence[tuple[str, str, str]], clock: Callable[[], float], contexts: Sequence[str] = ()
    ) -> None:
        self.spent = {label: 0.0 for label, _, _ in stages}
        self.clock = clock
        self._lock = threading.Lock()
        for label, module_name, attribute in stages:
            owner = importlib.import_module(module_name)
            if "." in attribute:
                class_name, attribute = attribute.split(".")
                owner = getattr(owner, class_name)
            wrap = self._timed_context if attribute in contexts else self._timed
            setattr(owner, attribute, wrap(label, getattr(owner, attribute)))

    def reset(self) -> None:
        with self._lock:
            self.spent = dict.fromkeys(self.spent, 0.0)

    def _add(self, label: str, seconds: float) -> None:
        with self._lock:
            self.spent[label] += seconds

    def _timed(self, label: str, function):
        def wrapper(*args, **kwargs):
            began = self.clock()
            try:
                return function(*args, **kwargs)
            finally:
                self._add(label, self.clock() - began)

        return wrapper

    def _timed_context(self, label: str, function):
        @contextlib.contextmanager
        def wrapper(*args, **kwargs):
            began = self.clock()
            with function(*args, **kwargs) as value:
                self._add(label, self.clock() - began)
                yield value
                began = self.clock()
            self._add(label, self.clock() - began)

        return wrapper
