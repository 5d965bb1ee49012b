"""Explaining many images on a Ray cluster: the same stages as :mod:`attnexplain.batch`, spread by Ray Data.

Per image, Ray tasks read and decode (:func:`attnexplain.inputs.read_image`); an actor pool of
``workers`` actors, each holding the model loaded once, explains batches with the same
:func:`attnexplain.batch_stages.explain_decoded` and writes each image's folder itself
(:func:`attnexplain.batch_stages.write_image`) into ``out``, which the workers must see at the same
path (a local folder on one machine, a shared mount on a cluster). Only the records (a few kilobytes
per image) come back to the driver, which keeps ``results.jsonl``, the reports and the progress
output through the same :class:`attnexplain.batch_ledger.RunLedger` as a local run, and holds the
``--out`` lock (:func:`attnexplain.batch.run_batch` takes it before it calls :func:`run_on_ray`).

Ray restarts an actor that dies and retries its batch; a retried batch rewrites whole folders
atomically and its records reach the driver once, so no image is lost or recorded twice.

Ray is an optional extra (``pip install 'attnexplain[ray]'``): nothing here imports it until a run
starts, and ``import attnexplain`` never imports this module.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .batch_ledger import BatchRun, start_run
from .batch_stages import BatchSettings, explain_decoded, write_image
from .errors import AttnExplainError
from .inputs import Decoded, InputImage, Inputs, failed_record, read_image
from .model_spec import ModelSpec

#: What ``--engine ray`` says when Ray is not installed.
INSTALL_HINT = "--engine ray needs Ray, an optional extra: pip install 'attnexplain[ray]'"
#: CPUs Ray reserves for one image's read-and-decode task: light next to the model's batch.
DECODE_CPUS = 0.5


class RayMissing(AttnExplainError):
    """``--engine ray`` without Ray installed."""


@dataclass(frozen=True)
class RayCluster:
    """Where and how wide a Ray run goes.

    ``address``: None starts a local Ray instance with this machine's cores (and stops it at the
    end); ``"auto"`` joins the cluster this machine belongs to; ``"ray://HOST:PORT"`` a remote one.
    ``workers``: actors, each holding the model once; ``num_gpus_per_worker``: GPUs each reserves
    (then it runs the model on CUDA). Each actor also reserves one CPU."""

    address: str | None = None
    workers: int = 1
    num_gpus_per_worker: float = 0.0


def require_ray():
    """The ``ray`` module, or :class:`RayMissing` saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - the extra ray[data], not only ray's core
    except ImportError:
        raise RayMissing(INSTALL_HINT + ".") from None
    return ray


def _connect(ray, cluster: RayCluster) -> bool:
    """Join or start Ray; True when this run started it (and so stops it)."""
    if ray.is_initialized():  # a notebook's or a test's instance: used as it is
        return False
    # Our progress output is the one the user reads: no dashboard, no INFO lines, no workers' prints.
    quiet = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
    try:
        if cluster.address is None:
            ray.init(num_cpus=os.cpu_count() or 1, **quiet)
        else:
            ray.init(address=cluster.address, **{k: v for k, v in quiet.items() if k != "include_dashboard"})
    except Exception as error:  # noqa: BLE001 - Ray raises several kinds for an unreachable cluster
        where = cluster.address or "a local Ray instance"
        raise AttnExplainError(f"Cannot connect to {where}: {' '.join(str(error).split())}") from None
    return True


