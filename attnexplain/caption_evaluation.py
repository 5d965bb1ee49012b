"""``evaluate`` on a captioner: for each word of each image's caption, does its map point at what the
word names, and does the word's probability follow the map?

For every image the model writes its own caption (:func:`attnexplain.captioning.explain_caption`);
each word is explained by the model's attention α and by Grad-CAM of the word's log-probability (and,
for an encoder–decoder whose plugin gives its attention maps, Chefer et al. 2021b's relevance), and
measured beside a random map (the chance level), with :mod:`attnexplain.metrics`' own code:

- localisation, where ``--masks`` holds a mask for the word: ``MASKS/<image without its
  suffix>/<word>.png`` (white = what the word names; a word is one of the caption's tokens as the
  tokenizer writes it alone, e.g. ``cat`` for GPT-2's ``Ġcat``, ``##s`` for a BERT word piece; one
  that is no plain file name, e.g. ``../x``, has no mask). Only words with a mask are measured then; a
  word the masks do not name (an article, a word the model got wrong) is listed as unmasked. Which
  word names which region is the masks' business: a texture word's mask is the background's;
- deletion and insertion of the word's probability: the caption is fed by teacher forcing (the
  plugin's ``Captioning.score``) to copies of the image with the map's most relevant pixels removed
  or revealed (:func:`attnexplain.metrics.causal_curves`). Without masks every word is measured so.

The verdict compares each map with the random map word by word (paired, bootstrap over the words:
:func:`attnexplain.verdict.judge`), and names the better of α and Grad-CAM only where the paired
interval of their difference excludes zero. Each image's line goes to evaluation.jsonl as it is
measured; evaluation.json, .csv and .html are written at the end or when the run is stopped, as
``evaluate`` does (:mod:`attnexplain.caption_evaluation_report` writes them).
"""

from __future__ import annotations

import hashlib
import math
import time
import types
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ._signals import stop_reason
from .errors import AttnExplainError, MethodError, shown
from .evaluation_summary import CurveSums, add_curves, image_totals, rounded
from .metrics import BETTER, LOCALISATION, METRIC_VALUES, RANDOM_MAP
from .model_spec import ModelSpec

#: The maps of a word by default, in the order of every table: the model's attention, Grad-CAM, the
#: chance level (:func:`caption_maps`: with the methods of ``--method`` instead of Grad-CAM).
CAPTION_MAPS = ("attention", "gradcam", RANDOM_MAP)
#: The metric groups that apply to a word's maps (ROAD, average drop and randomization do not).
CAPTION_METRICS = ("deletion", "insertion", "pointing", "mass", "rank")
#: Images whose word maps the page shows as small overlays (evaluation.py, which hands captioners
#: over here, shows as many of its images': this module cannot import it back).
EXAMPLE_IMAGES = 3
#: A folder of word masks is untrusted: at most this many files are looked at for ``--resume``.
MAX_MASK_FILES = 1000


def caption_metrics(requested: Sequence[str] | str | None, has_masks: bool) -> list[str]:
    """The metric groups to measure on a captioner's words: every one that applies (localisation with
    masks only) for None or ``"all"``; else the requested ones, each checked."""
    if requested is None or requested == "all":
        return [name for name in CAPTION_METRICS if has_masks or name not in LOCALISATION]
    refused = [name for name in requested if name not in CAPTION_METRICS]
    if refused:
        raise MethodError(
            f"A captioner's words are measured by {', '.join(CAPTION_METRICS)}; {shown(refused[0])} does not apply."
        )
    if not has_masks and any(name in LOCALISATION for name in requested):
        raise MethodError("The localisation metrics (pointing, mass, rank) need --masks DIR with a mask per word.")
    return list(dict.fromkeys(requested))


def caption_maps(settings, captioning=None, plugin=None) -> tuple[str, ...]:
    """The maps measured on each word, in table order: α, each method of ``settings.method`` (Grad-CAM
    by default), an encoder–decoder's relevance (``captioning.score_attention``), the random map."""
    from .caption_methods import caption_methods

    relevance = ("relevance",) if captioning is not None and captioning.score_attention is not None else ()
    return ("attention", *[method.name for method in caption_methods(settings.method, plugin)], *relevance, RANDOM_MAP)


