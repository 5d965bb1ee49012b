"""Progress on stderr for the commands that take minutes (``batch``, ``evaluate``): a Rich bar with
the rate and ETA on a terminal, a plain line every few seconds otherwise (a log, CI), nothing when
quiet."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

#: Seconds between two plain progress lines off a terminal.
LINE_EVERY_S = 5.0


class Progress:
    """Counts images done out of ``total``; ``label`` says what is done to them, :meth:`stage` what
    is being done now (shown beside the count)."""

    def __init__(
        self, total: int, quiet: bool, stream=None, already: int = 0, label: str = "explaining", unit: str = "img"
    ) -> None:
        # ``already``: images done by an earlier run (--resume); they do not count in the rate.
        self.total, self.quiet, self.done, self.already = total, quiet, already, already
        self.stream = stream or sys.stderr
        self.started = self.last = time.perf_counter()
        self.current = ""
        self.unit = unit
        self.bar = None
        if not quiet and self.stream.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TaskProgressColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import (
                Progress as Bar,
            )

            self.bar = Bar(
                TextColumn(label),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[stage]}"),
                console=Console(file=self.stream),
                transient=False,
            )
            self.bar.start()
            self.task = self.bar.add_task(label, total=total, completed=already, rate="", stage="")

    def rate(self) -> float:
        """Images per second done by this run."""
        return (self.done - self.already) / max(time.perf_counter() - self.started, 1e-9)

    def advance(self, count: int = 1, earlier: bool = False) -> None:
        """``earlier``: done by an earlier run (--resume), not counted in the rate."""
        self.done += count
        self.already += count if earlier else 0
        if self.bar is not None:
            self.bar.update(self.task, advance=count, rate=f"{self.rate():.1f} {self.unit}/s")
        else:
            self._line(force=self.done == self.total)

    def stage(self, name: str) -> None:
        """What the run does now (``maps``, ``perturbations``, …): a step of an image or batch that
        can take long, shown so that a slow run is seen to move."""
        self.current = name
        if self.bar is not None:
            self.bar.update(self.task, stage=name)
        else:
            self._line(force=False)

    def _line(self, force: bool) -> None:
        now = time.perf_counter()
        if self.quiet or not (force or now - self.last >= LINE_EVERY_S):
            return
        self.last = now
        rate = self.rate()
        remaining = f"{(self.total - self.done) / rate:.0f}s" if rate > 0 else "unknown"
        stage = f", {self.current}" if self.current and self.done < self.total else ""
        print(
            f"[attnexplain] {self.done}/{self.total} images, {rate:.2f} img/s, ETA {remaining}{stage}",
            file=self.stream,
            flush=True,
        )

    def update(self, done: int, total: int) -> None:
        """Move to ``done`` out of ``total`` (a count whose total grows as work is found)."""
        self.total = total
        if self.bar is not None:
            self.bar.update(self.task, total=total)
        self.advance(done - self.done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@contextmanager
def forwards_progress(label: str, quiet: bool, stream=None) -> Iterator[Callable[[int, int], None] | None]:
    """For ``run``: a bar of the images the slow methods score (``explain(progress=...)``), on a
    terminal only; None (nothing shown) when ``quiet`` or when ``stream`` (stderr) is piped, where a
    single image's progress would only clutter a log. The bar starts with the first count."""
    stream = stream or sys.stderr
    if quiet or not stream.isatty():
        yield None
        return
    shown: list[Progress] = []

    def report(done: int, total: int) -> None:
        if not shown:
            shown.append(Progress(total, quiet=False, stream=stream, label=label, unit="forwards"))
        shown[0].update(done, total)

    try:
        yield report
    finally:
        if shown:
            shown[0].close()
