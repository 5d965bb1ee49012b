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

Inputs are checked with ``os.stat`` before anything opens them (a FIFO blocks, a device never ends),
kept as named (symbolic links are not resolved, so outputs mirror the inputs as given), and never
taken from inside ``out``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import threading
import time
from collections import deque
from contextlib import ExitStack
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ._files import not_a_regular_file
from .errors import AttnExplainError
from .formats import DEFAULT_COLORMAP, RESULTS_JSONL
from .model_spec import ModelSpec
from .records import (DETAIL_HTML, IMAGES_DIR, RecordTooLarge, ResultsLog, ok_record_problem, read_results,
                      record_files_problem)
from .progress import Progress

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
#: The photo, shrunk: the detail page's and the gallery card's.
PHOTO_JPG = "photo.jpg"
PHOTO_SIDE = 512
THUMB_SIDE = 192
#: Exit code of ``attnexplain batch`` / ``merge`` when some images failed (the others were written).
EXIT_SOME_FAILED = 3


# --- inputs --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InputImage:
    path: Path  # absolute, symbolic links kept: the name the user gave or the folder holds
    relative: str  # posix path relative to the common root: names the output folder


@dataclass
class Inputs:
    images: list[InputImage]
    missing: list[tuple[str, str]]  # (what was given, why it cannot be read): recorded as failed
    root: Path | None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (a folder's or glob's entry, why)


def _has_glob(text: str) -> bool:
    return any(char in text for char in "*?[")


class _Collector:
    """Finds the image files the inputs name, checking each with ``os.stat`` before anything reads
    it: a FIFO or a device would block or never end. Symbolic links to folders are not followed
    (a loop would never end), and nothing inside the output folder is taken as an input."""

    def __init__(self, exclude: Path | None) -> None:
        # realpath, not Path.resolve: it never raises on a symbolic link loop
        self.exclude = Path(os.path.realpath(exclude)) if exclude is not None else None
        self.found: list[Path] = []
        self.missing: list[tuple[str, str]] = []
        self.skipped: list[tuple[str, str]] = []

    def _in_output(self, path: Path) -> bool:
        if self.exclude is None:
            return False
        resolved = Path(os.path.realpath(path))
        return resolved == self.exclude or self.exclude in resolved.parents

    def _take(self, path: Path) -> None:
        """A regular file, found in a folder or by a glob."""
        reason = not_a_regular_file(path)
        if reason is None and self._in_output(path):
            reason = "is inside the output folder (--out)"
        if reason is None:
            self.found.append(path)
        else:
            self.skipped.append((str(path), reason))

    def expand(self, spec: str) -> None:
        if spec.startswith("@"):
            self._read_list(Path(spec[1:]), spec)
            return
        path = Path(spec)
        if path.is_dir():
            self._walk(path)
            return
        reason = not_a_regular_file(path)
        if reason == "does not exist" and _has_glob(spec):
            self._glob(spec)
        elif reason is not None:
            self.missing.append((spec, f"{spec} {reason}."))
        elif self._in_output(path):
            self.skipped.append((spec, "is inside the output folder (--out)"))
        else:
            self.found.append(path)

    def _read_list(self, list_file: Path, spec: str) -> None:
        reason = not_a_regular_file(list_file)
        if reason is not None:
            self.missing.append((spec, f"The list file {list_file} {reason}."))
            return
        try:
            lines = list_file.read_text(encoding="utf-8").splitlines()
        except OSError as error:
            self.missing.append((spec, f"Cannot read the list file {list_file}: {error.strerror or error}"))
            return
        except UnicodeDecodeError:
            self.missing.append((spec, f"The list file {list_file} is not UTF-8 text."))
            return
        itself = os.path.realpath(list_file)
        for line in lines:
            line = line.strip()
            if line and not line.startswith("#"):
                # Lines name images, folders or globs, never other lists: a list cannot recurse.
                entry = line if os.path.isabs(line) else str(list_file.parent / line)
                if os.path.realpath(entry) == itself:
                    self.skipped.append((entry, "is the list file itself"))
                else:
                    self.expand(entry)

    def _walk(self, folder: Path) -> None:
        def unreadable(error: OSError) -> None:
            self.skipped.append((str(error.filename), f"cannot be read ({error.strerror or error})"))

        for parent, folders, files in os.walk(folder, onerror=unreadable):
            parent_path = Path(parent)
            descend = []
            for name in sorted(folders):
                sub = parent_path / name
                if sub.is_symlink():
                    self.skipped.append((str(sub), "is a symbolic link to a folder (not followed)"))
                elif self._in_output(sub):
                    self.skipped.append((str(sub), "is the output folder (--out)"))
                else:
                    descend.append(name)
            folders[:] = descend
            for name in sorted(files):
                if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                    self._take(parent_path / name)

    def _glob(self, spec: str) -> None:
        parts = Path(spec).parts
        first = next(index for index, part in enumerate(parts) if _has_glob(part))
        base = Path(*parts[:first]) if first else Path(".")
        before = len(self.found)
        for match in sorted(set(_glob_matches(base, parts[first:]))):
            if not os.path.isdir(match):
                self._take(match)
        if len(self.found) == before:
            self.missing.append((spec, f"No file matches {spec}"))


