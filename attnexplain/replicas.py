"""Explaining several batches at once, each on its own replica of the model.

On a CPU, one batch at a time with torch's threads spread over every core keeps them waiting on one
another at the end of each operation; two batches at once, each on its own thread with half of the
threads, explained 1.09–1.28× the images per second on the 2-core VM of ``benchmarks/RESULTS.md``
(ResNet-50 and the 0.6 MB sample model alike). Each batch needs a model of its own: what a pass does
to a model — the capture hooks, a replaced ``forward``, the parameters' gradient flags — holds for
the whole model while the pass runs. A replica shares the original's parameters (new ``Parameter``
objects over the same memory, each with its own flag) and copies everything else (the modules,
buffers, and the weights of quantized layers, which are not parameters).

A model is explained one batch at a time where a replica could not be its own: TorchScript
anywhere in it (its modules take no hooks and copy their weights), a module that ``copy.deepcopy``
refuses, and functions with a closure kept on a module or as a hook (``self.block = lambda x:
self.conv(x)``): deepcopy shares functions, so the replica's would run the original's layers.

A second batch holds its own activations: Score-CAM on ResNet-50 at 16 images of 224² takes
several GB, and two at once were killed for memory on a 24 GB machine. So the first batch runs
alone and measures what it took (the rise of the process's peak resident memory, which other
threads' allocations only make larger); the others start only if that many batches at once — one
per replica — would take at most half the memory still available (the machine's, or a container's
limit's), else the run goes on one batch at a time.

torch's thread count is a per-thread setting whose last value is also the default of every thread
that first uses torch afterwards: a thread that starts using torch while replicas run gets a
replica's share for its whole life (the pipeline's own threads start before the replicas do).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import queue
import sys
import threading
import types
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn


def _peak_resident_bytes() -> int | None:
    """The process's peak resident memory so far; None where the system does not keep it."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


