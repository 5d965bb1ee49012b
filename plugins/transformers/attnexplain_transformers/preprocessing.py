"""A Hugging Face image processor's settings as attnexplain's :class:`Preprocessing`.

The image processors of the supported families (ViT, DeiT, BEiT, Bit for DINOv2, ConvNeXt for
ConvNeXt and ResNet, CLIP) all do, in order: resize (to an exact height × width, or the shorter side
to ``shortest_edge``; ConvNeXt's: the shorter side to ``shortest_edge / crop_pct`` then a centre crop
of ``shortest_edge``, or below 384 only), centre crop to ``crop_size``, multiply by ``rescale_factor``,
normalise by ``image_mean``/``image_std``. Their default (torchvision) backend resizes with
torchvision's antialiased resize, which attnexplain's preprocessing uses too.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from attnexplain.plugin_api import FILE_MAX_SIZE, ModelLoadError, Preprocessing, normalization_values, normalize_size

#: PIL's resampling numbers (what ``resample`` holds) → attnexplain's interpolation names.
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
_RESAMPLE_NAMES = {1: "lanczos", 4: "box", 5: "hamming"}
#: ConvNeXt's processor crops only below this shortest edge (above, it stretches to a square).
_CONVNEXT_CROP_BELOW = 384
#: Families with no processor of their own in transformers' mapping, and the one they use.
_PROCESSOR_OF = {"dinov2_with_registers": "dinov2"}


def from_processor_config(settings: dict[str, Any], source: str) -> Preprocessing:
    """The preprocessing ``settings`` (a preprocessor_config.json, or a processor's ``to_dict()``)
    describe; refused with one line when a value is not what an image processor holds."""
    try:
        return _translate(settings, source)
    except (TypeError, ValueError, KeyError) as error:
        raise ModelLoadError(f"{source}: {error}") from None


def _translate(settings: dict[str, Any], source: str) -> Preprocessing:
    notes = []
    size = _size_dict(settings.get("size"), "size")
    crop = _exact_size(settings.get("crop_size"), "crop_size") if settings.get("do_center_crop") else None
    resize: int | None = None
    resize_to: tuple[int, int] | None = None
    processor = str(settings.get("image_processor_type") or "")
    if processor.endswith("Pil"):
        notes.append("PIL resizing approximated by torchvision's")
    if not settings.get("do_resize", True):
        raise ValueError(
            "do_resize is false: the processor expects photos already at the model's "
            "size, which attnexplain cannot assume"
        )
    if "shortest_edge" in size:
        shortest = size["shortest_edge"]
        if processor.startswith("ConvNext"):
            if shortest < _CONVNEXT_CROP_BELOW:
                crop_pct = float(settings.get("crop_pct", 224 / 256))
                # Bounded below too: crop_pct 1e-9 would resize the shorter side to 224·10⁹ pixels.
                if not shortest / FILE_MAX_SIZE <= crop_pct <= 1:
                    raise ValueError(
                        f"crop_pct must be in [{shortest / FILE_MAX_SIZE:.3g}, 1] (a resize "
                        f"to at most {FILE_MAX_SIZE} pixels), got {crop_pct}"
                    )
                resize, final = int(shortest / crop_pct), (shortest, shortest)
            else:
                final = (shortest, shortest)  # stretched to a square: attnexplain's resize=None
        else:
            resize, final = shortest, (shortest, shortest)
        if crop is not None:
            final = crop
            if resize is None:  # a square stretch, then a crop of it
                resize_to = (shortest, shortest)
    elif "height" in size and "width" in size:
        exact = (size["height"], size["width"])
        if crop is not None and crop != exact:
            resize_to, final = exact, crop
        else:
            final = exact
    else:
        raise ValueError(f"size {settings.get('size')!r} is neither height and width nor shortest_edge")
    if resize is not None and crop is None and "shortest_edge" in size and not processor.startswith("ConvNext"):
        # The shorter side resized, nothing cropped: the input keeps the photo's aspect ratio,
        # which attnexplain's fixed-size input cannot; the centre square is what it explains.
        notes.append("no crop_size: the centre square of the resized photo is explained")
    resample = settings.get("resample", 2)
    if isinstance(resample, bool) or not isinstance(resample, int):
        raise ValueError(f"resample must be a PIL resampling number, got {resample!r}")
    interpolation = _RESAMPLE.get(resample)
    if interpolation is None:
        notes.append(f"{_RESAMPLE_NAMES.get(resample, resample)} resampling approximated by bicubic")
        interpolation = "bicubic"
    mean, std = _normalisation(settings)
    if notes:
        source = f"{source} ({'; '.join(notes)})"
    return Preprocessing(
        size=normalize_size(final, FILE_MAX_SIZE),
        resize=resize,
        resize_to=resize_to,
        mean=mean,
        std=std,
        interpolation=interpolation,
        resize_v2=True,
        crop_rounds_down=True,
        source=source,
    )


def _exact_size(value: Any, what: str) -> tuple[int, int]:
    sides = _size_dict(value, what)
    if "height" not in sides or "width" not in sides:
        raise ValueError(f"{what} must give height and width, got {value!r}")
    return (sides["height"], sides["width"])


def _size_dict(value: Any, what: str) -> dict[str, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"height": value, "width": value}
    if not isinstance(value, dict) or not value:
        raise ValueError(f'{what} must be an object such as {{"height": 224, "width": 224}}, got {value!r}')
    known = {key: side for key, side in value.items() if key in ("height", "width", "shortest_edge")}
    for key, side in known.items():
        if isinstance(side, bool) or not isinstance(side, int) or not 8 <= side <= FILE_MAX_SIZE:
            raise ValueError(
                f"{what}.{key} must be a whole number of pixels between 8 and {FILE_MAX_SIZE}, got {side!r}"
            )
    if "longest_edge" in value or "max_height" in value:
        raise ValueError(
            f"{what} {value!r} bounds the longest side, which attnexplain's fixed-size input does not reproduce"
        )
    return known


def _normalisation(settings: dict[str, Any]) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """mean and std on [0, 1] pixels (what attnexplain's preprocessing divides by 255 to get) that
    give the processor's ``(pixel · rescale_factor − image_mean) / image_std``."""
    factor = 1.0
    if settings.get("do_rescale", True):
        factor = float(settings.get("rescale_factor", 1 / 255))
        if not math.isfinite(factor) or factor <= 0:
            raise ValueError(f"rescale_factor must be a positive number, got {factor}")
    if settings.get("do_normalize", True):
        mean = normalization_values(_numbers(settings.get("image_mean")), "image_mean")
        std = normalization_values(_numbers(settings.get("image_std")), "image_std", positive=True)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    # pixel·f = (pixel/255)·(255·f): dividing mean and std by 255·f keeps the same result.
    scale = 255.0 * factor
    if scale == 1.0:
        return mean, std
    return tuple(m / scale for m in mean), tuple(s / scale for s in std)  # type: ignore[return-value]


def _numbers(value: Any) -> list[float]:
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"image_mean and image_std must be numbers, got {value!r}")
    return [float(v) for v in values]


def family_default(
    model_type: str, image_size: int | None, translate: Callable[[dict, str], Preprocessing] | None = None
) -> Preprocessing | None:
    """The preprocessing of the family's image processor with its defaults, at the model's own
    ``image_size`` when the config has one (a processor's default size is the base model's).
    ``translate`` reads the processor's settings (default: :func:`from_processor_config`)."""
    import transformers
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(_PROCESSOR_OF.get(model_type, model_type))
    name = names.get("torchvision") if isinstance(names, dict) else None
    processor_class = getattr(transformers, name, None) if name else None
    if processor_class is None:
        return None
    settings = processor_class().to_dict()
    settings["image_processor_type"] = name
    preprocessing = (translate or from_processor_config)(settings, f"{name} defaults (no preprocessor_config.json)")
    if image_size is None:
        return preprocessing
    from dataclasses import replace

    return replace(
        preprocessing.with_overrides(size=image_size),
        source=preprocessing.source + f" at the config's image_size {image_size}",
    )
