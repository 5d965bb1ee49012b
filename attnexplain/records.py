"""``results.jsonl``: one JSON line per image of a batch run, what such a line may hold, and the key
that says whether it still stands for its image.

``batch`` appends a record as each image finishes; ``--resume`` and ``merge`` read the records of
earlier runs back. Those are plain text anyone can edit, so nothing here trusts them: every line is
bounded in size, every record is checked (:func:`ok_record_problem`, :func:`record_files_problem`)
before its paths or numbers are used, and a line no record can be read from is said, not skipped
silently (:func:`read_records`). A record's key is the run's :func:`fingerprint` (the model, the
options and what the plan decided) and the sha256 of the image's bytes (:func:`file_sha256`);
``evaluate``'s log (:mod:`attnexplain.evaluation_log`) is written and keyed the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from ._files import not_a_regular_file
from ._untrusted import finite_number, is_finite_number
from .caption_records import caption_record_problem, is_caption_record
from .errors import AttnExplainError, shown
from .formats import RESULTS_JSONL
from .truth import MAX_LABEL_LENGTH

if TYPE_CHECKING:
    from .batch_stages import BatchSettings
    from .model_spec import ModelSpec

#: Where batch writes an image's folder (``images/<image>``) and, in it, its detail page.
IMAGES_DIR = "images"
DETAIL_HTML = "detail.html"

#: The longest line of results.jsonl read as a record. A record is a few kilobytes, but its
#: predictions grow with --top-k: every class of ImageNet-21k (21,843 names) makes 2 to 6 MiB, and
#: 100,000 classes (the most a labels file may name) of 300-byte entries (a long name, or one written
#: as JSON escapes) 30 MiB; this holds twice that. Beyond it a line is not one of ours (batch refuses
#: to write one, see :meth:`ResultsLog.append`) and is dropped, and said, without being read whole:
#: the limit bounds the memory a damaged or hostile file can take.
MAX_RECORD_BYTES = 64 << 20
#: Lines no record can be read from that are each said; the rest are counted in one sentence (a
#: damaged file of millions of lines must not make a list of millions).
MAX_DROPPED_SAID = 100


class RecordTooLarge(AttnExplainError):
    """An image's record would be a line longer than :data:`MAX_RECORD_BYTES`."""


@dataclass
class ResultsFile:
    """What :func:`read_records` found in a results.jsonl: the records (the last line per image),
    and a sentence per line it could not use (``"line 3: not JSON"``; past :data:`MAX_DROPPED_SAID`,
    one sentence counts the others)."""

    records: list[dict[str, Any]]
    dropped: list[str]


def _numbered_lines(handle, limit: int) -> Iterator[tuple[int, bytes | None, str | None]]:
    """(line number, line, None) for each line of a binary file that ends with a newline and is at
    most ``limit`` bytes long; (line number, None, why) for the others, read in pieces."""
    number = 0
    while line := handle.readline(limit + 1):
        number += 1
        if line.endswith(b"\n"):
            yield number, line, None
            continue
        if len(line) <= limit:
            yield number, None, "cut short (no newline at its end: an interrupted write)"
            return
        while (rest := handle.readline(limit)) and not rest.endswith(b"\n"):
            pass  # the rest of an overlong line
        yield number, None, f"over {limit:,} bytes"


def read_records(path: Path) -> ResultsFile:
    """Every complete line of a results.jsonl that is a record (a JSON object naming its image);
    later lines for the same image replace earlier ones. A truncated, garbled or overlong line (an
    interrupted write, a damaged file) is left out and said in ``dropped``."""
    reason = not_a_regular_file(path)
    if reason == "does not exist":
        return ResultsFile([], [])
    if reason is not None:
        raise AttnExplainError(f"{path} {reason}.")
    records: dict[str, dict[str, Any]] = {}
    dropped: list[str] = []
    more = 0
    with open(path, "rb") as handle:
        for number, line, why in _numbered_lines(handle, MAX_RECORD_BYTES):
            if line is not None:
                try:
                    record = json.loads(line.decode("utf-8", errors="replace"))
                except (ValueError, RecursionError):  # ValueError: also an int of over 4300 digits
                    why = "not JSON" if line.strip() else None  # a blank line is no record
                else:
                    if isinstance(record, dict) and isinstance(record.get("image"), str):
                        records[record["image"]] = record
                    else:
                        why = "not a record naming its image"
            if why is not None and len(dropped) < MAX_DROPPED_SAID:
                dropped.append(f"line {number}: {why}")
            elif why is not None:
                more += 1
    if more:
        dropped.append(f"and {more} more lines that are no record")
    return ResultsFile(list(records.values()), dropped)