def refuse_settings(settings, plugin=None) -> None:
    """A one-line :class:`MethodError` for settings of :class:`~attnexplain.evaluation.EvaluationSettings`
    that do not apply to a captioner (the CLI refuses the options it has beyond these)."""
    given = [
        option
        for option, applies in (
            ("--target", settings.target is None),
            ("--versus", settings.versus is None),
            ("--layer (one layer)", settings.layer is None or isinstance(settings.layer, str)),
        )
        if not applies
    ]
    from .caption_methods import unread_options

    refuse_options(given + unread_options(settings.options))
    caption_maps(settings, plugin=plugin)  # an unknown or inapplicable --method, refused before anything is run


def refuse_options(given: Sequence[str]) -> None:
    """A one-line :class:`MethodError` naming the ``given`` options, if any: they do not apply to a
    captioner."""
    if given:
        raise MethodError(
            f"A captioner's words are evaluated on its attention α, the maps of --method and a random map; "
            f"{', '.join(given)} does not apply to it."
        )


def word_mask_path(masks: Path, relative: str, word: str) -> Path | None:
    """Where the mask of ``word`` in image ``relative`` lies; None for a word that is no plain file
    name (the model's vocabulary never names a path)."""
    if word in ("", ".", "..") or any(c in word for c in "/\\\0") or len(word) > 200:
        return None
    return masks / Path(relative).with_suffix("") / f"{word}.png"


def masks_digest(masks: Path | None, relative: str) -> str | None:
    """sha256 over the names and contents of the image's word masks (what ``--resume`` checks)."""
    from ._files import not_a_regular_file
    from .records import file_sha256

    folder = masks / Path(relative).with_suffix("") if masks is not None else None
    if folder is None or not folder.is_dir():
        return None
    digest = hashlib.sha256()
    try:
        names = sorted(path.name for path in folder.iterdir() if path.suffix == ".png")[:MAX_MASK_FILES]
        for name in names:
            if not_a_regular_file(folder / name) is None:
                digest.update(f"{name}\0{file_sha256(folder / name)}\0".encode())
    except OSError:
        return None
    return digest.hexdigest()


# --- one image -----------------------------------------------------------------------------------


def caption_score(captioning, ids: Sequence[int]):
    """The :data:`~attnexplain.metrics.ScoreFunction` of a caption: images (N, 3, H, W) → (N, T)
    each word's probability given the image and the words before it (teacher forcing)."""
    import torch

    def score(images: torch.Tensor) -> torch.Tensor:
        steps = torch.tensor([list(ids)], dtype=torch.long, device=images.device).expand(len(images), -1)
        log_probs = captioning.score(images, steps)
        return log_probs.float().gather(2, steps[..., None])[..., 0].exp()

    return score


def _word_masks(
    masks: Path, decoded, caption: Sequence[str], preprocessing, max_pixels: int
) -> tuple[dict[int, Any], list[str], dict]:
    """Per caption position the word's mask in the model's frame (H, W) bool, the words without one,
    and position → why the word's mask could not be used."""
    import torch

    from .evaluation_masks import MaskError, mask_file_mask, model_frame_mask

    relative = decoded.item.relative
    folder = masks / Path(relative).with_suffix("")
    if not folder.is_dir():
        single = masks / Path(relative).with_suffix(".png")
        hint = f" ({single.name} names no word)" if single.is_file() else ""
        raise MaskError(f"no folder {folder} of masks, one <word>.png per word{hint}")
    height, width = decoded.pixels.shape[:2]
    found, unmasked, errors = {}, [], {}
    for position, word in enumerate(caption):
        path = word_mask_path(masks, relative, word)
        if path is None or not (path.exists() or path.is_symlink()):
            unmasked.append(word)
            continue
        try:
            mask = mask_file_mask(path, width, height, max_pixels)
            found[position] = torch.from_numpy(model_frame_mask(mask, preprocessing))
        except MaskError as error:
            errors[position] = f"{word}: {error}"
    return found, unmasked, errors


