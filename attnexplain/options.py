"""The methods' settings, checked without importing torch: a bad option fails before the model loads."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .errors import MethodError

#: What integrated gradients starts from and occlusion fills windows with (``--baseline``).
BASELINES = ("mean", "black", "blur")

#: How the model's forward runs (``--precision``): auto (fp32 on the CPU, bf16 on a CUDA GPU that
#: supports it, else fp16), or one of them outright (see :mod:`attnexplain.precision`).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

#: More masks, copies or perturbations than any of those methods needs; also what the random draws
#: for them (held in memory at once) can afford.
MAX_SAMPLES = 100_000


@dataclass(frozen=True)
class MethodOptions:
    """Settings of the methods; each method reads the ones that concern it."""

    head_fusion: str = "mean"  # rollout: how heads are combined (mean, max, min)
    discard_ratio: float = 0.0  # rollout: share of the weakest attention weights dropped
    eigen_smooth: bool = False  # CAM family: first principal component instead of the channel sum
    aug_smooth: bool = False  # every method: average over flipped and zoomed copies
    steps: int = 32  # integrated_gradients
    #: smoothgrad, gradientshap: noisy copies (16); rise: masks (1000); kernelshap, lime:
    #: perturbations (256). None: each method's own default.
    samples: int | None = None
    noise: float = 0.15  # smoothgrad, as a share of each image's range
    baseline: str = "mean"  # integrated_gradients, occlusion: mean (0 after normalisation), black, blur
    window: int = 16  # occlusion, pixels at model resolution
    stride: int = 8  # occlusion
    batch_size: int = 32  # scorecam, sscam, iscam, ablationcam, occlusion, integrated_gradients, smoothgrad
    finer_classes: int = 3  # finercam: the most similar classes the target is compared with
    mask_noise: float = 2.0  # sscam: σ of the Gaussian noise added to its [0, 1] masks (torchcam's)
    precision: str = "auto"  # the model's forward: auto, fp32, bf16, fp16 (maps stay float32)

    def __post_init__(self) -> None:
        if self.head_fusion not in ("mean", "max", "min"):
            raise MethodError(f"Head fusion must be mean, max or min, not {self.head_fusion!r}.")
        if not 0.0 <= self.discard_ratio < 1.0:
            raise MethodError(f"The discard ratio must be in [0, 1), not {self.discard_ratio}.")
        for name in ("steps", "samples", "window", "stride", "batch_size", "finer_classes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise MethodError(f"{name} must be at least 1.")
        if self.samples is not None and self.samples > MAX_SAMPLES:
            raise MethodError(
                f"samples must be at most {MAX_SAMPLES:,}, not {self.samples:,}: each one "
                f"is a forward pass (or a noisy copy) per image."
            )
        if not 0.0 <= self.mask_noise <= 100.0:
            raise MethodError(f"The mask noise must be in [0, 100], not {self.mask_noise}.")
        if self.precision not in PRECISIONS:
            raise MethodError(f"The precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}.")
        if self.baseline not in BASELINES:
            raise MethodError(f"The baseline must be one of {', '.join(BASELINES)}, not {self.baseline!r}.")

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
