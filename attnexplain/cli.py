"""The ``attnexplain`` command: parses arguments, calls the Python API, prints.

Nothing heavy is imported at module level, so ``attnexplain --help`` answers without loading torch.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import click

from ._untrusted import terminal_text
from .formats import COLORMAP_NAMES, DEFAULT_COLORMAP


class _Group(click.Group):
    """Turns expected errors into one-line messages and unexpected ones into one line plus a hint;
    keeps libraries' warnings and log records off the terminal unless ``--debug``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # --debug belongs to the group, but people add it at the end of a failing command line.
        end = args.index("--") if "--" in args else len(args)
        if "--debug" in args[:end]:
            args = ["--debug"] + [arg for i, arg in enumerate(args) if i >= end or arg != "--debug"]
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        from .errors import AttnExplainError

        try:
            with _library_noise(shown=bool(ctx.params.get("debug"))):
                return super().invoke(ctx)
        except SystemExit as exiting:
            # Our commands end through click (ctx.exit, exceptions) or sys.exit with a failure
            # code; a success code here comes from code we ran (a model, a plugin) ending the
            # program early, which must not look like a finished command.
            if exiting.code not in (0, None):
                raise
            raise click.ClickException("Code the command ran (the model's or a plugin's) called exit() "
                                       "with status 0 before the command finished; nothing was "
                                       "completed.") from None
        except AttnExplainError as error:
            if ctx.params.get("debug") and error.__cause__ is not None:
                # A model's own failure, said in one line: --debug shows where in its code.
                import traceback

                traceback.print_exception(error.__cause__, file=sys.stderr)
            # One line, and no character that rewrites it: messages name the user's files.
            raise click.ClickException(terminal_text(str(error))) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)
        except Exception as error:
            if ctx.find_root().params.get("debug"):
                raise
            text = terminal_text(" ".join(str(error).split()) or type(error).__name__)
            raise click.ClickException(f"Unexpected {type(error).__name__}: {text} "
                                       f"(rerun with --debug for the traceback)") from None


@contextmanager
def _library_noise(shown: bool) -> Iterator[None]:
    """Without --debug, Python warnings (TorchScript's deprecation, GoogLeNet's init notice, NaN
    arithmetic) and log records (torch's, with their tracebacks) stay off stderr, so that an error
    is the one line we print."""
    if shown:
        yield
        return
    previous = logging.root.manager.disable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.CRITICAL)
        try:
            yield
        finally:
            logging.disable(previous)


def _numbers(kind: type, count: tuple[int, ...], check: Callable[[list], Any] | None = None):
    """Parse "N" or "A,B,C" (also "HxW"); ``check`` (the Python API's own validation) refuses values
    at parse time, so that a bad value is a usage error (exit 2)."""

    def convert(ctx: click.Context, param: click.Parameter, value: str | None):
        if value is None:
            return None
        try:
            numbers = [kind(part) for part in value.replace("x", ",").split(",") if part.strip()]
        except ValueError:
            raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None
        if len(numbers) not in count:
            raise click.BadParameter(f"expected {' or '.join(map(str, count))} numbers, got {value!r}")
        if check is not None:
            from .errors import AttnExplainError

            try:
                check(numbers)
            except AttnExplainError as error:
                raise click.BadParameter(str(error)) from None
        return numbers

    return convert


