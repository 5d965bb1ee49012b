"""Where the object is, for ``evaluate``'s localisation metrics: the user's masks (a mask image per
photo, white = object) or boxes (``{"name": [[x, y, w, h], ...]}`` or a COCO file), brought into
the frame the model saw.

Masks and boxes are untrusted: a bad or missing one is that image's :class:`MaskError`, recorded,
never the run's error; a boxes file is bounded in size and never opened unless it is a regular file.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .errors import AttnExplainError, shown

#: Untrusted boxes file: its size, and boxes per image.
MAX_BOXES_BYTES = 64 * 1024 * 1024
MAX_BOXES_PER_IMAGE = 1000
#: Object masks of one image (MASKS/<image>/<label>.png) a background's region is the complement of.
MAX_OBJECT_MASKS = 1000


class MaskError(AttnExplainError):
    """An image's mask or boxes are missing or unusable: that image's localisation is not measured."""


def read_boxes(path: Path) -> dict[str, list[list[float]]]:
    """File name → boxes [x, y, width, height] in photo pixels, from ``{"name": [[x, y, w, h], ...]}``
    or a COCO file (``images`` with ``id``/``file_name``, ``annotations`` with ``image_id``/``bbox``).
    The boxes themselves are checked per image (:func:`boxes_mask`): a bad one is that image's."""
    from ._files import not_a_regular_file

    reason = not_a_regular_file(path)  # a FIFO would block for ever, a device never end
    if reason is not None:
        raise AttnExplainError(f"The boxes file {path} {reason}.")
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_BOXES_BYTES + 1)  # bounded even if the file grows meanwhile
    except OSError as error:
        raise AttnExplainError(f"Cannot read the boxes file {path}: {error.strerror or error}.") from None
    if len(raw) > MAX_BOXES_BYTES:
        raise AttnExplainError(f"{path} is over {MAX_BOXES_BYTES // 2**20} MiB; a boxes file is not that large.")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as error:  # ValueError: also an int of over 4300 digits
        raise AttnExplainError(f"The boxes file {path} is not valid JSON: {shown(str(error))}.") from None
    if isinstance(data, dict) and "annotations" in data and "images" in data:
        if not isinstance(data["images"], list) or not isinstance(data["annotations"], list):
            raise AttnExplainError(f"The COCO file {path} needs lists under images and annotations.")
        names = {
            entry.get("id"): entry.get("file_name")
            for entry in data["images"]
            if isinstance(entry, dict)
            and isinstance(entry.get("file_name"), str)
            and isinstance(entry.get("id"), (int, str))
        }
        boxes: dict[str, list] = {}
        for number, annotation in enumerate(data["annotations"], start=1):
            if not isinstance(annotation, dict):
                continue
            image_id = annotation.get("image_id")
            if not isinstance(image_id, (int, str)) or isinstance(image_id, bool):
                raise AttnExplainError(
                    f"The COCO file {path}: annotation {number} has the image_id "
                    f"{shown(image_id)}, which is not an image's id (a number or text)."
                )
            if image_id in names:
                boxes.setdefault(names[annotation["image_id"]], []).append(annotation.get("bbox"))
        return boxes
    if not isinstance(data, dict):
        raise AttnExplainError(
            f"The boxes file {path} must map file names to lists of [x, y, w, h] boxes (or be a COCO file)."
        )
    return {name: value for name, value in data.items() if isinstance(name, str)}


def boxes_mask(boxes: Any, width: int, height: int) -> np.ndarray:
    """(height, width) bool mask of ``boxes`` (untrusted: each checked), or :class:`MaskError`."""
    from ._untrusted import finite_number

    if not isinstance(boxes, list) or not boxes:
        raise MaskError("its entry in the boxes file is not a non-empty list of [x, y, w, h] boxes")
    if len(boxes) > MAX_BOXES_PER_IMAGE:
        raise MaskError(f"it has over {MAX_BOXES_PER_IMAGE} boxes")
    mask = np.zeros((height, width), dtype=bool)
    for box in boxes:
        # Each value a finite float (10**400 is not), and so are the far corner's (1e308 + 1e308 is not).
        values = [finite_number(v) for v in box] if isinstance(box, list) and len(box) == 4 else [None]
        if (
            None in values
            or values[2] <= 0
            or values[3] <= 0
            or not math.isfinite(values[0] + values[2])
            or not math.isfinite(values[1] + values[3])
        ):
            raise MaskError(f"box {shown(box)} is not [x, y, width, height] with a positive, finite size")
        x, y, w, h = values
        left, top = min(width, max(0, math.floor(x))), min(height, max(0, math.floor(y)))
        right, bottom = max(0, min(width, math.ceil(x + w))), max(0, min(height, math.ceil(y + h)))
        mask[top:bottom, left:right] = True
    return mask


def mask_file_mask(path: Path, width: int, height: int, max_pixels: int) -> np.ndarray:
    """(height, width) bool mask from a mask image (white = object), or :class:`MaskError`."""
    from ._files import not_a_regular_file
    from .images import load_image

    reason = not_a_regular_file(path)
    if reason is not None:
        raise MaskError(f"its mask {path} {reason}")
    try:
        picture = load_image(path, max_pixels=max_pixels)
    except AttnExplainError as error:
        raise MaskError(f"its mask: {error}") from None
    if picture.size != (width, height):
        raise MaskError(f"its mask {path} is {picture.size[0]}×{picture.size[1]}, the image {width}×{height}")
    return picture.pixels.max(axis=2) > 127


