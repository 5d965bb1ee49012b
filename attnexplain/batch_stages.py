"""What a batch run does to each image, whatever engine runs it (:mod:`attnexplain.batch` on this
machine's threads, :mod:`attnexplain.ray_engine` on Ray actors): the settings that decide the
outputs, explaining a batch of decoded images (a pure function of its inputs) and writing an
image's folder atomically. A captioner's run does both its own way (:data:`Stages`, from
:mod:`attnexplain.caption_batch`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .formats import DEFAULT_COLORMAP
from .inputs import Decoded, failed_record
from .records import DETAIL_HTML, IMAGES_DIR

#: The photo, shrunk: the detail page's and the gallery card's.
PHOTO_JPG = "photo.jpg"
PHOTO_SIDE = 512
THUMB_SIDE = 192


# --- settings ------------------------------------------------------------------------------------


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
    #: Decoding threads, and as many writing threads; None: :func:`attnexplain.batch.default_workers`.
    workers: int | None = None
    #: Batches explained at once, each on its own replica of the model (see
    #: :mod:`attnexplain.replicas`); None: :func:`attnexplain.replicas.default_parallel_batches`.
    parallel_batches: int | None = None
    options: Any = None  # MethodOptions
    truth: Any = None  # attnexplain.truth.TrueClasses: each image's true class (--truth)
    metrics: tuple[str, ...] = ()  # perturbation metrics per map (attnexplain.metrics.perturbation_values)
    versus: int | str | None = None  # a contrast: the maps explain score(target) − score(versus)
    threshold: float = 0.5  # a multi-label model's: the classes at or above it are its "present" labels

    def describe(self) -> dict[str, Any]:
        data = {
            key: value
            for key, value in asdict(self).items()
            if key not in ("options", "images_per_batch", "workers", "parallel_batches", "truth")
            and not (key in ("metrics", "versus") and not value)
            and not (key == "threshold" and value == 0.5)
        }  # runs without metrics (or a contrast, or another threshold) keep their fingerprint
        data = {key: list(value) if isinstance(value, tuple) else value for key, value in data.items()}
        if self.size is not None:  # 32 and 32,32 are the same size
            from .preprocess import normalize_size

            data["size"] = list(normalize_size(self.size))
        for key in ("mean", "std"):
            if data[key] is not None and len(data[key]) == 1:
                data[key] = [float(data[key][0])] * 3
        data["options"] = self.options.as_dict() if self.options is not None else None
        return data


# --- what a run does, by the kind of model -------------------------------------------------------


@dataclass(frozen=True)
class Stages:
    """What a run does for its kind of model: ``plan(loaded, settings)`` once (an
    :class:`attnexplain.planning.Plan`), ``explain`` a chunk of decoded images on the model's thread
    (as :func:`explain_decoded`), ``write`` an image's folder on a writer thread (as
    :func:`write_image`), and what the run's report says besides (``meta``)."""

    plan: Callable[[Any, BatchSettings], Any]
    explain: Callable[..., tuple[list[dict[str, Any]], float]]
    write: Callable[..., dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)


def plan_batch(loaded, settings: BatchSettings):
    """A classifier's (detector's, segmenter's) plan: its methods, layers and preprocessing."""
    from .planning import plan_explanation

    return plan_explanation(
        loaded, settings.method, settings.layer, size=settings.size, mean=settings.mean, std=settings.std
    )


# --- the pure per-batch part -----------------------------------------------------------------------