def measure_image(
    loaded, captioning, decoded, preprocessing, settings, metrics, masks, seed: int, example: bool = False
) -> tuple[dict, dict, dict | None]:
    """One image (decoded with ``preprocessing``, as ``settings`` plan it): its record (its caption;
    per measured word its probability and each map's values), its curves ({"fractions", "deletion":
    {map: [per word]}, "insertion": ...}) and, with ``example``, the page's small overlays of each
    measured word's maps (else None)."""
    import torch

    from .captioning import caption_ids, explain_caption
    from .images import LoadedImage
    from .metrics import causal_curves, localisation, random_maps
    from .running import model_device

    picture = LoadedImage(pixels=decoded.pixels, path=decoded.item.path, format=None, mode="RGB")
    explanation = explain_caption(
        loaded,
        picture,
        size=settings.size,
        mean=settings.mean,
        std=settings.std,
        methods=settings.method,
        layer=settings.layer,
        options=settings.options,
    )
    names = caption_maps(settings, captioning, loaded.plugin)
    text = " ".join(explanation.caption)
    record: dict[str, Any] = {
        "image": decoded.item.relative,
        "path": str(decoded.item.path),
        "status": "ok",
        "caption": text,
    }
    positions = list(range(len(explanation.caption)))
    word_masks: dict[int, Any] = {}
    if masks is not None:
        from .evaluation_masks import MaskError

        try:
            word_masks, unmasked, errors = _word_masks(
                masks, decoded, explanation.caption, preprocessing, settings.max_pixels
            )
        except MaskError as error:
            word_masks, unmasked, errors = {}, [], {}
            record["mask_error"] = f"No localisation for {decoded.item.relative}: {error}."
        positions = sorted(word_masks)
        record["unmasked"] = unmasked
        if errors:
            record["mask_error"] = "; ".join(errors.values())
    by_position = {word.position: word for word in explanation.words}
    positions = [t for t in positions if t in by_position]  # every word is explained; never assume it
    record["words"] = []
    if not positions:
        return record, {}, None
    batch = decoded.tensor.to(model_device(loaded.module))
    size = tuple(batch.shape[-2:])
    chance = random_maps(1, size, [seed])[0]
    maps = torch.stack(
        [
            torch.stack([torch.from_numpy(by_position[t].map_named(name)).float() for name in names[:-1]] + [chance])
            for t in positions
        ]
    )  # (words, maps, H, W)
    values: dict[str, torch.Tensor] = {}
    curves: dict[str, Any] = {}
    if "deletion" in metrics or "insertion" in metrics:
        found = causal_curves(
            caption_score(captioning, explanation.ids or caption_ids(captioning, text)),
            batch.expand(len(positions), -1, -1, -1),
            maps.to(batch.device),
            torch.tensor(positions),
            torch.tensor([explanation.probabilities[t] for t in positions]),
            settings.metric_settings,
        )
        deletion, insertion = found.areas()
        curves["fractions"] = [float(f) for f in found.fractions]
        for which, area, curve in (("deletion", deletion, found.deletion), ("insertion", insertion, found.insertion)):
            if which in metrics:
                values[which] = area
                curves[which] = {name: curve[:, m].tolist() for m, name in enumerate(names)}
    if word_masks and any(name in LOCALISATION for name in metrics):
        box = decoded.box  # the photo's region the model saw: photo pixels per model pixel
        pixel_size = torch.tensor([[(box[3] - box[1]) / size[0], (box[2] - box[0]) / size[1]]], dtype=torch.float64)
        located = localisation(
            maps,
            torch.stack([word_masks[t] for t in positions]),
            settings.metric_settings.pointing_tolerance,
            pixel_size.expand(len(positions), -1),
        )
        values.update({name: located[name] for name in LOCALISATION if name in metrics})
    for w, t in enumerate(positions):
        record["words"].append(
            {
                "word": explanation.caption[t],
                "position": t,
                "probability": rounded(explanation.probabilities[t]),
                "metrics": {
                    name: {
                        metric: rounded(value[w, m])
                        for metric, value in values.items()
                        if math.isfinite(float(value[w, m]))
                    }
                    for m, name in enumerate(names)
                },
            }
        )
    found = None
    if example:
        found = {
            "image": record["image"],
            "caption": text,
            "words": [
                {
                    "word": explanation.caption[t],
                    "overlays": _overlays(decoded.pixels, dict(zip(names, maps[w])), decoded.box, settings),
                }
                for w, t in enumerate(positions)
            ],
        }
    return record, curves, found


