"""Explaining many images: a streaming pipeline that decodes, explains in batches and writes as it goes.

Decoding + preprocessing and encoding + writing run on worker threads while the model runs batches on
the calling thread through :func:`attnexplain.explanation.compute_maps`. At most a bounded number of
images is in flight at any time, so memory does not grow with the number of images.

Never losing work: every file is written atomically (per-image folders as a whole), ``results.jsonl``
gets one line per image, flushed as soon as that image's files are in place (by the thread that wrote
them), and ``report.json``, ``summary.csv`` and ``index.html`` are refreshed periodically and at the end
(also on Ctrl-C).
``resume=True`` skips images whose key (sha256 of the file's bytes + a fingerprint of the model and
options) already has an ``ok`` line whose outputs exist.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .errors import AttnExplainError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
RESULTS_JSONL = "results.jsonl"
SUMMARY_CSV = "summary.csv"
REPORT_JSON = "report.json"
INDEX_HTML = "index.html"
IMAGES_DIR = "images"
DETAIL_HTML = "detail.html"
THUMB_SIDE = 192
#: Exit code of ``attnexplain batch`` / ``merge`` when some images failed (the others were written).
EXIT_SOME_FAILED = 3


# --- inputs --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InputImage:
    path: Path  # absolute
    relative: str  # posix path relative to the common root: names the output folder


@dataclass
class Inputs:
    images: list[InputImage]
    missing: list[tuple[str, str]]  # (what was given, why nothing was found)
    root: Path | None


def _has_glob(text: str) -> bool:
    return any(char in text for char in "*?[")


def _expand(spec: str, found: list[Path], missing: list[tuple[str, str]], base: Path) -> None:
    if spec.startswith("@"):
        list_file = Path(spec[1:])
        try:
            lines = list_file.read_text(encoding="utf-8").splitlines()
        except OSError as error:
            missing.append((spec, f"Cannot read the list file {list_file}: {error.strerror or error}"))
            return
        for line in lines:
            line = line.strip()
            if line and not line.startswith("#"):
                entry = line if os.path.isabs(line) else str((list_file.parent / line))
                _expand(entry, found, missing, base)
        return
    path = Path(spec)
    if path.is_dir():
        for candidate in sorted(path.rglob("*")):
            if candidate.suffix.lower() in IMAGE_EXTENSIONS and candidate.is_file():
                found.append(candidate)
        return
    if path.exists():
        found.append(path)
        return
    if _has_glob(spec):
        matches = sorted(glob.glob(spec, recursive=True))
        files = [Path(m) for m in matches if Path(m).is_file()]
        if not files:
            missing.append((spec, f"No file matches {spec}"))
        for match in files:
            found.append(match)
        return
    missing.append((spec, f"Image not found: {spec}"))


def collect_inputs(specs: Sequence[str]) -> Inputs:
    """Files, folders (recursive, image extensions only), globs and ``@list.txt`` files → images,
    deduplicated and sorted by their path relative to the common root of their folders."""
    found: list[Path] = []
    missing: list[tuple[str, str]] = []
    for spec in specs:
        _expand(str(spec), found, missing, Path.cwd())
    unique: dict[str, Path] = {}
    for path in found:
        resolved = path.resolve()
        unique.setdefault(str(resolved), resolved)
    paths = list(unique.values())
    if not paths:
        return Inputs([], missing, None)
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    images = sorted((InputImage(p, p.relative_to(root).as_posix()) for p in paths),
                    key=lambda item: item.relative)
    return Inputs(images, missing, root)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise AttnExplainError(f"--shard must look like I/N (e.g. 0/4), not {text!r}.") from None
    if count < 1 or not 0 <= index < count:
        raise AttnExplainError(f"--shard {text}: need N >= 1 and 0 <= I < N.")
    return index, count


def in_shard(relative: str, shard: tuple[int, int] | None) -> bool:
    """Deterministic: the same relative path always lands in the same shard."""
    if shard is None:
        return True
    digest = hashlib.sha256(relative.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % shard[1] == shard[0]


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
    overlay_format: str = "jpg"  # see report.OVERLAY_FORMATS: thousands of photos want JPEG
    max_pixels: int = 100_000_000
    images_per_batch: int = 16
    workers: int = 2
    options: Any = None  # MethodOptions

    def describe(self) -> dict[str, Any]:
        data = {key: value for key, value in asdict(self).items()
                if key not in ("options", "images_per_batch", "workers")}
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


def fingerprint(model_spec: dict[str, Any], settings: BatchSettings) -> str:
    """Identifies the model (its file's content where it is a file) and every output-relevant option."""
    spec = {key: str(value) if isinstance(value, Path) else value
            for key, value in model_spec.items() if value is not None and value is not False}
    source = spec.get("model")
    if source and Path(str(source)).is_file():
        spec["model_sha256"] = file_sha256(Path(str(source)))
        spec["model"] = Path(str(source)).name
    labels = spec.get("labels")
    if labels and Path(str(labels)).is_file():
        spec["labels"] = file_sha256(Path(str(labels)))
    spec.pop("device", None)  # the same model on another device gives the same explanation
    text = json.dumps({"model": spec, "settings": settings.describe()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


# --- results.jsonl ---------------------------------------------------------------------------------

def read_results(path: Path) -> list[dict[str, Any]]:
    """Every complete line of a results.jsonl; a truncated or garbled line (an interrupted write) is
    skipped. Later lines for the same image replace earlier ones."""
    records: dict[str, dict[str, Any]] = {}
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if not line.endswith("\n"):
                    break  # the last line was cut short
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and "image" in record:
                    records[record["image"]] = record
    except FileNotFoundError:
        pass
    return list(records.values())


class ResultsLog:
    """Appends one JSON line per image and flushes it to disk at once."""

    def __init__(self, path: Path, keep: Iterable[dict[str, Any]]) -> None:
        from ._atomic import write_bytes_atomic

        path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(record, sort_keys=True) + "\n" for record in keep)
        write_bytes_atomic(path, text.encode("utf-8"))  # a fresh file holding only what is kept
        self._handle = open(path, "a", encoding="utf-8")

    def append(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record, sort_keys=True) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


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
                  photo_sizes: Sequence[tuple[int, int]] | None = None) -> list[dict[str, Any]]:
    """A pure function of its inputs: (B, 3, h, w) → per image, its maps (``MethodMap`` per method,
    attention grids and gates included), predictions and target, a detector's boxes (on the photo
    of ``photo_sizes`` (width, height), whose part the model saw is the image's ``regions`` entry;
    by default the input itself), or an error for images with nothing to explain (a requested
    target with probability 0, a detector that found nothing)."""
    import torch

    from .errors import MethodError, NothingToExplain
    from .explanation import boxes_on_photo, compute_maps, image_outcome

    batch = torch.cat(tensors).to(device)
    try:
        computed = compute_maps(loaded, batch, methods, layers, target=settings.target,
                                options=settings.options)
    except NothingToExplain as error:  # no image of the batch has anything to explain
        return [{"error": str(error)} for _ in tensors]
    probabilities = computed.probabilities.float().cpu()
    targets = computed.targets.cpu()
    results = []
    for index, maps in enumerate(computed.image_maps()):
        result: dict[str, Any] = {"maps": maps}
        try:
            target, predictions = image_outcome(probabilities[index], int(targets[index]),
                                                loaded.labels, settings.top_k,
                                                target_given=settings.target is not None)
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

    @property
    def exit_code(self) -> int:
        return EXIT_SOME_FAILED if self.failed else 0


class _Progress:
    """Rich bar on a terminal, a plain line every few seconds otherwise, nothing when quiet."""

    def __init__(self, total: int, quiet: bool, stream=None, already: int = 0) -> None:
        # ``already``: images done by an earlier run (--resume); they do not count in the rate.
        self.total, self.quiet, self.done, self.already = total, quiet, already, already
        self.stream = stream or sys.stderr
        self.started = self.last = time.perf_counter()
        self.bar = None
        if not quiet and self.stream.isatty():
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn,
                                       TextColumn, TimeElapsedColumn, TimeRemainingColumn)

            self.bar = Progress(TextColumn("explaining"), BarColumn(), MofNCompleteColumn(),
                                TaskProgressColumn(), TextColumn("{task.fields[rate]}"),
                                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                console=Console(file=self.stream), transient=False)
            self.bar.start()
            self.task = self.bar.add_task("batch", total=total, completed=already, rate="")

    def advance(self, count: int = 1) -> None:
        self.done += count
        now = time.perf_counter()
        rate = (self.done - self.already) / max(now - self.started, 1e-9)
        if self.bar is not None:
            self.bar.update(self.task, advance=count, rate=f"{rate:.1f} img/s")
        elif not self.quiet and (now - self.last >= 5.0 or self.done == self.total):
            self.last = now
            remaining = (self.total - self.done) / rate if rate > 0 else float("nan")
            print(f"[attnexplain] {self.done}/{self.total} images, {rate:.1f} img/s, "
                  f"ETA {remaining:.0f}s", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def run_batch(loaded, model_spec: dict[str, Any], input_specs: Sequence[str], out: Path,
              settings: BatchSettings, *, resume: bool = False, shard: tuple[int, int] | None = None,
              quiet: bool = False, device: str | None = None, refresh_every: int = 20,
              on_batch: Callable[[int], None] | None = None) -> BatchRun:
    """Explain every image ``input_specs`` names into ``out``; see the module's docstring."""
    import torch

    from .explanation import _model_device, plan_explanation
    from .gallery import write_reports

    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    inputs = collect_inputs(input_specs)
    selected = [item for item in inputs.images if in_shard(item.relative, shard)]
    missing = [(spec, reason) for spec, reason in inputs.missing if in_shard(spec, shard)]
    run_device = torch.device(device) if device else _model_device(loaded.module)
    plan = plan_explanation(loaded, settings.method, settings.layer, size=settings.size,
                            mean=settings.mean, std=settings.std)
    preprocessing, methods, layers = plan.preprocessing, plan.methods, plan.layers
    key_prefix = fingerprint(model_spec, settings)
    meta = {"model": loaded.describe(), "model_spec": {k: (str(v) if v is not None else None)
                                                       for k, v in model_spec.items()},
            "options": settings.describe(), "preprocessing": preprocessing.as_dict(),
            "methods": [m.name for m in methods], "layers": layers, "fingerprint": key_prefix,
            "shard": list(shard) if shard else None, "inputs": [str(s) for s in input_specs],
            "root": str(inputs.root) if inputs.root else None}

    previous = read_results(out / RESULTS_JSONL) if resume else []
    done: dict[str, dict[str, Any]] = {}
    for record in previous:
        if record.get("status") == "ok" and record.get("key", "").startswith(key_prefix) and \
                all((out / record["output"] / name).exists() for name in _record_files(record)):
            done[record["key"]] = record
    wanted = {item.relative for item in selected}
    kept = [record for record in done.values() if record["image"] in wanted]
    log = ResultsLog(out / RESULTS_JSONL, kept)
    records: dict[str, dict[str, Any]] = {}  # image → record, small dicts only
    summary = BatchRun(total=len(selected) + len(missing), out=out)
    progress = _Progress(summary.total, quiet, already=len(kept))
    workers = max(1, settings.workers)
    readers = ThreadPoolExecutor(workers, thread_name_prefix="attnexplain-read")
    writers = ThreadPoolExecutor(workers, thread_name_prefix="attnexplain-write")
    pending_reads: deque[Future] = deque()
    pending_writes: deque[Future] = deque()
    max_reads = settings.images_per_batch * 2 + workers
    max_writes = settings.images_per_batch + 2 * workers
    lock = threading.Lock()
    batches = 0

    def finish(record: dict[str, Any]) -> dict[str, Any]:
        with lock:
            log.append(record)
            records[record["image"]] = record
            if record["status"] == "ok":
                summary.ok += 1
            else:
                summary.failed += 1
            progress.advance()
        return record

    def write(decoded: Decoded, result: dict[str, Any], model_s: float) -> dict[str, Any]:
        # On a writer thread: the image's line is in results.jsonl as soon as its folder is in place.
        return finish(_write_image(out, decoded, result, settings, model_s))

    def refresh(complete: bool) -> None:
        meta_now = dict(meta, complete=complete, wall_s=round(time.perf_counter() - started, 3),
                        interrupted=summary.interrupted)
        with lock:
            finished = sorted(records.values(), key=lambda r: r["image"])
        write_reports(out, finished, meta_now)

    def wait_for_writes(limit: int) -> None:
        while pending_writes and (len(pending_writes) > limit or pending_writes[0].done()):
            pending_writes.popleft().result()  # raises what a writer could not handle

    def run_model(chunk: list[Decoded]) -> None:
        nonlocal batches
        began = time.perf_counter()
        results = explain_batch(loaded, [d.tensor for d in chunk], methods, layers, settings, run_device,
                                regions=[d.box for d in chunk],
                                photo_sizes=[d.pixels.shape[1::-1] for d in chunk])
        model_s = (time.perf_counter() - began) / len(chunk)
        for decoded, result in zip(chunk, results):
            decoded.tensor = None
            wait_for_writes(max_writes)
            pending_writes.append(writers.submit(write, decoded, result, model_s))
        batches += 1
        if on_batch is not None:
            on_batch(batches)
        if batches % refresh_every == 0:
            refresh(False)  # what has finished so far; the writers go on meanwhile

    try:
        for spec, reason in missing:
            finish({"image": spec, "path": spec, "status": "failed", "reason": reason, "key": None})
        for record in kept:
            records[record["image"]] = record
            summary.skipped += 1
            summary.ok += 1
        done_keys = {record["key"] for record in kept}
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
                                                    preprocessing, settings.max_pixels))
            if not pending_reads:
                break
            decoded = pending_reads.popleft().result()
            if decoded.skipped is not None:
                continue  # already counted from the kept records
            if decoded.error is not None:
                finish(_failed(decoded, decoded.error))
                continue
            chunk.append(decoded)
            if len(chunk) >= settings.images_per_batch:
                run_model(chunk)
                chunk = []
        if chunk:
            run_model(chunk)
        wait_for_writes(0)
    except KeyboardInterrupt:
        summary.interrupted = True
        raise
    finally:
        for future in pending_reads:
            future.cancel()
        readers.shutdown(wait=True, cancel_futures=True)
        writers.shutdown(wait=True)  # images already explained are written and recorded
        log.close()
        progress.close()
        summary.wall_s = time.perf_counter() - started
        refresh(not summary.interrupted)
    return summary