def explain_batch(
    loaded,
    tensors: list[Any],
    methods,
    layers: list[str],
    settings: BatchSettings,
    device,
    regions: Sequence[tuple[float, float, float, float]] | None = None,
    photo_sizes: Sequence[tuple[int, int]] | None = None,
    preprocessing=None,
) -> list[dict[str, Any]]:
    """A pure function of its inputs: (B, 3, h, w) → per image, its maps (``MethodMap`` per method,
    attention grids and gates included), predictions and target, a detector's boxes (on the photo
    of ``photo_sizes`` (width, height), whose part the model saw is the image's ``regions`` entry;
    by default the input itself), or an error for images with nothing to explain (a requested
    target with probability 0, a detector that found nothing). ``preprocessing`` is how the
    tensors were normalised (default: the model's), which says what ``--baseline black`` is."""
    import torch

    from .detection_targets import box_outcome
    from .engine import compute_maps_of_targets
    from .errors import MethodError, NothingToExplain
    from .targets import boxes_on_photo, image_outcome, present_labels, scored_for, target_record

    batch = torch.cat(tensors).to(device)
    loaded, _ = scored_for(loaded, settings.target, settings.versus)  # the metrics follow a contrast too
    try:
        computed, per_image = compute_maps_of_targets(
            loaded,
            batch,
            methods,
            layers,
            settings.target,
            options=settings.options,
            preprocessing=preprocessing,
            versus=settings.versus,
        )
    except NothingToExplain as error:  # no image of the batch has anything to explain
        return [{"error": str(error)} for _ in tensors]
    probabilities = computed.probabilities.float().cpu()
    targets = computed.targets.cpu()
    measured = _map_metrics(loaded, batch, computed, settings.metrics) if settings.metrics else None
    if measured is not None and computed.also:  # several targets: each one's maps on its own score
        parts = [computed, *computed.also]
        found = [measured, *(_map_metrics(loaded, batch, part, settings.metrics) for part in computed.also)]
        measured = [
            {
                key: next(
                    values[index][m.method]
                    for part, values in zip(parts, found)
                    if m.target is not None and int(part.targets[index]) == m.target.index
                )
                for key, m in maps.items()
            }
            for index, maps in enumerate(per_image)
        ]
    results = []
    for index, maps in enumerate(per_image):
        result: dict[str, Any] = {"maps": maps, "precision": computed.precision}
        if measured is not None:
            result["metrics"] = measured[index]
        try:
            target, predictions = image_outcome(
                probabilities[index],
                int(targets[index]),
                loaded.labels,
                settings.top_k,
                target_given=settings.target is not None and not computed.negative,
                methods=methods,
                values=computed.values,
                threshold=settings.threshold if computed.multilabel else None,
            )
            target, explained_box = box_outcome(computed.explained_boxes, computed.detections, index, target)
        except MethodError as error:  # this image only: the others of the batch are fine
            result["error"] = str(error)
        else:
            result["predictions"] = [p.as_dict() for p in predictions]
            if computed.multilabel:
                present = present_labels(probabilities[index], loaded.labels, settings.threshold)
                result["present"] = [p.as_dict() for p in present]
            result["target"] = {
                **target.as_dict(),
                **target_record(target, loaded.labels, computed.versus, computed.negative),
            }
            if computed.detections is not None:
                height, width = batch.shape[-2:]
                region = regions[index] if regions is not None else (0.0, 0.0, float(width), float(height))
                photo = photo_sizes[index] if photo_sizes is not None else (width, height)
                result["detections"] = boxes_on_photo(
                    computed.detections[index],
                    target.index,
                    loaded.labels,
                    (height, width),
                    region,
                    photo,
                    explained_box,
                )
        results.append(result)
    return results


def _map_metrics(loaded, batch, computed, metrics: Sequence[str]) -> list[dict[str, dict[str, float]]]:
    """Per image, ``{"<method>": {"<metric>": value}}`` for every map of ``computed``."""
    import math

    import torch

    from .metrics import perturbation_values

    names = list(computed.maps)
    maps = torch.stack([computed.maps[name].float() for name in names], dim=1)
    original = computed.explained_scores()
    values, _ = perturbation_values(
        loaded, batch, maps, computed.targets, original, metrics, precision=computed.precision
    )
    return [
        {
            name: {
                metric: round(float(value[b, m]), 6)
                for metric, value in values.items()
                if math.isfinite(float(value[b, m]))
            }
            for m, name in enumerate(names)
        }
        for b in range(batch.shape[0])
    ]


def explain_decoded(
    loaded, chunk: list[Decoded], plan, settings: BatchSettings, device
) -> tuple[list[dict[str, Any]], float]:
    """:func:`explain_batch` on decoded images: their results and the model's seconds per image."""
    began = time.perf_counter()
    results = explain_batch(
        loaded,
        [d.tensor for d in chunk],
        plan.methods,
        plan.layers,
        settings,
        device,
        regions=[d.box for d in chunk],
        photo_sizes=[d.pixels.shape[1::-1] for d in chunk],
        preprocessing=plan.preprocessing,
    )
    return results, (time.perf_counter() - began) / len(chunk)


# --- an image's folder -----------------------------------------------------------------------------


def image_record(decoded: Decoded, model_s: float) -> dict[str, Any]:
    """What the record of every explained image says of it, whatever the model: where its folder,
    detail page and photo are, its key and what it took so far."""
    output = f"{IMAGES_DIR}/{decoded.item.relative}"
    return {
        "image": decoded.item.relative,
        "path": str(decoded.item.path),
        "status": "ok",
        "key": decoded.key,
        "sha256": decoded.sha256,
        "output": output,
        "detail": f"{output}/{DETAIL_HTML}",
        "image_info": decoded.image_info,
        "timings": {"decode_s": round(decoded.decode_s, 6), "model_s": round(model_s, 6)},
        "photo": PHOTO_JPG,
    }