def _glob_matches(base: Path, patterns: Sequence[str]) -> Iterator[Path]:
    """What the glob components ``patterns`` match under ``base``, like :func:`glob.glob` with
    ``recursive=True`` except that ``**`` never follows a symbolic link to a folder: glob's does,
    and two links to ``.`` make that 2**40 paths. Hidden names match only a pattern starting with a dot."""
    if not patterns:
        yield base
        return
    head, rest = patterns[0], patterns[1:]
    if not _has_glob(head):
        if os.path.lexists(base / head):
            yield from _glob_matches(base / head, rest)
        return
    try:
        entries = sorted(os.scandir(base), key=lambda entry: entry.name)
    except OSError:
        return
    if head == "**":
        yield from _glob_matches(base, rest)  # no folder at all
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                yield from _glob_matches(Path(entry.path), patterns)
            elif not rest:
                yield Path(entry.path)
        return
    for entry in entries:
        if (entry.name.startswith(".") and not head.startswith(".")) \
                or not fnmatch.fnmatchcase(entry.name, head):
            continue
        if not rest:
            yield Path(entry.path)
        elif entry.is_dir():
            yield from _glob_matches(Path(entry.path), rest)


def collect_inputs(specs: Sequence[str], exclude: Path | None = None) -> Inputs:
    """Files, folders (recursive, image extensions only), globs and ``@list.txt`` files → images,
    sorted by their path relative to the common root of their folders. Paths are kept as named
    (symbolic links are not resolved, so outputs mirror the inputs as given); the same file named
    twice is taken once. ``exclude``: a folder (the output folder) whose files are never inputs.
    What is not a regular file is never opened: named explicitly it is ``missing`` (recorded as a
    failure), found in a folder or by a glob it is ``skipped`` with its reason."""
    collector = _Collector(exclude)
    for spec in specs:
        collector.expand(str(spec))
    unique: dict[tuple[int, int], Path] = {}
    for path in collector.found:
        absolute = Path(os.path.abspath(path))
        try:
            info = absolute.stat()
        except OSError:  # removed meanwhile: recorded when it is read
            identity = (-1, hash(str(absolute)))
        else:
            identity = (info.st_dev, info.st_ino)
        first = unique.setdefault(identity, absolute)
        if first != absolute:
            collector.skipped.append((str(absolute), f"is the same file as {first}"))
    paths = list(unique.values())
    if not paths:
        return Inputs([], collector.missing, None, collector.skipped)
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    images = sorted((InputImage(p, p.relative_to(root).as_posix()) for p in paths),
                    key=lambda item: item.relative)
    return Inputs(images, collector.missing, root, collector.skipped)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"I/N"`` → ``(I, N)``: shards count from 1, as ``--shard`` does in Playwright, Jest and Vitest."""
    if text is None:
        return None
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise AttnExplainError(f"--shard must look like I/N (e.g. 1/4), not {text!r}.") from None
    if index == 0 and count >= 1:
        raise AttnExplainError(f"--shard {text}: shards count from 1 (1/{count} to {count}/{count}).")
    if count < 1 or not 1 <= index <= count:
        raise AttnExplainError(f"--shard {text}: need N >= 1 and 1 <= I <= N.")
    return index, count


def in_shard(relative: str, shard: tuple[int, int] | None) -> bool:
    """Deterministic: the same relative path always lands in the same shard (``shard`` counts from 1)."""
    if shard is None:
        return True
    digest = hashlib.sha256(relative.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % shard[1] == shard[0] - 1


# --- settings and fingerprint --------------------------------------------------------------------

@dataclass(frozen=True)
class BatchSettings:
    """Everything besides the model that decides an image's outputs."""

    method: str = "auto"
    target: int | str | None = None
    layer: str | None = None
    size: Sequence[int] | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    top_k: int = 5
    alpha: float = 0.5
    colormap: str = DEFAULT_COLORMAP
    overlay_format: str = "jpg"  # see report.OVERLAY_FORMATS: thousands of photos want JPEG
    #: Longest side of the overlays (photos are decoded at the smallest scale that covers it and
    #: the model's input); None: the photo's own size.
    overlay_size: int | None = 2048
    max_pixels: int = 100_000_000
    images_per_batch: int = 16
    #: Decoding threads, and as many writing threads; None: :func:`default_workers` decides.
    workers: int | None = None
    #: Batches explained at once, each on its own replica of the model (see
    #: :mod:`attnexplain.replicas`); None: :func:`attnexplain.replicas.default_parallel_batches`.
    parallel_batches: int | None = None
    options: Any = None  # MethodOptions
    truth: Any = None  # attnexplain.truth.TrueClasses: each image's true class (--truth)
    metrics: tuple[str, ...] = ()  # perturbation metrics per map (attnexplain.evaluation)

    def describe(self) -> dict[str, Any]:
        data = {key: value for key, value in asdict(self).items()
                if key not in ("options", "images_per_batch", "workers", "parallel_batches", "truth")
                and not (key == "metrics" and not value)}  # runs without metrics keep their fingerprint
        data = {key: list(value) if isinstance(value, tuple) else value for key, value in data.items()}
        if self.size is not None:  # 32 and 32,32 are the same size
            from .preprocess import normalize_size

            data["size"] = list(normalize_size(self.size))
        for key in ("mean", "std"):
            if data[key] is not None and len(data[key]) == 1:
                data[key] = [float(data[key][0])] * 3
        data["options"] = self.options.as_dict() if self.options is not None else None
        return data


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(model_spec: ModelSpec | dict[str, Any], settings: BatchSettings, plan=None) -> str:
    """Identifies the model (its file's content where it is a file, and the content of the file
    ``--arch path/model.py:Class`` names), every output-relevant option and what the run's ``plan``
    (:class:`attnexplain.explanation.Plan`) decided from them: the methods, layers and
    preprocessing, which a new version of attnexplain or of a plugin may decide differently (the
    8-bit resize did), so that ``--resume`` never mixes the two."""
    from .loading import class_file

    spec = {key: str(value) if isinstance(value, Path) else value
            for key, value in ModelSpec.of(model_spec).identity().items() if value is not None and value is not False}
    source = spec.get("model")
    if source and Path(str(source)).is_file():
        spec["model_sha256"] = file_sha256(Path(str(source)))
        spec["model"] = Path(str(source)).name
    labels = spec.get("labels")
    if labels and Path(str(labels)).is_file():
        spec["labels"] = file_sha256(Path(str(labels)))
    arch_file = class_file(spec["arch"]) if isinstance(spec.get("arch"), str) else None
    if arch_file is not None and arch_file.is_file():  # a regular file: never a FIFO, which would block
        spec["arch_sha256"] = file_sha256(arch_file)
    spec.pop("device", None)  # the same model on another device gives the same explanation
    # Every field of the preprocessing, defaults included (the report's as_dict leaves them out).
    decided = None if plan is None else {
        "methods": [method.name for method in plan.methods], "layers": list(plan.layers),
        "preprocessing": asdict(plan.preprocessing)}
    text = json.dumps({"model": spec, "settings": settings.describe(), "plan": decided}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _reusable(record: dict[str, Any], key_prefix: str, wanted: set[str], out: Path) -> bool:
    """Whether an earlier run's record can stand for its image: made with this model and these
    options, for an image of this run, trustworthy (:func:`ok_record_problem`), every file it lists
    in place inside ``out`` (resolved; :func:`record_files_problem`)."""
    key = record.get("key")
    if record.get("status") != "ok" or not isinstance(key, str) or not key.startswith(key_prefix + ":") \
            or record.get("image") not in wanted or ok_record_problem(record) is not None:
        return False
    return record_files_problem(out, record) is None


# --- the pure per-batch part -----------------------------------------------------------------------

@dataclass
class Decoded:
    item: InputImage
    sha256: str
    key: str
    pixels: np.ndarray | None = None
    box: tuple[float, float, float, float] | None = None
    tensor: Any = None  # (1, 3, h, w)
    image_info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    skipped: dict[str, Any] | None = None  # the earlier record, when resuming
    decode_s: float = 0.0


def explain_batch(loaded, tensors: list[Any], methods, layers: list[str], settings: BatchSettings,
                  device, regions: Sequence[tuple[float, float, float, float]] | None = None,
                  photo_sizes: Sequence[tuple[int, int]] | None = None,
                  preprocessing=None) -> list[dict[str, Any]]:
    """A pure function of its inputs: (B, 3, h, w) → per image, its maps (``MethodMap`` per method,
    attention grids and gates included), predictions and target, a detector's boxes (on the photo
    of ``photo_sizes`` (width, height), whose part the model saw is the image's ``regions`` entry;
    by default the input itself), or an error for images with nothing to explain (a requested
    target with probability 0, a detector that found nothing). ``preprocessing`` is how the
    tensors were normalised (default: the model's), which says what ``--baseline black`` is."""
    import torch

    from .errors import MethodError, NothingToExplain
    from .engine import compute_maps
    from .targets import boxes_on_photo, image_outcome

    batch = torch.cat(tensors).to(device)
    try:
        computed = compute_maps(loaded, batch, methods, layers, target=settings.target,
                                options=settings.options, preprocessing=preprocessing)
    except NothingToExplain as error:  # no image of the batch has anything to explain
        return [{"error": str(error)} for _ in tensors]
    probabilities = computed.probabilities.float().cpu()
    targets = computed.targets.cpu()
    measured = _map_metrics(loaded, batch, computed, settings.metrics) if settings.metrics else None
    results = []
    for index, maps in enumerate(computed.image_maps()):
        result: dict[str, Any] = {"maps": maps}
        if measured is not None:
            result["metrics"] = measured[index]
        try:
            target, predictions = image_outcome(probabilities[index], int(targets[index]),
                                                loaded.labels, settings.top_k,
                                                target_given=settings.target is not None, methods=methods)
        except MethodError as error:  # this image only: the others of the batch are fine
            result["error"] = str(error)
        else:
            result["predictions"] = [p.as_dict() for p in predictions]
            result["target"] = target.as_dict()
            if computed.detections is not None:
                height, width = batch.shape[-2:]
                region = regions[index] if regions is not None else (0.0, 0.0, float(width), float(height))
                photo = photo_sizes[index] if photo_sizes is not None else (width, height)
                result["detections"] = boxes_on_photo(computed.detections[index], target.index,
                                                      loaded.labels, (height, width), region, photo)
        results.append(result)
    return results


def _map_metrics(loaded, batch, computed, metrics: Sequence[str]) -> list[dict[str, dict[str, float]]]:
    """Per image, ``{"<method>": {"<metric>": value}}`` for every map of ``computed``."""
    import math

    import torch

    from .evaluation import perturbation_values

    names = list(computed.maps)
    maps = torch.stack([computed.maps[name].float() for name in names], dim=1)
    original = computed.probabilities.gather(1, computed.targets[:, None])[:, 0]
    values, _ = perturbation_values(loaded, batch, maps, computed.targets, original, metrics)
    return [{name: {metric: round(float(value[b, m]), 6) for metric, value in values.items()
                    if math.isfinite(float(value[b, m]))} for m, name in enumerate(names)}
            for b in range(batch.shape[0])]


# --- the pipeline ------------------------------------------------------------------------------------

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


def run_batch(loaded, model_spec: ModelSpec | dict[str, Any], input_specs: Sequence[str], out: Path,
              settings: BatchSettings, *, resume: bool = False, shard: tuple[int, int] | None = None,
              quiet: bool = False, device: str | None = None, refresh_every: int = 20,
              on_batch: Callable[[int], None] | None = None, cluster=None,
              overwrite: bool = False) -> BatchRun:
    """Explain every image ``input_specs`` names into ``out``; see the module's docstring.

    An ``out`` that holds an earlier run's explained images is refused (:class:`EarlierRun`) unless
    ``resume`` keeps them or ``overwrite`` replaces its records with this run's.

    ``cluster``: a :class:`attnexplain.ray_engine.RayCluster` to explain on Ray actors (the model
    loaded in each from ``model_spec``) instead of in this process; the outputs are the same.

    Raises :class:`NoImages` when the inputs name no image at all, and
    :class:`attnexplain._lock.OutputInUse` when another run writes into ``out``."""
    from ._atomic import remove_stale_staging
    from ._lock import output_lock

    started = time.perf_counter()
    model_spec = ModelSpec.of(model_spec)  # the dict of its fields, as before there was a ModelSpec
    if cluster is not None and (settings.parallel_batches or 1) > 1:
        raise AttnExplainError("parallel_batches is for the local engine; on Ray, the cluster's "
                               "workers (model actors) explain batches at once.")
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
                return run_on_ray(model_spec, input_specs, inputs, out, settings, cluster, resume,
                                  shard, quiet, refresh_every, on_batch, started, loaded)
            return _run_locked(loaded, model_spec, input_specs, inputs, out, settings, resume, shard,
                               quiet, device, refresh_every, on_batch, started)


class NoImages(AttnExplainError):
    """The inputs name no image at all."""


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
        raise AttnExplainError("--resume keeps the earlier run's records in --out and --overwrite "
                               "replaces them: give one of them.")
    if resume or overwrite:
        return
    explained = sum(record.get("status") == "ok" for record in read_results(out / RESULTS_JSONL))
    if explained:
        raise EarlierRun(f"{out} holds an earlier run's results ({explained} explained image(s) in "
                         f"{RESULTS_JSONL}): add --resume to keep them and explain only what is new "
                         f"or changed, or --overwrite to replace them, or choose another --out.")


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


def start_run(loaded, model_spec, input_specs, inputs: Inputs, out: Path, settings: BatchSettings,
              resume: bool, shard, quiet: bool, started: float) -> RunStart:
    """The images of this run (its shard), its plan and its ledger, holding the records of an
    earlier run that still stand (``resume``)."""
    from .explanation import plan_explanation

    selected = [item for item in inputs.images if in_shard(item.relative, shard)]
    missing = [(spec, reason) for spec, reason in inputs.missing if in_shard(spec, shard)]
    plan = plan_explanation(loaded, settings.method, settings.layer, size=settings.size,
                            mean=settings.mean, std=settings.std)
    key_prefix = fingerprint(model_spec, settings, plan)
    meta = {"model": loaded.describe(), "model_spec": {k: (str(v) if v is not None else None)
                                                       for k, v in model_spec.identity().items()},
            "options": settings.describe(), "preprocessing": plan.preprocessing.as_dict(),
            "methods": [m.name for m in plan.methods], "layers": plan.layers, "fingerprint": key_prefix,
            "shard": list(shard) if shard else None, "inputs": [str(s) for s in input_specs],
            "root": str(inputs.root) if inputs.root else None,
            "skipped_inputs": [{"path": path, "reason": reason} for path, reason in inputs.skipped]}

    wanted = {item.relative for item in selected}
    # Per image, not per content: two files with the same bytes are two images, each with its row.
    root = Path(os.path.realpath(out))  # the records' folders must resolve inside it
    kept = {record["image"]: record for record in (read_results(out / RESULTS_JSONL) if resume else [])
            if _reusable(record, key_prefix, wanted, root)}
    summary = BatchRun(total=len(selected) + len(missing), out=out, skipped_inputs=inputs.skipped)
    ledger = RunLedger(out, meta, kept, summary, quiet, started)
    return RunStart(selected, missing, plan, key_prefix,
                    {image: record["key"] for image, record in kept.items()}, ledger)


class RunLedger:
    """The driver's book of a run: results.jsonl, the records the reports show, the counts and the
    progress output. Whatever engine explains the images, their records end here, one at a time."""

    def __init__(self, out: Path, meta: dict[str, Any], kept: dict[str, dict[str, Any]],
                 summary: BatchRun, quiet: bool, started: float) -> None:
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
                record = {**{key: record.get(key) for key in ("image", "path", "key", "sha256", "timings")},
                          "status": "failed", "reason": f"Cannot record it in {RESULTS_JSONL}: {why}"}
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

        meta_now = dict(self.meta, complete=complete, wall_s=round(time.perf_counter() - self.started, 3),
                        interrupted=self.summary.interrupted)
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


def explain_decoded(loaded, chunk: list[Decoded], plan, settings: BatchSettings,
                    device) -> tuple[list[dict[str, Any]], float]:
    """:func:`explain_batch` on decoded images: their results and the model's seconds per image."""
    began = time.perf_counter()
    results = explain_batch(loaded, [d.tensor for d in chunk], plan.methods, plan.layers, settings,
                            device, regions=[d.box for d in chunk],
                            photo_sizes=[d.pixels.shape[1::-1] for d in chunk],
                            preprocessing=plan.preprocessing)
    return results, (time.perf_counter() - began) / len(chunk)


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


def _run_locked(loaded, model_spec, input_specs, inputs: Inputs, out: Path, settings: BatchSettings,
                resume: bool, shard, quiet: bool, device, refresh_every: int, on_batch,
                started: float) -> BatchRun:
    import torch

    from .explanation import _model_device
    from .replicas import ModelReplicas, default_parallel_batches

    run = start_run(loaded, model_spec, input_specs, inputs, out, settings, resume, shard, quiet, started)
    selected, missing, key_prefix, ledger = run.selected, run.missing, run.key_prefix, run.ledger
    preprocessing, summary = run.plan.preprocessing, ledger.summary
    finish, refresh = ledger.finish, ledger.refresh
    run_device = torch.device(device) if device else _model_device(loaded.module)
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
        return finish(_write_image(out, decoded, result, settings, model_s))

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
        explaining.append((chunk, replicas.submit(explain_decoded, chunk, run.plan, settings, run_device)))
        while len(explaining) >= replicas.count:  # every replica busy: wait for the oldest batch
            oldest_explained()

    replicas: ModelReplicas | None = None
    try:
        replicas = ModelReplicas(loaded, parallel)
        for spec, reason in missing:
            finish({"image": spec, "path": spec, "status": "failed", "reason": reason, "key": None})
        done_keys = run.done_keys
        todo = iter(selected)
        chunk: list[Decoded] = []
        exhausted = False
        while True:
            while not exhausted and len(pending_reads) < max_reads:
                item = next(todo, None)
                if item is None:
                    exhausted = True
                    break
                pending_reads.append(readers.submit(_read_image, item, key_prefix, done_keys,
                                                    preprocessing, settings.max_pixels,
                                                    settings.overlay_size))
            if not pending_reads:
                break
            decoded = pending_reads.popleft().result()
            if decoded.skipped is not None:
                ledger.done_earlier()
                continue
            if decoded.error is not None:
                finish(_failed(decoded, decoded.error))
                continue
            chunk.append(decoded)
            if len(chunk) >= settings.images_per_batch:
                run_model(chunk)
                chunk = []
        if chunk:
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


def _failed(decoded: Decoded, reason: str) -> dict[str, Any]:
    return {"image": decoded.item.relative, "path": str(decoded.item.path), "status": "failed",
            "reason": reason, "key": decoded.key, "sha256": decoded.sha256,
            "timings": {"decode_s": round(decoded.decode_s, 6)}}


def _read_image(item: InputImage, key_prefix: str, done_keys: dict[str, str], preprocessing,
                max_pixels: int, overlay_size: int | None = None) -> Decoded:
    from .images import load_image
    from .preprocess import prepare

    began = time.perf_counter()
    reason = not_a_regular_file(item.path)  # a FIFO would block, a device never end: never read them
    if reason is not None:
        return Decoded(item, "", "", error=f"{item.path} {reason}.")
    try:
        sha = file_sha256(item.path)
    except OSError as error:
        return Decoded(item, "", "", error=f"Cannot read {item.path}: {error.strerror or error}")
    key = f"{key_prefix}:{sha}"
    decoded = Decoded(item, sha, key)
    if done_keys.get(item.relative) == key:
        decoded.skipped = {}
        return decoded
    try:
        picture = load_image(item.path, max_pixels=max_pixels, longest_side=overlay_size,
                             shortest_side=preprocessing.shortest_side)
        prepared = prepare(picture.pixels, preprocessing)
    except AttnExplainError as error:
        decoded.error = str(error)
    except Exception as error:  # noqa: BLE001 - one bad image never stops the run
        decoded.error = f"{type(error).__name__}: {' '.join(str(error).split())}"
    else:
        decoded.pixels, decoded.box, decoded.tensor = picture.pixels, prepared.box, prepared.tensor
        decoded.image_info = picture.describe()
    decoded.decode_s = time.perf_counter() - began
    return decoded


def _write_image(out: Path, decoded: Decoded, result: dict[str, Any], settings: BatchSettings,
                 model_s: float) -> dict[str, Any]:
    """One image's folder, atomically: per method the files ``attnexplain run`` writes (see
    :func:`attnexplain.report.write_method_outputs`) and a thumbnail, and the detail page."""
    from ._atomic import atomic_directory
    from .gallery import render_detail
    from .render import downscale, encode_image, render_explained_overlay
    from .report import method_summary, write_method_outputs
    from .viewer import DETAIL_MAP_SIDE, viewer_data

    began = time.perf_counter()
    if "error" in result:
        return _failed(decoded, result["error"])
    output = f"{IMAGES_DIR}/{decoded.item.relative}"
    files: dict[str, dict[str, str]] = {}
    try:
        with atomic_directory(out / output) as staging:
            for name, method_map in result["maps"].items():
                overlay = render_explained_overlay(decoded.pixels, method_map.heatmap, decoded.box,
                                                   settings.alpha, result.get("detections"),
                                                   settings.colormap)
                written = write_method_outputs(staging, method_map, overlay, settings.overlay_format,
                                               settings.colormap)
                files[name] = dict(written.files, thumb=f"thumb-{name}.jpg")
                (staging / files[name]["thumb"]).write_bytes(
                    encode_image(downscale(overlay, THUMB_SIDE), ".jpg", quality=80))
            first = next(iter(result["maps"].values()))
            record = {
                "image": decoded.item.relative, "path": str(decoded.item.path), "status": "ok",
                "key": decoded.key, "sha256": decoded.sha256, "output": output, "files": files,
                "detail": f"{output}/{DETAIL_HTML}", "image_info": decoded.image_info,
                "predictions": result["predictions"], "target": result["target"],
                "methods": list(result["maps"]),
                "maps": {name: method_summary(method_map) for name, method_map in result["maps"].items()},
                "layer": ",".join(first.layers) or None,
                **({"detections": result["detections"]} if "detections" in result else {}),
                **({"metrics": result["metrics"]} if "metrics" in result else {}),
                "timings": {"decode_s": round(decoded.decode_s, 6), "model_s": round(model_s, 6)},
                "photo": PHOTO_JPG,
                **({"truth": settings.truth.label_for(decoded.item.relative, decoded.item.path)}
                   if settings.truth is not None else {}),
            }
            (staging / PHOTO_JPG).write_bytes(encode_image(downscale(decoded.pixels, PHOTO_SIDE), ".jpg",
                                                           quality=85))
            target = result["target"]
            viewer = viewer_data(result["maps"], target["label"] or f"class {target['index']}", decoded.box,
                                 decoded.pixels.shape[1::-1], DETAIL_MAP_SIDE, settings.colormap,
                                 settings.alpha, result.get("detections"))
            (staging / DETAIL_HTML).write_text(render_detail(record, viewer, PHOTO_JPG), encoding="utf-8")
            record["timings"]["write_s"] = round(time.perf_counter() - began, 6)
    except Exception as error:  # noqa: BLE001 - a disk or encoding problem fails this image only
        return _failed(decoded, f"Cannot write outputs: {type(error).__name__}: {error}")
    finally:
        decoded.pixels = None
    return record

