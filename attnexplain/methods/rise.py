"""RISE (Petsiuk et al. 2018, "Randomized Input Sampling for Explanation of Black-box Models").

The map is the average of random masks weighted by the target's probability on the image seen
through each mask: S = Σᵢ p(target | I ⊙ Mᵢ) · Mᵢ / (N · P(cell kept)). Only forward passes.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

#: The masks' random grids and shifts come from a generator with this seed: every image gets the
#: same masks, alone or in any batch, on any device, in every run.
MASK_SEED = 0
#: The paper's settings: a 7 × 7 grid of cells, each kept with probability 0.5.
GRID = 7
KEEP_PROBABILITY = 0.5
#: Masks per image when --samples is not given.
MASKS = 1000


def rise_masks(
    count: int,
    size: tuple[int, int],
    device: torch.device | str = "cpu",
    *,
    grid: int = GRID,
    keep: float = KEEP_PROBABILITY,
    seed: int = MASK_SEED,
) -> torch.Tensor:
    """The first ``count`` masks of the seeded sequence: (count, H, W) in [0, 1].

    Each is a ``grid`` × ``grid`` binary grid (cells kept with probability ``keep``), upsampled
    bilinearly to (grid + 1) cells of ⌈H / grid⌉ × ⌈W / grid⌉ pixels and cropped at a random shift
    within one cell, as in the paper. The small grids and shifts are drawn on the CPU (the same on
    every device); the full-size masks are made on ``device``.
    """
    return _full_size(*_mask_draws(count, size, grid, keep, seed), size, device)


def _mask_draws(
    count: int, size: tuple[int, int], grid: int, keep: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, grid, grid) kept cells and (count, 2) shifts in pixels, drawn on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    cells = torch.rand((count, grid, grid), generator=generator) < keep
    cell = torch.tensor([-(-side // grid) for side in size])
    shifts = (torch.rand((count, 2), generator=generator) * cell).long()
    return cells, shifts


def _full_size(
    cells: torch.Tensor, shifts: torch.Tensor, size: tuple[int, int], device: torch.device | str
) -> torch.Tensor:
    grid = cells.shape[-1]
    height, width = size
    cell_h, cell_w = -(-height // grid), -(-width // grid)
    upsampled = F.interpolate(
        cells[:, None].to(device=device, dtype=torch.float32),
        size=((grid + 1) * cell_h, (grid + 1) * cell_w),
        mode="bilinear",
        align_corners=False,
    )[:, 0]
    return torch.stack([mask[y : y + height, x : x + width] for mask, (y, x) in zip(upsampled, shifts.tolist())])


def rise(
    forward: Callable,
    batch: torch.Tensor,
    target: list[int],
    *,
    probabilities: Callable[[torch.Tensor], torch.Tensor],
    samples: int = MASKS,
    batch_size: int = 32,
    masks: torch.Tensor | None = None,
    keep: float = KEEP_PROBABILITY,
    **_: object,
) -> torch.Tensor:
    """(B, H, W) RISE maps: ``samples`` masks (see :func:`rise_masks`, or the given ``masks``),
    ``batch_size`` masked images per forward pass. ``probabilities`` maps inputs to (N, classes)
    probabilities, the paper's score (not ``forward``'s logits). Costs ``samples`` forwards per
    image and nothing else."""
    size = tuple(batch.shape[-2:])
    count = samples if masks is None else len(masks)
    draws = _mask_draws(count, size, GRID, keep, MASK_SEED) if masks is None else None
    totals = torch.zeros((len(batch), size[0] * size[1]), device=batch.device, dtype=torch.float32)
    with torch.no_grad():
        for first in range(0, count, batch_size):
            # Made a chunk at a time on the device: full-size masks for all samples may not fit.
            chunk = (
                _full_size(*(d[first : first + batch_size] for d in draws), size, batch.device)
                if masks is None
                else masks[first : first + batch_size].to(batch.device, torch.float32)
            )
            flat = chunk.flatten(1)
            for index, (image, image_target) in enumerate(zip(batch, target)):
                masked = image[None] * chunk[:, None].to(image.dtype)
                weights = probabilities(masked)[:, image_target].float()
                totals[index] += weights @ flat
    return (totals / (count * keep)).reshape(len(batch), *size)