def _overlays(pixels: np.ndarray, maps: dict[str, Any], box, settings) -> dict[str, str]:
    """Map name → a small JPEG overlay of it on the photo, as a data: URI (the page holds them)."""
    import base64

    from .render import downscale, encode_image, render_explained_overlay

    found = {}
    for name, heatmap in maps.items():
        overlay = render_explained_overlay(pixels, heatmap.numpy(), box, colormap=settings.colormap)
        data = base64.b64encode(encode_image(downscale(overlay, 160), ".jpg", quality=80)).decode()
        found[name] = f"data:image/jpeg;base64,{data}"
    return found


# --- the run -------------------------------------------------------------------------------------


def evaluate_captions(
    loaded,
    input_specs: Sequence[str],
    settings,
    *,
    masks: Path | None = None,
    boxes: Path | None = None,
    out: Path | None = None,
    resume: bool = False,
    quiet: bool = True,
    model_spec: ModelSpec | dict[str, Any] | None = None,
) -> dict[str, Any]:
    """:func:`attnexplain.evaluation.evaluate` for a captioning model (same arguments, same outputs
    in ``out``: evaluation.jsonl as it goes, evaluation.json, .csv and .html at the end or when
    stopped): each word of each image's caption, its attention α and Grad-CAM beside a random map.
    ``settings``: an :class:`~attnexplain.evaluation.EvaluationSettings`, of which the preprocessing,
    ``max_pixels``, ``metrics`` and ``metric_settings`` apply (the other fields are refused)."""
    refuse_settings(settings, loaded.plugin)
    if boxes is not None:
        raise MethodError("A captioner's words are located by --masks DIR (a <word>.png per word); --boxes name none.")
    if masks is not None and not Path(masks).is_dir():
        raise AttnExplainError(f"The masks folder {masks} does not exist or is not a folder.")
    if out is None:
        if resume:
            raise AttnExplainError("Resuming needs the output folder of the earlier run.")
        return _evaluate(loaded, input_specs, settings, masks, None, False, quiet, model_spec)
    from ._atomic import remove_stale_staging
    from ._lock import output_lock

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise AttnExplainError(f"Cannot create the output folder {out}: {error.strerror or error}.") from None
    with output_lock(out):
        remove_stale_staging(out)
        return _evaluate(loaded, input_specs, settings, masks, out, resume, quiet, model_spec)


def _fingerprint(model_spec, settings, metrics: Sequence[str]) -> str:
    from .records import fingerprint

    described = {**settings.describe(), "task": "captioning", "metrics": list(metrics)}
    return "caption:" + fingerprint(model_spec, types.SimpleNamespace(describe=lambda: described))