def model_options(function):
    """Options that say how to load the model, shared by every command that takes MODEL."""
    options = [
        click.option("--arch", help="Architecture of a state_dict file: a torchvision builder name "
                                    "(resnet50, vit_b_16, ...), any name a plugin provides (one "
                                    "plugin's: timm:convnext_tiny), or your own class: "
                                    "path/to/model.py:MyNet or package.module:MyNet (imported)."),
        click.option("--arch-kwargs", metavar="JSON",
                     help="Keyword arguments for the architecture, as a JSON object: "
                          "'{\"num_classes\": 7}'."),
        click.option("--ema", is_flag=True,
                     help="Use a training checkpoint's EMA weights (timm train.py's state_dict_ema)."),
        click.option("--num-classes", type=click.IntRange(min=1),
                     help="Number of classes (default: read from the weights' head)."),
        click.option("--labels", type=click.Path(dir_okay=False, path_type=Path),
                     help="Text file with one class name per line."),
        click.option("--trust-model", is_flag=True,
                     help="Allow model files that hold code: a whole pickled model object, "
                          "TorchScript, torch.export (.pt2) programs. Loading them runs code from the "
                          "file: use only for files you trust."),
        click.option("--plugin", help="Use this plugin instead of the most specific one."),
        click.option("--device", default="auto", show_default=True,
                     type=click.Choice(["auto", "cpu", "cuda", "mps"]), help="Where to run the model."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _load(model: str, arch, num_classes, labels, trust_model, plugin, device, arch_kwargs=None,
          ema=False):
    from .loading import arch_kwargs_from_json, load_model

    return load_model(model, arch=arch, num_classes=num_classes, labels=labels,
                      trust_model=trust_model, plugin=plugin, device=device, ema=ema,
                      arch_kwargs=arch_kwargs_from_json(arch_kwargs) if arch_kwargs else None)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="attnexplain")
@click.option("--debug", is_flag=True, help="Show full tracebacks for unexpected errors.")
def main(debug: bool) -> None:
    """Show where a trained vision model looks.

    \b
    attnexplain run model.pt photo.jpg              # overlay, predictions, report
    attnexplain run torchvision:resnet50:DEFAULT photo.jpg
    attnexplain layers model.pt --arch resnet18      # candidate Grad-CAM layers
    """


def _with_options(function, options: dict[str, Callable], leave_out: tuple[str, ...]):
    for name, option in reversed(options.items()):
        if name not in leave_out:
            function = option(function)
    return function


def method_options(function, leave_out: tuple[str, ...] = ()):
    """Options of the explanation methods, shared by every command that explains (less ``leave_out``:
    a command that gives one of them another meaning)."""
    options = dict(
        method=click.option("--method", default="auto", show_default=True,
                     help="One or more methods, comma-separated (e.g. gradcam,layercam,scorecam); "
                          "`attnexplain methods` lists them. auto: rollout for ViTs, gradcam otherwise."),
        target=click.option("--target", help="Class to explain: index or label (default: the top prediction)."),
        layer=click.option("--layer", help="Layer(s) for the CAM family, comma-separated (several are fused; "
                                     "default: last layer with a spatial map; see `attnexplain layers`)."),
        head_fusion=click.option("--head-fusion", default="mean", show_default=True,
                     type=click.Choice(["mean", "max", "min"]), help="rollout: how heads are combined."),
        discard_ratio=click.option("--discard-ratio", default=0.0, show_default=True, type=click.FloatRange(0, 1, max_open=True),
                     help="rollout: share of the weakest attention weights dropped."),
        eigen_smooth=click.option("--eigen-smooth", is_flag=True,
                     help="CAM family: first principal component of the weighted activations."),
        aug_smooth=click.option("--aug-smooth", is_flag=True,
                     help="Average every map over mirrored and zoomed copies of the image."),
        steps=click.option("--steps", default=32, show_default=True, type=click.IntRange(min=1),
                     help="integrated_gradients: interpolation steps."),
        samples=click.option("--samples", type=click.IntRange(min=1),
                     help="smoothgrad, smoothgradcampp, gradientshap: noisy copies (default 16); sscam, "
                          "iscam: masks per channel (35, 10); rise: random masks (1000); kernelshap, "
                          "lime: perturbed samples (256)."),
        window=click.option("--window", default=16, show_default=True, type=click.IntRange(min=1),
                     help="occlusion: window side in model-input pixels (stride: half of it)."),
        baseline=click.option("--baseline", default="mean", show_default=True,
                     type=click.Choice(["mean", "black", "blur"]),
                     help="integrated_gradients, occlusion: the reference image. mean: the "
                          "normalisation's mean colour (0 after normalisation); black: pixel value "
                          "0; blur: a Gaussian-blurred copy of the image (sigma 1/16 of its side)."),
        batch_size=click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
                     help="Masked or perturbed images per forward pass (scorecam, sscam, iscam, ablationcam, "
                          "occlusion, IG, rise, feature_ablation, kernelshap, lime)."),
        finer_classes=click.option("--finer-classes", default=3, show_default=True, type=click.IntRange(min=1),
                     help="finercam: how many of the most similar classes the target is compared with."),
    )
    return _with_options(function, options, leave_out)


def _checked_size(values: list[int]) -> None:
    from .preprocess import normalize_size

    normalize_size(values)


def _checked_std(values: list[float]) -> None:
    from .preprocess import Preprocessing

    Preprocessing().with_overrides(std=values)


def image_options(function, leave_out: tuple[str, ...] = ()):
    """How images are read, preprocessed and reported, shared by `run` and `batch`."""
    options = dict(
        size=click.option("--size", callback=_numbers(int, (1, 2), _checked_size), help="Model input size: N or H,W."),
        mean=click.option("--mean", callback=_numbers(float, (1, 3)), help="Normalization mean: R,G,B."),
        std=click.option("--std", callback=_numbers(float, (1, 3), _checked_std),
                     help="Normalization std: R,G,B (positive)."),
        alpha=click.option("--alpha", default=0.5, show_default=True, type=click.FloatRange(0.0, 1.0),
                     help="Opacity of the heatmap in the overlays."),
        colormap=click.option("--colormap", default=DEFAULT_COLORMAP, show_default=True,
                     type=click.Choice(COLORMAP_NAMES),
                     help="Colormap of the written overlays (the HTML pages let you switch)."),
        top_k=click.option("--top-k", default=5, show_default=True, type=click.IntRange(min=1),
                     help="How many predictions to report per image."),
        max_pixels=click.option("--max-pixels", default=100_000_000, show_default=True,
                     type=click.IntRange(min=1),
                     help="Refuse larger images (decompression-bomb guard)."),
    )
    return _with_options(function, options, leave_out)


def overlay_format_option(default: str):
    """--overlay-format, whose default differs: exact PNG for one image, JPEG for many."""
    from .formats import OVERLAY_FORMATS

    return click.option("--overlay-format", default=default, show_default=True,
                        type=click.Choice(OVERLAY_FORMATS),
                        help="File format of the overlays (the raw maps are always .npy).")


def overlay_size_option(default: str):
    """--overlay-size, whose default differs: the photo's own size for one image, capped for many."""

    def parsed(ctx: click.Context, param: click.Parameter, value: str) -> int | None:
        if value.strip().lower() == "full":
            return None
        try:
            side = int(value)
        except ValueError:
            side = 0
        if side < 16:
            raise click.BadParameter(f"give a number of pixels of at least 16, or full (not {value[:40]!r}).")
        return side

    return click.option("--overlay-size", default=default, show_default=True, callback=parsed,
                        help="Longest side of the overlays in pixels, or full (the photo's own size). "
                             "JPEGs are decoded at the smallest scale that covers it and the model's "
                             "input.")


