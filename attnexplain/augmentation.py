"""``--aug-smooth``: each map averaged over the image, its mirror image and zoomed-in copies."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .errors import NothingToExplain

#: An augmented batch → its maps (method → (B, H, W)), explaining the plain image's targets.
MapsOf = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def augmentation_smoothing(
    maps_of: MapsOf, batch: torch.Tensor, plain: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Average each map over the image, its mirror image and zoomed-in copies, each mapped back.

    Zooming crops the centre and resizes it back to the input size (the model keeps its input
    size, which transformers need); its map covers only that centre, so the average at each pixel
    is over the copies that saw it. Every copy explains the class found on the plain image (for a
    detector: that class's best box in the copy, which need not be the same object).
    """
    height, width = batch.shape[-2:]
    sums = {name: heatmap.clone() for name, heatmap in plain.items()}
    counts = torch.ones(height, width, device=batch.device)
    for flip in (False, True):
        for zoom in (1.0, 1.2):
            if not flip and zoom == 1.0:
                continue
            augmented, (top, left, crop_h, crop_w) = _augment(batch, flip, zoom)
            try:
                copy = maps_of(augmented)
            except NothingToExplain:  # a detector found nothing in this copy: it has no say
                continue
            for name, heatmap in copy.items():
                restored = heatmap.flip(-1) if flip else heatmap
                shrunk = F.interpolate(restored[:, None], size=(crop_h, crop_w), mode="bilinear", align_corners=False)[
                    :, 0
                ]
                sums[name][:, top : top + crop_h, left : left + crop_w] += shrunk
            counts[top : top + crop_h, left : left + crop_w] += 1
    return {name: total / counts for name, total in sums.items()}


def _augment(batch: torch.Tensor, flip: bool, zoom: float):
    height, width = batch.shape[-2:]
    crop_h, crop_w = round(height / zoom), round(width / zoom)
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    augmented = batch[..., top : top + crop_h, left : left + crop_w]
    if zoom != 1.0:
        augmented = F.interpolate(augmented, size=(height, width), mode="bilinear", align_corners=False)
    if flip:
        augmented = augmented.flip(-1)
    return augmented, (top, left, crop_h, crop_w)