def _evaluate(loaded, input_specs, settings, masks, out, resume, quiet, model_spec):
    from . import evaluation_log as log_lines
    from .captioning import captioning_of
    from .inputs import NoImages, collect_inputs, decoded_chunks, failed_record, read_image
    from .planning import plan_preprocessing
    from .progress import Progress

    started = time.perf_counter()
    captioning = captioning_of(loaded)
    if captioning is None:
        raise MethodError("This model is not a captioner; `attnexplain evaluate` measures its methods as it is.")
    metrics = caption_metrics(settings.metrics, masks is not None)
    maps = caption_maps(settings, captioning, loaded.plugin)
    preprocessing = plan_preprocessing(loaded, size=settings.size, mean=settings.mean, std=settings.std)
    inputs = collect_inputs(input_specs, exclude=out)
    if not inputs.images:
        raise NoImages(f"No image found in {' '.join(map(str, input_specs))}.")
    position = {item.relative: i for i, item in enumerate(inputs.images)}
    spec = model_spec if model_spec is not None else ModelSpec(loaded.describe()["source"])
    key_prefix = _fingerprint(spec, settings, metrics) if out is not None else ""
    paths = {item.relative: item.path for item in inputs.images}
    kept = _reusable(out, key_prefix, paths, masks, metrics, maps) if resume else {}

    records: list[dict[str, Any]] = []
    examples: list[dict[str, Any]] = []
    sums = CurveSums()
    log = log_lines.open_log(out, kept.values()) if out is not None else None
    progress = Progress(len(inputs.images) + len(inputs.missing), quiet, label="evaluating")

    def finish(record: dict[str, Any], key: str | None = None, curves: dict[str, Any] | None = None) -> None:
        if log is not None:
            line = {**record, "key": key, "masks_sha256": masks_digest(masks, record["image"]), "curves": curves or {}}
            try:
                log.append(line)
            except OSError as error:
                record = {**record, "log_error": f"{error.strerror or error}"}
        records.append(record)
        _add_word_curves(sums, curves or {})
        progress.advance()

    for spec_text, reason in inputs.missing:
        finish({"image": spec_text, "path": spec_text, "status": "failed", "reason": reason})
    for line in kept.values():
        records.append({name: line[name] for name in RECORD_FIELDS if name in line})
        _add_word_curves(sums, line["curves"])
        progress.advance(earlier=True)

    stopped = None
    try:
        done_keys = {image: line["key"] for image, line in kept.items()}
        decoded = (
            read_image(item, key_prefix, done_keys, preprocessing, settings.max_pixels) for item in inputs.images
        )
        for (one,) in decoded_chunks(decoded, 1, finish):
            progress.stage(f"image {position[one.item.relative] + 1}")
            seed = settings.metric_settings.seed + position[one.item.relative]
            wanted = len(examples) < EXAMPLE_IMAGES
            try:
                record, curves, example = measure_image(
                    loaded, captioning, one, preprocessing, settings, metrics, masks, seed, wanted
                )
            except AttnExplainError as error:
                finish(failed_record(one, str(error)))
                continue
            finish(record, one.key, curves)
            examples.extend([example] if example is not None else [])
    except BaseException as error:  # Ctrl-C, SIGTERM/SIGHUP (attnexplain._signals), a failure
        stopped = stop_reason(error)
        raise
    finally:
        progress.close()
        if log is not None:
            log.close()
        records.sort(key=lambda record: position.get(record["image"], -1))
        try:
            evaluation = summarize_captions(
                loaded,
                preprocessing,
                metrics,
                settings,
                records,
                sums,
                time.perf_counter() - started,
                input_specs,
                maps,
            )
            evaluation.update(complete=stopped is None, reused=len(kept), examples=examples)
            if stopped is not None:
                evaluation["stopped"] = {
                    "by": stopped,
                    "images_measured": len(records),
                    "images_given": len(inputs.images) + len(inputs.missing),
                }
            if out is not None:
                from .caption_evaluation_report import write_caption_evaluation

                write_caption_evaluation(out, evaluation)
        except Exception as error:
            if stopped is not None:
                pass  # the stop or failure under way is what the user must see; the log keeps the images
            elif isinstance(error, OSError):
                raise AttnExplainError(f"Cannot write the evaluation into {out}: {error.strerror or error}.") from None
            else:
                raise
    return evaluation


def _add_word_curves(sums: CurveSums, curves: dict[str, Any]) -> None:
    """An image's per-word curves into the run's running sums: each word is one curve."""
    for which in ("deletion", "insertion"):
        for name, rows in curves.get(which, {}).items():
            for row in rows:
                add_curves(sums, {which: {name: row}})
    if "fractions" in curves:
        add_curves(sums, {"fractions": curves["fractions"]})


#: The fields of an image's record (evaluation.json's ``per_image``); a log line adds its key and curves.
RECORD_FIELDS = ("image", "path", "status", "reason", "caption", "words", "unmasked", "mask_error")


