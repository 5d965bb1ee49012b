"""The commands that explain and measure, writing their outputs into a folder: ``run`` (one image),
``batch`` (many), ``evaluate`` (which method to believe) and ``merge`` (the shards of a batch).

Each parses its options into the objects the Python API takes (:mod:`.option_groups`), calls it,
and prints what it did (:mod:`.printing`).
"""

from __future__ import annotations

import functools
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import click

from .._untrusted import terminal_text
from ..model_spec import ModelSpec
from ..options import MethodOptions
from .option_groups import (
    background_option,
    image_options,
    json_option,
    method_options,
    model_options,
    overlay_format_option,
    overlay_size_option,
    pointing_tolerance_check,
)
from .printing import batch_summary, print_evaluation, print_run


def _given(ctx: click.Context, name: str) -> bool:
    """Whether the command line set option ``name`` (rather than its default)."""
    return ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT


def _ray_cluster(engine: str, address: str | None, num_gpus_per_worker: float, workers: int):
    """The Ray cluster of ``--engine ray``, checked before the model loads; None for the local engine."""
    if engine != "ray":
        if address is not None or num_gpus_per_worker:
            raise click.UsageError("--address and --num-gpus-per-worker apply only with --engine ray.")
        return None
    from ..ray_engine import RayCluster, require_ray

    require_ray()  # without Ray: how to install it, before minutes of model loading
    return RayCluster(address=address, workers=workers, num_gpus_per_worker=num_gpus_per_worker)


def _map_metric_names(value: str | None) -> list[str]:
    """run --metrics: the perturbation metrics named ("all": every one), checked when measured."""
    if not value:
        return []
    from ..metrics import PERTURBATION_METRICS

    if value.strip() == "all":
        return list(PERTURBATION_METRICS)
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in PERTURBATION_METRICS]
    if unknown:
        raise click.BadParameter(
            f"{unknown[0]!r} is not one of {', '.join(PERTURBATION_METRICS)} "
            f"(`attnexplain evaluate` measures localisation and randomization)."
        )
    return names


def _metric_names(ctx: click.Context, param: click.Parameter, value: str | None):
    if value is None or value.strip() == "all":
        return value and "all"  # None: the default metrics (not ROAD); "all": every one
    return [name.strip() for name in value.split(",") if name.strip()]


def _shard(ctx: click.Context, param: click.Parameter, value: str | None):
    from ..errors import AttnExplainError
    from ..inputs import parse_shard

    try:
        return parse_shard(value)
    except AttnExplainError as error:
        raise click.BadParameter(str(error)) from None


