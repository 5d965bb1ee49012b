"""The randomization sanity check (Adebayo et al. 2018, cascading): the maps of the same images after
the model's parameters are randomized block by block from the top, compared with the trained model's
maps (Spearman's rank correlation and SSIM, on the signed and the absolute map). A map that stays the
same does not depend on what the model learned. :mod:`attnexplain.evaluation` runs it; the per-step
similarities, the averaged curves and the verdict are computed here.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Iterator

import numpy as np
import torch

from .metrics import spearman

#: A method whose maps keep, on average over the images, a Spearman correlation above this with the
#: trained model's maps after the head alone, or over the first RANDOMIZATION_EARLY_STEPS cascading
#: steps (the head, then the head and the last block), fails the sanity check (Adebayo et al. 2018:
#: the map must change as soon as the top layers lose their weights, not only once the whole model
#: has). See randomization_verdict.
RANDOMIZATION_LIMIT = 0.5
RANDOMIZATION_EARLY_STEPS = 2


def parameter_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that hold parameters of their own, output side first (the cascading order)."""
    return [
        layer
        for _, layer in reversed(list(module.named_modules()))
        if any(True for _ in layer.parameters(recurse=False))
    ]


def _block_of(name: str, containers: set[str]) -> str:
    """The block a module named ``name`` belongs to: its path up to the first element of a
    Sequential/ModuleList/ModuleDict (``layer4.0``, ``encoder.layers.encoder_layer_3``,
    ``blocks.3``), or the module itself when no container holds it (``fc``, ``conv1``)."""
    parts = name.split(".") if name else []
    for depth in range(1, len(parts) + 1):
        if ".".join(parts[: depth - 1]) in containers:
            return ".".join(parts[:depth])
    return name


def randomization_blocks(module: torch.nn.Module) -> list[tuple[str, list[torch.nn.Module]]]:
    """The model's blocks with parameters, output side first: (name, layers) each, as the cascading
    check randomizes them one at a time. A block is an element of one of the model's containers (as
    Adebayo et al. 2018 step through Inception's named blocks) or a module with parameters outside
    any. A block whose parameters are all 1-D (a normalisation's scale and shift, which re-initialise
    to the identity) joins the next block towards the input, so that every step changes weights."""
    containers = {
        name
        for name, layer in module.named_modules()
        if isinstance(layer, (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict))
    }
    names = {id(layer): name for name, layer in module.named_modules()}
    blocks: list[tuple[str, list[torch.nn.Module]]] = []
    for layer in parameter_layers(module):
        block = _block_of(names[id(layer)], containers)
        if blocks and blocks[-1][0] == block:
            blocks[-1][1].append(layer)
        else:
            blocks.append((block, [layer]))
    merged: list[tuple[str, list[torch.nn.Module]]] = []
    pending: list[tuple[str, list[torch.nn.Module]]] = []
    for name, layers in blocks:
        pending.append((name, layers))
        if any(parameter.dim() > 1 for layer in layers for parameter in layer.parameters(recurse=False)):
            merged.append(_one_step(pending))
            pending = []
    if pending:  # only 1-D parameters left at the input side: they make the last step
        merged.append(_one_step(pending))
    return merged


def _one_step(pending: list[tuple[str, list[torch.nn.Module]]]) -> tuple[str, list[torch.nn.Module]]:
    """Blocks randomized together: their names joined, their layers in one list."""
    return " + ".join(n or "(model)" for n, _ in pending), [layer for _, ls in pending for layer in ls]


def cascade_steps(module: torch.nn.Module, steps: int) -> list[tuple[str, list[torch.nn.Module]]]:
    """What each cascading step randomizes, output side first: one block per step (the head first),
    at most ``steps`` steps; when the model has more blocks, the last step randomizes all the rest,
    so the last step always leaves no trained parameter."""
    blocks = randomization_blocks(module)
    if len(blocks) <= max(1, steps):
        return blocks
    kept = blocks[: max(1, steps) - 1]
    rest = blocks[len(kept) :]
    label = rest[0][0] if len(rest) == 1 else f"{rest[0][0]} … {rest[-1][0]}"
    return [*kept, (label, [layer for _, layers in rest for layer in layers])]


