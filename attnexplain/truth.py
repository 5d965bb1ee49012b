"""Each image's true class for ``batch --truth``: from its folder's name (the ImageFolder layout) or
from a CSV file of ``image,class`` rows (a multi-label image's classes in one cell, ``cat;dog``).
The file is the user's, and may be anyone's: it is read with caps on its size, its rows and its
cells, and every problem is one line naming the row."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ._files import not_a_regular_file
from .errors import AttnExplainError, shown

FOLDERS = "folders"
#: A class name longer than this is not one (a label file's longest names are ~100 characters).
MAX_LABEL_LENGTH = 200
MAX_TRUTH_BYTES = 64 * 1024 * 1024
MAX_TRUTH_ROWS = 2_000_000
_IMAGE_COLUMNS = ("image", "file", "path", "filename")
_CLASS_COLUMNS = ("class", "label", "truth", "true_class", "labels")
#: Between the classes of a multi-label image in a --truth cell ("cat;dog"); the record keeps the cell.
LABEL_SEPARATOR = ";"


def true_labels(truth: str) -> list[str]:
    """The classes a record's true class names: one, or a multi-label image's several ("cat;dog")."""
    return [part for part in truth.split(LABEL_SEPARATOR) if part]


class TruthError(AttnExplainError):
    """The --truth file cannot be read as image,class rows."""


@dataclass(frozen=True)
class TrueClasses:
    """Where the true classes come from: the parent folders' names, or a table read from a CSV
    file, keyed by the image's path as batch names it (``a/cat.png``) or by its file name."""

    from_folders: bool = False
    by_image: dict[str, str] = field(default_factory=dict)

    def label_for(self, relative: str, path: str | Path | None = None) -> str | None:
        """The true class of the image batch names ``relative`` (found at ``path``), or None."""
        if self.from_folders:
            parent = Path(path).parent.name if path is not None else PurePosixPath(relative).parent.name
            return parent if _is_label(parent) else None
        found = self.by_image.get(relative)
        return found if found is not None else self.by_image.get(PurePosixPath(relative).name)


def _is_label(text: str) -> bool:
    return 0 < len(text) <= MAX_LABEL_LENGTH and text.isprintable() and text.strip() == text


def _labels_cell(cell: str) -> str:
    """A class cell as the record keeps it: one class, or several separated by ``;`` (each stripped;
    an empty part or a repeated class makes the cell no name, refused as such)."""
    parts = [part.strip() for part in cell.split(LABEL_SEPARATOR)]
    if len(parts) > 1 and (not all(parts) or len(set(parts)) != len(parts)):
        return ""
    return LABEL_SEPARATOR.join(parts)


def read_truth(spec: str) -> TrueClasses:
    """``folders``, or a CSV file with a header naming an image column (image, file, path or
    filename) and a class column (class, label, truth or true_class), UTF-8. A multi-label image's
    classes share its cell, separated by ``;`` (``cat;dog``)."""
    if spec == FOLDERS:
        return TrueClasses(from_folders=True)
    path = Path(spec)
    reason = not_a_regular_file(path)  # a FIFO would block for ever, a device never end
    if reason is not None:
        raise TruthError(f"The --truth file {path} {reason}.")
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_TRUTH_BYTES + 1)
    except OSError as error:
        raise TruthError(f"Cannot read the --truth file {path}: {error.strerror or error}.") from None
    if len(raw) > MAX_TRUTH_BYTES:
        raise TruthError(
            f"The --truth file {path} is over {MAX_TRUTH_BYTES // 2**20} MiB; give a CSV of image,class rows."
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise TruthError(f"The --truth file {path} is not UTF-8 text (line {line}); save it as UTF-8 CSV.") from None
    csv.field_size_limit(MAX_LABEL_LENGTH * 50)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [cell.strip().lower() for cell in next(reader, [])]
        image_column = next((header.index(n) for n in _IMAGE_COLUMNS if n in header), None)
        class_column = next((header.index(n) for n in _CLASS_COLUMNS if n in header), None)
        if image_column is None or class_column is None:
            raise TruthError(
                f"The --truth file {path} needs a header with an image column "
                f"({', '.join(_IMAGE_COLUMNS)}) and a class column "
                f"({', '.join(_CLASS_COLUMNS)}); its first row is {shown(header)}."
            )
        by_image: dict[str, str] = {}
        for row in reader:
            if reader.line_num > MAX_TRUTH_ROWS:
                raise TruthError(f"The --truth file {path} has over {MAX_TRUTH_ROWS} rows.")
            if not any(cell.strip() for cell in row):
                continue
            if len(row) <= max(image_column, class_column):
                raise TruthError(
                    f"Line {reader.line_num} of the --truth file {path} has no "
                    f"{header[class_column]} cell: {shown(row)}."
                )
            image, label = row[image_column].strip(), _labels_cell(row[class_column])
            if not image or not _is_label(label):
                raise TruthError(
                    f"Line {reader.line_num} of the --truth file {path} has no image or "
                    f"a class that is not a name (1–{MAX_LABEL_LENGTH} printable "
                    f"characters): {shown(row)}."
                )
            image = PurePosixPath(image.replace("\\", "/")).as_posix()
            if by_image.get(image, label) != label:
                raise TruthError(
                    f"Line {reader.line_num} of the --truth file {path} gives {shown(image)} "
                    f"the class {shown(label)}, an earlier line {shown(by_image[image])}."
                )
            by_image[image] = label
    except csv.Error as error:
        raise TruthError(f"Line {reader.line_num} of the --truth file {path} is not CSV: {error}.") from None
    if not by_image:
        raise TruthError(f"The --truth file {path} has no image,class rows.")
    return TrueClasses(by_image=by_image)
