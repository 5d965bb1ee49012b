"""Explaining many images: a streaming pipeline that decodes, explains in batches and writes as it goes.

Decoding + preprocessing and encoding + writing run on worker threads while the model runs batches
through :func:`attnexplain.engine.compute_maps`: on the calling thread, or, on a CPU, two at once on
replicas of the model (:mod:`attnexplain.replicas`). At most a bounded number of images is in flight
at any time, so memory does not grow with the number of images.

Never losing work: every file is written atomically (per-image folders as a whole), ``results.jsonl``
gets one line per image, flushed as soon as that image's files are in place (by the thread that wrote
them), and ``report.json``, ``summary.csv`` and ``index.html`` are refreshed periodically and at the end
(also on Ctrl-C, and on SIGTERM / SIGHUP under the CLI). One run at a time writes into an output folder
(a lock, see :mod:`attnexplain._lock`); staging files a killed run left there are removed by the next.
``resume=True`` skips each image whose path already has an ``ok`` line with the same key (sha256 of
the file's bytes + a fingerprint of the model and options) and whose outputs exist where this run puts
them: two files with equal bytes are two images, and an earlier line never points outside ``out``.

The stages are shared with the Ray engine (:mod:`attnexplain.ray_engine`): the inputs are collected
and decoded by :mod:`attnexplain.inputs` (checked with ``os.stat`` first, never taken from inside
``out``), explained and written by :mod:`attnexplain.batch_stages`, and recorded by
:mod:`attnexplain.batch_ledger`. This module is the local engine: its threads, its replicas of the
model and the checks before a run.
"""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .batch_ledger import BatchRun, start_run
from .batch_stages import BatchSettings, Stages, explain_decoded, plan_batch, write_image
from .errors import AttnExplainError
from .formats import RESULTS_JSONL
from .inputs import Decoded, Inputs, NoImages, collect_inputs, decoded_chunks, read_image
from .model_spec import ModelSpec
from .records import read_results


def run_batch(
    loaded,
    model_spec: ModelSpec | dict[str, Any],
    input_specs: Sequence[str],
    out: Path,
    settings: BatchSettings,
    *,
    resume: bool = False,
    shard: tuple[int, int] | None = None,
    quiet: bool = False,
    device: str | None = None,
    refresh_every: int = 20,
    on_batch: Callable[[int], None] | None = None,
    cluster=None,
    overwrite: bool = False,
) -> BatchRun:
    """Explain every image ``input_specs`` names into ``out``; see the module's docstring.

    An ``out`` that holds an earlier run's explained images is refused (:class:`EarlierRun`) unless
    ``resume`` keeps them or ``overwrite`` replaces its records with this run's.

    ``cluster``: a :class:`attnexplain.ray_engine.RayCluster` to explain on Ray actors (the model
    loaded in each from ``model_spec``) instead of in this process; the outputs are the same.

    Raises :class:`attnexplain.inputs.NoImages` when the inputs name no image at all, and
    :class:`attnexplain._lock.OutputInUse` when another run writes into ``out``."""
    from ._atomic import remove_stale_staging
    from ._lock import output_lock
    from .caption_batch import captioner_stages

    started = time.perf_counter()
    model_spec = ModelSpec.of(model_spec)  # the dict of its fields, as before there was a ModelSpec
    stages = captioner_stages(loaded, settings, cluster) or Stages(  # a captioner's run is its own
        plan=plan_batch, explain=explain_decoded, write=write_image
    )
    if cluster is not None and (settings.parallel_batches or 1) > 1:
        raise AttnExplainError(
            "parallel_batches is for the local engine; on Ray, the cluster's "
            "workers (model actors) explain batches at once."
        )
    out = Path(out)
    inputs = collect_inputs(input_specs, exclude=out)
    if not inputs.images:
        found = [reason for _, reason in inputs.missing] + [f"{path} {why}" for path, why in inputs.skipped]
        detail = f": {found[0]}" + (f" (and {len(found) - 1} more)" if len(found) > 1 else "") if found else "."
        raise NoImages(f"No image found in {' '.join(map(str, input_specs))}{detail}")
    with ExitStack() as engine:
        if cluster is not None:
            from .ray_engine import ray_session, run_on_ray

            # Joined (or started) and checked before --out is touched: a refused run leaves nothing.
            engine.enter_context(ray_session(cluster))
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise AttnExplainError(f"Cannot create the output folder {out}: {error.strerror or error}.") from None
        with output_lock(out):
            _refuse_earlier_run(out, resume, overwrite)  # under the lock: no run adds records meanwhile
            remove_stale_staging(out)  # what a killed run left: ours, since we hold the lock
            if cluster is not None:
                return run_on_ray(
                    model_spec,
                    input_specs,
                    inputs,
                    out,
                    settings,
                    cluster,
                    resume,
                    shard,
                    quiet,
                    refresh_every,
                    on_batch,
                    started,
                    loaded,
                )
            return _run_locked(
                loaded,
                model_spec,
                input_specs,
                inputs,
                out,
                settings,
                resume,
                shard,
                quiet,
                device,
                refresh_every,
                on_batch,
                started,
                stages,
            )


