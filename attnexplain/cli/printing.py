"""What the commands print on the terminal: a run's predictions and files, an evaluation's table,
the listings (aligned columns on a terminal, tab-separated lines in a pipe) and ``--json``.

Text from the user's files is escaped before it is printed: a class name or file name must not
rewrite the line (:func:`attnexplain._untrusted.terminal_text`)."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import click

from .._untrusted import terminal_text


def _shown_text(value: Any) -> str:
    """Text from the user's files (class names, file names, a model's notes) for Rich: control and
    bidirectional characters escaped (:func:`terminal_text`; a CR or U+202E would rewrite the line)
    and Rich's markup too (``[link=...]`` is markup)."""
    from rich.markup import escape

    return escape(terminal_text(value))


def print_run(report: dict[str, Any]) -> None:
    """A run's report: the model's notes, the predictions, the class explained and the files written."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for note in report["model"]["notes"]:
        console.print(f"[yellow]note:[/yellow] {_shown_text(note)}")
    table = Table(title=f"{report['method']} · {_shown_text(Path(report['image']['path']).name)}")
    table.add_column("#", justify="right")
    table.add_column("class")
    table.add_column("index", justify="right")
    values = any(prediction["prob"] is None for prediction in report["predictions"])  # a single output
    table.add_column("value" if values else "probability", justify="right")
    for rank, prediction in enumerate(report["predictions"], start=1):
        table.add_row(
            str(rank),
            _shown_text(prediction["label"] if prediction["label"] is not None else "—"),
            str(prediction["index"]),
            f"{prediction['value']:.4g}" if prediction["prob"] is None else f"{prediction['prob']:.4f}",
        )
    console.print(table)
    console.print(_explained_line(report))
    folder = Path(report["outputs"]["directory"])
    for method, files in report["outputs"]["maps"].items():
        for kind, name in files.items():
            console.print(f"  {method + ' ' + kind:<34} {_shown_text(folder / name)}", highlight=False, soft_wrap=True)
    for key in ("report_json", "report_html"):
        console.print(f"  {key:<34} {_shown_text(folder / report['outputs'][key])}", highlight=False, soft_wrap=True)


def print_caption_run(report: dict[str, Any]) -> None:
    """A captioner's run: the caption with each word's probability, and the files written."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for note in report["model"]["notes"]:
        console.print(f"[yellow]note:[/yellow] {_shown_text(note)}")
    source = "caption" if report["caption_source"] == "generated" else "given caption"
    console.print(f"{source}: [bold]{_shown_text(report['caption'])}[/bold]", highlight=False)
    table = Table(title=f"words · {_shown_text(Path(report['image']['path']).name)}")
    table.add_column("#", justify="right")
    table.add_column("word")
    table.add_column("probability", justify="right")
    for place, entry in enumerate(report["word_probabilities"], start=1):
        table.add_row(str(place), _shown_text(entry["word"]), f"{entry['probability']:.4f}")
    console.print(table)
    folder = Path(report["outputs"]["directory"])
    for key in ("attention_strip", "report_json", "report_html"):
        console.print(f"  {key:<34} {_shown_text(folder / report['outputs'][key])}", highlight=False, soft_wrap=True)


def _explained_line(report: dict[str, Any]) -> str:
    """What the maps explain: the class, for the methods whose map depends on it; the others (rollout,
    raw attention, gates, Eigen-CAM) are said to be not class-specific."""
    from ..errors import MethodError
    from ..method_registry import find_method
    from ..targets import explains_a_class

    def specific(name: str) -> bool:
        try:
            return explains_a_class([find_method(name)])
        except MethodError:  # a method no longer installed: as every map was described before
            return True

    of_class = [_shown_text(name) for name in report["methods"] if specific(name)]
    agnostic = [_shown_text(name) for name in report["methods"] if not specific(name)]
    layer = f" on layer {_shown_text(report['layer'])}" if report["layer"] else ""
    target = report["target"]
    plain = "versus" not in target and not target.get("negative")  # a contrast says "cat rather than dog"
    explained = f"class {target['label'] or target['index']}" if plain else target["explained"]
    if not of_class:
        return f"Mapped {', '.join(agnostic)}{layer}: not class-specific (the same map for every class)."
    line = f"Explained {_shown_text(explained)} with {', '.join(of_class)}{layer}"
    if agnostic:
        line += f"; {', '.join(agnostic)} not class-specific"
    return line + "."


def batch_summary(result: Any, wall_s: float, load_s: float) -> str:
    """A batch's last line: what was explained, reused from an earlier run (``--resume``) and failed,
    in the command's wall time (``wall_s``, the model's loading, ``load_s``, included), and the rate of
    the images explained now, over the time spent explaining them (``result``: a
    :class:`attnexplain.batch_ledger.BatchRun`)."""
    done_now = result.ok - result.skipped + result.failed
    counts = f"{result.ok} explained ({result.skipped} from an earlier run), {result.failed} failed"
    if done_now == 0:
        return (
            f"{counts}, in {wall_s:.1f}s: loading the model {load_s:.1f}s, nothing left to explain "
            f"(every image reused from the earlier run)."
        )
    rate = done_now / result.wall_s if result.wall_s else 0.0
    return (
        f"{counts}, in {wall_s:.1f}s: loading the model {load_s:.1f}s, {done_now} image"
        f"{'s' if done_now > 1 else ''} in {result.wall_s:.1f}s ({rate:.1f} images/s)."
    )


def print_listing(title: str, columns: list[str], rows: list[list[Any]], *, prose: tuple[str, ...] = ()) -> None:
    """A listing: on a terminal, aligned columns under ``title`` (a table whose ``prose`` columns,
    sentences, wrap); anywhere else (a pipe, a file) a header line and one tab-separated line per
    row, so that no name is ever wrapped or cut and ``cut -f`` works."""
    cells = [["" if value is None else terminal_text(" ".join(str(value).split())) for value in row] for row in rows]
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


