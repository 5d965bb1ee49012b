"""Combining the outputs of ``attnexplain batch --shard I/N`` runs (or of earlier merges) into one.

Everything a source holds is untrusted input: ``results.jsonl`` is plain text anyone can edit, and a
run killed by SIGTERM or a full disk leaves no ``report.json``. So every source and every record is
checked before anything is written: paths stay inside their source, files are regular files, every
record's fingerprint (the model and options it was explained with) agrees with its run's and with
the other sources'. Only then is the merged output built in a staging folder beside ``--out`` (hard
links where possible, copies across filesystems) and swapped in as a whole: a refused or failed merge
leaves ``--out`` exactly as it was, or absent.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

from ._files import not_a_regular_file
from ._lock import LOCK_NAME, reading_lock
from ._untrusted import finite_number, is_finite_number
from .batch_ledger import BatchRun
from .errors import AttnExplainError, shown
from .formats import REPORT_JSON, RESULTS_JSONL
from .records import ok_record_problem, read_records, record_file_names, record_files_problem, timings_problem

#: ``key`` of a record: "<fingerprint of model and options>:<sha256 of the image file>".
_KEY = re.compile(r"([0-9a-f]{8,64}):([0-9a-f]{64})")


@dataclass
class _Source:
    given: Path  # as the user named it, for messages
    root: Path  # resolved
    meta: dict[str, Any] | None  # report.json's "run"; None when the run left no report.json
    records: list[dict[str, Any]]
    fingerprint: str | None = None  # the run's, or that of all its records
    files: dict[str, dict[str, Path]] = field(default_factory=dict)  # image → destination → file
    dropped: list[str] = field(default_factory=list)  # results.jsonl's lines that are no record


def merge_outputs(sources: Sequence[Path], out: Path) -> BatchRun:
    """Combine the outputs of several ``attnexplain batch`` runs (shards) into ``out``: per-image
    files hard-linked (copied across filesystems), results concatenated, report.json, summary.csv
    and index.html rebuilt. See the module's docstring for what is checked first.

    ``out`` may be one of the sources (it then holds the merged result), a new or empty folder, or
    an earlier output whose explained images are all among the sources' (re-running a merge).
    Raises :class:`AttnExplainError` (and writes nothing) for anything else.
    """
    out = Path(os.path.abspath(out))  # "." has no name to put a staging folder beside
    with ExitStack() as locks:  # no batch may write into a source or --out while we read and swap
        for folder in (*sources, out):
            if os.path.isdir(folder):
                locks.enter_context(reading_lock(Path(folder)))
        return _merge_unlocked(sources, out)


def _merge_unlocked(sources: Sequence[Path], out: Path) -> BatchRun:
    read: list[_Source] = []
    for given in sources:
        source = _read_source(Path(given))
        if all(source.root != other.root for other in read):
            read.append(source)
    if not read:
        raise AttnExplainError("Cannot merge: no source was given.")
    fingerprint = _common_fingerprint(read)
    records, files = _merged_records(read)
    _check_out(out, read, {image for image, record in records.items() if record["status"] == "ok"})

    ordered = [records[image] for image in sorted(records)]
    metas = [source.meta for source in read]
    meta = dict(next((m for m in metas if m is not None), {}))
    # A line no record could be read from is an image the merge cannot hold: said, never lost silently.
    dropped = [f"{source.given / RESULTS_JSONL} {line}" for source in read for line in source.dropped]
    meta.update(
        shard=None,
        merged_from=[str(source.given) for source in read],
        fingerprint=fingerprint,
        complete=all(m is not None and m.get("complete") is True for m in metas) and not dropped,
        wall_s=sum(finite_number(m.get("wall_s")) or 0.0 for m in metas if m is not None),
        dropped_records=dropped,
    )
    _write_merged(out, ordered, files, meta)
    ok = sum(record["status"] == "ok" for record in ordered)
    return BatchRun(total=len(ordered), ok=ok, failed=len(ordered) - ok, out=out, dropped_records=dropped)


# --- reading and checking the sources ----------------------------------------------------------


def _refuse(source: _Source, image: Any, why: str) -> AttnExplainError:
    return AttnExplainError(f"Cannot merge: {source.given}: image {shown(image)} {why}; nothing was written.")


def _read_source(given: Path) -> _Source:
    results = given / RESULTS_JSONL
    why = not_a_regular_file(results)
    if why is not None:
        raise AttnExplainError(f"Cannot merge: {results} {why}: {given} is not an `attnexplain batch` output.")
    try:
        root = given.resolve(strict=True)
        found = read_records(results)
    except (OSError, RuntimeError) as error:
        raise AttnExplainError(f"Cannot merge: cannot read {results}: {error}.") from None
    source = _Source(given, root, _read_run(given), found.records, dropped=found.dropped)
    if source.meta is not None and isinstance(source.meta.get("fingerprint"), str):
        source.fingerprint = source.meta["fingerprint"]
    for record in source.records:
        _check_record(source, record)
    return source


def _read_run(given: Path) -> dict[str, Any] | None:
    """report.json's "run", or None where there is none (a run killed before writing it)."""
    report = given / REPORT_JSON
    if not os.path.lexists(report):
        return None
    why = not_a_regular_file(report)
    if why is not None:
        raise AttnExplainError(f"Cannot merge: {report} {why}.")
    try:
        run = json.loads(report.read_text(encoding="utf-8")).get("run")
    except (OSError, ValueError, AttributeError, RecursionError) as error:
        raise AttnExplainError(
            f"Cannot merge: {report} is not a report of `attnexplain batch` ({type(error).__name__})."
        ) from None
    if not isinstance(run, dict) or _run_problem(run):
        raise AttnExplainError(
            f"Cannot merge: {report} is not a report of `attnexplain batch` "
            f'(its "run" section is missing or malformed).'
        )
    return run