def model_frame_mask(mask: np.ndarray, preprocessing) -> np.ndarray:
    """The photo's mask resized and cropped exactly as the photo was for the model (h, w) bool."""
    from .preprocess import prepare

    plain = dataclasses.replace(preprocessing, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    layers = np.repeat(mask[..., None].astype(np.uint8) * 255, 3, axis=2)
    return prepare(layers, plain).tensor[0, 0].numpy() > 0.5


def check_background_labels(background, labels, has_masks: bool) -> None:
    """Refuse ``--background-label`` without masks or boxes, or naming no class of the model."""
    if background and not has_masks:
        raise AttnExplainError("--background-label measures a label against the background of --masks or --boxes.")
    unknown = [label for label in background if labels is not None and label not in labels]
    if unknown:
        raise AttnExplainError(f"--background-label {shown(unknown[0])} is not one of the model's classes (prompts).")


def object_masks(
    chunk, preprocessing, box_table, masks_dir, max_pixels, size, labels=None, own_only=False, background=()
):
    """(B, h, w) bool masks of the decoded images of ``chunk`` in the model's frame (``size``), from
    ``box_table`` (:func:`read_boxes`) or else the mask files under ``masks_dir``; and image index →
    why it has none (its mask is all False). ``labels``: per image, the class its maps explain; an
    image with several objects (a multi-label model's) has one mask per class,
    ``MASKS/<image path without its suffix>/<class>.png``, used for that class's maps; ``own_only``
    (several targets measured, each against its own object): only that mask, never the image's one.
    A class among ``background`` without a mask of its own is the background: every pixel outside
    the image's boxes, or its mask, or the union of its objects' masks (:func:`background_mask`)."""
    import torch

    result = torch.zeros(len(chunk), *size, dtype=torch.bool)
    errors: dict[int, str] = {}
    for i, decoded in enumerate(chunk):
        height, width = decoded.pixels.shape[:2]
        label = labels[i] if labels is not None else None
        try:
            if box_table is not None:
                relative = decoded.item.relative
                entry = box_table.get(relative, box_table.get(Path(relative).name))
                if entry is None:
                    raise MaskError("the boxes file has no entry for it")
                photo_mask = boxes_mask(entry, width, height)
                photo_mask = ~photo_mask if label in background else photo_mask
            elif label in background and not _is_file(_own_mask(masks_dir, decoded.item.relative, label)):
                photo_mask = background_mask(masks_dir, decoded.item.relative, background, width, height, max_pixels)
            else:
                photo_mask = mask_file_mask(
                    _mask_path(masks_dir, decoded.item.relative, labels[i] if labels is not None else None, own_only),
                    width,
                    height,
                    max_pixels,
                )
            result[i] = torch.from_numpy(model_frame_mask(photo_mask, preprocessing))
        except MaskError as error:
            errors[i] = f"No localisation for {decoded.item.relative}: {error}."
    return result, errors


def background_mask(masks_dir: Path, relative: str, background, width: int, height: int, max_pixels: int):
    """(height, width) bool: every pixel outside the image's objects, the complement of its mask
    ``MASKS/<image>.png``, else of the union of its objects' masks ``MASKS/<image>/<label>.png``
    (those of ``background`` classes left out), or :class:`MaskError` when it has none."""
    single = masks_dir / Path(relative).with_suffix(".png")
    if single.is_file():
        return ~mask_file_mask(single, width, height, max_pixels)
    folder = masks_dir / Path(relative).with_suffix("")
    found = sorted(itertools.islice(folder.glob("*.png"), MAX_OBJECT_MASKS + 1)) if folder.is_dir() else []
    objects = [path for path in found if path.stem not in background]
    if not objects or len(found) > MAX_OBJECT_MASKS:
        raise MaskError(
            f"no object mask to take the background of ({single.name} or {folder.name}/<label>.png, "
            f"at most {MAX_OBJECT_MASKS})"
        )
    union = np.zeros((height, width), dtype=bool)
    for path in objects:
        union |= mask_file_mask(path, width, height, max_pixels)
    return ~union


def _own_mask(masks_dir: Path, relative: str, label: str | None) -> Path | None:
    """``MASKS/<image>/<label>.png``; None for a label that is no plain file name (the model's text:
    ``..``, a ``/``), which never names a path."""
    if label is None or label in ("", ".", "..") or any(c in label for c in "/\\\0"):
        return None
    return masks_dir / Path(relative).with_suffix("") / f"{label}.png"


def _mask_path(masks_dir: Path, relative: str, label: str | None, own_only: bool = False) -> Path:
    """The mask of image ``relative``: of the object of class ``label`` where the image has one
    mask per object (a folder of them), else (unless ``own_only``) the image's one mask."""
    own = _own_mask(masks_dir, relative, label)
    if own is not None and (own.is_file() or own_only):
        return own
    if own_only:
        raise MaskError(f"no mask of its {shown(label)} object")
    return masks_dir / Path(relative).with_suffix(".png")


def _is_file(path: Path | None) -> bool:
    return path is not None and path.is_file()


def photo_pixel_sizes(chunk, size: tuple[int, int]):
    """(B, 2) photo pixels per model-input pixel (height, width) of each image: the pointing game's
    tolerance is in the photo's pixels, as the paper's, whatever the model's input size."""
    import torch

    return torch.tensor(
        [
            [(decoded.box[3] - decoded.box[1]) / size[0], (decoded.box[2] - decoded.box[0]) / size[1]]
            for decoded in chunk
        ],
        dtype=torch.float64,
    )