def read_results(path: Path) -> list[dict[str, Any]]:
    """The records of a results.jsonl (:func:`read_records`), lines it cannot use left out."""
    return read_records(path).records


class ResultsLog:
    """Appends one JSON line per image and flushes it to disk at once.

    Each line is one ``write`` call on an unbuffered file opened for appending, so a line is never
    interleaved with another and a failed write (a full disk) leaves nothing buffered to retry."""

    def __init__(self, path: Path, keep: Iterable[dict[str, Any]]) -> None:
        from ._atomic import write_bytes_atomic

        path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(record, sort_keys=True) + "\n" for record in keep)
        write_bytes_atomic(path, text.encode("utf-8"))  # a fresh file holding only what is kept
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)

    def append(self, record: dict[str, Any]) -> None:
        """Raises OSError (a full disk) with the file as it was: never half a line, and
        :class:`RecordTooLarge` for a line :func:`read_records` would not read back."""
        line = memoryview((json.dumps(record, sort_keys=True) + "\n").encode("utf-8"))
        if len(line) > MAX_RECORD_BYTES:
            raise RecordTooLarge(
                f"its record would be a line of {len(line):,} bytes in {RESULTS_JSONL}, "
                f"over the {MAX_RECORD_BYTES:,} a record may take; ask for fewer "
                f"classes (--top-k)"
            )
        size = os.fstat(self._fd).st_size  # callers append one at a time
        try:
            while line:
                line = line[os.write(self._fd, line) :]
            os.fsync(self._fd)
        except OSError:
            try:
                os.ftruncate(self._fd, size)  # needs no space
            except OSError:
                pass  # read_results skips a garbled line
            raise

    def close(self) -> None:
        os.close(self._fd)


def record_file_names(record: dict[str, Any]) -> list[str]:
    """The files an ok record says its folder holds: its detail page and every method's files."""
    names = [DETAIL_HTML] + ([record["photo"]] if "photo" in record else [])
    for per_method in record["files"].values():
        names.extend(per_method.values())
    return names


def ok_record_problem(record: dict[str, Any]) -> str | None:
    """Why an ``ok`` record of a results.jsonl cannot be trusted to stand for its image, or None.

    Records are plain text anyone can edit: its folder must be where batch puts it
    (``images/<image>``, the image a normalised relative path: nothing absolute, no ``..``), its
    files plain names inside that folder, its predictions and target (a captioner's caption and
    words, :func:`attnexplain.caption_records.caption_record_problem`) what the reports show, its
    ``metrics`` (when present) a small table of finite numbers for its own methods.
    ``--resume`` and ``merge`` both ask this before they use a record's paths.
    """
    image = record.get("image")
    if not _is_image_name(image):
        return "is not a relative path inside the output (absolute, '..' or not normalised)"
    output = f"{IMAGES_DIR}/{image}"
    if record.get("output") != output:
        return f"has the output {shown(record.get('output'))}, not {shown(output)} as batch writes it"
    if record.get("detail") != f"{output}/{DETAIL_HTML}":
        return f"has the detail page {shown(record.get('detail'))}, not {shown(output + '/' + DETAIL_HTML)}"
    predictions = record.get("predictions")
    if is_caption_record(record):  # a captioner's: a caption and its words instead of predictions
        captioned = caption_record_problem(record)
        if captioned is not None:
            return captioned
    elif not (
        isinstance(predictions, list)
        and predictions
        and all(map(_is_prediction, predictions))
        and _is_prediction(record.get("target"))
    ):
        return "has predictions or a target the reports cannot show"
    present = record.get("present")  # a multi-label model's labels above the threshold
    if present is not None and not (isinstance(present, list) and all(map(_is_prediction, present))):
        return "has present labels the reports cannot show"
    methods = record.get("methods")
    if not (isinstance(methods, list) and all(isinstance(m, str) for m in methods)):
        return "has methods that are not a list of names"
    files = record.get("files")
    if not (isinstance(files, dict) and files and all(isinstance(named, dict) for named in files.values())):
        return "has no table of file names"
    bad = next((name for name in record_file_names(record) if not _is_file_name(name)), None)
    if bad is not None:
        return f"names the file {shown(bad)}, which is not a plain file name"
    truth = record.get("truth")
    if truth is not None and not (isinstance(truth, str) and 0 < len(truth) <= MAX_LABEL_LENGTH):
        return f"has the true class {shown(truth)}, which is not a class name"
    problem = timings_problem(record.get("timings"))
    if problem is not None:
        return problem
    if "metrics" in record:
        from .metrics import metrics_table_problem

        return metrics_table_problem(record["metrics"], methods)
    return None