@click.command()
@click.argument("model")
@click.argument("image", type=click.Path(path_type=Path))
@method_options
@model_options
@image_options
@click.option(
    "--out",
    "out_dir",
    default="attnexplain-out",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the outputs.",
)
@overlay_format_option("png")
@overlay_size_option("full")
@json_option("the report as JSON")
@click.option(
    "--metrics",
    "metric_names",
    callback=lambda ctx, param, value: _map_metric_names(value),
    help="Also measure each map: deletion, insertion, road, drop, comma-separated (report.json "
    '"metrics"; `attnexplain evaluate` compares methods over many images).',
)
@click.option(
    "--quiet", is_flag=True, help="No progress bar (shown on a terminal for methods that cost many forwards)."
)
@click.option(
    "--caption",
    "caption",
    help="A captioning model: score this caption (teacher forcing) and explain each of its words, "
    "instead of the model's own caption.",
)
def run(
    model_spec: ModelSpec,
    image: Path,
    method: str,
    target: str | None,
    versus: str | None,
    layer: str | None,
    options: MethodOptions,
    size,
    mean,
    std,
    alpha: float,
    colormap: str,
    top_k: int,
    threshold: float,
    max_pixels: int,
    out_dir: Path,
    overlay_format: str,
    overlay_size: int | None,
    as_json: bool,
    metric_names: list[str],
    quiet: bool,
    caption: str | None,
) -> None:
    """Explain MODEL's prediction on IMAGE: overlays, raw heatmaps, report.json and report.html.

    MODEL is a saved model file (state_dict or training checkpoint with --arch, Lightning .ckpt, timm
    train.py checkpoint, .safetensors, TorchScript, torch.export .pt2, or a pickled module with
    --trust-model), a folder a plugin loads, or torchvision:NAME[:WEIGHTS].
    """
    from ..images import check_image, load_image
    from ..progress import forwards_progress
    from ..report import output_dir_for, writable_output_folder

    started = time.perf_counter()
    # A bad image fails before the slow part: decoded now at full size; a smaller decode needs the
    # model's input size, so its header is checked now and it is decoded after the model loads.
    picture = load_image(image, max_pixels=max_pixels) if overlay_size is None else None
    if picture is None:
        check_image(image, max_pixels=max_pixels)
    image_s = time.perf_counter() - started
    with writable_output_folder(out_dir):  # so does a folder the outputs cannot be written to
        # What fails without torch fails before importing it; the import is timed on its own.
        model_spec.check()
        started = time.perf_counter()
        from ..explanation import explain
        from ..planning import plan_preprocessing

        import_s = time.perf_counter() - started
        started = time.perf_counter()
        loaded = model_spec.load()
        model_s = time.perf_counter() - started
        if picture is None:
            started = time.perf_counter()
            needed = plan_preprocessing(loaded, size=size, mean=mean, std=std).shortest_side
            picture = load_image(image, max_pixels=max_pixels, longest_side=overlay_size, shortest_side=needed)
            image_s += time.perf_counter() - started
        from ..captioning import captioning_of

        if captioning_of(loaded) is not None:  # a captioner: its caption, each word's maps
            from .captioning import run_captioner

            timings = {"load_image_s": image_s, "import_s": import_s, "load_model_s": model_s}
            explained = dict(caption=caption, target=target, size=size, mean=mean, std=std, methods=method, layer=layer)
            written = dict(alpha=alpha, overlay_format=overlay_format, colormap=colormap)
            refused = {"--metrics": bool(metric_names), "options": options}
            run_captioner(loaded, picture, refused, explained, written, out_dir, timings, as_json)
            return
        if caption is not None:
            from ..errors import MethodError

            raise MethodError("--caption applies to captioning models only; this model is not one.")
        with forwards_progress(method, quiet) as progress:
            explanation = explain(
                loaded,
                picture,
                method,
                target=target,
                versus=versus,
                layer=layer,
                top_k=top_k,
                threshold=threshold,
                size=size,
                mean=mean,
                std=std,
                options=options,
                progress=progress,
            )
        explanation.timings = {
            "load_image_s": image_s,
            "import_s": import_s,
            "load_model_s": model_s,
            **explanation.timings,
        }
        if metric_names:
            from ..run_metrics import explanation_metrics

            started = time.perf_counter()
            explanation.metrics = explanation_metrics(explanation, metric_names)
            explanation.timings["metrics_s"] = time.perf_counter() - started
        directory = output_dir_for(out_dir, picture.path)
        report = explanation.save(directory, alpha=alpha, overlay_format=overlay_format, colormap=colormap)
    for summary in report["maps"].values():
        if "warning" in summary:
            click.echo(f"Warning: {summary['warning']}", err=True)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        print_run(report)


