"""The driver's side of a batch run, whatever engine explains its images: what the run takes
(:func:`start_run`: its shard's images, its plan, its key, the earlier records that still stand),
its book (:class:`RunLedger`: ``results.jsonl``, the records the reports show, the counts and the
progress output) and what it did (:class:`BatchRun`, which ``merge`` returns as well).

Never losing work: ``results.jsonl`` gets one line per image, flushed as soon as that image's files
are in place, and ``report.json``, ``summary.csv`` and ``index.html`` are refreshed from the records
so far, periodically and at the end.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import AttnExplainError
from .formats import RESULTS_JSONL
from .inputs import InputImage, Inputs, in_shard
from .progress import Progress
from .records import RecordTooLarge, ResultsLog, fingerprint, read_results, reusable_record

if TYPE_CHECKING:
    from .batch_stages import BatchSettings, Stages

#: Exit code of ``attnexplain batch`` / ``merge`` when some images failed (the others were written).
EXIT_SOME_FAILED = 3


@dataclass
class BatchRun:
    """What a run did, for the CLI."""

    total: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    wall_s: float = 0.0
    interrupted: bool = False
    out: Path | None = None
    skipped_inputs: list[tuple[str, str]] = field(default_factory=list)  # not regular files, ...
    report_error: str | None = None  # why report.json / summary.csv / index.html could not be written
    #: merge: the lines of the sources' results.jsonl no record could be read from (images lost)
    dropped_records: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return EXIT_SOME_FAILED if self.failed or self.report_error or self.dropped_records else 0


@dataclass
class RunStart:
    """What both engines decide on the driver before any image is read: the images of this run,
    the plan, the key that says an earlier record still stands, and the run's ledger."""

    selected: list[InputImage]
    missing: list[tuple[str, str]]
    plan: Any  # explanation.Plan
    key_prefix: str
    done_keys: dict[str, str]  # image → key of its reusable earlier record (--resume)
    ledger: "RunLedger"


def start_run(
    loaded,
    model_spec,
    input_specs,
    inputs: Inputs,
    out: Path,
    settings: BatchSettings,
    resume: bool,
    shard,
    quiet: bool,
    started: float,
    stages: Stages | None = None,
) -> RunStart:
    """The images of this run (its shard), its plan and its ledger, holding the records of an
    earlier run that still stand (``resume``). ``stages``: what the run does (default: a
    classifier's, :data:`attnexplain.batch_stages.EXPLAINING`)."""
    from .batch_stages import EXPLAINING

    stages = stages or EXPLAINING
    selected = [item for item in inputs.images if in_shard(item.relative, shard)]
    missing = [(spec, reason) for spec, reason in inputs.missing if in_shard(spec, shard)]
    plan = stages.plan(loaded, settings)
    key_prefix = fingerprint(model_spec, settings, plan)
    meta = {
        "model": loaded.describe(),
        "model_spec": {  # the prompts as a list of texts, every other field as text
            k: (list(v) if isinstance(v, tuple) else str(v) if v is not None else None)
            for k, v in model_spec.identity().items()
        },
        "options": settings.describe(),
        "preprocessing": plan.preprocessing.as_dict(),
        "methods": [m.name for m in plan.methods],
        "layers": plan.layers,
        "fingerprint": key_prefix,
        "shard": list(shard) if shard else None,
        "inputs": [str(s) for s in input_specs],
        "root": str(inputs.root) if inputs.root else None,
        "skipped_inputs": [{"path": path, "reason": reason} for path, reason in inputs.skipped],
        **stages.meta,
    }

    wanted = {item.relative for item in selected}
    # Per image, not per content: two files with the same bytes are two images, each with its row.
    root = Path(os.path.realpath(out))  # the records' folders must resolve inside it
    kept = {
        record["image"]: record
        for record in (read_results(out / RESULTS_JSONL) if resume else [])
        if reusable_record(record, key_prefix, wanted, root)
    }
    summary = BatchRun(total=len(selected) + len(missing), out=out, skipped_inputs=inputs.skipped)
    ledger = RunLedger(out, meta, kept, summary, quiet, started)
    return RunStart(
        selected, missing, plan, key_prefix, {image: record["key"] for image, record in kept.items()}, ledger
    )


class RunLedger:
    """The driver's book of a run: results.jsonl, the records the reports show, the counts and the
    progress output. Whatever engine explains the images, their records end here, one at a time."""

    def __init__(
        self,
        out: Path,
        meta: dict[str, Any],
        kept: dict[str, dict[str, Any]],
        summary: BatchRun,
        quiet: bool,
        started: float,
    ) -> None:
        try:
            self.log = ResultsLog(out / RESULTS_JSONL, kept.values())
        except OSError as error:  # a full disk before anything started
            raise AttnExplainError(f"Cannot write {out / RESULTS_JSONL}: {error.strerror or error}.") from None
        self.out, self.meta, self.summary, self.started = out, meta, summary, started
        self.records: dict[str, dict[str, Any]] = dict(kept)  # image → record, small dicts only
        self.progress = Progress(summary.total, quiet)
        self.lock = threading.Lock()

    def finish(self, record: dict[str, Any]) -> dict[str, Any]:
        """Record one image's outcome (thread-safe); returns the record as kept."""
        with self.lock:
            try:
                self.log.append(record)
            except (OSError, RecordTooLarge) as error:  # a full disk: the image fails, the run goes on
                why = error.strerror or error if isinstance(error, OSError) else error
                record = {
                    **{key: record.get(key) for key in ("image", "path", "key", "sha256", "timings")},
                    "status": "failed",
                    "reason": f"Cannot record it in {RESULTS_JSONL}: {why}",
                }
                if isinstance(error, RecordTooLarge):  # its failure, a few hundred bytes, is recorded
                    try:
                        self.log.append(record)
                    except (OSError, RecordTooLarge):
                        pass  # a full disk (or names of megabytes): the reports still say it
            self.records[record["image"]] = record
            if record["status"] == "ok":
                self.summary.ok += 1
            else:
                self.summary.failed += 1
            self.progress.advance()
        return record

    def done_earlier(self) -> None:
        """An image whose record from an earlier run stands (--resume)."""
        with self.lock:
            self.summary.skipped += 1
            self.summary.ok += 1
            self.progress.advance(earlier=True)

    def refresh(self, complete: bool) -> None:
        """report.json, summary.csv and index.html from the records so far."""
        from .gallery import write_reports

        meta_now = dict(
            self.meta,
            complete=complete,
            wall_s=round(time.perf_counter() - self.started, 3),
            interrupted=self.summary.interrupted,
        )
        with self.lock:
            finished = sorted(self.records.values(), key=lambda r: r["image"])
        try:
            write_reports(self.out, finished, meta_now)
        except OSError as error:  # a full disk: tried again at the next refresh
            self.summary.report_error = f"{error.filename or self.out}: {error.strerror or error}"
        else:
            self.summary.report_error = None

    def close(self) -> BatchRun:
        """Close results.jsonl and the progress output; write the final reports."""
        self.log.close()
        self.progress.close()
        self.summary.wall_s = time.perf_counter() - self.started
        self.refresh(not self.summary.interrupted)
        return self.summary
