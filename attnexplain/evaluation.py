"""evaluate(): which map to believe, measured on the user's model and images.

Images stream through in chunks (memory does not grow with their number): each chunk's maps are
computed once for every method, then every metric of :mod:`attnexplain.metrics` is computed from
them, with a random map beside them as the chance level. Only per-image numbers and the running
sums of the curves are kept. Masks and boxes are untrusted: a bad or missing one is that image's
error, recorded, never the run's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ._signals import Stopped
from .errors import AttnExplainError, MethodError, shown
from .formats import DEFAULT_COLORMAP
from .model_spec import ModelSpec
from .metrics import (BETTER, LOCALISATION, METRIC_VALUES, RANDOM_MAP, RANDOMIZATION_EARLY_STEPS,
                      RANDOMIZATION_LIMIT, SIMILARITIES, MetricSettings, cascade_steps, judged_similarity,
                      randomization_scores, randomization_verdict)
from .verdict import bootstrap_interval, judge, verdict_text

EVALUATION_JSON = "evaluation.json"
EVALUATION_CSV = "evaluation.csv"
EVALUATION_HTML = "evaluation.html"
#: Untrusted boxes file: its size, and boxes per image.
MAX_BOXES_BYTES = 64 * 1024 * 1024
MAX_BOXES_PER_IMAGE = 1000
EXAMPLE_IMAGES = 3
#: Why ROAD is not a default metric: its noisy linear imputation is a sparse solve per perturbed copy
#: (2 orders × 9 percentiles per map and image), measured under load on 2 cores at ~1 s per map and
#: 128 px image, over ten times the rest of the default metrics together.
DEFAULT_LEAVES_OUT_ROAD = "about 1 s of CPU per map and image at 128 px"
#: Finer deletion/insertion curves, as torchcam's default (and ours before CPU runs had to finish).
FINE_STEPS = 100


class MaskError(AttnExplainError):
    """An image's mask or boxes are missing or unusable: that image's localisation is not measured."""


@dataclass(frozen=True)
class EvaluationSettings:
    method: str | Sequence[str] = "default"  # "default" (all that apply, not the costly), "all", names
    #: None: every metric that applies but ROAD (see DEFAULT_LEAVES_OUT_ROAD); "all": every one; names.
    metrics: Sequence[str] | str | None = None
    target: int | str | None = None
    layer: str | Sequence[str] | None = None
    size: Sequence[int] | int | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    max_pixels: int = 100_000_000
    images_per_batch: int = 8
    metric_settings: MetricSettings = field(default_factory=MetricSettings)
    options: Any = None  # MethodOptions
    colormap: str = DEFAULT_COLORMAP  # of the example overlays on the page

    def describe(self) -> dict[str, Any]:
        """Every setting that changes a measured number (for ``--resume``'s fingerprint)."""
        from .preprocess import normalize_size

        metric_settings = {key: value for key, value in self.metric_settings.as_dict().items()
                           if key != "batch_size"}  # how many copies per forward: the same numbers
        return {"method": self.method if isinstance(self.method, str) else list(self.method),
                "target": self.target, "layer": self.layer if isinstance(self.layer, (str, type(None)))
                else list(self.layer), "size": list(normalize_size(self.size)) if self.size else None,
                "mean": list(self.mean) if self.mean else None, "std": list(self.std) if self.std else None,
                "max_pixels": self.max_pixels, "metric_settings": metric_settings,
                "options": self.options.as_dict() if self.options is not None else None}


# --- what to compute -----------------------------------------------------------------------------

def explanation_metrics(explanation, metrics: Sequence[str],
                        config: MetricSettings = MetricSettings()) -> dict[str, dict[str, float]]:
    """``{"<method>": {"<metric>": value}}`` for one :class:`~attnexplain.explanation.Explanation`:
    the perturbation metrics of each of its maps (what ``run --metrics`` puts in report.json)."""
    import torch

    from .preprocess import prepare

    unknown = [name for name in metrics if name not in PERTURBATION_METRICS]
    if unknown:
        raise MethodError(f"--metrics here takes {', '.join(PERTURBATION_METRICS)}, not {shown(unknown[0])} "
                          f"(`attnexplain evaluate` measures the others).")
    loaded = explanation.model
    device = next(iter(loaded.module.parameters()), torch.zeros(0)).device
    batch = prepare(explanation.image.pixels, explanation.preprocessing).tensor.to(device)
    names = list(explanation.maps)
    maps = torch.stack([torch.from_numpy(explanation.maps[name].heatmap) for name in names])[None].to(device)
    targets = torch.tensor([explanation.target.index], device=device)
    original = torch.tensor([explanation.target.prob])
    values, _ = perturbation_values(loaded, batch, maps, targets, original, metrics, config)
    return {name: {metric: _rounded(value[0, m]) for metric, value in values.items()
                   if math.isfinite(float(value[0, m]))} for m, name in enumerate(names)}


def applicable_methods(loaded, requested: str | Sequence[str] = "default") -> list[str]:
    """The method names to evaluate: ``default`` every method the model allows except those that cost
    many forwards per image (``Method.many_forwards``), ``all`` every one it allows, or the given
    names (checked)."""
    from .planning import resolve_methods
    from .methods import METHODS

    if requested not in ("default", "all"):
        return [m.name for m in resolve_methods(loaded, requested)]
    candidates = [*METHODS.values(), *loaded.plugin.methods()]  # the model's plugin's own too
    names = [method.name for method in candidates if requested == "all" or not method.many_forwards]
    usable = []
    for name in names:
        try:
            resolve_methods(loaded, name)
        except MethodError:
            continue
        usable.append(name)
    return usable


def chosen_metrics(requested: Sequence[str] | str | None, has_masks: bool) -> list[str]:
    """Metric groups to compute: the requested ones (checked); ``"all"`` every one that applies; None
    (the default) every one that applies but ROAD (:data:`DEFAULT_LEAVES_OUT_ROAD`)."""
    if requested is None or requested == "all":
        return [name for name in METRIC_VALUES if (has_masks or name not in LOCALISATION)
                and (requested == "all" or name != "road")]
    unknown = [name for name in requested if name not in METRIC_VALUES]
    if unknown:
        raise MethodError(f"Unknown metric {shown(unknown[0])}; metrics: {', '.join(METRIC_VALUES)}.")
    if not has_masks and any(name in LOCALISATION for name in requested):
        raise MethodError("The localisation metrics (pointing, mass, rank) need --masks DIR or --boxes FILE.")
    return list(dict.fromkeys(requested))


# --- masks and boxes (untrusted) -----------------------------------------------------------------

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
        names = {entry.get("id"): entry.get("file_name") for entry in data["images"]
                 if isinstance(entry, dict) and isinstance(entry.get("file_name"), str)
                 and isinstance(entry.get("id"), (int, str))}
        boxes: dict[str, list] = {}
        for number, annotation in enumerate(data["annotations"], start=1):
            if not isinstance(annotation, dict):
                continue
            image_id = annotation.get("image_id")
            if not isinstance(image_id, (int, str)) or isinstance(image_id, bool):
                raise AttnExplainError(f"The COCO file {path}: annotation {number} has the image_id "
                                       f"{shown(image_id)}, which is not an image's id (a number or text).")
            if image_id in names:
                boxes.setdefault(names[annotation["image_id"]], []).append(annotation.get("bbox"))
        return boxes
    if not isinstance(data, dict):
        raise AttnExplainError(f"The boxes file {path} must map file names to lists of [x, y, w, h] "
                               f"boxes (or be a COCO file).")
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
        if (None in values or values[2] <= 0 or values[3] <= 0
                or not math.isfinite(values[0] + values[2]) or not math.isfinite(values[1] + values[3])):
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


# --- the run -------------------------------------------------------------------------------------

@dataclass
class _Sums:
    """Running sums of the per-step curves, per method (memory flat in the number of images)."""

    deletion: dict[str, np.ndarray] = field(default_factory=dict)
    insertion: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    fractions: np.ndarray | None = None
    squares: dict[str, np.ndarray] = field(default_factory=dict)  # "which:method" → sum of squares

    def add(self, which: str, method: str, per_image: np.ndarray) -> None:
        """Add (images, points) curves."""
        table = getattr(self, which)
        table[method] = table.get(method, 0) + per_image.sum(axis=0)
        key = f"{which}:{method}"
        self.counts[key] = self.counts.get(key, 0) + per_image.shape[0]
        self.squares[key] = self.squares.get(key, 0) + np.square(per_image.astype(np.float64)).sum(axis=0)

    def band(self, which: str, method: str) -> list[list[float]]:
        """Per point, the 95% interval of the mean curve (normal approximation): the page draws the
        random map's, so a method's mean curve can be seen inside or outside chance."""
        key = f"{which}:{method}"
        if key not in self.counts or self.counts[key] < 2:
            return []
        count = self.counts[key]
        mean = getattr(self, which)[method] / count
        spread = np.sqrt(np.maximum(self.squares[key] / count - mean ** 2, 0) * count / (count - 1))
        half = 1.96 * spread / math.sqrt(count)
        # A probability's curve: the band stays within [0, 1] where the approximation would leave it.
        return [[round(float(low), 6), round(float(high), 6)]
                for low, high in zip(np.clip(mean - half, 0, 1), np.clip(mean + half, 0, 1))]

    def means(self, which: str) -> dict[str, list[float]]:
        return {method: [round(float(v), 6) for v in total / self.counts[f"{which}:{method}"]]
                for method, total in getattr(self, which).items()}


def evaluate(loaded, input_specs: Sequence[str], settings: EvaluationSettings = EvaluationSettings(), *,
             masks: Path | None = None, boxes: Path | None = None, exclude: Path | None = None,
             device: str | None = None, out: Path | None = None, resume: bool = False, quiet: bool = True,
             model_spec: ModelSpec | dict[str, Any] | None = None) -> dict[str, Any]:
    """Measure every method on the images ``input_specs`` name (as ``batch`` takes them): returns the
    evaluation (what evaluation.json holds, plus ``examples`` for the page).

    With ``out``, the run holds that folder's lock, appends each image's line to evaluation.jsonl as
    it is measured (:mod:`attnexplain.evaluation_log`) and writes evaluation.json, .csv and .html at
    the end, and also when it is stopped (Ctrl-C; SIGTERM and SIGHUP under the CLI) or fails: then
    they hold the images measured so far and say ``"complete": false``. ``resume`` reuses the lines of
    an earlier run in ``out`` made with the same model, settings, image and mask (``model_spec``: how
    the model was named, as ``batch`` takes it; default: ``loaded.describe()``). ``quiet=False``:
    progress on stderr, by image and by stage (maps, perturbations, randomization)."""
    if out is None:
        if resume:
            raise AttnExplainError("Resuming needs the output folder of the earlier run.")
        return _evaluate(loaded, input_specs, settings, masks, boxes, exclude, device, None, False, quiet,
                         model_spec)
    from ._atomic import remove_stale_staging
    from ._lock import output_lock

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise AttnExplainError(f"Cannot create the output folder {out}: {error.strerror or error}.") from None
    with output_lock(out):
        remove_stale_staging(out)  # what a killed run left: ours, since we hold the lock
        return _evaluate(loaded, input_specs, settings, masks, boxes, out if exclude is None else exclude,
                         device, out, resume, quiet, model_spec)


def _evaluate(loaded, input_specs, settings, masks, boxes, exclude, device, out, resume, quiet, model_spec):
    import torch

    from . import evaluation_log as log_lines
    from .batch import NoImages, _failed, _read_image, collect_inputs
    from .explanation import _model_device, plan_explanation
    from .options import MethodOptions
    from .progress import Progress

    started = time.perf_counter()
    if masks is not None and boxes is not None:
        raise AttnExplainError("Give --masks or --boxes, not both.")
    if masks is not None and not masks.is_dir():
        raise AttnExplainError(f"The masks folder {masks} does not exist or is not a folder.")
    box_table = read_boxes(boxes) if boxes is not None else None
    metrics = chosen_metrics(settings.metrics, masks is not None or boxes is not None)
    inputs = collect_inputs(input_specs, exclude=exclude)
    if not inputs.images:
        raise NoImages(f"No image found in {' '.join(map(str, input_specs))}.")
    method_names = applicable_methods(loaded, settings.method)
    if not method_names:
        raise MethodError("No method applies to this model.")
    plan = plan_explanation(loaded, method_names, settings.layer, size=settings.size, mean=settings.mean,
                            std=settings.std)
    options = settings.options or MethodOptions()
    run_device = torch.device(device) if device else _model_device(loaded.module)
    plan, left_out = _runnable(loaded, plan, options, run_device,
                               explicit=settings.method not in ("default", "all"))
    names = [m.name for m in plan.methods] + [RANDOM_MAP]
    # Each image's random map and place among the randomized images follow its place in the inputs,
    # not the order it was measured in: a resumed run gives the numbers a whole run gives.
    position = {item.relative: i for i, item in enumerate(inputs.images)}
    spec = model_spec if model_spec is not None else ModelSpec(loaded.describe()["source"])
    key_prefix = log_lines.run_fingerprint(spec, settings, plan, metrics, boxes) if out is not None else ""
    value_names = {value for group in metrics for value in METRIC_VALUES[group]}
    steps = len(cascade_steps(loaded.module, settings.metric_settings.randomization_steps))
    kept = (log_lines.reusable_lines(out, key_prefix, set(position), names, value_names, masks, steps)
            if resume else {})
    paths = {item.relative: item.path for item in inputs.images}
    # A line stands only for the very bytes it measured: an image changed since is measured again,
    # and its old line must not be counted beside the new one.
    kept = {image: line for image, line in kept.items()
            if line["key"] == f"{key_prefix}:{_file_sha256_or_none(paths[image])}"}

    records: list[dict[str, Any]] = []
    sums = _Sums()
    examples: list[dict[str, Any]] = []
    log = log_lines.open_log(out, kept.values()) if out is not None else None
    progress = Progress(len(inputs.images) + len(inputs.missing), quiet, label="evaluating")
    randomized = {"images": 0}  # images the randomization check has measured (it costs the most)

    def finish(record: dict[str, Any], key: str | None = None, curves: dict[str, Any] | None = None) -> None:
        """One image measured: its line in evaluation.jsonl at once, its curves in the totals."""
        if log is not None:
            mask_sha = log_lines.mask_digest(masks, record["image"]) if record["status"] == "ok" else None
            try:
                log.append(log_lines.logged(record, key, mask_sha, curves))
            except OSError as error:  # a full disk: the image is measured, only --resume loses it
                record = {**record, "log_error": f"{error.strerror or error}"}
        records.append(record)
        _add_curves(sums, curves or {})
        progress.advance()

    for spec_text, reason in inputs.missing:
        finish({"image": spec_text, "path": spec_text, "status": "failed", "reason": reason})
    for line in sorted(kept.values(), key=lambda line: position[line["image"]]):
        # What the line may not decide: the image's path and its class's label are this run's.
        index = line["target"]["index"]
        records.append({**log_lines.shown_record(line), "path": str(paths[line["image"]]),
                        "target": {"index": index, "label": _label(loaded.labels, index)}})
        curves = log_lines.line_curves(line)
        _add_curves(sums, curves)
        randomized["images"] += "randomization" in line
        progress.advance(earlier=True)

    def run_chunk(chunk: list) -> None:
        from .metrics import random_maps

        first, last = position[chunk[0].item.relative] + 1, position[chunk[-1].item.relative] + 1
        where = f"image {first}" if len(chunk) == 1 else f"images {first}-{last}"
        batch = torch.cat([d.tensor for d in chunk]).to(run_device)
        seeds = [settings.metric_settings.seed + position[d.item.relative] for d in chunk]
        progress.stage(f"maps of {where}")
        try:
            computed = _compute(loaded, batch, plan, settings, options)
        except AttnExplainError as error:
            if len(chunk) == 1:
                finish(_failed(chunk[0], str(error)))
                return
            for decoded in chunk:  # each image alone: one bad image must not fail the others
                run_chunk([decoded])
            return
        maps = torch.stack([computed.maps[name].float() for name in names[:-1]], dim=1)
        maps = torch.cat([maps, random_maps(len(chunk), tuple(batch.shape[-2:]), seeds)[:, None].to(maps)], 1)
        randomize = 0
        if "randomization" in metrics:  # the first images of the run only: enough for a per-method verdict
            randomize = max(0, min(len(chunk), settings.metric_settings.randomization_images - randomized["images"]))
            randomized["images"] += randomize

        def stage(name: str) -> None:
            progress.stage(f"{name} of {where}")

        values, curves = _chunk_metrics(loaded, batch, maps, computed, names, metrics, settings, plan,
                                        options, chunk, box_table, masks, randomize, stage)
        for i, decoded in enumerate(chunk):
            target = int(computed.targets[i])
            record = {"image": decoded.item.relative, "path": str(decoded.item.path), "status": "ok",
                      "target": {"index": target, "label": _label(loaded.labels, target)},
                      "probability": round(float(computed.probabilities[i, target]), 6),
                      "metrics": {name: {metric: _rounded(v[i, m]) for metric, v in values.items()
                                         if not math.isnan(float(v[i, m]))}
                                  for m, name in enumerate(names)}}
            if i in curves.get("mask_errors", {}):
                record["mask_error"] = curves["mask_errors"][i]
            if "randomization" in curves and i < len(curves["randomization"]["spearman"]):
                record["randomization"] = _randomization_record(curves["randomization"], i, names)
            image_curves = {which: {name: [float(v) for v in curves[which][i, m]] for m, name in enumerate(names)}
                            for which in ("deletion", "insertion") if which in curves}
            if "fractions" in curves:
                image_curves["fractions"] = [float(f) for f in curves["fractions"]]
            finish(record, decoded.key, image_curves)
        if len(examples) < EXAMPLE_IMAGES:
            examples.extend(_examples(chunk, maps, names, EXAMPLE_IMAGES - len(examples),
                                      settings.colormap))

    done_keys = {image: line["key"] for image, line in kept.items()}
    stopped = None
    try:
        pending: list = []
        for item in inputs.images:
            decoded = _read_image(item, key_prefix, done_keys, plan.preprocessing, settings.max_pixels)
            if decoded.skipped is not None:
                continue  # its earlier line stands (counted above)
            if decoded.error is not None:
                finish(_failed(decoded, decoded.error))
                continue
            pending.append(decoded)
            if len(pending) >= settings.images_per_batch:
                run_chunk(pending)
                pending = []
        if pending:
            run_chunk(pending)
    except BaseException as error:  # Ctrl-C, SIGTERM/SIGHUP (attnexplain._signals), a failure
        if isinstance(error, KeyboardInterrupt):
            stopped = str(error) if isinstance(error, Stopped) else "Ctrl-C"
        else:
            stopped = f"an error ({' '.join(str(error).split())[:300] or type(error).__name__})"
        raise
    finally:
        progress.close()
        if log is not None:
            log.close()
        # The records in a whole run's order (the inputs that could not be read, then the images in
        # input order), whatever was reused or measured when: the bootstrap resamples by position.
        records.sort(key=lambda record: position.get(record["image"], -1))
        try:
            evaluation = _summary(loaded, plan, names, metrics, settings, records, sums, examples,
                                  time.perf_counter() - started, list(input_specs), left_out)
            evaluation.update(complete=stopped is None, reused=len(kept))
            if stopped is not None:
                evaluation["stopped"] = {"by": stopped, "images_measured": len(records),
                                         "images_given": len(inputs.images) + len(inputs.missing)}
            evaluation["settings"]["default_leaves_out"] = leaves_out(settings)
            if out is not None:
                from .evaluation_report import write_evaluation

                write_evaluation(out, evaluation)
        except Exception as error:
            if stopped is not None:
                pass  # the stop or failure under way is what the user must see; the log keeps the images
            elif isinstance(error, OSError):
                raise AttnExplainError(f"Cannot write the evaluation into {out}: "
                                       f"{error.strerror or error}.") from None
            else:
                raise
    return evaluation


def _add_curves(sums: "_Sums", curves: dict[str, Any]) -> None:
    """One image's curves (``{"deletion": {"<method>": [...]}, ...}``) into the run's running sums."""
    for which in ("deletion", "insertion"):
        for name, values in curves.get(which, {}).items():
            sums.add(which, name, np.asarray([values], dtype=np.float64))
    if "fractions" in curves:
        sums.fractions = np.asarray(curves["fractions"], dtype=np.float64)


def leaves_out(settings: EvaluationSettings) -> list[str]:
    """What these settings leave out of what ``evaluate`` can measure, and how to ask for it (said
    in --help, in evaluation.json and on the page)."""
    found = []
    if settings.method == "default":
        found.append("the methods that cost many forwards per image (--method all, or name them)")
    if settings.metrics is None:
        found.append(f"ROAD, a sparse solve per perturbed copy ({DEFAULT_LEAVES_OUT_ROAD}; "
                     f"--metrics all, or name it)")
    config = settings.metric_settings
    if settings.metrics in (None, "all") or "randomization" in settings.metrics:
        found.append(f"the randomization check beyond the first {config.randomization_images} images "
                     f"(--randomization-images N)")
    if config.steps < FINE_STEPS:
        found.append(f"deletion and insertion curves of {config.steps} steps (--steps {FINE_STEPS} for "
                     f"finer ones)")
    return found


def _runnable(loaded, plan, options, device, explicit: bool):
    """The plan without the methods this model refuses, and why each was left out. Some refusals show
    only when the model runs (Captum's rules cannot follow a module called twice, as ResNet's shared
    ReLU): one blank input through each method finds them before any image, instead of every image
    failing. A method the user named is not left out: its refusal is the run's error."""
    import dataclasses

    import torch

    from .errors import NothingToExplain
    from .engine import compute_maps

    blank = torch.zeros(1, 3, *plan.preprocessing.size, device=device)
    kept, left_out = [], {}
    for method in plan.methods:
        try:
            compute_maps(loaded, blank, [method], plan.layers, target=0, options=options,
                         preprocessing=plan.preprocessing)
        except NothingToExplain:  # about the blank input (nothing detected on it), not the method
            pass
        except MethodError as error:
            if explicit:
                raise
            left_out[method.name] = str(error)
            continue
        except AttnExplainError:  # another refusal of the blank input itself
            pass
        kept.append(method)
    if not kept:
        raise MethodError("No method runs on this model: " + "; ".join(left_out.values()))
    return dataclasses.replace(plan, methods=kept), left_out


def _file_sha256_or_none(path: Path) -> str | None:
    from .batch import file_sha256

    try:
        return file_sha256(path)
    except OSError:  # unreadable now: measured (and reported) as a new image
        return None


def _compute(loaded, batch, plan, settings, options):
    from .engine import compute_maps

    return compute_maps(loaded, batch, plan.methods, plan.layers, target=settings.target, options=options,
                        preprocessing=plan.preprocessing)


#: The metrics measured from the model and the maps alone (no masks, no second model).
PERTURBATION_METRICS = ("deletion", "insertion", "road", "drop")


def perturbation_values(loaded, batch, maps, targets, original, metrics: Sequence[str],
                        config: MetricSettings = MetricSettings()) -> tuple[dict[str, Any], dict[str, Any]]:
    """The perturbation metrics among ``metrics`` for ``maps`` (B, M, H, W) of ``batch``: per value
    name a (B, M) tensor, and the deletion/insertion curves (NumPy) with their ``fractions``.
    ``original`` (B,) is each target's probability on the intact image."""
    import torch

    from . import metrics as measure
    from .running import probabilities_of

    score = probabilities_of(loaded, tuple(batch.shape[-2:]))  # the model as the engine calls it

    values: dict[str, torch.Tensor] = {}
    curves: dict[str, Any] = {}
    if "deletion" in metrics or "insertion" in metrics:
        found = measure.causal_curves(score, batch, maps, targets, original, config)
        deletion, insertion = found.areas()
        curves["fractions"] = found.fractions.numpy()
        for which, area, curve in (("deletion", deletion, found.deletion), ("insertion", insertion, found.insertion)):
            if which in metrics:
                values[which] = area
                curves[which] = curve.numpy()
    if "road" in metrics:
        values.update(measure.road_scores(score, batch, maps, targets, original, config))
    if "drop" in metrics:
        values.update(measure.confidence_change(score, batch, maps, targets, original, config))
    return values, curves


def _chunk_metrics(loaded, batch, maps, computed, names, metrics, settings, plan, options, chunk,
                   box_table, masks_dir, randomize: int, stage: Callable[[str], None]):
    """Every metric of the chunk's maps; the randomization check on its first ``randomize`` images
    only (NaN for the others). ``stage`` is told each costly step as it starts (progress)."""
    import torch

    from . import metrics as measure

    targets = computed.targets
    original = computed.probabilities.gather(1, targets[:, None])[:, 0]
    config = settings.metric_settings
    stage("perturbations")
    values, curves = perturbation_values(loaded, batch, maps, targets, original, metrics, config)
    if any(name in LOCALISATION for name in metrics):
        object_masks, errors = _object_masks(chunk, plan.preprocessing, box_table, masks_dir,
                                             settings.max_pixels, tuple(batch.shape[-2:]))
        found = measure.localisation(maps.cpu(), object_masks, config.pointing_tolerance,
                                     _photo_pixel_sizes(chunk, tuple(batch.shape[-2:])))
        values.update({name: found[name] for name in LOCALISATION if name in metrics})
        curves["mask_errors"] = errors
    if "randomization" in metrics:
        values["randomization"] = torch.full(maps.shape[:2], math.nan)
        if randomize > 0:  # the first images of the run only: enough for a per-method verdict
            stage("randomization")
            scores, curves["randomization"] = _randomization(loaded, batch[:randomize], maps[:randomize],
                                                             targets[:randomize], names, plan, options, config)
            values["randomization"][:randomize] = scores
    return {name: value.float().cpu() for name, value in values.items()}, curves


def _object_masks(chunk, preprocessing, box_table, masks_dir, max_pixels, size):
    import torch

    result = torch.zeros(len(chunk), *size, dtype=torch.bool)
    errors: dict[int, str] = {}
    for i, decoded in enumerate(chunk):
        height, width = decoded.pixels.shape[:2]
        try:
            if box_table is not None:
                relative = decoded.item.relative
                entry = box_table.get(relative, box_table.get(Path(relative).name))
                if entry is None:
                    raise MaskError("the boxes file has no entry for it")
                photo_mask = boxes_mask(entry, width, height)
            else:
                photo_mask = mask_file_mask(masks_dir / Path(decoded.item.relative).with_suffix(".png"),
                                            width, height, max_pixels)
            result[i] = torch.from_numpy(model_frame_mask(photo_mask, preprocessing))
        except MaskError as error:
            errors[i] = f"No localisation for {decoded.item.relative}: {error}."
    return result, errors


def _photo_pixel_sizes(chunk, size: tuple[int, int]):
    """(B, 2) photo pixels per model-input pixel (height, width) of each image: the pointing game's
    tolerance is in the photo's pixels, as the paper's, whatever the model's input size."""
    import torch

    return torch.tensor([[(decoded.box[3] - decoded.box[1]) / size[0], (decoded.box[2] - decoded.box[0]) / size[1]]
                         for decoded in chunk], dtype=torch.float64)


def _randomization(loaded, batch, maps, targets, names, plan, options, config):
    """The cascading randomization check of the images of ``batch`` (the first ones of the run, up
    to ``randomization_images``): per measure of :data:`~attnexplain.metrics.SIMILARITIES`, the
    similarity with the trained model's map after each step, (B, M, steps); and (B, M) each image's
    value, the mean over the early steps (:func:`~attnexplain.metrics.randomization_scores`)."""
    import torch

    from .engine import compute_maps
    from .metrics import random_maps, randomization_similarities

    def maps_of(randomized, step: int) -> torch.Tensor:
        changed = dataclasses.replace(loaded, module=randomized)
        # The chance level: two independent random maps.
        chance = random_maps(len(batch), tuple(batch.shape[-2:]),
                             [10_000_019 * (step + 1) + i for i in range(len(batch))])
        try:
            computed = compute_maps(changed, batch, plan.methods, plan.layers, options=options, targets=targets,
                                    preprocessing=plan.preprocessing)
        except AttnExplainError:  # e.g. a randomized detector that finds nothing: no value (NaN), no pass
            return torch.cat([torch.full((len(batch), len(names) - 1, *batch.shape[-2:]), math.nan),
                              chance[:, None]], dim=1)
        return torch.stack([computed.maps[name].float().cpu() for name in names[:-1]] + [chance], dim=1)

    similarities = randomization_similarities(loaded.module, maps_of, maps, config.randomization_steps,
                                              config.seed)
    _, early = randomization_scores(similarities, RANDOMIZATION_EARLY_STEPS)
    return torch.from_numpy(early), similarities


def _randomization_record(similarities: dict[str, np.ndarray], image: int, names) -> dict[str, Any]:
    """An image's ``"randomization"`` record entry: per method, per measure, the similarity after
    each step (null where it cannot be measured: JSON has no NaN)."""
    return {name: {measure: [None if math.isnan(v) else _rounded(v) for v in values[image, m]]
                   for measure, values in similarities.items()} for m, name in enumerate(names)}


def _examples(chunk, maps, names, count, colormap: str):
    import base64

    from .render import downscale, encode_image, render_explained_overlay

    found = []
    for i, decoded in enumerate(chunk[:count]):
        overlays = {}
        for m, name in enumerate(names):
            overlay = render_explained_overlay(decoded.pixels, maps[i, m].float().cpu().numpy(), decoded.box,
                                               colormap=colormap)
            data = base64.b64encode(encode_image(downscale(overlay, 160), ".jpg", quality=80)).decode()
            overlays[name] = f"data:image/jpeg;base64,{data}"
        found.append({"image": decoded.item.relative, "overlays": overlays})
    return found


def _label(labels, index: int) -> str | None:
    return labels[index] if labels is not None and index < len(labels) else None


def _rounded(value) -> float:
    return round(float(value), 6) + 0.0  # + 0.0: never a -0.0 in evaluation.json or the CSV


# --- the summary ---------------------------------------------------------------------------------

def _summary(loaded, plan, names, metrics, settings, records, sums, examples, wall_s, input_specs,
             left_out: dict[str, str]):
    from .report import versions

    ok = [r for r in records if r["status"] == "ok"]
    value_names = [value for group in metrics for value in METRIC_VALUES[group]]
    methods: dict[str, dict[str, Any]] = {}
    for name in names:
        summary = {}
        for metric in value_names:
            column = [r["metrics"][name][metric] for r in ok if metric in r["metrics"].get(name, {})]
            if column:
                low, high = bootstrap_interval(column, settings.metric_settings.seed)
                summary[metric] = {"mean": _rounded(np.mean(column)), "ci95": [_rounded(low), _rounded(high)],
                                   "images": len(column)}
        methods[name] = summary
    randomization = (_randomization_summary(records, names, [label for label, _ in cascade_steps(
        loaded.module, settings.metric_settings.randomization_steps)]) if "randomization" in metrics else None)
    failing = [name for name, found in (randomization or {}).get("methods", {}).items()
               if found["verdict"] == "fails"]
    judgement = judge(ok, names, value_names, failing, settings.metric_settings.seed)
    fractions = sums.fractions
    evaluation = {
        "model": loaded.describe(),
        "inputs": input_specs,
        "settings": {"methods": names[:-1], "left_out": left_out, "metrics": metrics, "layers": plan.layers,
                     "target": settings.target, "preprocessing": plan.preprocessing.as_dict(),
                     **settings.metric_settings.as_dict(), "randomization_limit": RANDOMIZATION_LIMIT,
                     "randomization_early_steps": RANDOMIZATION_EARLY_STEPS,
                     "better": {metric: ("higher" if BETTER[metric] > 0 else "lower") for metric in value_names}},
        "versions": versions(),
        "images": {"total": len(records), "ok": len(ok), "failed": len(records) - len(ok),
                   "mask_errors": sum(1 for r in ok if "mask_error" in r)},
        "methods": methods,
        "ranking": judgement.ranking,
        **judgement.as_dict(),
        "randomization_failed": failing,
        "randomization": randomization,
        "verdict": verdict_text(judgement, "randomization" in metrics),
        "curves": {"fractions": [round(float(f), 6) for f in fractions] if fractions is not None else [],
                   "deletion": sums.means("deletion"), "insertion": sums.means("insertion"),
                   "random_band": {which: sums.band(which, RANDOM_MAP) for which in ("deletion", "insertion")
                                   if RANDOM_MAP in getattr(sums, which)},
                   "randomization": {name: found["curves"]["judged"] for name, found
                                     in (randomization or {}).get("methods", {}).items()}},
        "per_image": records,
        "wall_s": round(wall_s, 3),
    }
    return {**evaluation, "examples": examples}


def _randomization_summary(records, names, steps: list[str]) -> dict[str, Any]:
    """The randomization check over the images that had it: per method its mean curve of each
    measure (null where no image gave a value; NaN is never averaged as 0), its score and verdict
    (:func:`~attnexplain.metrics.randomization_verdict`: a method no image could measure fails, a
    similarity that cannot be measured never counts as a pass). Records are
    untrusted (``--resume``): an entry that is not a list per measure of one number or null per step,
    each in [-1, 1], is left out."""
    from .evaluation_log import randomization_curves_fit

    per_method: dict[str, dict[str, list]] = {name: {measure: [] for measure in SIMILARITIES} for name in names}
    for record in records:
        entry = record.get("randomization") if record.get("status") == "ok" else None
        if not isinstance(entry, dict):
            continue
        for name in names:
            curves = entry.get(name)
            if randomization_curves_fit(curves, len(steps)):
                for measure in SIMILARITIES:
                    per_method[name][measure].append([math.nan if v is None else float(v) for v in curves[measure]])
    methods = {}
    for name in names:
        found = {measure: np.array(rows, dtype=np.float64).reshape(len(rows), len(steps))
                 for measure, rows in per_method[name].items()}
        head, early = randomization_scores(found, RANDOMIZATION_EARLY_STEPS)
        score, fails = randomization_verdict(head, early)
        verdict = "chance level" if name == RANDOM_MAP else "fails" if fails else "passes"
        methods[name] = {"score": None if score is None else _rounded(score),
                         "images": int((np.isfinite(head) & np.isfinite(early)).sum()), "verdict": verdict,
                         "curves": {measure: _nan_mean_curve(values) for measure, values
                                    in (*found.items(), ("judged", judged_similarity(found)))}}
    images = sum(1 for record in records
                 if record.get("status") == "ok" and isinstance(record.get("randomization"), dict))
    return {"steps": steps, "early_steps": RANDOMIZATION_EARLY_STEPS, "limit": RANDOMIZATION_LIMIT,
            "images": images, "methods": methods}


def _nan_mean_curve(values: np.ndarray) -> list[float | None]:
    """Per step the mean of the images' finite values, null where there is none."""
    counts = np.isfinite(values).sum(axis=0)
    sums = np.where(np.isfinite(values), values, 0.0).sum(axis=0)
    return [_rounded(total / count) if count else None for total, count in zip(sums, counts)]