def _reusable(
    out: Path, key_prefix: str, paths: dict[str, Path], masks: Path | None, metrics, names: Sequence[str]
) -> dict[str, dict]:
    """Image → the earlier run's line that still stands for it: an ok line of this model and these
    settings, for this image's bytes (``paths``: this run's images) and masks, of the shape this run
    writes (lines are untrusted)."""
    from ._files import not_a_regular_file
    from .evaluation_log import EVALUATION_JSONL
    from .records import file_sha256, read_results

    values = {value for group in metrics for value in METRIC_VALUES[group]}
    kept = {}
    for line in read_results(out / EVALUATION_JSONL):
        image = line.get("image")
        if line.get("status") != "ok" or image not in paths or _line_problem(line, values, names) is not None:
            continue
        if line.get("masks_sha256") != masks_digest(masks, image) or not_a_regular_file(paths[image]) is not None:
            continue
        try:
            current = f"{key_prefix}:{file_sha256(paths[image])}"
        except OSError:
            continue
        if line.get("key") == current:
            kept[image] = {**line, "path": str(paths[image])}
    return kept


def _line_problem(line: dict[str, Any], values: set[str], names: Sequence[str] = CAPTION_MAPS) -> str | None:
    """Why a log line cannot stand for its image, or None."""
    from ._untrusted import is_finite_number
    from .metrics import metrics_table_problem

    words = line.get("words")
    if not isinstance(line.get("caption"), str) or not isinstance(words, list) or len(words) > 1000:
        return "has no caption and words"
    for word in words:
        if not (
            isinstance(word, dict)
            and isinstance(word.get("word"), str)
            and isinstance(word.get("position"), int)
            and is_finite_number(word.get("probability"))
        ):
            return "has a word that is not one"
        if metrics_table_problem(word.get("metrics"), tuple(names)) is not None:
            return "has a word's metrics that are not a table"
        if any(not set(table) <= values for table in word["metrics"].values()):
            return "has values this run does not measure"
    curves = line.get("curves")
    if not isinstance(curves, dict):
        return "has no curves"
    fractions = curves.get("fractions", [])
    if not (isinstance(fractions, list) and all(is_finite_number(f) for f in fractions)):
        return "has fractions that are not numbers"
    for which in ("deletion", "insertion"):
        table = curves.get(which, {})
        if not isinstance(table, dict) or not set(table) <= set(names):
            return f"has {which} curves of other maps"
        for rows in table.values():
            if not (
                isinstance(rows, list)
                and len(rows) == len(words)
                and all(
                    isinstance(row, list) and len(row) == len(fractions) and all(map(is_finite_number, row))
                    for row in rows
                )
            ):
                return f"has {which} curves that are not a row per word"
    return None


# --- the summary ---------------------------------------------------------------------------------