def randomize_layer(layer: torch.nn.Module, generator: torch.Generator) -> None:
    """Fresh random parameters for ``layer``: its own initialiser where it has one, else Gaussian
    noise of each tensor's standard deviation."""
    with torch.no_grad():
        state = torch.random.get_rng_state()
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        try:
            reset = getattr(layer, "reset_parameters", None) or getattr(layer, "_reset_parameters", None)
            if callable(reset):
                reset()
                return
            for parameter in layer.parameters(recurse=False):
                spread = float(parameter.float().std()) if parameter.numel() > 1 else 1.0
                parameter.copy_(torch.randn_like(parameter) * (spread or 1.0))
        finally:
            torch.random.set_rng_state(state)


def cascading_randomization(module: torch.nn.Module, steps: int, seed: int = 0) -> Iterator[torch.nn.Module]:
    """A copy of ``module`` randomized cumulatively from the output side, yielded after each step of
    :func:`cascade_steps` (the last yield has every layer randomized). ``module`` itself is
    never changed."""
    randomized = copy.deepcopy(module)
    generator = torch.Generator().manual_seed(seed)
    for _, layers in cascade_steps(randomized, steps):
        for layer in layers:
            randomize_layer(layer, generator)
        yield randomized


#: The similarities measured at every step, as Adebayo et al. 2018: Spearman's ρ and SSIM, each on
#: the map as the method gives it (signed) and on its absolute value.
SIMILARITIES = ("spearman", "spearman_abs", "ssim", "ssim_abs")


def _robustly_scaled(heatmap: np.ndarray) -> np.ndarray:
    """``heatmap`` divided by the 99th percentile of its absolute values and clipped to [-1, 1]
    (Adebayo et al.'s normalisation before SSIM): the maps of a randomized model can be orders of
    magnitude larger or smaller, and one extreme pixel must not flatten the rest."""
    scale = float(np.percentile(np.abs(heatmap), 99))
    if not math.isfinite(scale) or scale <= 0:
        scale = float(np.abs(heatmap).max())
    if not math.isfinite(scale) or scale <= 0:
        return np.zeros_like(heatmap)
    return np.clip(heatmap / scale, -1.0, 1.0)


def ssim(first: np.ndarray, second: np.ndarray, signed: bool = True) -> float:
    """SSIM (scikit-image's, 7-pixel window or the map's side when smaller) of two maps after
    :func:`_robustly_scaled`, a signed map's [-1, 1] moved to [0, 1] (zero at 0.5): SSIM's terms
    assume values that are not negative, and on raw signed maps a map and its negative have an SSIM
    near +1 (two negative factors). NaN when ``first`` is constant (as :func:`spearman`) or the map
    is under 3 pixels on a side."""
    from skimage.metrics import structural_similarity

    if np.ptp(first) == 0 or min(first.shape) < 3:
        return float("nan")
    window = min(7, *first.shape)
    window -= 1 - window % 2  # odd, as SSIM's window must be

    def scaled(heatmap: np.ndarray) -> np.ndarray:
        found = _robustly_scaled(heatmap)
        return (found + 1) / 2 if signed else found

    return float(structural_similarity(scaled(first), scaled(second), win_size=window, data_range=1.0))