class EarlierRun(AttnExplainError):
    """``--out`` holds an earlier run's explained images, and neither ``--resume`` nor
    ``--overwrite`` says what becomes of them."""


def check_earlier_run(out: Path, resume: bool, overwrite: bool) -> None:
    """What :func:`run_batch` refuses (:class:`EarlierRun`) about ``out``'s earlier records, asked
    before the run starts (the CLI asks before the model loads). A folder another run is writing is
    left to the run's own lock to refuse, naming that run."""
    from ._lock import OutputInUse, reading_lock

    with ExitStack() as held:
        if os.path.isdir(out):
            try:
                held.enter_context(reading_lock(Path(out)))
            except OutputInUse:
                return
        _refuse_earlier_run(Path(out), resume, overwrite)


def _refuse_earlier_run(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuses a run that would replace the records of an earlier run in ``out`` without being told
    to: its results.jsonl is rewritten with what the run keeps, and images no longer in it vanish from
    the gallery and the summary. ``resume`` keeps them (for this run's inputs); ``overwrite`` replaces
    them (their folders stay until an image of the same name is written again)."""
    if resume and overwrite:
        raise AttnExplainError(
            "--resume keeps the earlier run's records in --out and --overwrite replaces them: give one of them."
        )
    if resume or overwrite:
        return
    explained = sum(record.get("status") == "ok" for record in read_results(out / RESULTS_JSONL))
    if explained:
        raise EarlierRun(
            f"{out} holds an earlier run's results ({explained} explained image(s) in "
            f"{RESULTS_JSONL}): add --resume to keep them and explain only what is new "
            f"or changed, or --overwrite to replace them, or choose another --out."
        )


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or ``taskset``'s limit),
    not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def default_workers(device_type: str, cores: int | None = None) -> int:
    """Decoding threads (and as many writing threads) for a run whose model runs on ``device_type``.

    On the CPU the model's own threads take every core, and the workers only fill its gaps (on 2
    cores, 1 to 3 workers gave the same throughput): 2, and a quarter of the cores on bigger
    machines. On a GPU the cores are free for decoding and writing, and an image costs them far
    more than the device's time for it (a 1.2 MP photo ~40 ms of CPU against a few ms of GPU): every
    core but the model's thread's, half decoding and half writing."""
    cores = available_cores() if cores is None else cores
    if device_type == "cpu":
        return max(2, cores // 4)
    return max(2, (cores - 1) // 2)


def _run_locked(
    loaded,
    model_spec,
    input_specs,
    inputs: Inputs,
    out: Path,
    settings: BatchSettings,
    resume: bool,
    shard,
    quiet: bool,
    device,
    refresh_every: int,
    on_batch,
    started: float,
    stages: Stages,
) -> BatchRun:
    import torch

    from .replicas import ModelReplicas, default_parallel_batches
    from .running import model_device

    run = start_run(loaded, model_spec, input_specs, inputs, out, settings, resume, shard, quiet, started, stages)
    selected, missing, key_prefix, ledger = run.selected, run.missing, run.key_prefix, run.ledger
    preprocessing, summary = run.plan.preprocessing, ledger.summary
    finish, refresh = ledger.finish, ledger.refresh
    run_device = torch.device(device) if device else model_device(loaded.module)
    workers = settings.workers if settings.workers is not None else default_workers(run_device.type)
    workers = max(1, workers)
    parallel = settings.parallel_batches or default_parallel_batches(run_device.type)
    readers = ThreadPoolExecutor(workers, thread_name_prefix="attnexplain-read")
    writers = ThreadPoolExecutor(workers, thread_name_prefix="attnexplain-write")
    # One thread refreshes the reports: their cost grows with the images done, and the model's
    # thread must not wait for it.
    reporter = ThreadPoolExecutor(1, thread_name_prefix="attnexplain-report")
    refreshing: Future | None = None
    pending_reads: deque[Future] = deque()
    pending_writes: deque[Future] = deque()
    explaining: deque[tuple[list[Decoded], Future]] = deque()  # batches handed to the model, in order
    # Bounded: memory does not grow with the number of images. Up to two batches are decoded
    # ahead (the next one is ready when the model finishes one) and a batch's writes go on while
    # the model runs the next.
    max_reads = settings.images_per_batch * 2 + workers
    max_writes = settings.images_per_batch + 2 * workers
    batches = 0

    def write(decoded: Decoded, result: dict[str, Any], model_s: float) -> dict[str, Any]:
        # On a writer thread: the image's line is in results.jsonl as soon as its folder is in place.
        return finish(stages.write(out, decoded, result, settings, model_s))

    def wait_for_writes(limit: int) -> None:
        while pending_writes and (len(pending_writes) > limit or pending_writes[0].done()):
            pending_writes.popleft().result()  # raises what a writer could not handle

    def hand_to_writers(chunk: list[Decoded], explained: Future) -> None:
        results, model_s = explained.result()  # raises what the model could not handle
        for decoded, result in zip(chunk, results):
            decoded.tensor = None
            wait_for_writes(max_writes)
            pending_writes.append(writers.submit(write, decoded, result, model_s))

    def oldest_explained() -> None:
        nonlocal batches, refreshing
        hand_to_writers(*explaining.popleft())
        # Known once the first batch has run: 1 where the model or the memory allows no more.
        ledger.meta["parallel_batches"] = replicas.count
        batches += 1
        if on_batch is not None:
            on_batch(batches)
        # What has finished so far; skipped while the last refresh still runs (the next is due soon).
        if batches % refresh_every == 0 and (refreshing is None or refreshing.done()):
            if refreshing is not None:
                refreshing.result()  # raises what the last one could not handle (a full disk it can)
            refreshing = reporter.submit(refresh, False)

    def run_model(chunk: list[Decoded]) -> None:
        explaining.append((chunk, replicas.submit(stages.explain, chunk, run.plan, settings, run_device)))
        while len(explaining) >= replicas.count:  # every replica busy: wait for the oldest batch
            oldest_explained()

    def read_ahead() -> Iterator[Decoded]:
        """The run's images decoded on the reader threads, in order, at most ``max_reads`` ahead."""
        todo = iter(selected)
        exhausted = False
        while True:
            while not exhausted and len(pending_reads) < max_reads:
                item = next(todo, None)
                if item is None:
                    exhausted = True
                    break
                pending_reads.append(
                    readers.submit(
                        read_image,
                        item,
                        key_prefix,
                        run.done_keys,
                        preprocessing,
                        settings.max_pixels,
                        settings.overlay_size,
                    )
                )
            if not pending_reads:
                return
            yield pending_reads.popleft().result()

    replicas: ModelReplicas | None = None
    try:
        replicas = ModelReplicas(loaded, parallel)
        for spec, reason in missing:
            finish({"image": spec, "path": spec, "status": "failed", "reason": reason, "key": None})
        for chunk in decoded_chunks(read_ahead(), settings.images_per_batch, finish, ledger.done_earlier):
            run_model(chunk)
        while explaining:
            oldest_explained()
        wait_for_writes(0)
    except KeyboardInterrupt:  # Ctrl-C, and SIGTERM / SIGHUP under the CLI (see _signals)
        summary.interrupted = True
        raise
    finally:
        for future in pending_reads:
            future.cancel()
        readers.shutdown(wait=True, cancel_futures=True)
        try:
            if replicas is not None:
                replicas.close()  # replicas still explaining stop at their next layer
            for chunk, explained in explaining:  # batches the model finished are written all the same
                if explained.done() and not explained.cancelled() and explained.exception() is None:
                    hand_to_writers(chunk, explained)
        finally:
            writers.shutdown(wait=True)  # images already explained are written and recorded
            reporter.shutdown(wait=True)  # before the final refresh, which must be the last
            ledger.close()
    return summary