def word_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every measured word of the ok images, as one record each (``{"image", "word", "metrics"}``):
    the unit the bootstrap resamples."""
    return [
        {"image": record["image"], "word": word["word"], "position": word["position"], "metrics": word["metrics"]}
        for record in records
        if record.get("status") == "ok"
        for word in record.get("words", [])
    ]


def summarize_captions(
    loaded, preprocessing, metrics, settings, records, sums, wall_s, input_specs, maps: Sequence[str] = CAPTION_MAPS
) -> dict[str, Any]:
    """What evaluation.json holds for a captioner: per map and value the mean over the words with
    its bootstrap interval, the same per word of the vocabulary, the paired comparison with the
    random map and between the maps (:func:`~attnexplain.verdict.judge`), a verdict line per map, the
    mean curves, and the per-image records. ``maps``: the run's (:func:`caption_maps`)."""
    from .report import versions
    from .verdict import bootstrap_interval, judge, score_formula

    words = word_records(records)
    names = tuple(maps)
    value_names = [value for group in metrics for value in METRIC_VALUES[group]]
    seed = settings.metric_settings.seed

    def means(chosen: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        table: dict[str, dict[str, Any]] = {}
        for name in names:
            table[name] = {}
            for metric in value_names:
                column = [w["metrics"][name][metric] for w in chosen if metric in w["metrics"].get(name, {})]
                if column:
                    low, high = bootstrap_interval(column, seed)
                    table[name][metric] = {
                        "mean": rounded(np.mean(column)),
                        "ci95": [rounded(low), rounded(high)],
                        "words": len(column),
                    }
        return table

    judgement = judge(words, list(names), value_names, [], seed)
    ok = [r for r in records if r["status"] == "ok"]
    methods = means(words)
    evaluation = {
        "task": "captioning",
        "model": loaded.describe(),
        "inputs": list(input_specs),
        "settings": {
            "maps": list(names[:-1]),
            "metrics": list(metrics),
            "caption": "generated",
            "preprocessing": preprocessing.as_dict(),
            **settings.metric_settings.as_dict(),
            "better": {metric: ("higher" if BETTER[metric] > 0 else "lower") for metric in value_names},
        },
        "versions": versions(),
        "images": image_totals(records, ok),
        "words": {"measured": len(words), "unmasked": sum(len(r.get("unmasked", [])) for r in ok)},
        "methods": methods,
        "by_word": {
            word: {"words": count, "maps": means([w for w in words if w["word"] == word])}
            for word, count in sorted(_counts(w["word"] for w in words).items())
        },
        "ranking": judgement.ranking,
        **judgement.as_dict(),
        "map_verdicts": map_verdicts(judgement, methods),
        "verdict": caption_verdict(judgement, len(words), score_formula(judgement.parts)),
        "curves": {
            "fractions": [round(float(f), 6) for f in sums.fractions] if sums.fractions is not None else [],
            "deletion": sums.means("deletion"),
            "insertion": sums.means("insertion"),
            "random_band": {
                which: sums.band(which, RANDOM_MAP)
                for which in ("deletion", "insertion")
                if RANDOM_MAP in getattr(sums, which)
            },
        },
        "per_image": records,
        "wall_s": round(wall_s, 3),
    }
    return evaluation


def _counts(items) -> dict[str, int]:
    found: dict[str, int] = {}
    for item in items:
        found[item] = found.get(item, 0) + 1
    return found


def map_verdicts(judgement, methods: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Per map one line: for each value its mean beside the random map's and whether the paired 95%
    interval of the difference (over the words) puts it better, worse, or no different."""
    lines = {}
    for name in [name for name in methods if name != RANDOM_MAP]:
        parts = []
        for metric, by_map in judgement.against_random.items():
            difference = by_map.get(name)
            mine, chance = methods[name].get(metric), methods[RANDOM_MAP].get(metric)
            if difference is None or not difference.images or mine is None or chance is None:
                continue
            if not difference.separates:
                said = "no different from"
            else:
                said = "better than" if difference.mean > 0 else "worse than"
            parts.append(f"{metric} {mine['mean']:.3f} ({said} the random map's {chance['mean']:.3f}, paired)")
        lines[name] = f"{name}: " + ("; ".join(parts) if parts else "nothing measured") + "."
    return lines


def caption_verdict(judgement, words: int, formula: str) -> str:
    """The one line the terminal and the page lead with: which map to believe on these words, named
    only where its paired interval with the other excludes zero."""
    counted = f"{words} word" + ("" if words == 1 else "s")
    if not words:
        return "No word was measured."
    if not judgement.parts:
        flagged = [metric for metric in ("insertion", "deletion") if metric in judgement.uninformative]
        if not flagged:
            return f"No faithfulness metric was measured on {counted}."
        return (
            f"Neither deletion nor insertion sets a map apart from the random map on these {counted} "
            f"({', '.join(flagged)} uninformative: paired and unpaired 95% intervals): no map is recommended."
        )
    if judgement.winner is not None:
        versus = judgement.pairwise.get((judgement.winner, RANDOM_MAP))
        text = f"Most faithful on these {counted}: {judgement.winner}"
        if versus is None or not versus.separates or versus.mean <= 0:
            text += " (but no better than a random map)"
        return text + f". Ranked by {formula}."
    tied = " and ".join(judgement.tied)
    return f"No single winner: {tied}: no difference on these {counted}. Ranked by {formula}."
