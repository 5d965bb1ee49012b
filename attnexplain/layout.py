"""How a layer's 4-D output is laid out: a (B, C, H, W) map, a channels-last (B, H, W, C) map, or no
map of the image at all (attention probabilities, windows of a map).

Read the wrong way, a channels-last map gives a picture of (width, channel) positions: stripes, with
no error. So a 4-D output is read as a map only on evidence, in this order: the plugin's word
(:meth:`~attnexplain.plugins.ModelPlugin.layer_layout`); what the output's module is by torch's own
definition (a ``Conv2d`` writes channels first, a ``Linear`` or ``LayerNorm`` acts on the last
dimension), passed on to a module that hands on a tensor it was given or keeps its input's shape
(a residual block); else a check that the (H, W) reading fits the input image's shape and the
channels-last reading does not. Anything else is refused with the reason.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .plugins import ModelPlugin

__all__ = ["CHANNELS_FIRST", "CHANNELS_LAST", "LAYOUTS", "NOT_A_MAP", "as_map", "decide", "grid_fits", "own_layout"]

#: The layouts' names: what :meth:`~attnexplain.plugins.ModelPlugin.layer_layout` answers and
#: ``LayerInfo.layout`` records. This module imports torch only inside its functions, so that a
#: plugin can name them (through :mod:`attnexplain.plugin_api`) without importing torch.
CHANNELS_FIRST = "channels_first"  # (B, C, H, W)
CHANNELS_LAST = "channels_last"  # (B, H, W, C)
NOT_A_MAP = "not_a_map"  # attention probabilities, a head's internals: no map of the image
LAYOUTS = (CHANNELS_FIRST, CHANNELS_LAST, NOT_A_MAP)


@functools.cache
def _channels_first_layers() -> tuple[type[nn.Module], ...]:
    """Layers torch defines on (N, C, H, W) inputs."""
    from torch import nn

    return (
        nn.Conv2d,
        nn.ConvTranspose2d,
        nn.BatchNorm2d,
        nn.InstanceNorm2d,
        nn.GroupNorm,
        nn.LocalResponseNorm,
        nn.MaxPool2d,
        nn.AvgPool2d,
        nn.AdaptiveAvgPool2d,
        nn.AdaptiveMaxPool2d,
        nn.LPPool2d,
        nn.FractionalMaxPool2d,
        nn.Upsample,
        nn.PixelShuffle,
        nn.PixelUnshuffle,
        nn.Dropout2d,
        nn.Softmax2d,
        nn.ZeroPad2d,
        nn.ConstantPad2d,
        nn.ReflectionPad2d,
        nn.ReplicationPad2d,
    )


def own_layout(module: "nn.Module", output: "torch.Tensor") -> str | None:
    """What torch's definition of ``module`` says of its 4-D ``output`` (a subclass with a forward of
    its own may do anything: None)."""
    from torch import nn

    if output.dim() != 4:
        return None
    kind = type(module)
    for layer in _channels_first_layers():
        if isinstance(module, layer) and kind.forward is layer.forward:
            return CHANNELS_FIRST
    if isinstance(module, nn.Linear) and kind.forward is nn.Linear.forward:
        return CHANNELS_LAST  # its features are the last dimension
    if isinstance(module, nn.LayerNorm) and kind.forward is nn.LayerNorm.forward and len(module.normalized_shape) == 1:
        return CHANNELS_LAST
    if isinstance(module, nn.Softmax) and kind.forward is nn.Softmax.forward and module.dim in (-1, 3):
        # Normalised along its last dimension: attention probabilities (a map would not be
        # normalised along its width).
        return NOT_A_MAP
    return None


def grid_fits(height: int, width: int, input_size: tuple[int, int]) -> bool:
    """Whether a height × width grid can be the input image seen at some stride: the strides the two
    sides imply agree, up to rounding (a side may be a cell or so off, as padding and odd sizes
    make it) and up to 10% (a detector pads its resized input to a multiple of 32)."""

    def strides(cells: int, pixels: int) -> tuple[float, float]:
        return pixels / (cells + 1.5) / 1.1, pixels / max(cells - 1.5, 0.5) * 1.1

    if height < 1 or width < 1 or height > 2 * input_size[0] or width > 2 * input_size[1]:
        return False
    low_h, high_h = strides(height, input_size[0])
    low_w, high_w = strides(width, input_size[1])
    return max(low_h, low_w) <= min(high_h, high_w)


def decide(
    plugin: "ModelPlugin",
    model: "nn.Module",
    layer: str,
    shape: tuple[int, ...],
    inferred: str | None,
    input_size: tuple[int, int],
    batch: int,
) -> tuple[str | None, str]:
    """How layer ``layer``'s 4-D output of ``shape`` is read for a batch of ``batch`` images of
    ``input_size``: (layout, "") or (None, the reason it cannot be read as a map). ``inferred`` is
    what the probe found from torch's layers (:func:`own_layout`, passed on through the model)."""
    try:
        said = plugin.layer_layout(model, layer)
    except Exception:  # noqa: BLE001 - a plugin failing here leaves the layer to the evidence
        said = None
    if said is not None and said not in LAYOUTS:
        said = None  # a plugin's odd answer is no word
    layout = said or inferred
    shown = "x".join(map(str, shape))
    if shape[0] != batch and layout != NOT_A_MAP:
        return None, (
            f"layer {layer!r} outputs {shown}, whose first dimension is not the batch of "
            f"{batch} image(s) (windows or groups of a map)"
        )
    if layout == NOT_A_MAP:
        what = (
            f"which plugin {plugin.name} says is not a map of the image"
            if said
            else "attention probabilities (a softmax along its last dimension), not a map of the image"
        )
        return None, f"layer {layer!r} outputs {shown}, {what}"
    if layout is None:
        first, last = grid_fits(shape[2], shape[3], input_size), grid_fits(shape[1], shape[2], input_size)
        if first and not last:
            layout = CHANNELS_FIRST
        else:
            why = (
                "could be (batch, channels, height, width) or channels-last (batch, height, width, channels)"
                if first
                else "does not fit the input image as (batch, channels, height, width)"
            )
            return None, (
                f"layer {layer!r} outputs {shown}, which {why} at "
                f"{input_size[0]}x{input_size[1]}, and plugin {plugin.name} does not say "
                f"how it is laid out"
            )
    return layout, ""


def as_map(layout: str, tensor: Any) -> Any:
    """``tensor`` as (B, C, H, W), laid out as ``layout`` says (a rearrangement only: the same is
    applied to an output and to its gradient)."""
    return tensor.permute(0, 3, 1, 2) if layout == CHANNELS_LAST else tensor