@click.command()
@click.argument("model")
@click.argument("inputs", nargs=-1, required=True)
@method_options
@model_options
@image_options
@click.option(
    "--images-per-batch",
    default=16,
    show_default=True,
    type=click.IntRange(min=1),
    help="Images per forward pass (--batch-size is the methods' own batch, e.g. scorecam).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="Threads that decode images, and as many that write them, while the model runs "
    "(default: from the cores this process may use: 2, or a quarter of them, with "
    "the model on the CPU; every core but one, half each, on a GPU); with --engine "
    "ray, model actors (one CPU each, and --num-gpus-per-worker GPUs; default 1).",
)
@click.option(
    "--parallel-batches",
    type=click.IntRange(min=1),
    help="Batches the model explains at once, each on its own copy of the model sharing "
    "its weights, torch's CPU threads divided between them (default: 2 with the "
    "model on a CPU where torch may use 2 threads or more, where it is faster; 1 on "
    "a GPU); the others start once the first batch has shown that they fit in "
    "memory. --engine local only.",
)
@click.option(
    "--engine",
    default="local",
    show_default=True,
    type=click.Choice(["local", "ray"]),
    help="local: this process. ray: Ray tasks decode, an actor pool explains and writes "
    "(needs `pip install 'attnexplain[ray]'`; --out on a filesystem every worker sees).",
)
@click.option(
    "--address",
    help="--engine ray: the cluster to join (auto, or ray://HOST:PORT; default: "
    "start a local Ray instance with this machine's cores).",
)
@click.option(
    "--num-gpus-per-worker",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="--engine ray: GPUs each model actor reserves (it runs the model on CUDA when > 0).",
)
@click.option(
    "--out",
    "out_dir",
    default="attnexplain-batch",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the outputs (never read as inputs; one run at a time writes there).",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Skip images already explained in --out with the same model, options and file content; do the rest.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace the records of an earlier run in --out (without it, or --resume, an --out "
    "holding explained images is refused).",
)
@click.option(
    "--shard",
    callback=_shard,
    help="I/N: explain only a deterministic 1/N of the inputs, counting from 1 (--shard 1/2, "
    "--shard 2/2; merge the outputs with `attnexplain merge`).",
)
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option(
    "--truth",
    metavar="folders|FILE.csv",
    help="Each image's true class: 'folders' takes its parent folder's name (the ImageFolder "
    "layout); a CSV gives image,class rows. The gallery then shows accuracy, a confusion "
    "table and filters to the misclassified images.",
)
@overlay_format_option("jpg")
@click.option(
    "--metrics",
    "metric_names",
    callback=lambda ctx, param, value: _map_metric_names(value),
    help="Also measure each map: deletion, insertion, road, drop, comma-separated (each "
    'record\'s "metrics" in results.jsonl).',
)
@overlay_size_option("2048")
def batch(
    model_spec: ModelSpec,
    inputs: tuple[str, ...],
    method: str,
    target: str | None,
    versus: str | None,
    layer: str | None,
    options: MethodOptions,
    size,
    mean,
    std,
    alpha: float,
    colormap: str,
    top_k: int,
    threshold: float,
    max_pixels: int,
    images_per_batch: int,
    workers: int | None,
    parallel_batches: int | None,
    engine: str,
    address: str | None,
    num_gpus_per_worker: float,
    out_dir: Path,
    resume: bool,
    overwrite: bool,
    shard: tuple[int, int] | None,
    quiet: bool,
    truth: str | None,
    overlay_format: str,
    metric_names: list[str],
    overlay_size: int | None,
) -> None:
    """Explain many images with MODEL: overlays, heatmaps, results.jsonl, summary.csv, report.json
    and an index.html gallery in --out. A captioner's images are captioned, each word explained.

    INPUTS are image files, folders (searched recursively for jpg, jpeg, png, webp, bmp, tif,
    tiff; symbolic links to folders are not followed), globs ('photos/**/*.jpg') or @list.txt (one
    input per line). Outputs mirror the input paths as given (symbolic links not resolved) relative
    to their common folder, under OUT/images/. A named input that is not a regular file (a FIFO, a
    device) is recorded as failed without being read; such entries of folders are skipped and
    listed in report.json. A bad image is recorded with its reason and the run goes on.
    results.jsonl is written as images finish and the reports are refreshed periodically, so an
    interrupted run (Ctrl-C, SIGTERM, SIGHUP) leaves a valid partial report; --resume finishes it.
    Another batch writing to the same --out is refused, and so is an --out holding an earlier run's
    explained images unless --resume keeps them or --overwrite replaces them.

    \b
    Exit codes:
    0 every image was explained;
    3 some images failed, or some outputs could not be written (a full disk); the others were
      written (see report.json / index.html);
    1 the run could not start: no image found, --out in use by another run, model or options
      (one line on stderr);
    2 usage error (unknown option, bad value such as --shard 3/2);
    130 interrupted by Ctrl-C (SIGINT), 143 by SIGTERM, 129 by SIGHUP.
    """
    began = time.perf_counter()  # the wall time the summary reports, model loading included
    from .._signals import Stopped, stop_signals_interrupt
    from ..batch import check_earlier_run, run_batch
    from ..batch_stages import BatchSettings
    from ..report import writable_output_folder
    from ..truth import read_truth

    if engine == "ray" and parallel_batches is not None:
        raise click.UsageError(
            "--parallel-batches is for --engine local; with --engine ray, "
            "--workers sets how many model actors explain at once."
        )
    if resume and overwrite:
        raise click.UsageError(
            "--resume keeps the earlier run's records in --out and --overwrite replaces them: give one of them."
        )
    ray_workers = workers if _given(click.get_current_context(), "workers") else 1
    cluster = _ray_cluster(engine, address, num_gpus_per_worker, ray_workers)
    if cluster is not None:
        model_spec = replace(model_spec, device="cpu")  # the driver only plans; each actor loads its own

    settings = BatchSettings(
        method=method,
        target=target,
        versus=versus,
        layer=layer,
        size=tuple(size) if size else None,
        mean=tuple(mean) if mean else None,
        std=tuple(std) if std else None,
        top_k=top_k,
        threshold=threshold,
        alpha=alpha,
        colormap=colormap,
        overlay_format=overlay_format,
        overlay_size=overlay_size,
        max_pixels=max_pixels,
        truth=read_truth(truth) if truth else None,
        images_per_batch=images_per_batch,
        workers=workers,
        parallel_batches=parallel_batches,
        metrics=tuple(metric_names),
        options=options,
    )
    try:
        # --out is checked before the model loads (a bad --out fails first), and is removed again
        # if the run cannot start (no image found): a refused run leaves no folder behind.
        with stop_signals_interrupt(), writable_output_folder(out_dir):
            check_earlier_run(out_dir, resume, overwrite)  # before the model loads: a refused run waits for nothing
            loading = time.perf_counter()
            loaded = model_spec.load()
            load_s = time.perf_counter() - loading
            result = run_batch(
                loaded,
                model_spec,
                list(inputs),
                out_dir,
                settings,
                resume=resume,
                shard=shard,
                quiet=quiet,
                cluster=cluster,
                overwrite=overwrite,
            )
    except Stopped as stop:
        where = f"; the partial report is in {out_dir}" if (out_dir / "report.json").is_file() else ""
        click.echo(f"Stopped by {stop}{where}.", err=True)
        sys.exit(stop.exit_code)
    if result.skipped_inputs:
        shown = terminal_text("; ".join(f"{path} {reason}" for path, reason in result.skipped_inputs[:5]))
        more = f" (and {len(result.skipped_inputs) - 5} more)" if len(result.skipped_inputs) > 5 else ""
        click.echo(
            f"Skipped {len(result.skipped_inputs)} entries of the inputs, listed in report.json: {shown}{more}",
            err=True,
        )
    if result.report_error:
        click.echo(f"Warning: the reports could not be written: {result.report_error}", err=True)
    if not quiet:
        click.echo(
            f"{batch_summary(result, time.perf_counter() - began, load_s)} Gallery: {out_dir / 'index.html'}", err=True
        )
    if result.exit_code:
        sys.exit(result.exit_code)