#: Seconds a step of one image may take in a record (a year): the report sums them over images,
#: and 1e308 twice is infinity, which JSON cannot hold.
MAX_STEP_SECONDS = 365 * 24 * 3600


def timings_problem(timings: Any) -> str | None:
    """Why a record's ``timings`` (absent, or seconds by step) cannot be summed, or None."""
    if timings is not None and not (isinstance(timings, dict) and all(map(_is_seconds, timings.values()))):
        return "has timings that are not numbers of seconds"
    return None


def _is_seconds(value: Any) -> bool:
    seconds = finite_number(value)
    return seconds is not None and 0 <= seconds <= MAX_STEP_SECONDS


#: A class index beyond this is not one (a model has at most millions of classes); it keeps every
#: index a record brings within what NumPy and the pages' JavaScript hold exactly.
MAX_CLASS_INDEX = 2**31 - 1


def _is_prediction(value: Any) -> bool:
    index = value.get("index") if isinstance(value, dict) else None
    return (
        isinstance(index, int)
        and not isinstance(index, bool)
        and 0 <= index <= MAX_CLASS_INDEX
        # a probability, or a single output's value (regression, a binary logit) in its stead
        and (
            is_finite_number(value.get("prob")) or (value.get("prob") is None and is_finite_number(value.get("value")))
        )
        and isinstance(value.get("label"), (str, type(None)))
    )


def _is_file_name(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and not any(char in name for char in "/\\\0")


def _is_image_name(image: Any) -> bool:
    """The relative posix path batch names an image by: normalised, nothing absolute, no ``..``."""
    return (
        isinstance(image, str)
        and bool(image)
        and "\0" not in image
        and not image.startswith("/")
        and posixpath.normpath(image) == image
        and all(part not in ("", ".", "..") for part in image.split("/"))
    )


def record_files_problem(root: Path, record: dict[str, Any]) -> str | None:
    """Why the files an ok record (checked by :func:`ok_record_problem`) lists are not where batch
    puts them inside the output folder ``root`` (resolved), or None: its folder must not be reached
    through a symbolic link (which could point anywhere), and each file must be a regular file, not
    a link. ``--resume`` and ``merge`` both ask this before they use an earlier record's files."""
    output = record["output"]
    folder = root / output
    try:
        resolved = folder.resolve()
    except (OSError, RuntimeError):
        resolved = None
    if resolved != folder:
        return f"has its folder {output} behind a symbolic link (it resolves to {resolved}, not inside {root}/{output})"
    for name in record_file_names(record):
        path = folder / name
        why = "is a symbolic link" if os.path.islink(path) else not_a_regular_file(path)
        if why is not None:
            return f"lists the file {output}/{name}, which {why}"
    return None


# --- keys: what says an earlier record still stands ------------------------------------------------


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """The sha256 of a file's bytes (read ``chunk`` bytes at a time), hex: what a key says of an image."""
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
    from .model_spec import ModelSpec

    spec = {
        key: str(value) if isinstance(value, Path) else value
        for key, value in ModelSpec.of(model_spec).identity().items()
        if value is not None and value is not False
    }
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
    decided = (
        None
        if plan is None
        else {
            "methods": [method.name for method in plan.methods],
            "layers": list(plan.layers),
            "preprocessing": asdict(plan.preprocessing),
        }
    )
    text = json.dumps({"model": spec, "settings": settings.describe(), "plan": decided}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def reusable_record(record: dict[str, Any], key_prefix: str, wanted: set[str], out: Path) -> bool:
    """Whether an earlier run's record can stand for its image: made with this model and these
    options, for an image of this run, trustworthy (:func:`ok_record_problem`), every file it lists
    in place inside ``out`` (resolved; :func:`record_files_problem`)."""
    key = record.get("key")
    if (
        record.get("status") != "ok"
        or not isinstance(key, str)
        or not key.startswith(key_prefix + ":")
        or record.get("image") not in wanted
        or ok_record_problem(record) is not None
    ):
        return False
    return record_files_problem(out, record) is None
