"""evaluate(): which map to believe, measured on the user's model and images.

Images stream through in chunks (memory does not grow with their number): each chunk's maps are
computed once for every method, then every metric of :mod:`attnexplain.metrics` is computed from
them, with a random map beside them as the chance level. Only per-image numbers and the running
sums of the curves are kept. Masks and boxes are untrusted: a bad or missing one is that image's
error, recorded, never the run's.

The images are collected and decoded as ``batch`` takes them (:mod:`attnexplain.inputs`); what is
around the run lives beside it: the masks and boxes (:mod:`attnexplain.evaluation_masks`), the log
that ``--resume`` reads (:mod:`attnexplain.evaluation_log`), the totals of evaluation.json
(:mod:`attnexplain.evaluation_summary`) and the files written (:mod:`attnexplain.evaluation_report`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ._signals import stop_reason
from .errors import AttnExplainError, MethodError, shown
from .evaluation_masks import check_background_labels, object_masks, photo_pixel_sizes, read_boxes
from .evaluation_summary import CurveSums, add_curves, rounded, summarize
from .evaluation_targets import labelled_evaluation, merged_metrics, target_columns, target_keys
from .formats import DEFAULT_COLORMAP
from .inputs import NoImages, collect_inputs, decoded_chunks, failed_record, read_image
from .metrics import LOCALISATION, METRIC_VALUES, RANDOM_MAP, MetricSettings, perturbation_values
from .model_spec import ModelSpec
from .randomization import RANDOMIZATION_EARLY_STEPS, cascade_steps, randomization_scores

EXAMPLE_IMAGES = 3
#: Why ROAD is not a default metric: its noisy linear imputation is a sparse solve per perturbed copy
#: (2 orders × 9 percentiles per map and image), measured under load on 2 cores at ~1 s per map and
#: 128 px image, over ten times the rest of the default metrics together.
DEFAULT_LEAVES_OUT_ROAD = "about 1 s of CPU per map and image at 128 px"
#: Finer deletion/insertion curves, as torchcam's default (and ours before CPU runs had to finish).
FINE_STEPS = 100


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
    versus: int | str | None = None  # a contrast: the maps explain score(target) − score(versus)
    #: Labels whose region is the background: every pixel outside the image's object masks (a texture prompt).
    background: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
        """Every setting that changes a measured number (for ``--resume``'s fingerprint)."""
        from .preprocess import normalize_size

        metric_settings = {
            key: value for key, value in self.metric_settings.as_dict().items() if key != "batch_size"
        }  # how many copies per forward: the same numbers
        return {
            "method": self.method if isinstance(self.method, str) else list(self.method),
            "target": self.target,
            "layer": self.layer if isinstance(self.layer, (str, type(None))) else list(self.layer),
            "size": list(normalize_size(self.size)) if self.size else None,
            "mean": list(self.mean) if self.mean else None,
            "std": list(self.std) if self.std else None,
            "max_pixels": self.max_pixels,
            "metric_settings": metric_settings,
            "options": self.options.as_dict() if self.options is not None else None,
            **({"versus": self.versus} if self.versus is not None else {}),
            **({"background": list(self.background)} if self.background else {}),
        }


# --- what to compute -----------------------------------------------------------------------------


def applicable_methods(loaded, requested: str | Sequence[str] = "default") -> list[str]:
    """The method names to evaluate: ``default`` every method the model allows except those that cost
    many forwards per image (``Method.many_forwards``), ``all`` every one it allows, or the given
    names (checked)."""
    from .methods import METHODS
    from .planning import resolve_methods

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
        return [
            name
            for name in METRIC_VALUES
            if (has_masks or name not in LOCALISATION) and (requested == "all" or name != "road")
        ]
    unknown = [name for name in requested if name not in METRIC_VALUES]
    if unknown:
        raise MethodError(f"Unknown metric {shown(unknown[0])}; metrics: {', '.join(METRIC_VALUES)}.")
    if not has_masks and any(name in LOCALISATION for name in requested):
        raise MethodError("The localisation metrics (pointing, mass, rank) need --masks DIR or --boxes FILE.")
    return list(dict.fromkeys(requested))


# --- the run -------------------------------------------------------------------------------------


def evaluate(
    loaded,
    input_specs: Sequence[str],
    settings: EvaluationSettings = EvaluationSettings(),
    *,
    masks: Path | None = None,
    boxes: Path | None = None,
    exclude: Path | None = None,
    device: str | None = None,
    out: Path | None = None,
    resume: bool = False,
    quiet: bool = True,
    model_spec: ModelSpec | dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Measure every method on the images ``input_specs`` name (as ``batch`` takes them): returns the
    evaluation (what evaluation.json holds, plus ``examples`` for the page).

    With ``out``, the run holds that folder's lock, appends each image's line to evaluation.jsonl as
    it is measured (:mod:`attnexplain.evaluation_log`) and writes evaluation.json, .csv and .html at
    the end, and also when it is stopped (Ctrl-C; SIGTERM and SIGHUP under the CLI) or fails: then
    they hold the images measured so far and say ``"complete": false``. ``resume`` reuses the lines of
    an earlier run in ``out`` made with the same model, settings, image and mask (``model_spec``: how
    the model was named, as ``batch`` takes it; default: ``loaded.describe()``). ``quiet=False``:
    progress on stderr, by image and by stage (maps, perturbations, randomization). A captioner's
    words are measured by :func:`attnexplain.caption_evaluation.evaluate_captions`."""
    from .captioning import captioning_of

    if captioning_of(loaded) is not None:
        from .caption_evaluation import evaluate_captions

        where = {"masks": masks, "boxes": boxes, "out": out, "resume": resume, "quiet": quiet}
        return evaluate_captions(loaded, input_specs, settings, model_spec=model_spec, **where)
    if out is None:
        if resume:
            raise AttnExplainError("Resuming needs the output folder of the earlier run.")
        return _evaluate(loaded, input_specs, settings, masks, boxes, exclude, device, None, False, quiet, model_spec)
    from ._atomic import remove_stale_staging
    from ._lock import output_lock

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise AttnExplainError(f"Cannot create the output folder {out}: {error.strerror or error}.") from None
    with output_lock(out):
        remove_stale_staging(out)  # what a killed run left: ours, since we hold the lock
        return _evaluate(
            loaded,
            input_specs,
            settings,
            masks,
            boxes,
            out if exclude is None else exclude,
            device,
            out,
            resume,
            quiet,
            model_spec,
        )


def _evaluate(loaded, input_specs, settings, masks, boxes, exclude, device, out, resume, quiet, model_spec):
    import torch

    from . import evaluation_log as log_lines
    from .detection_targets import refuse_box_metrics
    from .options import MethodOptions
    from .planning import plan_explanation
    from .progress import Progress
    from .running import model_device
    from .targets import box_rank, scored_for, several_targets

    started = time.perf_counter()
    if masks is not None and boxes is not None:
        raise AttnExplainError("Give --masks or --boxes, not both.")
    if masks is not None and not masks.is_dir():
        raise AttnExplainError(f"The masks folder {masks} does not exist or is not a folder.")
    box_table = read_boxes(boxes) if boxes is not None else None
    # A contrast or a negated output is what every map and every perturbation follows.
    loaded, _ = scored_for(loaded, settings.target, settings.versus)
    # Several targets (a multi-label model's labels, prompts): each its own columns, "gradcam@cat".
    several = several_targets(settings.target)
    keys = target_keys(several, loaded.labels, settings.versus) if several is not None else None
    if keys is not None and boxes is not None:
        raise AttnExplainError(
            "Several targets need --masks with a mask per object (MASKS/<image>/<label>.png), not --boxes."
        )
    metrics = chosen_metrics(settings.metrics, masks is not None or boxes is not None)
    refuse_box_metrics(box_rank(settings.target), [name for name in metrics if name not in LOCALISATION])
    check_background_labels(settings.background, loaded.labels, masks is not None or boxes is not None)
    inputs = collect_inputs(input_specs, exclude=exclude)
    if not inputs.images:
        raise NoImages(f"No image found in {' '.join(map(str, input_specs))}.")
    method_names = applicable_methods(loaded, settings.method)
    if not method_names:
        raise MethodError("No method applies to this model.")
    plan = plan_explanation(
        loaded, method_names, settings.layer, size=settings.size, mean=settings.mean, std=settings.std
    )
    options = settings.options or MethodOptions()
    run_device = torch.device(device) if device else model_device(loaded.module)
    plan, left_out = _runnable(loaded, plan, options, run_device, explicit=settings.method not in ("default", "all"))
    names = [m.name for m in plan.methods] + [RANDOM_MAP]
    columns = target_columns(names, keys) if keys is not None else names
    # Each image's random map and place among the randomized images follow its place in the inputs,
    # not the order it was measured in: a resumed run gives the numbers a whole run gives.
    position = {item.relative: i for i, item in enumerate(inputs.images)}
    spec = model_spec if model_spec is not None else ModelSpec(loaded.describe()["source"])
    key_prefix = log_lines.run_fingerprint(spec, settings, plan, metrics, boxes) if out is not None else ""
    value_names = {value for group in metrics for value in METRIC_VALUES[group]}
    steps = len(cascade_steps(loaded.module, settings.metric_settings.randomization_steps))
    kept = (
        log_lines.reusable_lines(out, key_prefix, set(position), columns, value_names, masks, steps) if resume else {}
    )
    paths = {item.relative: item.path for item in inputs.images}
    # A line stands only for the very bytes it measured: an image changed since is measured again,
    # and its old line must not be counted beside the new one.
    kept = {
        image: line
        for image, line in kept.items()
        if line["key"] == f"{key_prefix}:{_file_sha256_or_none(paths[image])}"
    }

    records: list[dict[str, Any]] = []
    sums = CurveSums()
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
        add_curves(sums, curves or {})
        progress.advance()

    for spec_text, reason in inputs.missing:
        finish({"image": spec_text, "path": spec_text, "status": "failed", "reason": reason})
    for line in sorted(kept.values(), key=lambda line: position[line["image"]]):
        # What the line may not decide: the image's path and its class's label are this run's.
        index = line["target"]["index"]
        records.append(
            {
                **log_lines.shown_record(line),
                "path": str(paths[line["image"]]),
                "target": {"index": index, "label": _label(loaded.labels, index)},
            }
        )
        curves = log_lines.line_curves(line)
        add_curves(sums, curves)
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
            parts = _compute(loaded, batch, plan, settings, options, several or [settings.target])
        except AttnExplainError as error:
            if len(chunk) == 1:
                finish(failed_record(chunk[0], str(error)))
                return
            for decoded in chunk:  # each image alone: one bad image must not fail the others
                run_chunk([decoded])
            return
        randomize = 0
        if "randomization" in metrics:  # the first images of the run only: enough for a per-method verdict
            randomize = max(0, min(len(chunk), settings.metric_settings.randomization_images - randomized["images"]))
            randomized["images"] += randomize

        def stage(name: str) -> None:
            progress.stage(f"{name} of {where}")

        chance = random_maps(len(chunk), tuple(batch.shape[-2:]), seeds)[:, None].to(run_device, torch.float32)
        # Each target's maps (one target but for --target a,b), each measured against its target.
        target_maps = [
            torch.cat([torch.stack([part.maps[n].float() for n in names[:-1]], 1), chance], 1) for part in parts
        ]
        measured = [
            _chunk_metrics(
                loaded,
                batch,
                maps,
                part,
                names,
                metrics,
                settings,
                plan,
                options,
                chunk,
                box_table,
                masks,
                randomize,
                stage,
                own_masks=several is not None,
            )
            for maps, part in zip(target_maps, parts)
        ]
        values, curves = measured[0] if len(measured) == 1 else merged_metrics(measured)
        computed = parts[0]
        for i, decoded in enumerate(chunk):
            target = int(computed.targets[i])
            record = {
                "image": decoded.item.relative,
                "path": str(decoded.item.path),
                "status": "ok",
                "target": {"index": target, "label": _label(loaded.labels, target)},
                "probability": round(float(computed.probabilities[i, target]), 6),
                "metrics": {
                    name: {metric: rounded(v[i, m]) for metric, v in values.items() if not math.isnan(float(v[i, m]))}
                    for m, name in enumerate(columns)
                },
            }
            if keys is not None:
                record["targets"] = [_target_entry(loaded, part, i) for part in parts]
            if i in curves.get("mask_errors", {}):
                record["mask_error"] = curves["mask_errors"][i]
            if "randomization" in curves and i < len(curves["randomization"]["spearman"]):
                record["randomization"] = _randomization_record(curves["randomization"], i, columns)
            image_curves = {
                which: {name: [float(v) for v in curves[which][i, m]] for m, name in enumerate(columns)}
                for which in ("deletion", "insertion")
                if which in curves
            }
            if "fractions" in curves:
                image_curves["fractions"] = [float(f) for f in curves["fractions"]]
            finish(record, decoded.key, image_curves)
        if len(examples) < EXAMPLE_IMAGES:
            examples.extend(_examples(chunk, target_maps[0], names, EXAMPLE_IMAGES - len(examples), settings.colormap))

    done_keys = {image: line["key"] for image, line in kept.items()}
    stopped = None
    try:
        # An image whose earlier line stands is passed over: it was counted above.
        decoded = (
            read_image(item, key_prefix, done_keys, plan.preprocessing, settings.max_pixels) for item in inputs.images
        )
        for chunk in decoded_chunks(decoded, settings.images_per_batch, finish):
            run_chunk(chunk)
    except BaseException as error:  # Ctrl-C, SIGTERM/SIGHUP (attnexplain._signals), a failure
        stopped = stop_reason(error)
        raise
    finally:
        progress.close()
        if log is not None:
            log.close()
        # The records in a whole run's order (the inputs that could not be read, then the images in
        # input order), whatever was reused or measured when: the bootstrap resamples by position.
        records.sort(key=lambda record: position.get(record["image"], -1))
        try:

            def summary(rows: list[dict[str, Any]], curve_sums: CurveSums) -> dict[str, Any]:
                wall_s = time.perf_counter() - started
                return summarize(
                    loaded,
                    plan,
                    names,
                    metrics,
                    settings,
                    rows,
                    curve_sums,
                    examples,
                    wall_s,
                    list(input_specs),
                    left_out,
                )

            evaluation = (
                summary(records, sums)
                if keys is None
                else labelled_evaluation(summary, records, sums, names, keys, metrics, settings.metric_settings.seed)
            )
            evaluation.update(complete=stopped is None, reused=len(kept))
            if stopped is not None:
                evaluation["stopped"] = {
                    "by": stopped,
                    "images_measured": len(records),
                    "images_given": len(inputs.images) + len(inputs.missing),
                }
            evaluation["settings"]["default_leaves_out"] = leaves_out(settings)
            if out is not None:
                from .evaluation_report import write_evaluation

                write_evaluation(out, evaluation)
        except Exception as error:
            if stopped is not None:
                pass  # the stop or failure under way is what the user must see; the log keeps the images
            elif isinstance(error, OSError):
                raise AttnExplainError(f"Cannot write the evaluation into {out}: {error.strerror or error}.") from None
            else:
                raise
    return evaluation


def leaves_out(settings: EvaluationSettings) -> list[str]:
    """What these settings leave out of what ``evaluate`` can measure, and how to ask for it (said
    in --help, in evaluation.json and on the page)."""
    found = []
    if settings.method == "default":
        found.append("the methods that cost many forwards per image (--method all, or name them)")
    if settings.metrics is None:
        found.append(f"ROAD, a sparse solve per perturbed copy ({DEFAULT_LEAVES_OUT_ROAD}; --metrics all, or name it)")
    config = settings.metric_settings
    if settings.metrics in (None, "all") or "randomization" in settings.metrics:
        found.append(
            f"the randomization check beyond the first {config.randomization_images} images (--randomization-images N)"
        )
    if config.steps < FINE_STEPS:
        found.append(f"deletion and insertion curves of {config.steps} steps (--steps {FINE_STEPS} for finer ones)")
    return found


def _runnable(loaded, plan, options, device, explicit: bool):
    """The plan without the methods this model refuses, and why each was left out. Some refusals show
    only when the model runs (Captum's rules cannot follow a module called twice, as ResNet's shared
    ReLU): one blank input through each method finds them before any image, instead of every image
    failing. A method the user named is not left out: its refusal is the run's error."""
    import dataclasses

    import torch

    from .engine import compute_maps
    from .errors import NothingToExplain

    blank = torch.zeros(1, 3, *plan.preprocessing.size, device=device)
    kept, left_out = [], {}
    for method in plan.methods:
        try:
            compute_maps(
                loaded, blank, [method], plan.layers, target=0, options=options, preprocessing=plan.preprocessing
            )
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
    from .records import file_sha256

    try:
        return file_sha256(path)
    except OSError:  # unreadable now: measured (and reported) as a new image
        return None


def _compute(loaded, batch, plan, settings, options, targets):
    """Each of ``targets``' maps of ``batch`` (of one forward where the methods allow)."""
    from .engine import each_target_maps

    return each_target_maps(
        loaded,
        batch,
        plan.methods,
        plan.layers,
        targets,
        options=options,
        preprocessing=plan.preprocessing,
        versus=settings.versus,
    )


def _chunk_metrics(
    loaded,
    batch,
    maps,
    computed,
    names,
    metrics,
    settings,
    plan,
    options,
    chunk,
    box_table,
    masks_dir,
    randomize: int,
    stage: Callable[[str], None],
    own_masks: bool = False,
):
    """Every metric of the chunk's maps; the randomization check on its first ``randomize`` images
    only (NaN for the others). ``stage`` is told each costly step as it starts (progress).
    ``own_masks``: a target's localisation reads only its own object's mask, never the image's one."""
    import torch

    from .metrics import localisation

    targets = computed.targets
    original = computed.explained_scores()
    config = settings.metric_settings
    stage("perturbations")
    values, curves = perturbation_values(loaded, batch, maps, targets, original, metrics, config, computed.precision)
    if any(name in LOCALISATION for name in metrics):
        explained = [_label(loaded.labels, int(index)) for index in targets]  # each label's own mask, where given
        masks, errors = object_masks(
            chunk,
            plan.preprocessing,
            box_table,
            masks_dir,
            settings.max_pixels,
            tuple(batch.shape[-2:]),
            explained,
            own_only=own_masks,
            background=settings.background,
        )
        found = localisation(
            maps.cpu(), masks, config.pointing_tolerance, photo_pixel_sizes(chunk, tuple(batch.shape[-2:]))
        )
        values.update({name: found[name] for name in LOCALISATION if name in metrics})
        curves["mask_errors"] = errors
    if "randomization" in metrics:
        values["randomization"] = torch.full(maps.shape[:2], math.nan)
        if randomize > 0:  # the first images of the run only: enough for a per-method verdict
            stage("randomization")
            scores, curves["randomization"] = _randomization(
                loaded, batch[:randomize], maps[:randomize], targets[:randomize], names, plan, options, config
            )
            values["randomization"][:randomize] = scores
    return {name: value.float().cpu() for name, value in values.items()}, curves


def _randomization(loaded, batch, maps, targets, names, plan, options, config):
    """The cascading randomization check of the images of ``batch`` (the first ones of the run, up
    to ``randomization_images``): per measure of :data:`~attnexplain.randomization.SIMILARITIES`, the
    similarity with the trained model's map after each step, (B, M, steps); and (B, M) each image's
    value, the mean over the early steps (:func:`~attnexplain.randomization.randomization_scores`)."""
    import torch

    from .engine import compute_maps
    from .metrics import random_maps
    from .randomization import randomization_similarities

    def maps_of(randomized, step: int) -> torch.Tensor:
        changed = dataclasses.replace(loaded, module=randomized)
        # The chance level: two independent random maps.
        chance = random_maps(
            len(batch), tuple(batch.shape[-2:]), [10_000_019 * (step + 1) + i for i in range(len(batch))]
        )
        try:
            computed = compute_maps(
                changed,
                batch,
                plan.methods,
                plan.layers,
                options=options,
                targets=targets,
                preprocessing=plan.preprocessing,
            )
        except AttnExplainError:  # e.g. a randomized detector that finds nothing: no value (NaN), no pass
            return torch.cat(
                [torch.full((len(batch), len(names) - 1, *batch.shape[-2:]), math.nan), chance[:, None]], dim=1
            )
        return torch.stack([computed.maps[name].float().cpu() for name in names[:-1]] + [chance], dim=1)

    similarities = randomization_similarities(loaded.module, maps_of, maps, config.randomization_steps, config.seed)
    _, early = randomization_scores(similarities, RANDOMIZATION_EARLY_STEPS)
    return torch.from_numpy(early), similarities


def _randomization_record(similarities: dict[str, np.ndarray], image: int, names) -> dict[str, Any]:
    """An image's ``"randomization"`` record entry: per method, per measure, the similarity after
    each step (null where it cannot be measured: JSON has no NaN)."""
    return {
        name: {
            measure: [None if math.isnan(v) else rounded(v) for v in values[image, m]]
            for measure, values in similarities.items()
        }
        for m, name in enumerate(names)
    }


def _examples(chunk, maps, names, count, colormap: str):
    import base64

    from .render import downscale, encode_image, render_explained_overlay

    found = []
    for i, decoded in enumerate(chunk[:count]):
        overlays = {}
        for m, name in enumerate(names):
            overlay = render_explained_overlay(
                decoded.pixels, maps[i, m].float().cpu().numpy(), decoded.box, colormap=colormap
            )
            data = base64.b64encode(encode_image(downscale(overlay, 160), ".jpg", quality=80)).decode()
            overlays[name] = f"data:image/jpeg;base64,{data}"
        found.append({"image": decoded.item.relative, "overlays": overlays})
    return found


def _target_entry(loaded, computed, image: int) -> dict[str, Any]:
    """An image's entry of its record's ``targets`` (a run of several): a target and its probability."""
    index = int(computed.targets[image])
    probability = round(float(computed.probabilities[image, index]), 6)
    return {"index": index, "label": _label(loaded.labels, index), "probability": probability}


def _label(labels, index: int) -> str | None:
    return labels[index] if labels is not None and index < len(labels) else None
