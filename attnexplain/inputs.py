"""The images a run takes: input collection, shards, and decoding, shared by ``batch``, ``evaluate``
and the Ray engine.

Inputs are checked with ``os.stat`` before anything opens them (a FIFO blocks, a device never ends),
kept as named (symbolic links are not resolved, so outputs mirror the inputs as given), and never
taken from inside ``out``. Shards split a run's images by their relative path, deterministically.
Decoding (:func:`read_image`) reads an image's bytes once for its key (the run's fingerprint + the
file's sha256) and its pixels; a decode that fails is that image's record (:func:`failed_record`),
never the run's error. :func:`decoded_chunks` is the one loop that turns decoded images into the
model's batches.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

from ._files import not_a_regular_file
from .errors import AttnExplainError
from .records import file_sha256

if TYPE_CHECKING:
    import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


class NoImages(AttnExplainError):
    """The inputs name no image at all."""


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
        if (entry.name.startswith(".") and not head.startswith(".")) or not fnmatch.fnmatchcase(entry.name, head):
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
    images = sorted((InputImage(p, p.relative_to(root).as_posix()) for p in paths), key=lambda item: item.relative)
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


# --- decoding ------------------------------------------------------------------------------------


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


def failed_record(decoded: Decoded, reason: str) -> dict[str, Any]:
    """The record of an image that failed (its decode, its explanation or its writing)."""
    return {
        "image": decoded.item.relative,
        "path": str(decoded.item.path),
        "status": "failed",
        "reason": reason,
        "key": decoded.key,
        "sha256": decoded.sha256,
        "timings": {"decode_s": round(decoded.decode_s, 6)},
    }


def read_image(
    item: InputImage,
    key_prefix: str,
    done_keys: dict[str, str],
    preprocessing,
    max_pixels: int,
    overlay_size: int | None = None,
) -> Decoded:
    """``item`` read and decoded at most once: its key (``key_prefix`` + the sha256 of its bytes),
    ``skipped`` where ``done_keys`` holds that key for it (an earlier record stands), else its
    pixels (the longest side at most ``overlay_size``) and the model's tensor, or ``error``."""
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
        picture = load_image(
            item.path, max_pixels=max_pixels, longest_side=overlay_size, shortest_side=preprocessing.shortest_side
        )
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


def decoded_chunks(
    decoded: Iterable[Decoded],
    size: int,
    failed: Callable[[dict[str, Any]], Any],
    earlier: Callable[[], Any] | None = None,
) -> Iterator[list[Decoded]]:
    """The images of ``decoded`` that decoded, in chunks of ``size`` (the last one shorter), for the
    model: a failed decode's record goes to ``failed`` (:func:`failed_record`), an image whose
    earlier record stands to ``earlier``. ``decoded`` is read only as the chunks are taken, so a
    pipeline that reads ahead keeps reading while the model runs a chunk."""
    chunk: list[Decoded] = []
    for one in decoded:
        if one.skipped is not None:
            if earlier is not None:
                earlier()
            continue
        if one.error is not None:
            failed(failed_record(one, one.error))
            continue
        chunk.append(one)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
