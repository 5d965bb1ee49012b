"""The commands that list what is installed and what a model offers: ``plugins``, ``models``,
``methods`` and ``layers``."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import click

from .._untrusted import terminal_text
from ..model_spec import ModelSpec
from .option_groups import json_option, model_options, size_option
from .printing import print_json, print_listing, print_methods


@contextmanager
def _reading_told(what: str) -> Iterator[Callable[[str, int, int], None] | None]:
    """On a terminal, a line on stderr while a plugin's ``what`` is read from the plugin itself
    (the first listing after an install imports every plugin's library: seconds to a minute), and
    what was read once done; nothing where stderr is not a terminal."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    status = console.status("")
    read: list[str] = []
    started = time.perf_counter()

    def reading(plugin: str, number: int, count: int) -> None:
        if not read:
            status.start()
        read.append(plugin)
        status.update(
            f"Reading plugin {terminal_text(plugin)}'s {what} ({number} of {count}; cached for later listings)..."
        )

    try:
        yield reading
    finally:
        status.stop()
        if read:
            names = ", ".join(terminal_text(name) for name in read)
            console.print(
                f"Read the {what} of {len(read)} plugin{'s' if len(read) > 1 else ''} ({names}) in "
                f"{time.perf_counter() - started:.1f} s; later listings read them from the cache.",
                markup=False,
            )


@click.command()
@json_option("the plugins as JSON")
def plugins(as_json: bool) -> None:
    """List installed model plugins and how many models each builds by name; a plugin that fails
    to load is shown with its error."""
    from ..catalog import plugin_listing

    with _reading_told("model catalog") as reading:
        listed = plugin_listing(reading=reading)
    if as_json:
        print_json(listed)
        return
    rows = [
        [
            plugin["name"],
            plugin["version"],
            plugin["distribution"],
            plugin["models"],
            ", ".join(plugin["families"]),
            "ok" if plugin["error"] is None else f"broken: {plugin['error']}",
        ]
        for plugin in listed
    ]
    print_listing(
        "Model plugins (entry-point group attnexplain.plugins)",
        ["plugin", "version", "distribution", "models", "families", "status"],
        rows,
        prose=("families", "status"),
    )


@click.command()
@click.argument("pattern", required=False)
@click.option("--plugin", "plugin_name", help="Only this plugin's models (see `attnexplain plugins`).")
@click.option("--task", help="Only this task (classification, segmentation, detection).")
@click.option(
    "--details",
    is_flag=True,
    help="Also say what --method auto means for each model and its default layer (builds each model, without weights).",
)
@click.option(
    "--check",
    is_flag=True,
    help="Build each model with random weights and explain an image with --method auto (minutes).",
)
@json_option("the models as JSON")
def models(
    pattern: str | None, plugin_name: str | None, task: str | None, details: bool, check: bool, as_json: bool
) -> None:
    """List the models installed plugins build by name: name, task, plugin, the input size it is
    run at, status.

    PATTERN keeps the models whose name contains it, or matches it as a glob ('vit_*_224').
    Listing builds nothing; --details and --check build every model listed, so narrow them with
    PATTERN, --plugin or --task. Exit code 1 when --check finds a failure.
    """
    from ..catalog import catalog_row, check_entry, describe_entry, read_catalog, select_entries

    with _reading_told("model catalog") as reading:
        catalog = read_catalog(plugin_name, reading=reading)
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
        print_json({"models": [row.as_dict() for row in rows], "errors": catalog.errors})
    else:
        columns = ["model", "task", "plugin", "input"] + (["method", "layer"] if check or details else [])
        cells = [
            [row.spec or row.entry.name, row.entry.task, row.plugin, row.entry.real_size]
            + ([row.method, row.layer] if check or details else [])
            + [row.status if row.seconds is None else f"{row.status} ({row.seconds:.1f}s)"]
            for row in rows
        ]
        print_listing(f"Models by name ({len(rows)})", columns + ["status"], cells)
    failures = sum(row.status.startswith("failed") for row in rows)
    if failures:
        raise click.ClickException(f"{failures} model(s) failed the check.")


@click.command()
@json_option("the methods as JSON")
def methods(as_json: bool) -> None:
    """List every explanation method: what it shows, where it applies, its cost and its paper;
    methods a plugin adds name their plugin."""
    from ..catalog import method_listing

    with _reading_told("methods") as reading:
        listed, errors = method_listing(reading=reading)
    for name, error in errors.items():
        click.echo(f"Warning: plugin {name}'s methods cannot be listed: {error}", err=True)
    if as_json:
        print_json({"methods": listed, "errors": errors})
        return
    title = "Explanation methods (--method NAME[,NAME...])"
    if sys.stdout.isatty():
        print_methods(title, listed)
        return
    rows = [
        [
            method["name"],
            method["family"],
            method["summary"],
            method["applies_to"],
            method["cost"],
            method["paper"],
            method["plugin"] or "attnexplain",
        ]
        for method in listed
    ]
    print_listing(
        title,
        ["method", "family", "what it shows", "applies to", "cost", "paper", "from"],
        rows,
        prose=("what it shows", "applies to", "cost", "paper"),
    )


@click.command()
@click.argument("model")
@model_options
@size_option("Input size to probe with: N or H,W.")
@click.option("--all", "show_all", is_flag=True, help="List every layer, not only spatial ones.")
@json_option("the layers as JSON")
def layers(model_spec: ModelSpec, size, show_all: bool, as_json: bool) -> None:
    """List MODEL's layers that Grad-CAM can use, with their output shapes."""
    from ..errors import MethodError

    loaded = model_spec.load()
    # Imported after the model path and labels are checked: those fail without importing torch.
    import torch

    from ..captioning import refuse_captioner
    from ..planning import default_layer, layer_maps, plan_preprocessing

    refuse_captioner(loaded, "`attnexplain layers`")
    if not loaded.inner_layers:
        raise MethodError(f"A {loaded.loader} model does not expose its inner layers to hooks.")
    preprocessing = plan_preprocessing(loaded, size=size)
    parameter = next(loaded.module.parameters(), None)
    batch = torch.zeros(1, 3, *preprocessing.size, device=parameter.device if parameter is not None else "cpu")
    found = layer_maps(loaded, batch)
    chosen = default_layer(loaded, batch) if any(info.is_spatial for info, _ in found) else None
    listed = [
        {
            "name": info.name,
            "type": info.kind,
            "shape": list(info.shape) if info.shape else None,
            "map_shape": list(map_shape) if map_shape else None,
            "default": info.name == chosen,
        }
        for info, map_shape in found
        if show_all or map_shape is not None
    ]
    if as_json:
        print_json(
            {
                "model": model_spec.model,
                "architecture": loaded.architecture,
                "plugin": loaded.plugin.name,
                "size": list(preprocessing.size),
                "default": chosen,
                "layers": listed,
            }
        )
        return
    rows = [
        [
            layer["name"],
            layer["type"],
            "x".join(map(str, layer["shape"])) if layer["shape"] else "(not a tensor)",
            "x".join(map(str, layer["map_shape"])) if layer["map_shape"] else "",
            "default" if layer["default"] else "",
        ]
        for layer in listed
    ]
    print_listing(
        f"Layers of {loaded.architecture or model_spec.model} at {preprocessing.size[0]}x"
        f"{preprocessing.size[1]} (in the order they finish)",
        ["layer", "type", "output shape", "map for CAM", ""],
        rows,
    )
