"""Progress of the methods that cost many forwards (Score-CAM and its variants, Ablation-CAM, Smooth
Grad-CAM++, occlusion, RISE, integrated gradients, SmoothGrad, GradientSHAP, feature ablation,
KernelSHAP, LIME): the images the model has scored for them so far, out of how many they need.

A pass wraps the model functions it hands such a method in :meth:`ForwardCount.expecting`'s counter,
which counts the rows each call scores; Captum's methods loop inside Captum, so counting the calls
is the one way to see them move. Nothing is counted without a callback.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import torch

from ..methods import Method
from ..methods.attribution import NOISY_COPIES, PERTURBATIONS, superpixels
from ..methods.rise import MASKS
from ..methods.scorecam import ISCAM_SAMPLES, SSCAM_SAMPLES
from ..options import MethodOptions

#: Called with (done, total): the images scored so far and the number expected. ``total`` grows when
#: a later method (or a layer of several) starts; ``done`` never decreases and ends at ``total``.
ProgressCallback = Callable[[int, int], None]

Function = TypeVar("Function", bound=Callable[..., Any])


class ForwardCount:
    """The count behind one explanation's progress, carried by every :class:`~attnexplain.passes.base.PassRun`
    of it (augmentation smoothing runs the passes once per copy: the count goes on)."""

    def __init__(self, report: ProgressCallback | None = None) -> None:
        self.report = report
        self.done = 0
        self.total = 0

    @contextmanager
    def expecting(self, expected: Callable[[], int]) -> Iterator[Callable[[Function], Function]]:
        """One method's work, ``expected()`` images scored (asked only when progress is reported:
        see :func:`expected_forwards`): yields ``counted``, which wraps a model function (inputs →
        (N, classes) scores) so that each call adds its N. The count never passes the expected end,
        and is moved to it when the work ends (a call Captum makes of its own is not worth a bar
        that stops short)."""
        forwards = expected() if self.report is not None else 0
        if self.report is None or forwards <= 0:
            yield _unchanged
            return
        report = self.report
        self.total += forwards
        end = self.done + forwards
        report(self.done, self.total)

        def counted(function: Function) -> Function:
            def call(*args: Any, **kwargs: Any) -> Any:
                result = function(*args, **kwargs)
                shape = getattr(result, "shape", ())
                self._advance(int(shape[0]) if len(shape) else 1, end)
                return result

            return call  # type: ignore[return-value]

        yield counted
        self._advance(end - self.done, end)

    def _advance(self, count: int, end: int) -> None:
        done = min(self.done + count, end)
        if done > self.done and self.report is not None:
            self.done = done
            self.report(done, self.total)


def _unchanged(function: Function) -> Function:
    return function


def expected_forwards(method: Method, options: MethodOptions, batch: torch.Tensor, channels: int = 0) -> int:
    """How many images ``method`` has the model score for ``batch`` (B, 3, H, W); ``channels``: the
    CAM layer's, for the CAM methods that score one masked image per channel. 0 for a method that
    costs a forward or two (no progress is shown for it)."""
    samples = options.samples
    images, size = len(batch), (int(batch.shape[-2]), int(batch.shape[-1]))
    if method.name == "feature_ablation":  # one forward per superpixel, and one of the image
        return sum(1 + int(labels.max()) + 1 for labels in superpixels(batch))
    per_image = {
        "scorecam": channels,
        "ablationcam": channels,
        "sscam": channels * (samples or SSCAM_SAMPLES),
        "iscam": channels * (samples or ISCAM_SAMPLES),
        "smoothgradcampp": samples or NOISY_COPIES,
        "smoothgrad": samples or NOISY_COPIES,
        "gradientshap": samples or NOISY_COPIES,
        "integrated_gradients": options.steps,
        "rise": samples or MASKS,
        "occlusion": 1 + _windows(size, options.window, options.stride),
        "kernelshap": 1 + (samples or PERTURBATIONS),
        "lime": 1 + (samples or PERTURBATIONS),
    }.get(method.name, 0)
    return images * per_image


def _windows(size: tuple[int, int], window: int, stride: int) -> int:
    """Captum's occlusion windows: ⌈(side − window) / stride⌉ + 1 along each side."""
    count = 1
    for side in size:
        count *= -(-max(side - window, 0) // stride) + 1
    return count


__all__ = ["ForwardCount", "ProgressCallback", "expected_forwards"]
