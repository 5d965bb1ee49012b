"""Turning a photo into the tensor a model expects, and remembering which part of the photo it saw."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

from .errors import AttnExplainError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SIZE = (224, 224)
#: How a photo becomes the input of a model whose preprocessing nothing says (``--resize``): ``crop``
#: as torchvision's ImageNet evaluation transform (the shorter side to 256 × size/224, the centre
#: cropped), what most models were trained and evaluated with; ``squash``: the whole photo
#: stretched to the input size, for models trained that way.
RESIZE_MODES = ("crop", "squash")
#: The largest side a user's explicit --size may ask for.
MAX_SIZE = 8192
#: The largest side a model FILE may ask for (checkpoint metadata, an exported input shape). The
#: largest inputs published vision models take are ~600 px (EfficientNet-B7 600, ViT-H/14 518,
#: segmentation presets 520), and an explanation holds every activation and its gradient: at 1024²
#: a ResNet-50 needs ~2 GB for that, at 8192² over 100 GB. A file is not the user, so it gets the
#: bound that covers real models, not the one that covers what a user may knowingly ask for.
FILE_MAX_SIZE = 1024


@dataclass(frozen=True)
class Preprocessing:
    """Resize (optionally shorter side first, then centre crop), scale to [0, 1], normalize.

    ``resize=None`` resizes the whole photo straight to ``size`` so that every pixel is explained;
    a ``resize`` shorter-side length followed by a centre crop of ``size`` reproduces the usual
    evaluation transforms of published weights. ``letterbox=True`` (with ``resize=None``) keeps the
    photo's aspect ratio instead: it is shrunk to fit ``size`` and centred, the rest padded with the
    mean colour (0 after normalisation), as detectors trained on unstretched photos want.
    ``resize_to`` (height, width), instead of ``resize``, first stretches the whole photo to exactly
    that size and then centre-crops ``size`` (Hugging Face's DeiT processor: 256×256, then 224).
    ``resize_v2`` (the default) resizes the 8-bit photo with ``torchvision.transforms.v2``'s native
    8-bit kernel, the one Hugging Face's image processors use and the one that reproduces Pillow's
    resize (what a preset gets from ``ImageFolder``'s PIL images, and timm's eval transforms): equal
    to the preset applied to a PIL image on ~99.9% of values, the rest one grey level away, and
    ~10x cheaper than ``resize_v2=False``, which converts the photo to float first as the v1
    functional does on a tensor (the preset applied to a uint8 tensor, bit for bit; ~10% of values
    one level away from the PIL result). ``crop_rounds_down=True`` places an odd margin's extra
    pixel after the centre crop, not where ``round`` puts it (Hugging Face's crop).
    """

    size: tuple[int, int] = DEFAULT_SIZE  # (height, width) of the model input
    resize: int | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    source: str = "default"  # where these settings came from, for the report
    letterbox: bool = False
    resize_to: tuple[int, int] | None = None
    resize_v2: bool = True
    crop_rounds_down: bool = False

    def with_overrides(
        self,
        size: Sequence[int] | int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> "Preprocessing":
        """Apply user overrides; a new ``size`` keeps the resize-to-crop ratio of published transforms."""
        changes: dict[str, Any] = {}
        if size is not None:
            new_size = normalize_size(size)
            if self.resize is not None:
                changes["resize"] = round(self.resize * min(new_size) / min(self.size))
            if self.resize_to is not None:
                changes["resize_to"] = tuple(
                    round(side * new / old) for side, new, old in zip(self.resize_to, new_size, self.size)
                )
            changes["size"] = new_size
        if mean is not None:
            changes["mean"] = normalization_values(mean, "--mean")
        if std is not None:
            changes["std"] = normalization_values(std, "--std", positive=True)
        if not changes:
            return self
        return replace(self, **changes, source=f"{self.source} + overrides")

    def with_resize(self, mode: str | None) -> "Preprocessing":
        """As ``--resize`` says (:data:`RESIZE_MODES`; None: unchanged): ``squash`` stretches the whole
        photo to ``size``; ``crop`` resizes the shorter side to 256 × size/224 and crops the centre,
        unless these settings already crop."""
        if mode is None:
            return self
        if mode not in RESIZE_MODES:
            raise AttnExplainError(f"--resize must be one of {', '.join(RESIZE_MODES)}, not {mode!r}.")
        if mode == "squash":
            changes: dict[str, Any] = {"resize": None, "resize_to": None, "letterbox": False}
        elif self.resize is None and self.resize_to is None:
            changes = {"resize": round(256 * min(self.size) / 224), "letterbox": False}
        else:
            return self
        if all(getattr(self, name) == value for name, value in changes.items()):
            return self
        return replace(self, **changes, source=f"{self.source} + --resize {mode}")

    @property
    def shortest_side(self) -> int:
        """The shorter side a photo needs so that preprocessing only ever shrinks it (whatever the
        photo's aspect ratio): what a reduced decode (``load_image(longest_side=...)``) keeps."""
        return max(*self.size, self.resize or 0, *(self.resize_to or ()))

    def as_dict(self) -> dict[str, Any]:
        shown = {
            "size": list(self.size),
            "resize": self.resize,
            "letterbox": self.letterbox,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "source": self.source,
        }
        if self.resize_to is not None:  # only then: reports of every other model stay as they were
            shown["resize_to"] = list(self.resize_to)
        if not self.resize_v2:  # only when not the default, as the other two
            shown["resize_v2"] = False
        if self.crop_rounds_down:
            shown["crop_rounds_down"] = True
        return shown


#: The preprocessing of a classifier's file that says none (a state_dict loaded with ``--arch``), and
#: of ``--resize crop``: torchvision's ImageNet evaluation transform, resize the shorter side to 256
#: and crop the centre 224×224 (a new ``size`` keeps the ratio), normalised with ImageNet's mean and
#: std. A module handed to the API in memory keeps the whole photo unless its caller says.
DEFAULT_PREPROCESSING = Preprocessing(
    size=DEFAULT_SIZE, resize=256, source="default: torchvision's ImageNet evaluation transform"
)


@dataclass(frozen=True)
class PreparedInput:
    """A model-ready batch of one image and the region of the original photo it covers."""

    tensor: Any  # torch.Tensor (1, 3, H, W), float32
    box: tuple[float, float, float, float]  # (left, top, right, bottom) in original pixels


def normalize_size(size: Sequence[int] | int, limit: int = MAX_SIZE) -> tuple[int, int]:
    """``(height, width)`` from one or two integers, each between 8 and ``limit``."""
    values: tuple[int, ...]
    if isinstance(size, int):
        values = (size, size)
    else:
        values = tuple(int(v) for v in size)
        if len(values) == 1:
            values = (values[0], values[0])
    if len(values) != 2 or any(v < 8 or v > limit for v in values):
        raise AttnExplainError(f"Input size must be one or two integers between 8 and {limit}, got {size}.")
    return values  # type: ignore[return-value]


def normalization_values(values: Sequence[float], what: str, *, positive: bool = False) -> tuple[float, float, float]:
    """A normalisation mean or std as three finite numbers (one number means all three), named
    ``what`` in the error; ``positive`` for a std, which divides."""
    numbers = tuple(float(v) for v in values)
    if len(numbers) == 1:
        numbers = numbers * 3
    if len(numbers) != 3:
        raise AttnExplainError(f"{what} needs one or three numbers (R,G,B), got {list(values)}.")
    if not all(math.isfinite(v) for v in numbers):
        raise AttnExplainError(f"{what} must be finite numbers, got {list(numbers)}.")
    if positive and any(v <= 0 for v in numbers):
        raise AttnExplainError(f"{what} values must be positive, got {list(numbers)}.")
    return numbers  # type: ignore[return-value]


def from_torchvision_transforms(transforms: Any, source: str) -> Preprocessing | None:
    """Read the settings of a torchvision weights preset (``weights.transforms()``)."""
    crop = getattr(transforms, "crop_size", None)
    resize = getattr(transforms, "resize_size", None)
    mean = getattr(transforms, "mean", None)
    std = getattr(transforms, "std", None)
    if mean is None or std is None or (crop is None and resize is None):
        return None
    interpolation = getattr(getattr(transforms, "interpolation", None), "value", "bilinear")
    resize_short = int(resize[0]) if resize else None
    if crop:
        size = normalize_size(crop)
    elif resize_short is not None:
        # Segmentation presets only resize the shorter side; explain a square of that side.
        size = normalize_size(resize_short)
        resize_short = None
    else:  # an empty resize_size and no crop: nothing says the input's size
        return None
    return Preprocessing(
        size=size,
        resize=resize_short,
        mean=tuple(mean),
        std=tuple(std),
        interpolation=str(interpolation),
        source=source,
    )


def prepare(pixels: Any, preprocessing: Preprocessing) -> PreparedInput:
    """Resize, crop and normalize an (H, W, 3) uint8 RGB array into a (1, 3, h, w) float tensor."""
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F  # what torchvision's weight presets use
    from torchvision.transforms.v2 import functional as F2

    from .images import channels_first, check_aspect_ratio

    height, width = pixels.shape[:2]
    check_aspect_ratio(width, height)  # before any resize: arrays and tensors from the API too
    crop_h, crop_w = preprocessing.size
    mode = InterpolationMode(preprocessing.interpolation)
    resize = F2.resize if preprocessing.resize_v2 else F.resize
    image = channels_first(pixels)  # every path below resizes into a new tensor: never written to
    pad = None
    if preprocessing.resize is None and preprocessing.letterbox:
        scale = min(crop_h / height, crop_w / width)
        fit_h, fit_w = max(1, round(height * scale)), max(1, round(width * scale))
        resized = resize(image, [fit_h, fit_w], interpolation=mode, antialias=True)
        top, left = (crop_h - fit_h) // 2, (crop_w - fit_w) // 2
        pad = (left, crop_w - fit_w - left, top, crop_h - fit_h - top)
        # The input covers the photo plus the padding around it, in the photo's pixels.
        scale_x, scale_y = fit_w / width, fit_h / height
        box = (-left / scale_x, -top / scale_y, (crop_w - left) / scale_x, (crop_h - top) / scale_y)
    elif preprocessing.resize is None and preprocessing.resize_to is None:
        resized = resize(image, [crop_h, crop_w], interpolation=mode, antialias=True)
        box = (0.0, 0.0, float(width), float(height))
    else:
        target = list(preprocessing.resize_to) if preprocessing.resize_to else [preprocessing.resize]
        resized = resize(image, target, interpolation=mode, antialias=True)
        new_h, new_w = resized.shape[1:]
        if preprocessing.crop_rounds_down:
            top, left = int((new_h - crop_h) / 2.0), int((new_w - crop_w) / 2.0)
            resized = F.crop(resized, top, left, crop_h, crop_w)
        else:
            resized = F.center_crop(resized, [crop_h, crop_w])
            # Same rounding as torchvision's center_crop, so the box matches the pixels it kept.
            top = int(round((new_h - crop_h) / 2.0))
            left = int(round((new_w - crop_w) / 2.0))
        scale_x, scale_y = new_w / width, new_h / height
        box = (left / scale_x, top / scale_y, (left + crop_w) / scale_x, (top + crop_h) / scale_y)
    tensor = F.normalize(resized.float().div_(255.0), list(preprocessing.mean), list(preprocessing.std))
    if pad is not None:
        tensor = torch.nn.functional.pad(tensor, pad)  # 0 after normalising: the mean colour
    return PreparedInput(tensor=tensor.unsqueeze(0), box=box)
