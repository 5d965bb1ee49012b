"""How much to believe a map: metrics computed from the maps, the model and the images.

- faithfulness, by perturbing the image in the map's order and watching the target's probability
  (as the model's plugin defines it): deletion and insertion (Petsiuk et al. 2018, RISE), ROAD
  (Rong et al. 2022), average drop and increase in confidence (Chattopadhay et al. 2018);
- localisation against the object's mask: pointing game, energy-based pointing game (relevance
  mass) and relevance rank accuracy;
- the randomization sanity check (Adebayo et al. 2018) has its own module,
  :mod:`attnexplain.randomization`.

Every image's perturbed copies, for every method, go through the model together in batches (one
forward per batch of copies) under inference mode: the cost is the forwards and nothing else.
docs/metrics.md gives each formula and its defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .errors import AttnExplainError, shown

#: (N, 3, H, W) inputs → (N, classes) probabilities as the model's plugin defines them.
ScoreFunction = Callable[[torch.Tensor], torch.Tensor]

#: Metric groups a user names (--metrics) → the values each gives per image and method.
METRIC_VALUES: dict[str, tuple[str, ...]] = {
    "deletion": ("deletion",),
    "insertion": ("insertion",),
    "road": ("road_morf", "road_lerf", "road"),
    "drop": ("avg_drop", "increase"),
    "pointing": ("pointing",),
    "mass": ("mass",),
    "rank": ("rank",),
    "randomization": ("randomization",),
}
#: Which way is better for each value: +1 higher, -1 lower.
BETTER: dict[str, int] = {
    "deletion": -1,
    "insertion": 1,
    "road_morf": -1,
    "road_lerf": 1,
    "road": 1,
    "avg_drop": -1,
    "increase": 1,
    "pointing": 1,
    "mass": 1,
    "rank": 1,
    "randomization": -1,
}
LOCALISATION = ("pointing", "mass", "rank")
#: The metrics measured from the model and the maps alone (no masks, no second model).
PERTURBATION_METRICS = ("deletion", "insertion", "road", "drop")
#: The random-map baseline's name in every table.
RANDOM_MAP = "random"
#: Beyond any photo's size (MAX_SIZE): a larger tolerance is a typo, and every map would hit.
MAX_POINTING_TOLERANCE = 10_000


@dataclass(frozen=True)
class MetricSettings:
    #: Deletion/insertion points (RISE: one step per image row). 10 keeps a CPU run of every default
    #: method short: the curves cost maps × 2 × (steps − 1) forwards per image (--steps asks for more).
    steps: int = 10
    blur_size: int = 11  # insertion's starting image: Gaussian blur as RISE's code (kernel, σ)
    blur_sigma: float = 5.0
    road_percentiles: tuple[int, ...] = (10, 20, 30, 40, 50, 60, 70, 80, 90)
    road_noise: float = 0.01  # noisy linear imputation's noise (absolute, on the normalised input)
    randomization_steps: int = 5  # cascading randomization: at most this many steps, the head first
    randomization_images: int = 8  # the first images measured; a subset is enough for a per-method verdict
    batch_size: int = 64  # perturbed copies per forward
    seed: int = 0
    #: Pointing game: a maximum this far from the object (in the photo's pixels) still hits it, as
    #: Zhang et al. 2018 count (15 px); 0 asks for a maximum on the object itself.
    pointing_tolerance: float = 15.0

    def __post_init__(self) -> None:
        tolerance = self.pointing_tolerance
        if (
            isinstance(tolerance, bool)
            or not isinstance(tolerance, (int, float))
            or not math.isfinite(tolerance)
            or not 0 <= tolerance <= MAX_POINTING_TOLERANCE
        ):
            raise AttnExplainError(
                f"The pointing tolerance must be a number of pixels from 0 to "
                f"{MAX_POINTING_TOLERANCE}, not {shown(tolerance)}."
            )
        images = self.randomization_images
        if isinstance(images, bool) or not isinstance(images, int) or images < 1:
            # 0 would leave every method unmeasured, and an unmeasured method fails the check.
            raise AttnExplainError(
                f"The randomization check needs at least one image, not {shown(images)} "
                f"(leave randomization out of the metrics to skip it)."
            )

    def as_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "blur_size": self.blur_size,
            "blur_sigma": self.blur_sigma,
            "road_percentiles": list(self.road_percentiles),
            "road_noise": self.road_noise,
            "randomization_steps": self.randomization_steps,
            "randomization_images": self.randomization_images,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "pointing_tolerance": self.pointing_tolerance,
        }


# --- scoring copies ------------------------------------------------------------------------------


def batched_target_scores(
    score: ScoreFunction, make_copies: Callable[[slice], torch.Tensor], targets: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """Each copy's target probability: (J,) for the J copies ``make_copies`` builds slice by slice,
    ``targets`` (J,) their classes. One forward per ``batch_size`` copies, no autograd."""
    values = []
    with torch.inference_mode():
        for start in range(0, len(targets), batch_size):
            part = slice(start, min(start + batch_size, len(targets)))
            probabilities = score(make_copies(part))
            values.append(probabilities.float().gather(1, targets[part].to(probabilities.device)[:, None])[:, 0].cpu())
    return torch.cat(values) if values else torch.zeros(0)


def pixel_order_ranks(maps: torch.Tensor) -> torch.Tensor:
    """(N, H*W) rank of each pixel in the map's order, most relevant first (0); ties keep the order
    of a descending stable sort."""
    flat = maps.flatten(1)
    order = torch.argsort(flat, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks


def rise_gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """(size, size) kernel of RISE's code: a centred impulse Gaussian-filtered with mirror
    ('reflect') borders and a radius of 4σ, so its weights fold back into the window."""
    radius = int(4.0 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    centre = size // 2
    line = np.zeros(size)
    for position in range(size):
        # Half-sample mirror: index -1 reads 0, index size reads size-1, with period 2*size.
        read = np.mod(position + offsets, 2 * size)
        read = np.where(read >= size, 2 * size - 1 - read, read)
        line[position] = weights[read == centre].sum()
    return torch.from_numpy(np.outer(line, line)).float()


def blurred(images: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Every channel blurred alone with RISE's kernel, zero-padded like its conv2d."""
    kernel = rise_gaussian_kernel(size, sigma).to(images)
    channels = images.shape[1]
    weight = kernel.expand(channels, 1, size, size)
    return torch.nn.functional.conv2d(images, weight, padding=size // 2, groups=channels)


# --- deletion and insertion ----------------------------------------------------------------------


@dataclass
class CausalCurves:
    fractions: torch.Tensor  # (P,) share of pixels removed (deletion) / revealed (insertion)
    deletion: torch.Tensor  # (B, M, P) target probability at each point
    insertion: torch.Tensor  # (B, M, P)

    def areas(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, M) areas under the deletion and insertion curves (trapezoid rule over fractions)."""
        return (
            torch.trapezoid(self.deletion, self.fractions, dim=-1),
            torch.trapezoid(self.insertion, self.fractions, dim=-1),
        )


def causal_curves(
    score: ScoreFunction,
    images: torch.Tensor,
    maps: torch.Tensor,
    targets: torch.Tensor,
    original: torch.Tensor,
    settings: MetricSettings = MetricSettings(),
) -> CausalCurves:
    """Deletion and insertion curves of ``maps`` (B, M, H, W): M maps per image of ``images``
    (B, 3, H, W), explaining ``targets`` (B,) whose probabilities on the intact images are
    ``original`` (B,). Deletion replaces pixels, most relevant first, by zeros (the dataset's mean
    colour after normalisation); insertion reveals them on a blurred copy. Both curves' end points
    do not depend on the map: they are scored once per image."""
    batch, methods = maps.shape[:2]
    pixels = maps.shape[-1] * maps.shape[-2]
    per_step = math.ceil(pixels / settings.steps)
    counts = list(range(0, pixels, per_step)) + [pixels]
    fractions = torch.tensor(counts, dtype=torch.float64) / pixels
    ranks = pixel_order_ranks(maps.reshape(batch * methods, *maps.shape[-2:]))
    flat_images = images.flatten(2)  # (B, 3, HW)
    substrate = blurred(images, settings.blur_size, settings.blur_sigma).flatten(2)

    # End points: deletion's last (all zeros) and insertion's first (all blurred), per image.
    flat_zeros = torch.zeros_like(flat_images[:1])
    end_images = torch.arange(batch).repeat(2)
    end_kinds = torch.arange(2).repeat_interleave(batch)
    ends = batched_target_scores(
        score,
        lambda part: torch.where(
            (end_kinds[part] == 0).to(images.device)[:, None, None], flat_zeros, substrate[end_images[part]]
        ).view(-1, *images.shape[1:]),
        targets.cpu()[end_images],
        settings.batch_size,
    ).view(2, batch)

    # Every other point of every curve of every image and method: one job each.
    inner_counts = torch.tensor(counts[1:-1], dtype=torch.long)
    pairs = batch * methods
    job_pair = torch.arange(pairs).repeat_interleave(2 * len(inner_counts))
    job_curve = torch.arange(2).repeat_interleave(len(inner_counts)).repeat(pairs)  # 0 deletion
    job_point = torch.arange(1, len(counts) - 1).repeat(2 * pairs)
    job_count = inner_counts.repeat(2 * pairs)
    job_image = job_pair // methods

    def copies(part: slice) -> torch.Tensor:
        pair, image = job_pair[part].to(ranks.device), job_image[part].to(images.device)
        chosen = (ranks[pair] < job_count[part].to(ranks.device)[:, None])[:, None]  # (J, 1, HW)
        intact, start = flat_images[image], substrate[image]
        deleting = (job_curve[part] == 0).to(images.device)[:, None, None]
        before = torch.where(deleting, intact, start)  # what the chosen pixels replace
        after = torch.where(deleting, torch.zeros_like(intact), intact)
        return torch.where(chosen, after, before).view(-1, *images.shape[1:])

    inner = batched_target_scores(score, copies, targets.cpu()[job_image], settings.batch_size)
    curves = torch.empty(2, pairs, len(counts))
    curves[job_curve, job_pair, job_point] = inner
    intact_scores = original.float().cpu().repeat_interleave(methods)
    curves[0, :, 0], curves[0, :, -1] = intact_scores, ends[0].repeat_interleave(methods)
    curves[1, :, 0], curves[1, :, -1] = ends[1].repeat_interleave(methods), intact_scores
    shape = (batch, methods, len(counts))
    return CausalCurves(fractions.float(), curves[0].view(shape), curves[1].view(shape))


# --- ROAD ----------------------------------------------------------------------------------------

#: Noisy linear imputation's neighbourhood (ROAD): each removed pixel is the weighted mean of its
#: eight neighbours, edges twice the weight of corners.
_NEIGHBOURS = tuple(
    ((dy, dx), 1 / 6 if dy == 0 or dx == 0 else 1 / 12) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)
)


def linear_imputation(
    image: torch.Tensor, removed: torch.Tensor, noise: float = 0.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``image`` (C, H, W) with the ``removed`` (H, W) pixels replaced by the solution of
    "each removed pixel = the weighted mean of its neighbours inside the image" (one sparse linear
    system, all channels at once), plus Gaussian noise of standard deviation ``noise``."""
    from scipy.sparse import csc_matrix
    from scipy.sparse.linalg import spsolve

    channels, height, width = image.shape
    flat_removed = removed.reshape(-1).cpu().numpy().astype(bool)
    unknown = np.flatnonzero(flat_removed)
    if unknown.size == 0:
        return image.clone()
    values = image.reshape(channels, -1).double().cpu().numpy()
    variable = np.full(height * width, -1)
    variable[unknown] = np.arange(unknown.size)
    rows_y, rows_x = np.divmod(unknown, width)
    right_side = np.zeros((unknown.size, channels))
    diagonal = np.zeros(unknown.size)
    entries_row, entries_col, entries_value = [], [], []
    for (dy, dx), weight in _NEIGHBOURS:
        y, x = rows_y + dy, rows_x + dx
        inside = (y >= 0) & (y < height) & (x >= 0) & (x < width)
        diagonal[inside] -= weight  # weights of neighbours outside the image are left out
        neighbour = np.where(inside, y * width + x, 0)
        known = inside & ~flat_removed[neighbour]
        right_side[known] -= weight * values[:, neighbour[known]].T
        missing = inside & flat_removed[neighbour]
        entries_row.append(np.flatnonzero(missing))
        entries_col.append(variable[neighbour[missing]])
        entries_value.append(np.full(int(missing.sum()), weight))
    rows = np.concatenate(entries_row + [np.arange(unknown.size)])
    cols = np.concatenate(entries_col + [np.arange(unknown.size)])
    data = np.concatenate(entries_value + [diagonal])
    system = csc_matrix((data, (rows, cols)), shape=(unknown.size, unknown.size))
    solution = np.asarray(spsolve(system, right_side)).reshape(unknown.size, channels)
    filled = image.reshape(channels, -1).clone()
    imputed = torch.from_numpy(solution.T).to(filled)
    if noise:
        imputed = imputed + noise * torch.randn(imputed.shape, generator=generator).to(filled)
    filled[:, torch.from_numpy(unknown).to(filled.device)] = imputed
    return filled.view_as(image)


def road_removed(heatmap: np.ndarray, percentile: float, most_relevant: bool) -> np.ndarray:
    """The pixels ROAD removes at ``percentile``: those at or above the map's percentile
    (most relevant first), or at or above the percentile of the reversed map (least relevant)."""
    ordered = heatmap if most_relevant else -heatmap
    return ordered >= np.percentile(ordered, percentile)


def road_scores(
    score: ScoreFunction,
    images: torch.Tensor,
    maps: torch.Tensor,
    targets: torch.Tensor,
    original: torch.Tensor,
    settings: MetricSettings = MetricSettings(),
) -> dict[str, torch.Tensor]:
    """ROAD (B, M) values: the mean change of the target probability over the percentiles when the
    most (``road_morf``, lower is better) or least (``road_lerf``, higher is better) relevant pixels
    are imputed; ``road`` = (lerf − morf) / 2. Imputation runs on the CPU (a sparse solve per copy);
    the copies go through the model in batches."""
    batch, methods = maps.shape[:2]
    generator = torch.Generator().manual_seed(settings.seed)
    cpu_maps = maps.float().cpu().numpy()
    cpu_images = images.float().cpu()
    percentiles = settings.road_percentiles
    jobs = [
        (b, m, order, p) for b in range(batch) for m in range(methods) for order in (0, 1) for p in percentiles
    ]  # order 0: most relevant first

    def copies(part: slice) -> torch.Tensor:
        return torch.stack(
            [
                linear_imputation(
                    cpu_images[b],
                    torch.from_numpy(road_removed(cpu_maps[b, m], p, most_relevant=order == 0)),
                    settings.road_noise,
                    generator,
                )
                for b, m, order, p in jobs[part]
            ]
        ).to(images.device)

    job_targets = targets.cpu()[torch.tensor([b for b, *_ in jobs], dtype=torch.long)]
    after = batched_target_scores(score, copies, job_targets, settings.batch_size)
    change = after.view(batch, methods, 2, len(percentiles)) - original.float().cpu()[:, None, None, None]
    morf, lerf = change.mean(dim=-1).unbind(-1)
    return {"road_morf": morf, "road_lerf": lerf, "road": (lerf - morf) / 2}


# --- average drop / increase in confidence -------------------------------------------------------


def confidence_change(
    score: ScoreFunction,
    images: torch.Tensor,
    maps: torch.Tensor,
    targets: torch.Tensor,
    original: torch.Tensor,
    settings: MetricSettings = MetricSettings(),
) -> dict[str, torch.Tensor]:
    """(B, M) drop (max(0, p − p') / p) and increase (p' > p, 0 or 1) of the target probability p
    when the model sees the input multiplied by the map scaled to [0, 1] (p')."""
    batch, methods = maps.shape[:2]
    low = maps.flatten(2).amin(dim=2)[..., None, None]
    high = maps.flatten(2).amax(dim=2)[..., None, None]
    scaled = ((maps - low) / (high - low).clamp_min(1e-12)).float()
    job_image = torch.arange(batch).repeat_interleave(methods)

    def copies(part: slice) -> torch.Tensor:
        pairs = torch.arange(part.start, part.stop)
        return scaled.flatten(0, 1)[pairs.to(scaled.device)][:, None] * images[job_image[part].to(images.device)]

    masked = batched_target_scores(score, copies, targets.cpu()[job_image], settings.batch_size).view(batch, methods)
    before = original.float().cpu()[:, None]
    return {"avg_drop": torch.relu(before - masked) / (before + 1e-7), "increase": (masked > before).float()}


# --- the perturbation metrics of a batch's maps ----------------------------------------------------


def perturbation_values(
    loaded,
    batch,
    maps,
    targets,
    original,
    metrics: Sequence[str],
    config: MetricSettings = MetricSettings(),
    precision: str = "fp32",
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The perturbation metrics among ``metrics`` for ``maps`` (B, M, H, W) of ``batch``: per value
    name a (B, M) tensor, and the deletion/insertion curves (NumPy) with their ``fractions``.
    ``original`` (B,) is each target's probability on the intact image. What ``evaluate`` measures
    of every map, and ``run`` / ``batch --metrics`` of theirs. The model runs in ``precision`` (that
    of the maps' forward, which gave ``original``); the curves are float32 whatever it is."""
    from .precision import model_precision
    from .running import probabilities_of

    score = probabilities_of(loaded, tuple(batch.shape[-2:]))  # the model as the engine calls it

    with model_precision(loaded.module, precision):
        return _perturbation_values(score, batch, maps, targets, original, metrics, config)


def _perturbation_values(score, batch, maps, targets, original, metrics, config):
    """:func:`perturbation_values` with the model as ``score``."""
    values: dict[str, torch.Tensor] = {}
    curves: dict[str, Any] = {}
    if "deletion" in metrics or "insertion" in metrics:
        found = causal_curves(score, batch, maps, targets, original, config)
        deletion, insertion = found.areas()
        curves["fractions"] = found.fractions.numpy()
        for which, area, curve in (("deletion", deletion, found.deletion), ("insertion", insertion, found.insertion)):
            if which in metrics:
                values[which] = area
                curves[which] = curve.numpy()
    if "road" in metrics:
        values.update(road_scores(score, batch, maps, targets, original, config))
    if "drop" in metrics:
        values.update(confidence_change(score, batch, maps, targets, original, config))
    return values, curves


# --- localisation --------------------------------------------------------------------------------


def localisation(
    maps: torch.Tensor, masks: torch.Tensor, tolerance: float = 0.0, pixel_size: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """(B, M) localisation of ``maps`` (B, M, H, W) against the object ``masks`` (B, H, W) bool:
    ``pointing`` 1 when a maximum of the map is on the object or within ``tolerance`` of it (the
    pointing game of Zhang et al. 2018 counts a 15-pixel tolerance), distances measured in the
    photo's pixels, ``pixel_size`` (B, 2) photo pixels per map pixel (height, width; 1 when None);
    ``mass`` the share of the map's positive mass on it (energy-based pointing game); ``rank`` the
    share of the map's top-K pixels on it, K the object's size (relevance rank accuracy). NaN where a
    mask is empty."""
    flat = maps.flatten(2).float()
    inside = masks.flatten(1)[:, None, :].expand_as(flat)
    peaks = flat == flat.amax(dim=2, keepdim=True)
    near = (
        masks
        if tolerance <= 0
        else torch.from_numpy(
            np.stack(
                [
                    near_object(
                        mask.cpu().numpy(), tolerance, (1.0, 1.0) if pixel_size is None else tuple(map(float, size))
                    )
                    for mask, size in zip(masks, pixel_size if pixel_size is not None else [None] * len(masks))
                ]
            )
        )
    )
    pointing = (peaks & near.flatten(1)[:, None, :].to(peaks.device)).any(dim=2).float()
    positive = flat.clamp_min(0)
    mass = (positive * inside).sum(dim=2) / positive.sum(dim=2).clamp_min(1e-30)
    size = masks.flatten(1).sum(dim=1)  # (B,)
    ranks = pixel_order_ranks(flat.flatten(0, 1)).view_as(flat)
    top = ranks < size[:, None, None]
    rank = (top & inside).sum(dim=2) / size[:, None].clamp_min(1)
    empty = (size == 0)[:, None].expand_as(pointing)
    return {
        name: torch.where(empty, torch.nan, value.float())
        for name, value in (("pointing", pointing), ("mass", mass), ("rank", rank))
    }


def near_object(mask: np.ndarray, tolerance: float, pixel_size: tuple[float, float]) -> np.ndarray:
    """(H, W) bool: the pixels whose centre is closer than ``tolerance`` photo pixels to the centre
    of an object pixel of ``mask`` (the object itself included), one map pixel being ``pixel_size``
    (height, width) photo pixels (a resize may stretch one axis more than the other). As TorchRay's
    pointing game (Zhang et al.'s benchmark code): a hit when the open disc of radius ``tolerance``
    around the maximum holds an object pixel."""
    from scipy.ndimage import distance_transform_edt

    mask = mask.astype(bool)
    if not mask.any():
        return mask
    return mask | (distance_transform_edt(~mask, sampling=pixel_size) < tolerance)


# --- randomization -------------------------------------------------------------------------------


def spearman(first: np.ndarray, second: np.ndarray) -> float:
    """Spearman's rank correlation of two maps' pixels (ties ranked by their mean rank). NaN when
    ``first`` is constant (it has no order to keep); 0 when only ``second`` is (the order is lost)."""
    from scipy.stats import spearmanr

    first, second = np.ravel(first), np.ravel(second)
    if np.ptp(first) == 0:
        return float("nan")
    if np.ptp(second) == 0:
        return 0.0
    return float(spearmanr(first, second).statistic)


def random_maps(count: int, size: tuple[int, int], seeds: Sequence[int]) -> torch.Tensor:
    """(count, H, W) uniform random maps, one seed per image: the chance level of every metric."""
    return torch.stack([torch.rand(size, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds[:count]])


#: Records of earlier runs are untrusted: how large their metrics table may be.
MAX_TABLE_ENTRIES = 64
MAX_NAME_LENGTH = 100


def metrics_table_problem(table: Any, methods: Sequence[str]) -> str | None:
    """Why ``table``, a record's ``"metrics"`` (``{"<method>": {"<metric>": <float>}}``), cannot be
    shown, or None: it must be that shape, name only ``methods`` (or the random map), hold finite
    numbers, and stay small."""
    from ._untrusted import is_finite_number

    if not isinstance(table, dict) or len(table) > MAX_TABLE_ENTRIES:
        return "has metrics that are not a table of methods"
    for method, values in table.items():
        if method not in methods and method != RANDOM_MAP:
            return f"has metrics for {shown(method)}, which is not one of its methods"
        if not isinstance(values, dict) or len(values) > MAX_TABLE_ENTRIES:
            return f"has metrics for {shown(method)} that are not a table of values"
        for metric, value in values.items():
            if not (isinstance(metric, str) and 0 < len(metric) <= MAX_NAME_LENGTH):
                return "has a metric without a short name"
            if not is_finite_number(value):  # 10**400 too: math.isfinite would raise OverflowError
                return f"has the metric {shown(metric)} with a value that is not a finite number"
    return None