def _method_settings(head_fusion, discard_ratio, eigen_smooth, aug_smooth, steps, samples, window,
                     baseline, batch_size, finer_classes):
    from .options import MethodOptions

    return MethodOptions(head_fusion=head_fusion, discard_ratio=discard_ratio,
                         eigen_smooth=eigen_smooth, aug_smooth=aug_smooth, steps=steps,
                         samples=samples, window=window, stride=max(1, window // 2),
                         batch_size=batch_size, baseline=baseline, finer_classes=finer_classes)


@main.command()
@click.argument("model")
@click.argument("image", type=click.Path(path_type=Path))
@method_options
@model_options
@image_options
@click.option("--out", "out_dir", default="attnexplain-out", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Folder for the outputs.")
@overlay_format_option("png")
@overlay_size_option("full")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--metrics", "metric_names", callback=lambda ctx, param, value: _map_metric_names(value),
              help="Also measure each map: deletion, insertion, road, drop, comma-separated (report.json "
                   "\"metrics\"; `attnexplain evaluate` compares methods over many images).")
def run(model: str, image: Path, method: str, target: str | None, layer: str | None,
        head_fusion: str, discard_ratio: float, eigen_smooth: bool, aug_smooth: bool, steps: int,
        samples: int | None, window: int, baseline: str, batch_size: int, finer_classes: int,
        arch: str | None, arch_kwargs: str | None, ema: bool, num_classes: int | None,
        labels: Path | None, trust_model: bool,
        plugin: str | None, device: str, size, mean, std, alpha: float, colormap: str, top_k: int,
        max_pixels: int, out_dir: Path, overlay_format: str, overlay_size: int | None, as_json: bool,
        metric_names: list[str]) -> None:
    """Explain MODEL's prediction on IMAGE: overlays, raw heatmaps, report.json and report.html.

    MODEL is a saved model file (state_dict or training checkpoint with --arch, Lightning .ckpt, timm
    train.py checkpoint, .safetensors, TorchScript, torch.export .pt2, or a pickled module with
    --trust-model), a folder a plugin loads, or torchvision:NAME[:WEIGHTS].
    """
    from .images import check_image, load_image
    from .report import output_dir_for, writable_output_folder

    settings = _method_settings(head_fusion, discard_ratio, eigen_smooth, aug_smooth, steps, samples,
                                window, baseline, batch_size, finer_classes)
    started = time.perf_counter()
    # A bad image fails before the slow part: decoded now at full size; a smaller decode needs the
    # model's input size, so its header is checked now and it is decoded after the model loads.
    picture = load_image(image, max_pixels=max_pixels) if overlay_size is None else None
    if picture is None:
        check_image(image, max_pixels=max_pixels)
    image_s = time.perf_counter() - started
    with writable_output_folder(out_dir):  # so does a folder the outputs cannot be written to
        from .loading import check_model_path, read_labels

        # What fails without torch fails before importing it; the import is timed on its own.
        check_model_path(Path(model))
        label_names = read_labels(labels) if labels is not None else None
        started = time.perf_counter()
        from .explanation import explain, plan_preprocessing

        import_s = time.perf_counter() - started
        started = time.perf_counter()
        loaded = _load(model, arch, num_classes, label_names, trust_model, plugin, device, arch_kwargs, ema)
        model_s = time.perf_counter() - started
        if picture is None:
            started = time.perf_counter()
            needed = plan_preprocessing(loaded, size=size, mean=mean, std=std).shortest_side
            picture = load_image(image, max_pixels=max_pixels, longest_side=overlay_size,
                                 shortest_side=needed)
            image_s += time.perf_counter() - started
        explanation = explain(loaded, picture, method, target=target, layer=layer, top_k=top_k,
                              size=size, mean=mean, std=std, options=settings)
        explanation.timings = {"load_image_s": image_s, "import_s": import_s, "load_model_s": model_s,
                               **explanation.timings}
        if metric_names:
            from .evaluation import explanation_metrics

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
        _print_run(report)


def _shown_text(value: Any) -> str:
    """Text from the user's files (class names, file names, a model's notes) for Rich: control and
    bidirectional characters escaped (:func:`terminal_text`; a CR or U+202E would rewrite the line)
    and Rich's markup too (``[link=...]`` is markup)."""
    from rich.markup import escape

    return escape(terminal_text(value))


def _print_run(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for note in report["model"]["notes"]:
        console.print(f"[yellow]note:[/yellow] {_shown_text(note)}")
    table = Table(title=f"{report['method']} · {_shown_text(Path(report['image']['path']).name)}")
    table.add_column("#", justify="right")
    table.add_column("class")
    table.add_column("index", justify="right")
    table.add_column("probability", justify="right")
    for rank, prediction in enumerate(report["predictions"], start=1):
        table.add_row(str(rank), _shown_text(prediction["label"] if prediction["label"] is not None else "—"),
                      str(prediction["index"]), f"{prediction['prob']:.4f}")
    console.print(table)
    target = report["target"]
    layer = f" on layer {_shown_text(report['layer'])}" if report["layer"] else ""
    console.print(f"Explained class {_shown_text(target['label'] or target['index'])} with "
                  f"{', '.join(report['methods'])}{layer}.")
    folder = Path(report["outputs"]["directory"])
    for method, files in report["outputs"]["maps"].items():
        for kind, name in files.items():
            console.print(f"  {method + ' ' + kind:<34} {_shown_text(folder / name)}", highlight=False,
                          soft_wrap=True)
    for key in ("report_json", "report_html"):
        console.print(f"  {key:<34} {_shown_text(folder / report['outputs'][key])}", highlight=False,
                      soft_wrap=True)


def _print_listing(title: str, columns: list[str], rows: list[list[Any]], *,
                   prose: tuple[str, ...] = ()) -> None:
    """A listing: on a terminal, aligned columns under ``title`` (a table whose ``prose`` columns,
    sentences, wrap); anywhere else (a pipe, a file) a header line and one tab-separated line per
    row, so that no name is ever wrapped or cut and ``cut -f`` works."""
    cells = [["" if value is None else terminal_text(" ".join(str(value).split())) for value in row]
             for row in rows]
    if not sys.stdout.isatty():
        with _reader_may_leave():
            for line in [columns, *cells]:
                click.echo("\t".join(line))
        return
    if not prose:
        # Plain aligned columns: a box table of a thousand rows takes Rich a second to lay out.
        widths = [max(len(line[index]) for line in [columns, *cells]) for index in range(len(columns))]
        with _reader_may_leave():
            click.echo(title)
            for line in [columns, *cells]:
                click.echo("  ".join(value.ljust(width) for value, width in zip(line, widths)).rstrip())
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=bool(prose))
    for column in columns:
        if column in prose:
            table.add_column(column, min_width=12)
        else:
            table.add_column(column, no_wrap=True, overflow="fold")
    for row in cells:
        table.add_row(*row)
    Console(highlight=False).print(table, markup=False)


def _print_json(data: Any) -> None:
    """What every ``--json`` prints, as ``run --json`` does."""
    with _reader_may_leave():
        click.echo(json.dumps(data, indent=2))


@contextmanager
def _reader_may_leave() -> Iterator[None]:
    """A listing piped into ``head`` loses its reader early: end quietly with the shell's SIGPIPE
    status (141), as ``ls | head`` does, not with an error about a broken pipe."""
    import os

    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        # Python flushes stdout again at exit, which would fail the same way.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the plugins as JSON on stdout.")
def plugins(as_json: bool) -> None:
    """List installed model plugins and how many models each builds by name; a plugin that fails
    to load is shown with its error."""
    from .catalog import plugin_listing

    listed = plugin_listing()
    if as_json:
        _print_json(listed)
        return
    rows = [[plugin["name"], plugin["version"], plugin["distribution"], plugin["models"],
             ", ".join(plugin["families"]),
             "ok" if plugin["error"] is None else f"broken: {plugin['error']}"] for plugin in listed]
    _print_listing("Model plugins (entry-point group attnexplain.plugins)",
                   ["plugin", "version", "distribution", "models", "families", "status"], rows,
                   prose=("families", "status"))


@main.command()
@click.argument("pattern", required=False)
@click.option("--plugin", "plugin_name", help="Only this plugin's models (see `attnexplain plugins`).")
@click.option("--task", help="Only this task (classification, segmentation, detection).")
@click.option("--details", is_flag=True, help="Also say what --method auto means for each model and "
                                              "its default layer (builds each model, without weights).")
@click.option("--check", is_flag=True, help="Build each model with random weights and explain an "
                                            "image with --method auto (minutes).")
@click.option("--json", "as_json", is_flag=True, help="Print the models as JSON on stdout.")
def models(pattern: str | None, plugin_name: str | None, task: str | None, details: bool,
           check: bool, as_json: bool) -> None:
    """List the models installed plugins build by name: name, task, plugin, the input size it is
    run at, status.

    PATTERN keeps the models whose name contains it, or matches it as a glob ('vit_*_224').
    Listing builds nothing; --details and --check build every model listed, so narrow them with
    PATTERN, --plugin or --task. Exit code 1 when --check finds a failure.
    """
    from .catalog import catalog_row, check_entry, describe_entry, read_catalog, select_entries

    catalog = read_catalog(plugin_name)
    for name, error in catalog.errors.items():
        click.echo(f"Warning: plugin {name}'s models cannot be listed: {error}", err=True)
    selected = select_entries(catalog.entries, pattern=pattern, task=task)
    if check or details:
        from rich.console import Console

        console = Console(stderr=True)
        rows = []
        for plugin, entry in selected:
            with console.status(f"{'checking' if check else 'describing'} {entry.name}..."):
                rows.append((check_entry if check else describe_entry)(plugin, entry))
    else:
        rows = [catalog_row(plugin, entry) for plugin, entry in selected]
    if as_json:
        _print_json({"models": [row.as_dict() for row in rows], "errors": catalog.errors})
    else:
        columns = ["model", "task", "plugin", "input"] + (["method", "layer"] if check or details else [])
        cells = [[row.spec or row.entry.name, row.entry.task, row.plugin, row.entry.real_size]
                 + ([row.method, row.layer] if check or details else [])
                 + [row.status if row.seconds is None else f"{row.status} ({row.seconds:.1f}s)"]
                 for row in rows]
        _print_listing(f"Models by name ({len(rows)})", columns + ["status"], cells)
    failures = sum(row.status.startswith("failed") for row in rows)
    if failures:
        raise click.ClickException(f"{failures} model(s) failed the check.")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the methods as JSON on stdout.")
def methods(as_json: bool) -> None:
    """List every explanation method: what it shows, where it applies, its cost and its paper;
    methods a plugin adds name their plugin."""
    from .catalog import method_listing

    listed, errors = method_listing()
    for name, error in errors.items():
        click.echo(f"Warning: plugin {name}'s methods cannot be listed: {error}", err=True)
    if as_json:
        _print_json({"methods": listed, "errors": errors})
        return
    rows = [[method["name"], method["family"], method["summary"], method["applies_to"], method["cost"],
             method["paper"], method["plugin"] or "attnexplain"] for method in listed]
    _print_listing("Explanation methods (--method NAME[,NAME...])",
                   ["method", "family", "what it shows", "applies to", "cost", "paper", "from"], rows,
                   prose=("what it shows", "applies to", "cost", "paper"))


@main.command()
@click.argument("model")
@model_options
@click.option("--size", callback=_numbers(int, (1, 2), _checked_size), help="Input size to probe with: N or H,W.")
@click.option("--all", "show_all", is_flag=True, help="List every layer, not only spatial ones.")
@click.option("--json", "as_json", is_flag=True, help="Print the layers as JSON on stdout.")
def layers(model: str, arch, arch_kwargs, ema, num_classes, labels, trust_model, plugin, device, size,
           show_all: bool, as_json: bool) -> None:
    """List MODEL's layers that Grad-CAM can use, with their output shapes."""
    from .errors import MethodError

    loaded = _load(model, arch, num_classes, labels, trust_model, plugin, device, arch_kwargs, ema)
    # Imported after the model path and labels are checked: those fail without importing torch.
    import torch

    from .explanation import plan_preprocessing
    from .planning import default_layer, layer_maps

    if not loaded.inner_layers:
        raise MethodError(f"A {loaded.loader} model does not expose its inner layers to hooks.")
    preprocessing = plan_preprocessing(loaded, size=size)
    parameter = next(loaded.module.parameters(), None)
    batch = torch.zeros(1, 3, *preprocessing.size,
                        device=parameter.device if parameter is not None else "cpu")
    found = layer_maps(loaded, batch)
    chosen = default_layer(loaded, batch) if any(info.is_spatial for info, _ in found) else None
    listed = [{"name": info.name, "type": info.kind, "shape": list(info.shape) if info.shape else None,
               "map_shape": list(map_shape) if map_shape else None, "default": info.name == chosen}
              for info, map_shape in found if show_all or map_shape is not None]
    if as_json:
        _print_json({"model": model, "architecture": loaded.architecture, "plugin": loaded.plugin.name,
                     "size": list(preprocessing.size), "default": chosen, "layers": listed})
        return
    rows = [[layer["name"], layer["type"],
             "x".join(map(str, layer["shape"])) if layer["shape"] else "(not a tensor)",
             "x".join(map(str, layer["map_shape"])) if layer["map_shape"] else "",
             "default" if layer["default"] else ""] for layer in listed]
    _print_listing(f"Layers of {loaded.architecture or model} at {preprocessing.size[0]}x"
                   f"{preprocessing.size[1]} (in the order they finish)",
                   ["layer", "type", "output shape", "map for CAM", ""], rows)


def _shard(ctx: click.Context, param: click.Parameter, value: str | None):
    from .inputs import parse_shard
    from .errors import AttnExplainError

    try:
        return parse_shard(value)
    except AttnExplainError as error:
        raise click.BadParameter(str(error)) from None


@main.command()
@click.argument("model")
@click.argument("inputs", nargs=-1, required=True)
@method_options
@model_options
@image_options
@click.option("--images-per-batch", default=16, show_default=True, type=click.IntRange(min=1),
              help="Images per forward pass (--batch-size is the methods' own batch, e.g. scorecam).")
@click.option("--workers", type=click.IntRange(min=1),
              help="Threads that decode images, and as many that write them, while the model runs "
                   "(default: from the cores this process may use: 2, or a quarter of them, with "
                   "the model on the CPU; every core but one, half each, on a GPU); with --engine "
                   "ray, model actors (one CPU each, and --num-gpus-per-worker GPUs; default 1).")
@click.option("--parallel-batches", type=click.IntRange(min=1),
              help="Batches the model explains at once, each on its own copy of the model sharing "
                   "its weights, torch's CPU threads divided between them (default: 2 with the "
                   "model on a CPU where torch may use 2 threads or more, where it is faster; 1 on "
                   "a GPU); the others start once the first batch has shown that they fit in "
                   "memory. --engine local only.")
@click.option("--engine", default="local", show_default=True, type=click.Choice(["local", "ray"]),
              help="local: this process. ray: Ray tasks decode, an actor pool explains and writes "
                   "(needs `pip install 'attnexplain[ray]'`; --out on a filesystem every worker sees).")
@click.option("--address", help="--engine ray: the cluster to join (auto, or ray://HOST:PORT; default: "
                                "start a local Ray instance with this machine's cores).")
@click.option("--num-gpus-per-worker", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="--engine ray: GPUs each model actor reserves (it runs the model on CUDA when > 0).")
@click.option("--out", "out_dir", default="attnexplain-batch", show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the outputs (never read as inputs; one run at a time writes there).")
@click.option("--resume", is_flag=True, help="Skip images already explained in --out with the same "
                                             "model, options and file content; do the rest.")
@click.option("--overwrite", is_flag=True,
              help="Replace the records of an earlier run in --out (without it, or --resume, an --out "
                   "holding explained images is refused).")
@click.option("--shard", callback=_shard,
              help="I/N: explain only a deterministic 1/N of the inputs, counting from 1 (--shard 1/2, "
                   "--shard 2/2; merge the outputs with `attnexplain merge`).")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--truth", metavar="folders|FILE.csv",
              help="Each image's true class: 'folders' takes its parent folder's name (the ImageFolder "
                   "layout); a CSV gives image,class rows. The gallery then shows accuracy, a confusion "
                   "table and filters to the misclassified images.")
@overlay_format_option("jpg")
@click.option("--metrics", "metric_names", callback=lambda ctx, param, value: _map_metric_names(value),
              help="Also measure each map: deletion, insertion, road, drop, comma-separated (each "
                   "record's \"metrics\" in results.jsonl).")
@overlay_size_option("2048")
def batch(model: str, inputs: tuple[str, ...], method: str, target: str | None, layer: str | None,
          head_fusion: str, discard_ratio: float, eigen_smooth: bool, aug_smooth: bool, steps: int,
          samples: int | None, window: int, baseline: str, batch_size: int, finer_classes: int, arch,
          arch_kwargs, ema, num_classes, labels,
          trust_model, plugin,
          device: str, size, mean, std, alpha: float, colormap: str, top_k: int, max_pixels: int,
          images_per_batch: int, workers: int | None, parallel_batches: int | None, engine: str,
          address: str | None,
          num_gpus_per_worker: float, out_dir: Path, resume: bool, overwrite: bool,
          shard: tuple[int, int] | None, quiet: bool, truth: str | None, overlay_format: str,
          metric_names: list[str], overlay_size: int | None) -> None:
    """Explain many images with MODEL: overlays, heatmaps, results.jsonl, summary.csv, report.json
    and an index.html gallery in --out.

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
    from ._signals import Stopped, stop_signals_interrupt
    from .batch import BatchSettings, check_earlier_run, run_batch
    from .report import writable_output_folder
    from .truth import read_truth

    if engine == "ray" and parallel_batches is not None:
        raise click.UsageError("--parallel-batches is for --engine local; with --engine ray, "
                               "--workers sets how many model actors explain at once.")
    if resume and overwrite:
        raise click.UsageError("--resume keeps the earlier run's records in --out and --overwrite "
                               "replaces them: give one of them.")
    ray_workers = workers if _given(click.get_current_context(), "workers") else 1
    cluster = _ray_cluster(engine, address, num_gpus_per_worker, ray_workers)
    if cluster is not None:
        device = "cpu"  # the driver only plans; each actor loads the model on its own device

    settings = BatchSettings(
        method=method, target=target, layer=layer, size=tuple(size) if size else None,
        mean=tuple(mean) if mean else None, std=tuple(std) if std else None, top_k=top_k,
        alpha=alpha, colormap=colormap, overlay_format=overlay_format, overlay_size=overlay_size,
        max_pixels=max_pixels, truth=read_truth(truth) if truth else None,
        images_per_batch=images_per_batch, workers=workers, parallel_batches=parallel_batches,
        metrics=tuple(metric_names),
        options=_method_settings(head_fusion, discard_ratio, eigen_smooth, aug_smooth, steps,
                                 samples, window, baseline, batch_size, finer_classes))
    try:
        # --out is checked before the model loads (a bad --out fails first), and is removed again
        # if the run cannot start (no image found): a refused run leaves no folder behind.
        with stop_signals_interrupt(), writable_output_folder(out_dir):
            check_earlier_run(out_dir, resume, overwrite)  # before the model loads: a refused run waits for nothing
            loaded = _load(model, arch, num_classes, labels, trust_model, plugin, device, arch_kwargs,
                           ema)
            spec = {"model": model, "arch": arch, "num_classes": num_classes, "labels": labels,
                    "trust_model": trust_model, "plugin": plugin, "arch_kwargs": arch_kwargs,
                    "ema": ema}
            result = run_batch(loaded, spec, list(inputs), out_dir, settings, resume=resume,
                               shard=shard, quiet=quiet, cluster=cluster, overwrite=overwrite)
    except Stopped as stop:
        where = f"; the partial report is in {out_dir}" if (out_dir / "report.json").is_file() else ""
        click.echo(f"Stopped by {stop}{where}.", err=True)
        sys.exit(stop.exit_code)
    if result.skipped_inputs:
        shown = terminal_text("; ".join(f"{path} {reason}" for path, reason in result.skipped_inputs[:5]))
        more = f" (and {len(result.skipped_inputs) - 5} more)" if len(result.skipped_inputs) > 5 else ""
        click.echo(f"Skipped {len(result.skipped_inputs)} entries of the inputs, listed in report.json: "
                   f"{shown}{more}", err=True)
    if result.report_error:
        click.echo(f"Warning: the reports could not be written: {result.report_error}", err=True)
    if not quiet:
        rate = (result.ok - result.skipped + result.failed) / result.wall_s if result.wall_s else 0.0
        click.echo(f"{result.ok} explained ({result.skipped} from an earlier run), {result.failed} "
                   f"failed, in {result.wall_s:.1f}s ({rate:.1f} images/s). "
                   f"Gallery: {out_dir / 'index.html'}", err=True)
    if result.exit_code:
        sys.exit(result.exit_code)


def _given(ctx: click.Context, name: str) -> bool:
    """Whether the command line set option ``name`` (rather than its default)."""
    return ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT


def _ray_cluster(engine: str, address: str | None, num_gpus_per_worker: float, workers: int):
    """The Ray cluster of ``--engine ray``, checked before the model loads; None for the local engine."""
    if engine != "ray":
        if address is not None or num_gpus_per_worker:
            raise click.UsageError("--address and --num-gpus-per-worker apply only with --engine ray.")
        return None
    from .ray_engine import RayCluster, require_ray

    require_ray()  # without Ray: how to install it, before minutes of model loading
    return RayCluster(address=address, workers=workers, num_gpus_per_worker=num_gpus_per_worker)


def _map_metric_names(value: str | None) -> list[str]:
    """run --metrics: the perturbation metrics named ("all": every one), checked when measured."""
    if not value:
        return []
    from .metrics import PERTURBATION_METRICS

    if value.strip() == "all":
        return list(PERTURBATION_METRICS)
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in PERTURBATION_METRICS]
    if unknown:
        raise click.BadParameter(f"{unknown[0]!r} is not one of {', '.join(PERTURBATION_METRICS)} "
                                 f"(`attnexplain evaluate` measures localisation and randomization).")
    return names


def _metric_names(ctx: click.Context, param: click.Parameter, value: str | None):
    if value is None or value.strip() == "all":
        return value and "all"  # None: the default metrics (not ROAD); "all": every one
    return [name.strip() for name in value.split(",") if name.strip()]


def _pointing_tolerance(ctx: click.Context, param: click.Parameter, value: float) -> float:
    """The API's own check at parse time: a bad tolerance (negative, NaN, inf) is a usage error."""
    from .errors import AttnExplainError
    from .metrics import MetricSettings

    try:
        MetricSettings(pointing_tolerance=value)
    except AttnExplainError as error:
        raise click.BadParameter(str(error)) from None
    return value


@main.command()
@click.argument("model")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--method", default="default", show_default=True,
              help="Methods to compare, comma-separated; default: every method that applies to the model "
                   "except those that cost many forwards per image (the Score-CAM family, ablationcam, "
                   "occlusion, integrated_gradients, smoothgrad(campp), gradientshap, rise, "
                   "feature_ablation, kernelshap, lime); all: every one that applies.")
