"""The ``input`` family's pass: the model as a function of its input, handed to each method
(Captum's attributions, RISE, FullGrad, guided Grad-CAM)."""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Iterator

import torch

from ..errors import MethodError
from ..methods import METHODS, Method
from ..methods.attribution import baseline_images
from ..options import MethodOptions
from ..precision import as_float32, method_forwards
from ..running import probabilities_of, scores_of
from .base import PassOutput, PassRun, no_gradient, upsample
from .cam import cam_maps
from .counting import expected_forwards
from .registry import register_pass


@register_pass("input")
def input_pass(run: PassRun, methods: list[Method]) -> PassOutput:
    loaded, batch, options = run.loaded, run.batch, run.options
    forward = scores_of(loaded, run.size)
    targets = run.targets()
    baseline = baseline_images(batch, options.baseline, run.black)
    output = PassOutput(maps={}, layers={})
    for method in methods:
        _check_input_method(method, batch, options)
        cam = None
        if method.name == "guided_gradcam":  # its Grad-CAM half: the CAM pass, same layer layout
            cam = run.maps.get("gradcam")
            if cam is None:
                cam = cam_maps(run, [METHODS["gradcam"]])["gradcam"]
        counting = partial(expected_forwards, method, options, batch)
        with (
            torch.enable_grad(),
            _gradient_needed(method.name),
            method_forwards(method),
            run.forwards.expecting(counting) as counted,
        ):
            attribution = method.compute(
                counted(forward),
                batch,
                targets.tolist(),
                model=loaded.module,
                cam=cam,
                probabilities=counted(probabilities_of(loaded, run.size)),
                **input_settings(options, baseline),
            )
        output.maps[method.name] = upsample(as_float32(attribution.detach()), run.size)
        output.layers[method.name] = list(run.layers) if method.name == "guided_gradcam" else []
    return output


def input_settings(options: MethodOptions, baseline: torch.Tensor) -> dict:
    """The settings an input method reads, as keyword arguments of its ``compute``."""
    settings = {
        "baseline": baseline,
        "steps": options.steps,
        "noise": options.noise,
        "window": options.window,
        "stride": options.stride,
        "batch_size": options.batch_size,
    }
    return settings if options.samples is None else {**settings, "samples": options.samples}


def _check_input_method(method: Method, batch: torch.Tensor, options: MethodOptions) -> None:
    """Settings an input method cannot work with, refused with the reason before Captum fails."""
    height, width = batch.shape[-2:]
    if method.name == "occlusion" and options.window > min(height, width):
        raise MethodError(
            f"The occlusion window ({options.window} pixels) is larger than the model's "
            f"input ({height}x{width}); use --window {min(height, width)} or less."
        )


@contextmanager
def _gradient_needed(method: str) -> Iterator[None]:
    """Captum's own error for an output without gradient, said as the cause and what to do."""
    try:
        yield
    except RuntimeError as error:
        if "does not require grad" not in str(error):
            raise
        raise MethodError(
            no_gradient("the input", f"a method other than {method} (e.g. occlusion, which needs no gradient)")
        ) from None