def _run_problem(run: dict[str, Any]) -> bool:
    """Whether what the merged pages show of a source's "run" (its methods, layers, model and
    preprocessing, which become the merged report's) is not what batch writes there."""
    if not all(
        value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        for value in (run.get("methods"), run.get("layers"))
    ):
        return True
    model, preprocessing = run.get("model"), run.get("preprocessing")
    if model is not None and not (
        isinstance(model, dict)
        and all(isinstance(model.get(key), (str, type(None))) for key in ("source", "architecture"))
    ):
        return True
    if preprocessing is None:
        return False
    # The pages write the size and resize as text and the mean and std as numbers (float()).
    return not (
        isinstance(preprocessing, dict)
        and isinstance(preprocessing.get("size") or [], list)
        and all(
            isinstance(preprocessing.get(key) or [], list)
            and all(is_finite_number(v) for v in preprocessing.get(key) or [])
            for key in ("mean", "std")
        )
    )


def _check_record(source: _Source, record: dict[str, Any]) -> None:
    """Refuses a record the reports cannot show or whose files are not where batch puts them;
    notes the files an ok record brings (``source.files``)."""
    image = record.get("image")
    if not isinstance(image, str) or not image:
        raise _refuse(source, image, "has no name")
    status = record.get("status")
    if status not in ("ok", "failed"):
        raise _refuse(source, image, f"has the status {shown(status)}, neither 'ok' nor 'failed'")
    for name in ("reason", "layer", "path", "sha256"):
        if not isinstance(record.get(name), (str, type(None))):
            raise _refuse(source, image, f"has a {name} that is not text")
    problem = timings_problem(record.get("timings"))
    if problem is not None:
        raise _refuse(source, image, problem)
    _check_key(source, record)
    if status != "ok":
        return
    problem = ok_record_problem(record) or record_files_problem(source.root, record)
    if problem is not None:
        raise _refuse(source, image, problem)
    output = record["output"]
    source.files[image] = {f"{output}/{name}": source.root / output / name for name in record_file_names(record)}


def _check_key(source: _Source, record: dict[str, Any]) -> None:
    """An ok record must carry its fingerprint (in its key), a failed one may not have any (an input
    that did not exist, a file that could not be read); one there must be the run's."""
    image, key = record["image"], record.get("key")
    if key in (None, "") and record["status"] != "ok":
        return
    match = _KEY.fullmatch(key) if isinstance(key, str) else None
    if match is None:
        raise _refuse(source, image, f"has no fingerprint: its key {shown(key)} is not '<fingerprint>:<sha256>'")
    if record.get("sha256") not in (None, match.group(2)):
        raise _refuse(source, image, "has a sha256 that differs from the one in its key")
    found = match.group(1)
    if source.fingerprint is None:
        source.fingerprint = found
    elif found != source.fingerprint:
        known = (
            "the run's report.json says"
            if source.meta is not None and source.meta.get("fingerprint") == source.fingerprint
            else "its other images have"
        )
        raise _refuse(
            source,
            image,
            f"was explained with fingerprint {found} but {known} {source.fingerprint} (another model or other options)",
        )


def _common_fingerprint(sources: list[_Source]) -> str | None:
    first = next((source for source in sources if source.fingerprint is not None), None)
    for source in sources:
        if source.fingerprint is not None and source.fingerprint != first.fingerprint:
            raise AttnExplainError(
                f"Cannot merge: {first.given} and {source.given} were made with different models or "
                f"options (fingerprints {first.fingerprint} and {source.fingerprint}); merging them "
                f"would mix explanations. Nothing was written."
            )
    return first.fingerprint if first is not None else None