@click.option("--metrics", callback=_metric_names,
              help="Comma-separated: deletion, insertion, road, drop, pointing, mass, rank, "
                   "randomization, or all (default: all that apply but ROAD, whose sparse solves cost "
                   "about 1 s of CPU per map and image at 128 px; localisation needs --masks or --boxes).")
@click.option("--masks", type=click.Path(path_type=Path),
              help="Folder mirroring the inputs with one mask PNG per image (white = object).")
@click.option("--boxes", type=click.Path(dir_okay=False, path_type=Path),
              help="JSON file: file name → [[x, y, w, h], ...] in photo pixels, or a COCO file.")
# The defaults are MetricSettings' (metrics imports torch, which --help must not load; a test holds them equal).
@click.option("--steps", default=10, show_default=True,
              type=click.IntRange(min=2, max=10_000),
              help="Deletion/insertion: steps per curve (each costs two forwards per map and image; "
                   "100 for finer curves).")
@click.option("--pointing-tolerance", default=15.0, show_default=True, type=float, callback=_pointing_tolerance,
              help="Pointing game: a maximum of the map closer than this many pixels of the photo to the "
                   "object still hits it (Zhang et al. 2018 count 15); 0: only a maximum on the object.")
@click.option("--randomization-images", default=8, show_default=True, type=click.IntRange(min=1, max=100_000),
              help="Randomization check: how many of the first images it measures (a subset is enough for "
                   "a per-method verdict; each costs every method's maps once per step).")