def _local_torch_threads(cluster: RayCluster) -> int | None:
    """Torch threads per CPU actor when the Ray instance is our own, on this machine: its cores shared
    by the actors (decoding tasks are light next to the model). None on a cluster: Ray's own
    thread setting, one per CPU it gave the actor, since other work may share those machines."""
    if cluster.address is not None or cluster.num_gpus_per_worker:
        return None
    return max(1, (os.cpu_count() or 1) // cluster.workers)


def _check_room(ray, cluster: RayCluster) -> None:
    """Refuse a pool the cluster cannot hold: Ray would wait for it forever."""
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    if cluster.workers + DECODE_CPUS > cpus:
        raise AttnExplainError(
            f"--workers {cluster.workers} asks for {cluster.workers} CPU(s), one per model actor, and "
            f"the decoding tasks need a share of one more, but the Ray cluster has {cpus:g} CPU(s): "
            f"use --workers {max(1, math.floor(cpus - DECODE_CPUS))} or fewer."
        )
    wanted = cluster.workers * cluster.num_gpus_per_worker
    if wanted > gpus:
        raise AttnExplainError(
            f"--workers {cluster.workers} with --num-gpus-per-worker "
            f"{cluster.num_gpus_per_worker:g} asks for {wanted:g} GPU(s), but the "
            f"Ray cluster has {gpus:g}."
        )


def _quiet_ray_data(ray) -> None:
    """Our progress bar is the only one: Ray Data's own bars and per-run log lines stay off."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _shared_path(value: Any) -> Any:
    """A path the driver names, made absolute: the workers' current folder is not the driver's."""
    if isinstance(value, (str, Path)) and os.path.exists(value):
        return os.path.abspath(value)
    return value


def _decode_row(
    row: dict[str, Any], key_prefix: str, preprocessing, max_pixels: int, overlay_size: int | None
) -> dict[str, Any]:
    """A Ray task: read and decode one image with batch's own reader. ``row["earlier"]``: the key
    of the image's record from an earlier run that still stands (--resume), or ""."""
    item = InputImage(Path(row["path"]), row["relative"])
    earlier = {item.relative: row["earlier"]} if row["earlier"] else {}
    decoded = read_image(item, key_prefix, earlier, preprocessing, max_pixels, overlay_size)
    if decoded.tensor is not None:
        decoded.tensor = decoded.tensor.numpy()  # pickles without torch's shared-memory handles
    # Rows differ in what they hold (a failed decode has no pixels), and Arrow wants one schema per
    # column: each travels as our own pickle, made and read only by this module's tasks and actors.
    return {"image": row["relative"], "decoded": pickle.dumps(decoded, protocol=pickle.HIGHEST_PROTOCOL)}


class _ExplainWorker:
    """A Ray actor: the model loaded once, then batches explained and written into ``out``."""

    def __init__(
        self, model_spec: ModelSpec, settings: BatchSettings, out: str, use_gpu: bool, torch_threads: int | None = None
    ) -> None:
        import torch

        if torch_threads:  # Ray gives a 1-CPU actor one thread; on our own machine it may have more
            torch.set_num_threads(torch_threads)
        from .planning import plan_explanation

        device = "cuda" if use_gpu else "cpu"
        self.loaded = replace(model_spec, device=device).load()
        self.plan = plan_explanation(
            self.loaded, settings.method, settings.layer, size=settings.size, mean=settings.mean, std=settings.std
        )
        self.settings, self.out, self.device = settings, Path(out), torch.device(device)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        import torch

        decoded: list[Decoded] = [pickle.loads(blob) for blob in batch["decoded"]]
        records: dict[int, dict[str, Any] | None] = {}
        chunk = []
        for index, one in enumerate(decoded):
            if one.skipped is not None:
                records[index] = None  # an earlier run's record stands
            elif one.error is not None:
                records[index] = failed_record(one, one.error)
            else:
                one.tensor = torch.from_numpy(one.tensor)
                chunk.append((index, one))
        if chunk:
            results, model_s = explain_decoded(
                self.loaded, [one for _, one in chunk], self.plan, self.settings, self.device
            )
            for (index, one), result in zip(chunk, results):
                one.tensor = None
                records[index] = write_image(self.out, one, result, self.settings, model_s)
        ordered = [records[index] for index in range(len(decoded))]
        return {
            "image": [one.item.relative for one in decoded],
            "record": [json.dumps(record) if record is not None else "" for record in ordered],
        }


@contextmanager
def ray_session(cluster: RayCluster) -> Iterator[None]:
    """Ray joined (or started, and stopped at the end) with room for ``cluster``'s actor pool."""
    ray = require_ray()
    owns = _connect(ray, cluster)
    try:
        _check_room(ray, cluster)
        yield
    finally:
        if owns:
            ray.shutdown()


def run_on_ray(
    model_spec: ModelSpec,
    input_specs: Sequence[str],
    inputs: Inputs,
    out: Path,
    settings: BatchSettings,
    cluster: RayCluster,
    resume: bool,
    shard,
    quiet: bool,
    refresh_every: int,
    on_batch: Callable[[int], None] | None,
    started: float,
    loaded,
) -> BatchRun:
    """:func:`attnexplain.batch.run_batch`'s work on Ray, inside :func:`ray_session` and with the
    ``--out`` lock held. ``loaded``: the driver's copy of the model, for the plan and the reports."""
    ray = require_ray()
    if not model_spec.model:
        raise AttnExplainError(
            "The Ray engine loads the model in each actor from model_spec.model "
            "(a file or PREFIX:NAME), and none was given."
        )
    run = start_run(loaded, model_spec, input_specs, inputs, out, settings, resume, shard, quiet, started)
    ledger, summary = run.ledger, run.ledger.summary
    batches = 0
    refreshed_at = 0  # records when the reports were last written
    try:
        for spec, reason in run.missing:
            ledger.finish({"image": spec, "path": spec, "status": "failed", "reason": reason, "key": None})
        if run.selected:
            _quiet_ray_data(ray)
            worker_spec = replace(
                model_spec, **{key: _shared_path(value) for key, value in model_spec.identity().items()}
            )
            # Each row carries its own earlier key: no task gets the whole run's table.
            rows = [
                {"relative": item.relative, "path": str(item.path), "earlier": run.done_keys.get(item.relative, "")}
                for item in run.selected
            ]
            images = ray.data.from_items(
                rows, override_num_blocks=max(1, math.ceil(len(rows) / settings.images_per_batch))
            )
            decoded = images.map(
                _decode_row,
                num_cpus=DECODE_CPUS,
                fn_kwargs={
                    "key_prefix": run.key_prefix,
                    "preprocessing": run.plan.preprocessing,
                    "max_pixels": settings.max_pixels,
                    "overlay_size": settings.overlay_size,
                },
            )
            explained = decoded.map_batches(
                _ExplainWorker,
                batch_size=settings.images_per_batch,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=cluster.workers),
                num_cpus=1,
                num_gpus=cluster.num_gpus_per_worker or None,
                fn_constructor_kwargs={
                    "model_spec": worker_spec,
                    "settings": settings,
                    "out": os.path.abspath(out),
                    "use_gpu": cluster.num_gpus_per_worker > 0,
                    "torch_threads": _local_torch_threads(cluster),
                },
            )
            for block in explained.iter_batches(batch_size=None, batch_format="numpy"):
                for text in block["record"]:
                    if text:
                        ledger.finish(json.loads(text))
                    else:
                        ledger.done_earlier()
                batches += 1
                if on_batch is not None:
                    on_batch(batches)
                # Every refresh rewrites the reports of all records so far: spaced geometrically as
                # well, their total cost stays proportional to the images, not to their square.
                if batches % refresh_every == 0 and len(ledger.records) >= refreshed_at * 1.25:
                    refreshed_at = len(ledger.records)
                    ledger.refresh(False)
    except KeyboardInterrupt:  # Ctrl-C, and SIGTERM / SIGHUP under the CLI (see _signals)
        summary.interrupted = True
        raise
    except ray.exceptions.RayError as error:  # e.g. no actor could load the model
        summary.interrupted = True
        raise AttnExplainError(f"The Ray run stopped: {_first_line(error)}") from None
    finally:
        ledger.close()
    return summary


def _first_line(error: BaseException) -> str:
    """The cause a Ray error wraps, in one line: its text holds the remote traceback."""
    cause = getattr(error, "cause", None) or error
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return lines[-1] if lines else type(cause).__name__