def _merged_records(sources: list[_Source]) -> tuple[dict[str, dict[str, Any]], dict[str, Path]]:
    """image → the record kept (an ok one over a failed one, the first of equal ones) and
    destination → source file of everything the kept records bring."""
    kept: dict[str, tuple[dict[str, Any], _Source]] = {}
    for source in sources:
        for record in source.records:
            image = record["image"]
            previous = kept.get(image)
            if previous is not None and previous[0]["status"] == "ok":
                if record["status"] == "ok" and _sha(record) != _sha(previous[0]):
                    raise AttnExplainError(
                        f"Cannot merge: {previous[1].given} and {source.given} both explain image "
                        f"{shown(image)}, from different files (sha256 {_sha(previous[0])[:12]}… and "
                        f"{_sha(record)[:12]}…); merge only the one you want. Nothing was written."
                    )
                continue
            kept[image] = (record, source)
    files: dict[str, Path] = {}
    owner: dict[str, str] = {}  # destination → image
    for image, (_record, source) in kept.items():
        for destination, path in source.files.get(image, {}).items():  # ok records only
            files[destination] = path
            owner[destination] = image
    for image, (record, _) in kept.items():
        if record["status"] != "ok":
            continue
        folder = PurePosixPath(record["output"])
        for part in (folder, *folder.parents):
            if str(part) in owner:  # a.png/detail.html/x.png would need a folder where a file is
                raise AttnExplainError(
                    f"Cannot merge: image {shown(image)} needs the folder "
                    f"{part}, which is a file of image {shown(owner[str(part)])}. "
                    f"Nothing was written."
                )
    return {image: record for image, (record, _) in kept.items()}, files


def _sha(record: dict[str, Any]) -> str:
    return record["key"].rsplit(":", 1)[1]


def _check_out(out: Path, sources: list[_Source], merged: set[str]) -> None:
    """--out is replaced as a whole: refuse where that would delete anything not merged."""
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise AttnExplainError(f"Cannot merge: --out {out} exists and is not a folder.")
    resolved = out.resolve()
    roots = {source.root for source in sources}
    inside = next((source for source in sources if resolved in source.root.parents), None)
    if inside is not None:
        raise AttnExplainError(
            f"Cannot merge: --out {out} holds the source {inside.given}; "
            f"replacing --out would delete it. Choose another --out."
        )
    if resolved in roots or all(entry.name == LOCK_NAME for entry in out.iterdir()):
        return
    results = out / RESULTS_JSONL
    if not_a_regular_file(results) is not None:
        raise AttnExplainError(
            f"Cannot merge: --out {out} holds files and no {RESULTS_JSONL}: it "
            f"is not an attnexplain output, and the merge would replace it. "
            f"Choose a new or empty folder."
        )
    found = read_records(results)
    if found.dropped:
        raise AttnExplainError(
            f"Cannot merge: --out {out} holds lines of {RESULTS_JSONL} that are no record "
            f"({found.dropped[0]}); the merge would replace the images they stood for. Name {out} as "
            f"a source too (its unreadable lines are then listed), or choose another --out."
        )
    earlier = found.records
    lost = sorted(str(r["image"]) for r in earlier if r.get("status") == "ok" and r["image"] not in merged)
    if lost:
        raise AttnExplainError(
            f"Cannot merge: --out {out} already holds {len(lost)} explained image(s) that no source "
            f"has (e.g. {shown(lost[0])}); the merge would replace them. Name {out} as a source "
            f"too to keep them, or choose another --out."
        )


# --- writing ---------------------------------------------------------------------------------------


def _write_merged(out: Path, records: list[dict[str, Any]], files: dict[str, Path], meta: dict[str, Any]) -> None:
    from ._atomic import atomic_directory, write_bytes_atomic
    from .gallery import write_reports

    try:
        with atomic_directory(out) as staging:
            os.chmod(staging, 0o755)  # mkdtemp makes it private; outputs are meant to be shared
            for destination, path in files.items():
                target = staging / destination
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(path, target, follow_symlinks=False)
                except OSError:  # another filesystem, or one without hard links
                    shutil.copyfile(path, target, follow_symlinks=False)
            text = "".join(json.dumps(record, sort_keys=True) + "\n" for record in records)
            write_bytes_atomic(staging / RESULTS_JSONL, text.encode("utf-8"))
            write_reports(staging, records, meta)
    except OSError as error:
        raise AttnExplainError(
            f"Cannot write the merged output beside {out}: "
            f"{error.strerror or error} ({error.filename or ''}); --out is "
            f"unchanged."
        ) from None