def write_photo(folder: Path, decoded: Decoded) -> None:
    """The photo, shrunk (:data:`PHOTO_SIDE`), for the detail page and the gallery's card."""
    from .render import downscale, encode_image

    (folder / PHOTO_JPG).write_bytes(encode_image(downscale(decoded.pixels, PHOTO_SIDE), ".jpg", quality=85))


def write_image_folder(
    out: Path,
    decoded: Decoded,
    result: dict[str, Any],
    model_s: float,
    fill: Callable[[Path, dict[str, Any]], None],
) -> dict[str, Any]:
    """One image's folder, atomically, whatever the model: ``fill(staging, record)`` writes the
    model's files into the staging folder and adds to the record (:func:`image_record`); the photo
    is written beside them. A failed explanation (``result["error"]``), a disk or an encoding
    problem fails this image only (:func:`attnexplain.inputs.failed_record`)."""
    from ._atomic import atomic_directory

    began = time.perf_counter()
    if "error" in result:
        return failed_record(decoded, result["error"])
    record = image_record(decoded, model_s)
    try:
        with atomic_directory(out / record["output"]) as staging:
            fill(staging, record)
            write_photo(staging, decoded)
            record["timings"]["write_s"] = round(time.perf_counter() - began, 6)
    except Exception as error:  # noqa: BLE001 - a disk or encoding problem fails this image only
        return failed_record(decoded, f"Cannot write outputs: {type(error).__name__}: {error}")
    finally:
        decoded.pixels = None
    return record


def write_image(
    out: Path, decoded: Decoded, result: dict[str, Any], settings: BatchSettings, model_s: float
) -> dict[str, Any]:
    """One image's folder, atomically: per method the files ``attnexplain run`` writes (see
    :func:`attnexplain.report.write_method_outputs`) and a thumbnail, and the detail page."""
    return write_image_folder(
        out, decoded, result, model_s, lambda staging, record: _write_maps(staging, record, decoded, result, settings)
    )


def _write_maps(
    staging: Path, record: dict[str, Any], decoded: Decoded, result: dict[str, Any], settings: BatchSettings
) -> None:
    from .gallery import render_detail
    from .render import downscale, encode_image, render_explained_overlay
    from .report import method_summary, write_method_outputs
    from .viewer import DETAIL_MAP_SIDE, viewer_data

    files: dict[str, dict[str, str]] = {}
    for name, method_map in result["maps"].items():
        overlay = render_explained_overlay(
            decoded.pixels,
            method_map.heatmap,
            decoded.box,
            settings.alpha,
            result.get("detections"),
            settings.colormap,
        )
        written = write_method_outputs(staging, method_map, overlay, settings.overlay_format, settings.colormap)
        files[name] = dict(written.files, thumb=f"thumb-{name}.jpg")
        (staging / files[name]["thumb"]).write_bytes(encode_image(downscale(overlay, THUMB_SIDE), ".jpg", quality=80))
    first = next(iter(result["maps"].values()))
    record.update(
        {
            "files": files,
            "predictions": result["predictions"],
            **({"present": result["present"]} if "present" in result else {}),
            "target": result["target"],
            "methods": list(result["maps"]),
            "maps": {name: method_summary(method_map) for name, method_map in result["maps"].items()},
            "layer": ",".join(first.layers) or None,
            "precision": result["precision"],  # what the model's forward ran in (--precision resolved)
            **({"detections": result["detections"]} if "detections" in result else {}),
            **({"metrics": result["metrics"]} if "metrics" in result else {}),
            **(
                {"truth": settings.truth.label_for(decoded.item.relative, decoded.item.path)}
                if settings.truth is not None
                else {}
            ),
        }
    )
    target = result["target"]
    viewer = viewer_data(
        result["maps"],
        target["label"] or f"class {target['index']}",
        decoded.box,
        decoded.pixels.shape[1::-1],
        DETAIL_MAP_SIDE,
        settings.colormap,
        settings.alpha,
        result.get("detections"),
    )
    (staging / DETAIL_HTML).write_text(render_detail(record, viewer, PHOTO_JPG), encoding="utf-8")


#: What a run does to a classifier's images (detectors' and segmenters' too).
EXPLAINING = Stages(plan=plan_batch, explain=explain_decoded, write=write_image)