def print_methods(title: str, methods: list[dict[str, Any]]) -> None:
    """``attnexplain methods`` on a terminal: one block per method, its name and family on the first
    line, what it shows below, then where it applies, its cost and its paper, each wrapped to the
    terminal (at most 100 columns: prose reads badly wider). Elsewhere, as every listing
    (:func:`print_listing`: one tab-separated line per method)."""
    import functools
    import shutil
    import textwrap

    width = max(40, min(shutil.get_terminal_size().columns, 100))
    with _reader_may_leave():
        click.echo(title)
        for method in methods:
            shown = {key: terminal_text(" ".join(str(value).split())) for key, value in method.items()}
            origin = f"plugin {shown['plugin']}" if method["plugin"] else "built in"
            gradient = "gradients" if method["needs_gradient"] else "no gradients"
            click.echo()
            click.echo(f"{click.style(shown['name'], bold=True)}  ({shown['family']}, {gradient}, {origin})")
            # Never broken at a hyphen: an option (--finer-classes) or a name (Grad-CAM) stays whole.
            wrap = functools.partial(textwrap.fill, width=width, break_on_hyphens=False)
            click.echo(wrap(shown["summary"], initial_indent="  ", subsequent_indent="  "))
            for label, key in (("applies to", "applies_to"), ("cost", "cost"), ("paper", "paper")):
                click.echo(wrap(shown[key], initial_indent=f"  {label + ':':<12}", subsequent_indent=" " * 14))


def print_json(data: Any) -> None:
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


def print_evaluation(evaluation: dict[str, Any]) -> None:
    """An evaluation: the methods ranked by faithfulness, how far the metrics agree, the
    randomization check and the verdict."""
    if evaluation.get("task") == "captioning":
        print_caption_evaluation(evaluation)
        return
    from rich.console import Console
    from rich.table import Table

    from ..evaluation_report import CONVENTION, shown_mean, shown_metrics, shown_number
    from ..evaluation_targets import by_label_lines

    table = Table(title=f"{evaluation['images']['ok']} images, ranked by faithfulness")
    metrics = shown_metrics(evaluation)
    uninformative = evaluation.get("uninformative", [])
    table.add_column("method")
    table.add_column("faithfulness ↑", justify="right")
    for metric, display in metrics.items():
        table.add_column(
            f"{display['label']} {display['arrow']}{'*' if metric in uninformative else ''}", justify="right"
        )
    for row in evaluation["ranking"]:
        summary = evaluation["methods"][row["method"]]
        name = row["method"] + (" (fails randomization)" if row["method"] in evaluation["randomization_failed"] else "")
        table.add_row(
            name,
            shown_number(row["faithfulness"]),
            *[shown_mean(summary.get(metric), display)[0] for metric, display in metrics.items()],
        )
    # Off a terminal Rich assumes 80 columns, too narrow for a column per metric.
    Console(highlight=False, width=None if sys.stdout.isatty() else 240).print(table)
    click.echo(CONVENTION)
    if uninformative:
        click.echo(
            f"* Uninformative on these images, left out of the ranking (no method separates from the "
            f"random map): {', '.join(uninformative)}."
        )
    agreement = evaluation.get("agreement")
    if agreement:
        lowest = min((pair for pair in agreement["pairs"] if pair["tau"] is not None), key=lambda p: p["tau"])
        click.echo(
            f"Agreement of the metrics on the order of the methods: mean Kendall τ "
            f"{shown_number(agreement['mean_tau'])} (lowest: {' · '.join(lowest['metrics'])} "
            f"{shown_number(lowest['tau'])})."
        )
    check = evaluation.get("randomization")
    if check:
        click.echo(
            f"Randomization check on {check['images']} images (ρ after the head, or over the first "
            f"{check['early_steps']} steps, above {check['limit']} fails): "
            + ", ".join(
                f"{name} {shown_number(found['score'])} {found['verdict']}" for name, found in check["methods"].items()
            )
            + "."
        )
    click.echo(evaluation["verdict"])
    for line in by_label_lines(evaluation):  # several targets: each one's figures
        click.echo(terminal_text(line))
    for name, reason in evaluation["settings"].get("left_out", {}).items():
        click.echo(f"Left out {name}: {reason}", err=True)


def print_caption_evaluation(evaluation: dict[str, Any]) -> None:
    """A captioner's evaluation: per map (attention, the chosen maps, the random map) each value's mean over
    the measured words, the verdict and a line per map."""
    from rich.console import Console
    from rich.table import Table

    from ..evaluation_report import CONVENTION, metric_display, shown_mean, shown_number

    words = evaluation["words"]["measured"]
    table = Table(title=f"{words} words of {evaluation['images']['ok']} images' captions")
    displays = {metric: metric_display(metric, better) for metric, better in evaluation["settings"]["better"].items()}
    table.add_column("map")
    table.add_column("faithfulness ↑", justify="right")
    for display in displays.values():
        table.add_column(f"{display['label']} {display['arrow']}", justify="right")
    for row in evaluation["ranking"]:
        summary = evaluation["methods"][row["method"]]
        table.add_row(
            row["method"],
            shown_number(row["faithfulness"]),
            *[shown_mean(summary.get(metric), display)[0] for metric, display in displays.items()],
        )
    Console(highlight=False, width=None if sys.stdout.isatty() else 240).print(table)
    click.echo(CONVENTION)
    click.echo(evaluation["verdict"])
    for line in evaluation["map_verdicts"].values():
        click.echo(line)