def map_similarities(before: np.ndarray, after: np.ndarray) -> dict[str, float]:
    """Every measure of :data:`SIMILARITIES` between two (H, W) maps, all NaN where either holds a
    value that is not finite. On maps without negative values (most methods' maps) the absolute
    value changes nothing and is not computed twice."""
    before, after = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if not (np.isfinite(before).all() and np.isfinite(after).all()):  # a map that could not be made
        return {name: float("nan") for name in SIMILARITIES}
    if before.min() >= 0 and after.min() >= 0:  # on [0, 1] as they are: no shift to make room for signs
        same, similar = spearman(before, after), ssim(before, after, signed=False)
        return {"spearman": same, "spearman_abs": same, "ssim": similar, "ssim_abs": similar}
    return {
        "spearman": spearman(before, after),
        "spearman_abs": spearman(np.abs(before), np.abs(after)),
        "ssim": ssim(before, after, signed=True),
        "ssim_abs": ssim(np.abs(before), np.abs(after), signed=False),
    }


def randomization_similarities(
    module: torch.nn.Module,
    maps_of: Callable[[torch.nn.Module, int], torch.Tensor],
    original: torch.Tensor,
    steps: int,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Per measure of :data:`SIMILARITIES`, (B, M, S) its value between each of the ``original``
    maps (B, M, H, W) and the map ``maps_of(randomized module, step)`` gives after each of the S
    cascading steps (head first). NaN where the original map is constant (it has no order to keep)."""
    before = original.float().cpu().numpy()
    found: dict[str, list] = {name: [] for name in SIMILARITIES}
    for step, randomized in enumerate(cascading_randomization(module, steps, seed)):
        after = maps_of(randomized, step).float().cpu().numpy()
        pairs = [
            [map_similarities(before[b, m], after[b, m]) for m in range(before.shape[1])]
            for b in range(before.shape[0])
        ]
        for name in SIMILARITIES:
            found[name].append([[pair[name] for pair in row] for row in pairs])
    return {
        name: np.array(values, dtype=np.float64).reshape(-1, *before.shape[:2]).transpose(1, 2, 0)
        for name, values in found.items()
    }


def judged_similarity(similarities: dict[str, np.ndarray]) -> np.ndarray:
    """The similarity the verdict judges, per step: the larger of the two Spearman ρ (signed,
    absolute), so that a map that survives up to its sign counts as surviving. NaN only where both
    are NaN."""
    return np.fmax(similarities["spearman"], similarities["spearman_abs"])


def randomization_scores(similarities: dict[str, np.ndarray], early_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Per map, :func:`judged_similarity` after the head alone, and its mean over the first
    ``early_steps`` steps (the last axis): what the verdict weighs (:func:`randomization_verdict`).
    NaN where any of those steps is NaN: a map whose similarity cannot be measured is never counted
    as changed."""
    judged = judged_similarity(similarities)
    if judged.shape[-1] == 0:  # a model without parameters: nothing was randomized, nothing measured
        return np.full(judged.shape[:-1], np.nan), np.full(judged.shape[:-1], np.nan)
    return judged[..., 0], judged[..., : max(1, early_steps)].mean(axis=-1)


def randomization_verdict(head: np.ndarray, early: np.ndarray) -> tuple[float | None, bool]:
    """A method's score and whether it fails, from its images' values of
    :func:`randomization_scores`: the larger of the mean after the head alone and the mean over the
    early steps, above :data:`RANDOMIZATION_LIMIT` fails. The head-only step alone can fail a map (one
    that does not read the head, as attention rollout, keeps ρ = 1 there whatever the next block
    does); the early steps' mean keeps one step that bounces back from failing a map that changed.
    Means over the images, not a maximum per image: a random head is one draw per class, and a
    per-image maximum would pick that draw's lucky images. Images without a value are left out of
    the means; a method without any image fails (score None): NaN is never a pass."""
    head, early = np.asarray(head, dtype=np.float64), np.asarray(early, dtype=np.float64)
    usable = np.isfinite(head) & np.isfinite(early)
    if not usable.any():
        return None, True
    score = float(max(head[usable].mean(), early[usable].mean()))
    return score, score > RANDOMIZATION_LIMIT