def _record_files(record: dict[str, Any]) -> list[str]:
    names = [DETAIL_HTML]
    for files in record.get("files", {}).values():
        names.extend(files.values())
    return names


def _failed(decoded: Decoded, reason: str) -> dict[str, Any]:
    return {"image": decoded.item.relative, "path": str(decoded.item.path), "status": "failed",
            "reason": reason, "key": decoded.key, "sha256": decoded.sha256,
            "timings": {"decode_s": round(decoded.decode_s, 6)}}


def _read_image(item: InputImage, key_prefix: str, done_keys: set[str], preprocessing,
                max_pixels: int) -> Decoded:
    from .images import load_image
    from .preprocess import prepare

    began = time.perf_counter()
    try:
        sha = file_sha256(item.path)
    except OSError as error:
        return Decoded(item, "", "", error=f"Cannot read {item.path}: {error.strerror or error}")
    key = f"{key_prefix}:{sha}"
    decoded = Decoded(item, sha, key)
    if key in done_keys:
        decoded.skipped = {}
        return decoded
    try:
        picture = load_image(item.path, max_pixels=max_pixels)
        prepared = prepare(picture.pixels, preprocessing)
    except AttnExplainError as error:
        decoded.error = str(error)
    except Exception as error:  # noqa: BLE001 - one bad image never stops the run
        decoded.error = f"{type(error).__name__}: {' '.join(str(error).split())}"
    else:
        decoded.pixels, decoded.box, decoded.tensor = picture.pixels, prepared.box, prepared.tensor
        decoded.image_info = {"width": picture.size[0], "height": picture.size[1],
                              "format": picture.format, "mode": picture.mode}
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

    began = time.perf_counter()
    if "error" in result:
        return _failed(decoded, result["error"])
    output = f"{IMAGES_DIR}/{decoded.item.relative}"
    files: dict[str, dict[str, str]] = {}
    try:
        with atomic_directory(out / output) as staging:
            os.chmod(staging, 0o755)  # mkdtemp makes it private; outputs are meant to be shared
            for name, method_map in result["maps"].items():
                overlay = render_explained_overlay(decoded.pixels, method_map.heatmap, decoded.box,
                                                   settings.alpha, result.get("detections"))
                written = write_method_outputs(staging, method_map, overlay, settings.overlay_format)
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
                "timings": {"decode_s": round(decoded.decode_s, 6), "model_s": round(model_s, 6)},
            }
            (staging / DETAIL_HTML).write_text(render_detail(record), encoding="utf-8")
            record["timings"]["write_s"] = round(time.perf_counter() - began, 6)
    except Exception as error:  # noqa: BLE001 - a disk or encoding problem fails this image only
        return _failed(decoded, f"Cannot write outputs: {type(error).__name__}: {error}")
    finally:
        decoded.pixels = None
    return record

