"""``run`` on a captioning model: the caption, and for each word its attention and gradient maps.

``run`` hands a model over here when its plugin says it captions (:mod:`attnexplain.captioning`);
the work happens in :func:`attnexplain.captioning.explain_caption`, the printing in
:func:`.printing.print_caption_run`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from .printing import print_caption_run


def run_captioner(
    loaded: Any,
    picture: Any,
    refused: dict[str, Any],
    explained: dict[str, Any],
    written: dict[str, Any],
    out_dir: Path,
    timings: dict[str, float],
    as_json: bool,
) -> None:
    """Refuse the options given that do not apply to a captioner (``refused``: option → given, and
    ``options``: the methods' settings, those a word's maps do not read refused where changed), then
    explain ``picture``'s caption (``explained``: caption, target, size, mean, std, methods, layer,
    as :func:`~attnexplain.captioning.explain_caption` takes them) and write the outputs
    (``written``: alpha, overlay_format, colormap) into ``out_dir``'s folder for the picture."""
    from ..caption_batch import refuse_options
    from ..caption_methods import unread_options
    from ..captioning import explain_caption
    from ..report import output_dir_for

    options = refused.pop("options", None)
    refuse_options([option for option, was_given in refused.items() if was_given] + unread_options(options))
    explanation = explain_caption(loaded, picture, options=options, **explained)
    explanation.timings = {**timings, **explanation.timings}
    report = explanation.save(output_dir_for(out_dir, picture.path), **written)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        print_caption_run(report)


#: The options of ``evaluate`` that apply to a captioner: how to load the model and read the images
#: and masks, the localisation and curve settings, the word maps (``--method``, ``--layer`` and the
#: settings they read: :data:`attnexplain.caption_methods.WORD_METHOD_OPTIONS`), the outputs.
EVALUATE_APPLIES = frozenset(
    {
        "method",
        "layer",
        "eigen_smooth",
        "samples",
        "noise",
        "baseline",
        "window",
        "stride",
        "batch_size",
        "model",
        "inputs",
        "metrics",
        "masks",
        "steps",
        "pointing_tolerance",
        "arch",
        "arch_kwargs",
        "ema",
        "trust_model",
        "plugin",
        "resize",
        "device",
        "size",
        "mean",
        "std",
        "max_pixels",
        "colormap",
        "out_dir",
        "as_json",
        "resume",
        "quiet",
    }
)


def evaluation_for(loaded: Any, evaluate: Any) -> Any:
    """``evaluate`` (:func:`attnexplain.evaluation.evaluate`, which hands a captioner to
    :func:`~attnexplain.caption_evaluation.evaluate_captions`), once, for a captioner, the options
    given on the command line that do not apply to it are refused in one line."""
    from ..captioning import captioning_of

    if captioning_of(loaded) is None:
        return evaluate
    from ..caption_evaluation import refuse_options

    context = click.get_current_context()
    given = [
        param.opts[0]
        for param in context.command.params
        if param.name not in EVALUATE_APPLIES
        and param.name is not None
        and context.get_parameter_source(param.name) is not click.core.ParameterSource.DEFAULT
    ]
    refuse_options(given)
    return evaluate