@click.command()
@click.argument("model")
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--method",
    default="default",
    show_default=True,
    help="Methods to compare, comma-separated; default: every method that applies to the model "
    "except those that cost many forwards per image (the Score-CAM family, ablationcam, "
    "occlusion, integrated_gradients, smoothgrad(campp), gradientshap, rise, "
    "feature_ablation, kernelshap, lime); all: every one that applies.",
)
@click.option(
    "--metrics",
    callback=_metric_names,
    help="Comma-separated: deletion, insertion, road, drop, pointing, mass, rank, "
    "randomization, or all (default: all that apply but ROAD, whose sparse solves cost "
    "about 1 s of CPU per map and image at 128 px; localisation needs --masks or --boxes).",
)
@click.option(
    "--masks",
    type=click.Path(path_type=Path),
    help="Folder mirroring the inputs with one mask PNG per image (white = object).",
)
@click.option(
    "--boxes",
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSON file: file name → [[x, y, w, h], ...] in photo pixels, or a COCO file.",
)
# The defaults are MetricSettings' (metrics imports torch, which --help must not load; a test holds them equal).
@click.option(
    "--steps",
    default=10,
    show_default=True,
    type=click.IntRange(min=2, max=10_000),
    help="Deletion/insertion: steps per curve (each costs two forwards per map and image; 100 for finer curves).",
)
@click.option(
    "--pointing-tolerance",
    default=15.0,
    show_default=True,
    type=float,
    callback=pointing_tolerance_check,
    help="Pointing game: a maximum of the map closer than this many pixels of the photo to the "
    "object still hits it (Zhang et al. 2018 count 15); 0: only a maximum on the object.",
)
@click.option(
    "--randomization-images",
    default=8,
    show_default=True,
    type=click.IntRange(min=1, max=100_000),
    help="Randomization check: how many of the first images it measures (a subset is enough for "
    "a per-method verdict; each costs every method's maps once per step).",
)
@click.option(
    "--randomization-steps",
    default=5,
    show_default=True,
    type=click.IntRange(min=1, max=1000),
    help="Randomization check: at most this many cascading steps, one block each from the head "
    "down; the last step re-initialises all the rest.",
)
@background_option
@functools.partial(method_options, leave_out=("method", "steps"))
@model_options
@functools.partial(image_options, leave_out=("alpha", "top_k", "threshold"))
@click.option(
    "--images-per-batch",
    default=8,
    show_default=True,
    type=click.IntRange(min=1),
    help="Images explained and perturbed together.",
)
@click.option(
    "--out",
    "out_dir",
    default="attnexplain-eval",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for evaluation.json, evaluation.csv, evaluation.html.",
)
@json_option("evaluation.json")
@click.option(
    "--resume",
    is_flag=True,
    help="Reuse the images an earlier run in --out measured with the "
    "same model, settings, image and mask; measure the rest.",
)
@click.option("--quiet", is_flag=True, help="No progress output.")
def evaluate(
    model_spec: ModelSpec,
    inputs: tuple[str, ...],
    method: str,
    metrics,
    masks: Path | None,
    boxes: Path | None,
    steps: int,
    pointing_tolerance: float,
    randomization_images: int,
    randomization_steps: int,
    background,
    target,
    versus,
    layer,
    options: MethodOptions,
    size,
    mean,
    std,
    colormap: str,
    max_pixels: int,
    images_per_batch: int,
    out_dir: Path,
    as_json: bool,
    resume: bool,
    quiet: bool,
) -> None:
    """Which map to believe: measure the methods on MODEL and INPUTS (as `batch` takes them) for
    faithfulness (deletion, insertion, ROAD, average drop), localisation (with --masks or --boxes)
    and the randomization sanity check, beside a random map. On a captioner: each caption word's attention
    and Grad-CAM, against its mask MASKS/<image>/<word>.png and by deletion/insertion of its probability.

    Writes evaluation.json, evaluation.csv and evaluation.html in --out and prints a table ranked by
    faithfulness with a one-line verdict. A bad image, mask or box is recorded for that image.
    Progress goes to stderr; each image's line goes to evaluation.jsonl as it is measured, so an
    interrupted run (Ctrl-C, SIGTERM, SIGHUP) leaves a valid partial evaluation ("complete": false)
    and --resume finishes it.

    The defaults fit a CPU and leave out, each to ask for: the methods that cost many forwards per
    image (--method all), ROAD (--metrics all), the randomization check beyond the first 8 images
    (--randomization-images) and finer deletion/insertion curves than 10 steps (--steps 100).

    \b
    Exit codes: 0 done; 3 some images could not be measured; 1 could not start;
    130 interrupted by Ctrl-C (SIGINT), 143 by SIGTERM, 129 by SIGHUP.
    """
    from .._signals import Stopped, stop_signals_interrupt
    from ..evaluation import EvaluationSettings
    from ..evaluation import evaluate as run_evaluation
    from ..metrics import MetricSettings
    from ..report import writable_output_folder
    from .captioning import evaluation_for

    settings = EvaluationSettings(
        method=method,
        metrics=metrics,
        target=target,
        versus=versus,
        layer=layer,
        size=size,
        mean=mean,
        std=std,
        max_pixels=max_pixels,
        images_per_batch=images_per_batch,
        colormap=colormap,
        metric_settings=MetricSettings(
            steps=steps,
            batch_size=max(options.batch_size, 64),
            pointing_tolerance=pointing_tolerance,
            randomization_images=randomization_images,
            randomization_steps=randomization_steps,
        ),
        options=options,
        background=background or (),
    )
    try:
        with stop_signals_interrupt(), writable_output_folder(out_dir):
            loaded = model_spec.load()
            evaluation = evaluation_for(loaded, run_evaluation)(
                loaded,
                list(inputs),
                settings,
                masks=masks,
                boxes=boxes,
                out=out_dir,
                resume=resume,
                quiet=quiet,
                model_spec=model_spec,
            )
    except Stopped as stop:
        partial = (out_dir / "evaluation.json").is_file()
        where = f"; the partial evaluation is in {out_dir} (--resume finishes it)" if partial else ""
        click.echo(f"Stopped by {stop}{where}.", err=True)
        sys.exit(stop.exit_code)
    if as_json:
        click.echo(json.dumps({k: v for k, v in evaluation.items() if k != "examples"}, indent=2))
    else:
        print_evaluation(evaluation)
        click.echo(f"Page: {out_dir / 'evaluation.html'}", err=True)
    if evaluation["images"]["failed"]:
        sys.exit(3)


@click.command()
@click.argument("sources", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the merged outputs.",
)
def merge(sources: tuple[Path, ...], out_dir: Path) -> None:
    """Combine the outputs of `attnexplain batch --shard` runs into one: per-image files (hard
    links where possible), results.jsonl, report.json, summary.csv and index.html.

    Every source is checked first (paths, files, the model and options of every image); the result
    is built beside --out and replaces it as a whole, so a refused merge changes nothing. --out may
    be new, empty, one of the SOURCES, or an earlier output whose images the sources all hold.

    \b
    Exit codes: 0 every image was explained; 3 some images failed; 1 refused (nothing written).
    """
    from ..merge import merge_outputs

    result = merge_outputs(list(sources), out_dir)
    if result.dropped_records:
        more = " (and more)" if len(result.dropped_records) > 1 else ""
        click.echo(
            f"Warning: lines of the sources' results.jsonl that are no record were left out, "
            f"listed in report.json (run.dropped_records): "
            f"{terminal_text(result.dropped_records[0])}{more}",
            err=True,
        )
    click.echo(f"{result.ok} explained, {result.failed} failed. Gallery: {out_dir / 'index.html'}", err=True)
    if result.exit_code:
        sys.exit(result.exit_code)