@click.option("--randomization-steps", default=5, show_default=True, type=click.IntRange(min=1, max=1000),
              help="Randomization check: at most this many cascading steps, one block each from the head "
                   "down; the last step re-initialises all the rest.")
@functools.partial(method_options, leave_out=("method", "steps"))
@model_options
@functools.partial(image_options, leave_out=("alpha", "top_k"))
@click.option("--images-per-batch", default=8, show_default=True, type=click.IntRange(min=1),
              help="Images explained and perturbed together.")
@click.option("--out", "out_dir", default="attnexplain-eval", show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Folder for evaluation.json, evaluation.csv, evaluation.html.")
@click.option("--json", "as_json", is_flag=True, help="Print evaluation.json on stdout.")
@click.option("--resume", is_flag=True, help="Reuse the images an earlier run in --out measured with the "
                                             "same model, settings, image and mask; measure the rest.")
@click.option("--quiet", is_flag=True, help="No progress output.")
def evaluate(model: str, inputs: tuple[str, ...], method: str, metrics, masks: Path | None,
             boxes: Path | None, steps: int, pointing_tolerance: float, randomization_images: int,
             randomization_steps: int, target, layer, head_fusion, discard_ratio, eigen_smooth,
             aug_smooth, samples, window, baseline, batch_size, finer_classes, arch, arch_kwargs, ema,
             num_classes, labels, trust_model,
             plugin, device: str, size, mean, std, colormap: str, max_pixels: int, images_per_batch: int,
             out_dir: Path, as_json: bool, resume: bool, quiet: bool) -> None:
    """Which map to believe: measure the methods on MODEL and INPUTS (as `batch` takes them) for
    faithfulness (deletion, insertion, ROAD, average drop), localisation (with --masks or --boxes)
    and the randomization sanity check, beside a random map.

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
    from ._signals import Stopped, stop_signals_interrupt
    from .evaluation import EvaluationSettings, evaluate as run_evaluation
    from .metrics import MetricSettings
    from .report import writable_output_folder

    settings = EvaluationSettings(
        method=method, metrics=metrics, target=target, layer=layer, size=size, mean=mean, std=std,
        max_pixels=max_pixels, images_per_batch=images_per_batch, colormap=colormap,
        metric_settings=MetricSettings(steps=steps, batch_size=max(batch_size, 64),
                                       pointing_tolerance=pointing_tolerance,
                                       randomization_images=randomization_images,
                                       randomization_steps=randomization_steps),
        options=_method_settings(head_fusion, discard_ratio, eigen_smooth, aug_smooth, 32, samples,
                                 window, baseline, batch_size, finer_classes))
    try:
        with stop_signals_interrupt(), writable_output_folder(out_dir):
            loaded = _load(model, arch, num_classes, labels, trust_model, plugin, device, arch_kwargs, ema)
            spec = {"model": model, "arch": arch, "num_classes": num_classes, "labels": labels,
                    "trust_model": trust_model, "plugin": plugin, "arch_kwargs": arch_kwargs, "ema": ema}
            evaluation = run_evaluation(loaded, list(inputs), settings, masks=masks, boxes=boxes,
                                        out=out_dir, resume=resume, quiet=quiet, model_spec=spec)
    except Stopped as stop:
        where = (f"; the partial evaluation is in {out_dir} (--resume finishes it)"
                 if (out_dir / "evaluation.json").is_file() else "")
        click.echo(f"Stopped by {stop}{where}.", err=True)
        sys.exit(stop.exit_code)
    if as_json:
        click.echo(json.dumps({k: v for k, v in evaluation.items() if k != "examples"}, indent=2))
    else:
        _print_evaluation(evaluation)
        click.echo(f"Page: {out_dir / 'evaluation.html'}", err=True)
    if evaluation["images"]["failed"]:
        sys.exit(3)


def _print_evaluation(evaluation: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from .evaluation_report import CONVENTION, shown_mean, shown_metrics, shown_number

    table = Table(title=f"{evaluation['images']['ok']} images, ranked by faithfulness")
    metrics = shown_metrics(evaluation)
    uninformative = evaluation.get("uninformative", [])
    table.add_column("method")
    table.add_column("faithfulness ↑", justify="right")
    for metric, display in metrics.items():
        table.add_column(f"{display['label']} {display['arrow']}{'*' if metric in uninformative else ''}",
                         justify="right")
    for row in evaluation["ranking"]:
        summary = evaluation["methods"][row["method"]]
        name = row["method"] + (" (fails randomization)" if row["method"] in evaluation["randomization_failed"] else "")
        table.add_row(name, shown_number(row["faithfulness"]),
                      *[shown_mean(summary.get(metric), display)[0] for metric, display in metrics.items()])
    # Off a terminal Rich assumes 80 columns, too narrow for a column per metric.
    Console(highlight=False, width=None if sys.stdout.isatty() else 240).print(table)
    click.echo(CONVENTION)
    if uninformative:
        click.echo(f"* Uninformative on these images, left out of the ranking (no method separates from the "
                   f"random map): {', '.join(uninformative)}.")
    agreement = evaluation.get("agreement")
    if agreement:
        lowest = min((pair for pair in agreement["pairs"] if pair["tau"] is not None), key=lambda p: p["tau"])
        click.echo(f"Agreement of the metrics on the order of the methods: mean Kendall τ "
                   f"{shown_number(agreement['mean_tau'])} (lowest: {' · '.join(lowest['metrics'])} "
                   f"{shown_number(lowest['tau'])}).")
    check = evaluation.get("randomization")
    if check:
        click.echo(f"Randomization check on {check['images']} images (ρ after the head, or over the first "
                   f"{check['early_steps']} steps, above {check['limit']} fails): "
                   + ", ".join(f"{name} {shown_number(found['score'])} {found['verdict']}"
                               for name, found in check["methods"].items()) + ".")
    click.echo(evaluation["verdict"])
    for name, reason in evaluation["settings"].get("left_out", {}).items():
        click.echo(f"Left out {name}: {reason}", err=True)


@main.command()
@click.argument("sources", nargs=-1, required=True,
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the merged outputs.")
def merge(sources: tuple[Path, ...], out_dir: Path) -> None:
    """Combine the outputs of `attnexplain batch --shard` runs into one: per-image files (hard
    links where possible), results.jsonl, report.json, summary.csv and index.html.

    Every source is checked first (paths, files, the model and options of every image); the result
    is built beside --out and replaces it as a whole, so a refused merge changes nothing. --out may
    be new, empty, one of the SOURCES, or an earlier output whose images the sources all hold.

    \b
    Exit codes: 0 every image was explained; 3 some images failed; 1 refused (nothing written).
    """
    from .merge import merge_outputs

    result = merge_outputs(list(sources), out_dir)
    if result.dropped_records:
        more = " (and more)" if len(result.dropped_records) > 1 else ""
        click.echo(f"Warning: lines of the sources' results.jsonl that are no record were left out, "
                   f"listed in report.json (run.dropped_records): "
                   f"{terminal_text(result.dropped_records[0])}{more}", err=True)
    click.echo(f"{result.ok} explained, {result.failed} failed. Gallery: {out_dir / 'index.html'}",
               err=True)
    if result.exit_code:
        sys.exit(result.exit_code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
