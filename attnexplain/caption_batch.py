"""``batch`` on a captioning model: every image captioned and explained word by word.

The run is :mod:`attnexplain.batch`'s (its inputs, threads, replicas, resume, ledger, reports,
Ctrl-C), with its own :class:`~attnexplain.batch_stages.Stages`: each image goes through
:func:`attnexplain.captioning.explain_caption`, and its folder holds what ``run`` writes for a
captioner (:func:`attnexplain.caption_report.write_caption_outputs`) with the caption report as its
detail page, leading back to the gallery, a small picture of each word's attention for the card, and
the photo. Its record carries the caption (:mod:`attnexplain.caption_records`).

``--method`` chooses each word's gradient maps beside its attention (Grad-CAM by default; those
:mod:`attnexplain.caption_methods` allows), ``--layer`` the encoder's module the CAM methods read.
Options that choose or tune a classifier's targets do not apply to a captioner: a run that names
one is refused in one line before anything is written.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from .batch_stages import BatchSettings, Stages, write_image_folder
from .caption_records import CAPTION_METHODS, CAPTIONING, RELEVANCE, caption_record_fields
from .errors import AttnExplainError, MethodError
from .inputs import Decoded
from .records import DETAIL_HTML


def refuse_options(given: Sequence[str]) -> None:
    """A one-line :class:`MethodError` naming the options ``given`` that do not apply to a captioner."""
    if given:
        raise MethodError(
            f"A captioner is explained word by word by its own attention and the gradient maps of --method; "
            f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to it."
        )


def captioner_stages(loaded, settings: BatchSettings, cluster: Any = None) -> Stages | None:
    """What a batch run does to a captioner's images (:data:`CAPTIONING_STAGES`), after refusing
    the ``settings`` that do not apply to one, and Ray (``cluster``), whose actors explain a
    classifier's way; None for a model that is no captioner. An encoder–decoder's run names its
    words' relevance among its methods."""
    from .caption_methods import caption_methods, unread_options
    from .captioning import captioning_of

    captioning = captioning_of(loaded)
    if captioning is None:
        return None
    defaults = BatchSettings()
    given = [
        option
        for option, differs in (
            ("--versus", settings.versus is not None),
            ("--metrics", bool(settings.metrics)),
            ("--truth", settings.truth is not None),
            ("--top-k", settings.top_k != defaults.top_k),
            ("--threshold", settings.threshold != defaults.threshold),
        )
        if differs
    ]
    given += unread_options(settings.options)
    refuse_options(given)
    if cluster is not None:
        raise AttnExplainError(
            "A captioner's batch runs on the local engine: leave out --engine ray (or give --engine local)."
        )
    methods = [method.name for method in caption_methods(settings.method, loaded.plugin)]
    # An encoder–decoder's words also have Chefer et al. 2021b's relevance.
    relevance = [RELEVANCE] if captioning.score_attention is not None else []
    return replace(CAPTIONING_STAGES, meta={**CAPTIONING_STAGES.meta, "methods": ["attention", *methods, *relevance]})


def plan_captions(loaded, settings: BatchSettings):
    """A captioner's plan: its preprocessing (with ``--size``, ``--mean``, ``--std``), no classifier
    method, its feature map's layer (where each word's Grad-CAM is taken)."""
    from .captioning import captioning_of
    from .planning import Plan, plan_preprocessing

    captioning = captioning_of(loaded)
    preprocessing = plan_preprocessing(loaded, size=settings.size, mean=settings.mean, std=settings.std)
    layer = settings.layer or (captioning.feature_layer if captioning is not None else None)
    return Plan(preprocessing, [], [layer] if layer is not None else [])


def explain_captions(
    loaded, chunk: list[Decoded], plan, settings: BatchSettings, device
) -> tuple[list[dict[str, Any]], float]:
    """Each decoded image captioned and explained (``{"explanation": CaptionExplanation}``), or why
    not (``{"error": ...}``: an empty caption, a ``--target`` word it does not hold); and the model's
    seconds per image."""
    from .captioning import explain_caption
    from .images import LoadedImage

    began = time.perf_counter()
    results: list[dict[str, Any]] = []
    for decoded in chunk:
        info = decoded.image_info
        assert decoded.pixels is not None  # a decoded image's, until it is written
        decoded_size = (decoded.pixels.shape[1], decoded.pixels.shape[0])
        file_size = (info.get("width"), info.get("height"))
        picture = LoadedImage(
            pixels=decoded.pixels,
            path=decoded.item.path,
            format=info.get("format"),
            mode=info.get("mode") or "RGB",
            file_size=file_size if file_size != decoded_size else None,
        )
        try:
            explanation = explain_caption(
                loaded,
                picture,
                target=None if settings.target is None else str(settings.target),
                size=settings.size,
                mean=settings.mean,
                std=settings.std,
                methods=settings.method,
                layer=settings.layer,
                options=settings.options,
            )
        except AttnExplainError as error:  # this image only: the run goes on
            results.append({"error": str(error)})
        else:
            results.append({"explanation": explanation})
    return results, (time.perf_counter() - began) / len(chunk)


def write_caption_image(
    out: Path, decoded: Decoded, result: dict[str, Any], settings: BatchSettings, model_s: float
) -> dict[str, Any]:
    """One image's folder, atomically: each word's overlays and maps, the attention strip,
    report.json, the caption report as the detail page, each word's thumbnail and the photo."""
    from .caption_report import write_caption_outputs
    from .gallery import gallery_links

    def fill(staging: Path, record: dict[str, Any]) -> None:
        report = write_caption_outputs(
            result.pop("explanation"),
            out / record["output"],
            settings.alpha,
            settings.overlay_format,
            settings.colormap,
            into=staging,
            page_name=DETAIL_HTML,
            gallery=gallery_links(record),
            thumbs=True,
        )
        record.update(caption_record_fields(report))

    return write_image_folder(out, decoded, result, model_s, fill)


#: What a run does to a captioner's images.
CAPTIONING_STAGES = Stages(
    plan=plan_captions,
    explain=explain_captions,
    write=write_caption_image,
    meta={"task": CAPTIONING, "methods": list(CAPTION_METHODS)},
)