#: Where Linux shows this process's control group (its container's, inside one).
CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_headroom() -> int | None:
    """What a Linux container's memory limit (cgroup v2, else v1) still allows; None without one."""
    for limit_file, usage_file in (
        ("memory.max", "memory.current"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),
    ):
        try:
            limit = (CGROUP_ROOT / limit_file).read_text().strip()
            usage = int((CGROUP_ROOT / usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max", or v1's huge number: no limit
            return max(0, int(limit) - usage)
    return None


def available_memory() -> int | None:
    """Bytes the process can still take without swapping or being killed: the machine's available
    memory, or less where a container's limit says so; None where the system does not say."""
    import psutil

    candidates = [psutil.virtual_memory().available, _cgroup_headroom()]
    known = [value for value in candidates if value is not None]
    return min(known) if known else None


def default_parallel_batches(device_type: str, threads: int | None = None) -> int:
    """Batches explained at once when the run does not say: 2 with the model on a CPU where torch
    may use 2 threads or more (``threads``, by default torch's own count: the cores this process
    may use, or what ``OMP_NUM_THREADS`` / ``torch.set_num_threads`` allow; measured on 2 cores
    only), else 1; 1 on a GPU, whose kernels run one after another anyway."""
    threads = torch.get_num_threads() if threads is None else threads
    return 2 if device_type == "cpu" and threads >= 2 else 1


#: The hooks that run with the model (those of ``state_dict`` do not).
_RUN_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _holds_closures(module: nn.Module) -> bool:
    """Whether a module of ``module`` keeps, as an attribute of its own or as a hook, a function with
    a closure (or a ``functools.partial`` of one), which a deepcopy would share with the original."""
    for submodule in module.modules():
        kept = list(vars(submodule).values())
        for name in _RUN_HOOKS:
            kept.extend(getattr(submodule, name, {}).values())
        for value in kept:
            while isinstance(value, functools.partial):
                value = value.func
            if isinstance(value, types.FunctionType) and value.__closure__:
                return True
    return False


def replicate(module: nn.Module) -> nn.Module | None:
    """A copy of ``module`` whose parameters share the original's memory; None where a copy could
    not be its own (see the module's docstring)."""
    if any(isinstance(submodule, torch.jit.ScriptModule) for submodule in module.modules()) or _holds_closures(module):
        return None
    # deepcopy takes what ``memo`` already holds for an object: the same Parameter wherever the
    # model ties one (shared embeddings stay shared), over the original's tensor.
    memo: dict[int, Any] = {
        id(parameter): nn.Parameter(parameter.detach(), parameter.requires_grad)
        for parameter in module.parameters()
        if type(parameter) is nn.Parameter
    }
    try:
        return copy.deepcopy(module, memo)
    except Exception:  # noqa: BLE001 - a model we cannot copy is explained one batch at a time
        return None


class _Stopped(BaseException):
    """Raised inside a replica's forward once the run stops: a BaseException, so that no handler
    for the model's own errors (``except Exception``) turns it into a failed image."""


class ModelReplicas:
    """Runs functions of a loaded model on ``count`` threads, each with its own replica (the first
    is ``loaded`` itself), torch's CPU threads divided between them. With a count of 1 (or a model
    that cannot be replicated), :meth:`submit` runs the function on the calling thread, as if there
    were no pool.

    :attr:`count` is how many functions may run at once: 1 until the first one has finished and
    shown that the others fit in memory (see the module's docstring), then the replicas' number
    (or 1 for good). Callers keep at most :attr:`count` submitted functions unfinished.

    :meth:`close` (or leaving the ``with`` block) stops replicas that still run a batch at their next
    layer (an interrupted run does not wait for them) and restores torch's thread count.
    """

    def __init__(self, loaded: Any, count: int) -> None:
        self.loaded = loaded
        models = [loaded]
        for _ in range(count - 1):
            module = replicate(loaded.module)
            if module is None:
                models = [loaded]
                break
            models.append(dataclasses.replace(loaded, module=module))
        self.count = self._wanted = len(models)
        self._measured = False  # whether the first function has been given its measurement
        self._stop = threading.Event()
        self._hooks = ExitStack()
        self._pool: ThreadPoolExecutor | None = None
        self._threads_before = torch.get_num_threads()
        if self.count == 1:
            return
        try:
            for model in models:
                for module in model.module.modules():
                    self._hooks.callback(module.register_forward_pre_hook(self._check_stop).remove)
        except Exception:  # noqa: BLE001 - a module that takes no hooks: one batch at a time
            self._hooks.close()
            self.count = 1
            return
        # torch's threads divided between the replicas (3 threads: 2 and 1), at least one each.
        shares = [
            max(1, self._threads_before // self._wanted + (index < self._threads_before % self._wanted))
            for index in range(self._wanted)
        ]
        free: queue.SimpleQueue[tuple[Any, int]] = queue.SimpleQueue()
        for model, threads in zip(models, shares):
            free.put((model, threads))
        self._mine = threading.local()

        def start_thread() -> None:  # each pool thread takes one replica for its whole life
            self._mine.model, self._mine.threads = free.get_nowait()
            # The first call sets this thread up from the process's default, which the other
            # replica's thread may be changing: done before any count of this thread's own is set.
            torch.get_num_threads()

        self._pool = ThreadPoolExecutor(self._wanted, thread_name_prefix="attnexplain-model", initializer=start_thread)
        self.count = 1  # until the first batch has shown that the others fit in memory

    def _check_stop(self, module: nn.Module, args: Any) -> None:
        if self._stop.is_set():
            raise _Stopped()

    def submit(self, function: Callable[..., Any], *args: Any) -> Future:
        """``function(model, *args)`` on a free replica; its future (already done with one replica)."""
        if self._pool is None:
            done: Future = Future()
            done.set_result(function(self.loaded, *args))
            return done
        first, self._measured = not self._measured, True
        return self._pool.submit(self._measuring if first else self._running, function, args)

    def _running(self, function: Callable[..., Any], args: tuple) -> Any:
        # Alone (the first function, or every one where only one fits), a replica takes all of
        # torch's threads: a share of them would leave cores idle.
        torch.set_num_threads(self._mine.threads if self.count > 1 else self._threads_before)
        return function(self._mine.model, *args)

    def _measuring(self, function: Callable[..., Any], args: tuple) -> Any:
        """The first function, and what it took: the others start if one per replica at once
        would fit in half of the memory still available."""
        import psutil

        before = psutil.Process().memory_info().rss
        result = self._running(function, args)
        peak, available = _peak_resident_bytes(), available_memory()
        if peak is not None and available is not None and max(0, peak - before) * self._wanted <= available // 2:
            self.count = self._wanted
        return result

    def close(self) -> None:
        """Stop the replicas (a batch still running stops at its next layer), wait for their threads
        and restore torch's thread count."""
        self._stop.set()
        try:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
        finally:  # even when a second Ctrl-C ends the wait: the user's model must not keep the checks
            self._hooks.close()
            if self._pool is not None:
                torch.set_num_threads(self._threads_before)

    def __enter__(self) -> "ModelReplicas":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
