"""Every metric equals an independent implementation on the same maps, model and images."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from conftest import sobel_edges

from attnexplain.metrics import (
    MetricSettings,
    causal_curves,
    confidence_change,
    linear_imputation,
    localisation,
    road_scores,
    spearman,
)
from attnexplain.randomization import RANDOMIZATION_LIMIT


class _Softmaxed(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return torch.softmax(self.model(x), dim=1)


@pytest.fixture(scope="module")
def tiny_cnn():
    """A small CNN with fixed random weights: the references run it once per step, so it is fast."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 4),
    ).eval()


def _score(model):
    return lambda inputs: torch.softmax(model(inputs), dim=1)


# --- RISE's CausalMetric, written out as in the paper's code (224 px, one row per step) ---------


def _rise_kernel(size: int, sigma: float) -> torch.Tensor:
    from scipy.ndimage import gaussian_filter

    impulse = np.zeros((size, size))
    impulse[size // 2, size // 2] = 1
    kernel = np.zeros((3, 3, size, size))
    for channel in range(3):
        kernel[channel, channel] = gaussian_filter(impulse, sigma)
    return torch.from_numpy(kernel.astype("float32"))


def _rise_causal_metric(
    model, image: torch.Tensor, saliency: np.ndarray, mode: str, step: int, substrate, scores_too: bool = False
):
    pixels = image.shape[-1] * image.shape[-2]
    with torch.no_grad():
        target = int(model(image).argmax(1)[0])
        steps = (pixels + step - 1) // step
        if mode == "del":
            start, finish = image.clone(), substrate(image)
        else:
            start, finish = substrate(image), image.clone()
        scores = np.empty(steps + 1)
        order = np.flip(np.argsort(saliency.reshape(-1, pixels), axis=1), axis=-1)
        for i in range(steps + 1):
            scores[i] = float(model(start)[0, target])
            if i < steps:
                coords = order[:, step * i : step * (i + 1)]
                start.numpy().reshape(1, 3, pixels)[0, :, coords] = finish.numpy().reshape(1, 3, pixels)[0, :, coords]
    area = (scores.sum() - scores[0] / 2 - scores[-1] / 2) / (scores.shape[0] - 1)
    return (area, scores) if scores_too else area


@pytest.mark.heavy
def test_deletion_and_insertion_equal_rise_causal_metric_at_224_px(tiny_cnn):
    small_resnet = tiny_cnn
    torch.manual_seed(3)
    image = torch.randn(1, 3, 224, 224)
    saliency = torch.rand(2, 224, 224)  # continuous: no ties, so the order is the same
    kernel = _rise_kernel(11, 5)
    probability = _Softmaxed(small_resnet)
    curves = causal_curves(
        _score(small_resnet),
        image,
        saliency[None],
        probability(image).argmax(1),
        probability(image).amax(1).detach(),
        MetricSettings(steps=224, batch_size=128),
    )
    deletion, insertion = curves.areas()
    for m in range(2):
        expected_deletion = _rise_causal_metric(probability, image, saliency[m].numpy(), "del", 224, torch.zeros_like)
        expected_insertion = _rise_causal_metric(
            probability,
            image,
            saliency[m].numpy(),
            "ins",
            224,
            lambda x: torch.nn.functional.conv2d(x, kernel, padding=11 // 2),
        )
        assert float(deletion[0, m]) == pytest.approx(expected_deletion, abs=1e-5)
        assert float(insertion[0, m]) == pytest.approx(expected_insertion, abs=1e-5)


def test_deletion_and_insertion_equal_rise_causal_metric_on_a_small_image(tiny_cnn):
    """The same comparison at 32 px with one image row per step (fast, in the default suite)."""
    small_resnet = tiny_cnn
    torch.manual_seed(4)
    images = torch.randn(2, 3, 32, 32)
    saliency = torch.rand(2, 2, 32, 32)
    kernel = _rise_kernel(11, 5)
    probability = _Softmaxed(small_resnet)
    with torch.no_grad():
        probabilities = probability(images)
    curves = causal_curves(
        _score(small_resnet),
        images,
        saliency,
        probabilities.argmax(1),
        probabilities.amax(1),
        MetricSettings(steps=32, batch_size=50),
    )
    deletion, insertion = curves.areas()
    assert curves.deletion.shape == (2, 2, 33)
    for b in range(2):
        for m in range(2):
            assert float(deletion[b, m]) == pytest.approx(
                _rise_causal_metric(
                    probability, images[b : b + 1], saliency[b, m].numpy(), "del", 32, torch.zeros_like
                ),
                abs=1e-5,
            )
            assert float(insertion[b, m]) == pytest.approx(
                _rise_causal_metric(
                    probability,
                    images[b : b + 1],
                    saliency[b, m].numpy(),
                    "ins",
                    32,
                    lambda x: torch.nn.functional.conv2d(x, kernel, padding=5),
                ),
                abs=1e-5,
            )


def test_deletion_points_equal_rise_and_the_area_integrates_over_the_true_fractions(tiny_cnn):
    """Where the step does not divide the pixels (32×32 in 10 steps of 103: the last removes 97), every
    point of the curve equals RISE's score, and our area is the trapezoid over the true fractions;
    RISE's auc() spaces its points equally, so its area differs."""
    torch.manual_seed(6)
    image = torch.randn(1, 3, 32, 32)
    saliency = torch.rand(1, 1, 32, 32)
    probability = _Softmaxed(tiny_cnn)
    with torch.no_grad():
        probabilities = probability(image)
    curves = causal_curves(
        _score(tiny_cnn),
        image,
        saliency,
        probabilities.argmax(1),
        probabilities.amax(1),
        MetricSettings(steps=10, batch_size=50),
    )
    rise_area, rise_scores = _rise_causal_metric(
        probability, image, saliency[0, 0].numpy(), "del", 103, torch.zeros_like, scores_too=True
    )
    np.testing.assert_allclose(curves.deletion[0, 0].numpy(), rise_scores, atol=1e-5)
    true_fractions = np.minimum(np.arange(11) * 103, 1024) / 1024
    ours = float(curves.areas()[0][0, 0])
    assert ours == pytest.approx(np.trapezoid(rise_scores, true_fractions), abs=1e-6)
    assert abs(ours - rise_area) > 1e-6


# --- ROAD against pytorch-grad-cam 1.5.7 ---------------------------------------------------------


def test_linear_imputation_equals_pytorch_grad_cam_noisy_linear_imputer_without_noise():
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    torch.manual_seed(5)
    image = torch.randn(3, 24, 28)
    for share in (0.1, 0.5, 0.9):
        kept = (torch.rand(24, 28) > share).float()
        expected = NoisyLinearImputer(noise=0.0)(image, kept)
        ours = linear_imputation(image, kept == 0)
        assert torch.allclose(ours, expected, atol=1e-5)
        assert torch.equal(ours[:, kept == 1], image[:, kept == 1])


@pytest.mark.heavy
def test_road_means_agree_with_pytorch_grad_cam_road_with_noise_over_50_images(tiny_cnn):
    _compare_road(tiny_cnn, images=50, side=32)


def test_road_means_agree_with_pytorch_grad_cam_road_with_noise(tiny_cnn):
    _compare_road(tiny_cnn, images=8, side=16)


def _compare_road(small_resnet, images: int, side: int):
    from pytorch_grad_cam.metrics.road import ROADCombined, ROADLeastRelevantFirstAverage, ROADMostRelevantFirstAverage
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    torch.manual_seed(6)
    count = images
    images = torch.randn(count, 3, side, side)
    maps = torch.rand(count, 1, side, side)
    with torch.no_grad():
        probabilities = torch.softmax(small_resnet(images), dim=1)
    targets = probabilities.argmax(1)
    ours = road_scores(
        _score(small_resnet), images, maps, targets, probabilities.amax(1), MetricSettings(batch_size=64)
    )
    cams = maps[:, 0].numpy()
    reference_targets = [ClassifierOutputSoftmaxTarget(int(t)) for t in targets]
    morf = ROADMostRelevantFirstAverage()(images, cams, reference_targets, small_resnet)
    lerf = ROADLeastRelevantFirstAverage()(images, cams, reference_targets, small_resnet)
    combined = ROADCombined()(images, cams, reference_targets, small_resnet)
    assert float(ours["road_morf"].mean()) == pytest.approx(float(np.mean(morf)), abs=0.01)
    assert float(ours["road_lerf"].mean()) == pytest.approx(float(np.mean(lerf)), abs=0.01)
    assert float(ours["road"].mean()) == pytest.approx(float(np.mean(combined)), abs=0.01)


# --- average drop / increase against torchcam 0.5.0 ----------------------------------------------


class _GivenMaps:
    """A torchcam CAM extractor that hands torchcam's metric our maps (scaled as its extractors do)."""

    def __init__(self, model, maps: torch.Tensor):
        self.model, self.maps = model, maps

    def __call__(self, class_idx=None, scores=None, normalized=True, **kwargs):
        flat = self.maps.flatten(1)
        low, high = flat.amin(1)[:, None, None], flat.amax(1)[:, None, None]
        return [(self.maps - low) / (high - low)]

    def fuse_cams(self, cams):
        return cams[0]

    def _hooks_off(self):
        from contextlib import nullcontext

        return nullcontext()


def test_average_drop_and_increase_equal_torchcam_classification_metric(tiny_cnn):
    small_resnet = tiny_cnn
    from functools import partial

    from torchcam.metrics import ClassificationMetric

    torch.manual_seed(7)
    images = torch.randn(6, 3, 48, 48)
    maps = torch.rand(6, 48, 48) ** 3
    with torch.no_grad():
        probabilities = torch.softmax(small_resnet(images), dim=1)
    ours = confidence_change(
        _score(small_resnet), images, maps[:, None], probabilities.argmax(1), probabilities.amax(1)
    )
    reference = ClassificationMetric(_GivenMaps(small_resnet, maps), partial(torch.softmax, dim=-1))
    reference.update(images)
    summary = reference.summary()
    assert float(ours["avg_drop"].mean()) == pytest.approx(summary["avg_drop"], abs=1e-5)
    assert float(ours["increase"].mean()) == pytest.approx(summary["conf_increase"], abs=1e-9)


# --- localisation: the formulas of Quantus 0.6.0, written out per image --------------------------


def _quantus_style(a: np.ndarray, s: np.ndarray) -> tuple[float, float, float]:
    a, s = a.ravel(), s.ravel().astype(bool)
    hit = bool(np.any(s[np.argwhere(a == a.max()).ravel()]))  # PointingGame
    positive = np.clip(a, 0, None)
    mass = positive[s].sum() / positive.sum()  # RelevanceMassAccuracy on the map's positive part
    k = int(s.sum())
    top = np.argsort(-a, kind="stable")[:k]
    rank = len(np.intersect1d(top, np.flatnonzero(s))) / k  # RelevanceRankAccuracy
    return float(hit), float(mass), float(rank)


def test_localisation_equals_the_pointing_game_relevance_mass_and_rank_formulas():
    rng = np.random.default_rng(8)
    maps = rng.random((3, 2, 20, 24)).astype(np.float32)
    maps[0, 1, 2, 3] = 5.0  # a peak outside the object
    masks = np.zeros((3, 20, 24), dtype=bool)
    masks[:, 5:12, 6:15] = True
    masks[2] = False
    masks[2, 0:3, 0:4] = True
    ours = localisation(torch.from_numpy(maps), torch.from_numpy(masks))
    assert float(ours["pointing"][0, 1]) == 0.0
    for b in range(3):
        for m in range(2):
            hit, mass, rank = _quantus_style(maps[b, m], masks[b])
            assert float(ours["pointing"][b, m]) == hit
            assert float(ours["mass"][b, m]) == pytest.approx(mass, abs=1e-6)
            assert float(ours["rank"][b, m]) == pytest.approx(rank, abs=1e-6)


def test_localisation_is_nan_for_an_empty_mask():
    values = localisation(torch.rand(1, 1, 8, 8), torch.zeros(1, 8, 8, dtype=torch.bool))
    assert all(bool(torch.isnan(v).all()) for v in values.values())


# --- the pointing game's tolerance (Zhang et al. 2018: 15 px) -------------------------------------


def _peak_at(y: int, x: int, size=(20, 20)) -> torch.Tensor:
    heatmap = torch.zeros(1, 1, *size)
    heatmap[0, 0, y, x] = 1.0
    return heatmap


def test_pointing_counts_a_maximum_closer_than_the_tolerance_in_photo_pixels_as_a_hit():
    """By hand: the object is rows 0-4, the peak at row 10 (6 map pixels below it). A map pixel of 2
    photo pixels in height puts it 12 photo pixels away; in width it changes nothing."""
    mask = torch.zeros(1, 20, 20, dtype=torch.bool)
    mask[0, :5] = True
    peak = _peak_at(10, 3)

    def hit(tolerance, pixel_size=None):
        sizes = None if pixel_size is None else torch.tensor([pixel_size], dtype=torch.float64)
        return float(localisation(peak, mask, tolerance, sizes)["pointing"][0, 0])

    assert hit(0) == 0.0
    assert hit(6) == 0.0 and hit(6.5) == 1.0  # closer than, as TorchRay's acceptance disc
    assert hit(15, (2.0, 1.0)) == 1.0 and hit(12, (2.0, 1.0)) == 0.0 and hit(12.5, (2.0, 1.0)) == 1.0
    assert hit(15, (3.0, 1.0)) == 0.0  # 18 photo pixels away
    assert hit(6.5, (1.0, 3.0)) == 1.0  # a wider pixel: the peak is straight below the object
    # Diagonal: a one-pixel object at (1, 2), the peak at (10, 10): sqrt(9² + 8²) ≈ 12.04 pixels.
    corner = torch.zeros(1, 20, 20, dtype=torch.bool)
    corner[0, 1, 2] = True
    diagonal = (
        localisation(_peak_at(10, 10), corner, 12.0)["pointing"],
        localisation(_peak_at(10, 10), corner, 12.1)["pointing"],
    )
    assert [float(v[0, 0]) for v in diagonal] == [0.0, 1.0]
    # Mass and rank do not take a tolerance.
    for name in ("mass", "rank"):
        assert torch.equal(localisation(peak, mask, 15.0)[name], localisation(peak, mask)[name])


def _torchray_pointing(mask: np.ndarray, point: tuple[int, int], tolerance: float) -> bool:
    """TorchRay's PointingGame.evaluate (Zhang et al.'s benchmark), written out: a hit when an object
    pixel lies in the open disc of radius ``tolerance`` around ``point`` (u: column, v: row)."""
    rows = (np.arange(mask.shape[0], dtype=np.float32) - point[1]) ** 2
    cols = (np.arange(mask.shape[1], dtype=np.float32) - point[0]) ** 2
    accept = (rows[:, None] + cols[None, :]) < tolerance**2
    return bool((mask & accept).any())


@pytest.mark.parametrize("tolerance", [1.5, 4.0, 7.0])
def test_pointing_with_a_tolerance_equals_torchray_pointing_game(tolerance):
    maps, masks = _composite_maps_and_masks()
    ours = localisation(torch.from_numpy(maps[:, None]), torch.from_numpy(masks), tolerance)["pointing"][:, 0]
    theirs = [
        _torchray_pointing(
            mask, tuple(int(v) for v in np.unravel_index(np.argmax(a_map), a_map.shape)[::-1]), tolerance
        )
        for a_map, mask in zip(maps, masks)
    ]
    assert ours.tolist() == [float(v) for v in theirs]
    strict = localisation(torch.from_numpy(maps[:, None]), torch.from_numpy(masks))["pointing"][:, 0]
    assert (ours >= strict).all()  # a tolerance only adds hits


# --- localisation: Quantus 0.6.0 itself on the same maps and masks ------------------------------


def _quantus_localisation(maps: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
    """Quantus's values for ``maps`` (B, H, W) and ``masks`` (B, H, W), without its abs or
    normalisation (ours takes the map as it is). The energy-based pointing game is its
    AttributionLocalisation on the map's positive part; RelevanceMassAccuracy sums signed values."""
    import quantus

    inputs = dict(
        model=None,
        x_batch=np.zeros((len(maps), 3, *maps.shape[1:]), dtype=np.float32),
        y_batch=np.zeros(len(maps), dtype=int),
        a_batch=maps[:, None].astype(np.float32),
        s_batch=masks[:, None].astype(np.float32),
    )
    plain = dict(abs=False, normalise=False, disable_warnings=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its notes on empty masks and on abs=False
        return {
            "pointing": np.array(quantus.PointingGame(**plain)(**inputs), dtype=float),
            "mass": np.array(quantus.AttributionLocalisation(positive_attributions=True, **plain)(**inputs)),
            "signed_mass": np.array(quantus.RelevanceMassAccuracy(**plain)(**inputs)),
            "rank": np.array(quantus.RelevanceRankAccuracy(**plain)(**inputs)),
        }


def _ours(maps: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
    values = localisation(torch.from_numpy(maps[:, None]), torch.from_numpy(masks))
    return {name: value[:, 0].numpy().astype(float) for name, value in values.items()}


def _composite_maps_and_masks() -> tuple[np.ndarray, np.ndarray]:
    """Eight maps of 24×32: a blob on the object, a blob beside it, noise, signed noise; masks of
    different sizes and places."""
    rng = np.random.default_rng(11)
    height, width = 24, 32
    yy, xx = np.mgrid[:height, :width]
    maps, masks = [], []
    for index in range(8):
        top, left = rng.integers(0, height - 8), rng.integers(0, width - 10)
        mask = np.zeros((height, width), dtype=bool)
        mask[top : top + rng.integers(4, 9), left : left + rng.integers(5, 11)] = True
        centre_y, centre_x = (top + 3, left + 3) if index % 2 == 0 else rng.integers(0, [height, width])
        blob = np.exp(-((yy - centre_y) ** 2 + (xx - centre_x) ** 2) / 18.0)
        noise = rng.random((height, width))
        a_map = blob + 0.3 * noise if index < 6 else noise - 0.5  # the last two are signed
        maps.append(a_map.astype(np.float32))
        masks.append(mask)
    return np.stack(maps), np.stack(masks)


def test_localisation_equals_quantus_pointing_game_attribution_localisation_and_rank_accuracy():
    maps, masks = _composite_maps_and_masks()
    ours, theirs = _ours(maps, masks), _quantus_localisation(maps, masks)
    assert 0 < ours["pointing"].sum() < len(maps)  # hits and misses both checked
    np.testing.assert_array_equal(ours["pointing"], theirs["pointing"])
    np.testing.assert_allclose(ours["mass"], theirs["mass"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ours["rank"], theirs["rank"], rtol=1e-6)  # ours in float32
    # On maps with no negative values the energy-based pointing game is RelevanceMassAccuracy too.
    np.testing.assert_allclose(ours["mass"][:6], theirs["signed_mass"][:6], rtol=1e-5)
    assert not np.allclose(ours["mass"][6:], theirs["signed_mass"][6:])


def test_localisation_equals_quantus_when_the_maximum_is_tied_inside_and_outside_the_object():
    maps = np.zeros((3, 16, 16), dtype=np.float32)
    masks = np.zeros((3, 16, 16), dtype=bool)
    masks[:, 4:8, 4:8] = True
    maps[0, 5, 5] = maps[0, 12, 12] = 1.0  # one of two equal peaks on the object: a hit
    maps[1, 12, 12] = maps[1, 0, 0] = 1.0  # both equal peaks off it: a miss
    maps[2] = np.round(np.random.default_rng(2).random((16, 16)) * 3) / 4  # four levels, many ties
    maps[2, 4:10, 4:6] = 1.0  # the top level: 12 pixels on the object, the next 4 tied at 0.75
    ours, theirs = _ours(maps, masks), _quantus_localisation(maps, masks)
    np.testing.assert_array_equal(ours["pointing"], [1.0, 0.0, 1.0])
    for name in ("pointing", "mass"):
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-6, err_msg=name)
    # Which of the pixels tied at the K-th place count is the sort's choice (ours stable, Quantus's
    # numpy's default): the rank agrees where the tie does not straddle the object's edge.
    masks[2] = maps[2] >= 0.75
    ours, theirs = _ours(maps, masks), _quantus_localisation(maps, masks)
    assert ours["rank"][2] == theirs["rank"][2] == 1.0


def test_localisation_of_an_empty_mask_is_nan_where_quantus_pointing_game_says_hit():
    maps = np.random.default_rng(3).random((2, 8, 8)).astype(np.float32)
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[1, 2:4, 2:4] = True
    ours, theirs = _ours(maps, masks), _quantus_localisation(maps, masks)
    assert np.isnan([ours["pointing"][0], ours["mass"][0], ours["rank"][0]]).all()
    assert np.isnan([theirs["mass"][0], theirs["rank"][0]]).all()
    # Quantus 0.6.0 writes its NaN into a bool array, where it reads as a hit (docs/metrics.md).
    assert theirs["pointing"][0] == 1.0
    for name in ("pointing", "mass", "rank"):
        assert ours[name][1] == pytest.approx(theirs[name][1], rel=1e-6)


def test_spearman_ranks_ties_by_their_mean_rank_and_handles_constant_maps():
    from scipy.stats import spearmanr

    first = np.array([[0, 0, 1, 2, 2, 5]], dtype=float)
    second = np.array([[3, 1, 1, 0, 2, 2]], dtype=float)
    assert spearman(first, second) == pytest.approx(spearmanr(first.ravel(), second.ravel()).statistic)
    assert spearman(first, first * 3 + 1) == pytest.approx(1.0)
    assert spearman(first, np.zeros_like(first)) == 0.0  # the order was lost
    assert np.isnan(spearman(np.zeros_like(first), first))  # there was no order


# --- randomization: Quantus 0.6.0's MPRT on the same model, maps and layer order --------------


@pytest.fixture(scope="module")
def mprt_run(plain_cnn):
    """Quantus's MPRT on ``plain_cnn`` (top down, Spearman, no abs or normalisation), its
    explain_func our saliency and the edge map; every map it was given is kept."""
    import dataclasses

    import quantus

    from attnexplain.explanation import _as_loaded_model, compute_maps, plan_explanation

    loaded = _as_loaded_model(plain_cnn)
    plan = plan_explanation(loaded, "saliency", size=32)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    targets = plain_cnn(images).argmax(1)

    def maps_of(module, inputs, classes):  # (B, 2, H, W): saliency, edges
        computed = compute_maps(
            dataclasses.replace(loaded, module=module), inputs, plan.methods, plan.layers, targets=classes
        )
        return torch.stack([computed.maps["saliency"].float(), sobel_edges(inputs)], dim=1)

    before = maps_of(plain_cnn, images, targets)
    given = []
    scores = {}
    for m in range(2):

        def explain_func(model, inputs, targets, **_):
            found = maps_of(model, torch.as_tensor(inputs), torch.as_tensor(targets))[:, m].numpy()
            given.append((m, found))
            return found

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scores[m] = quantus.MPRT(layer_order="top_down", seed=0, abs=False, normalise=False, disable_warnings=True)(
                model=plain_cnn,
                x_batch=images.numpy(),
                y_batch=targets.numpy(),
                a_batch=before[:, m].numpy(),
                explain_func=explain_func,
                batch_size=len(images),
            )
    return {
        "model": plain_cnn,
        "images": images,
        "targets": targets,
        "before": before,
        "given": given,
        "scores": scores,
        "maps_of": maps_of,
    }


def test_randomization_order_is_quantus_mprt_top_down_layer_order(mprt_run):
    from attnexplain.randomization import parameter_layers

    model = mprt_run["model"]
    names = {id(module): name for name, module in model.named_modules()}
    theirs = [name for name in mprt_run["scores"][0] if name != "original"]
    assert [names[id(layer)] for layer in parameter_layers(model)] == theirs


def test_randomization_spearman_equals_quantus_mprt_on_the_maps_mprt_computed(mprt_run):
    before = mprt_run["before"].numpy()
    for m in range(2):
        layers = list(mprt_run["scores"][m])  # "original", then one per randomized layer
        after = [found for method, found in mprt_run["given"] if method == m]
        assert len(after) == len(layers)  # one explain_func call per model, the whole batch each
        for layer, maps in zip(layers, after):
            ours = [spearman(before[b, m], maps[b]) for b in range(len(before))]
            np.testing.assert_allclose(
                ours, mprt_run["scores"][m][layer], rtol=1e-9, atol=1e-12, err_msg=f"{m} {layer}"
            )


def test_randomization_agrees_with_quantus_mprt_after_the_whole_model_is_randomized(mprt_run):
    from attnexplain.randomization import randomization_similarities

    images, targets = mprt_run["images"], mprt_run["targets"]
    layers = len(mprt_run["scores"][0]) - 1
    ours = randomization_similarities(
        mprt_run["model"],
        lambda module, step: mprt_run["maps_of"](module, images, targets),
        mprt_run["before"],
        steps=layers,
        seed=0,
    )["spearman"]  # a layer a step, as MPRT
    last = list(mprt_run["scores"][0])[-1]
    # The random weights differ (Quantus reseeds every layer with seed + 1, we draw a seed per layer),
    # so the saliency maps' correlations agree in the mean, not image by image.
    saliency_ours, saliency_theirs = np.mean(ours[:, 0, -1]), np.mean(mprt_run["scores"][0][last])
    assert abs(saliency_ours - saliency_theirs) < 0.15
    assert max(saliency_ours, saliency_theirs) < RANDOMIZATION_LIMIT
    # The edge map ignores the weights: both keep it at ρ = 1 after every layer.
    np.testing.assert_allclose(ours[:, 1, :], 1.0)
    for layer, values in mprt_run["scores"][1].items():
        np.testing.assert_allclose(values, 1.0, err_msg=layer)


# --- randomization: steps, similarities, verdict ------------------------------------------------


def test_randomization_steps_are_the_models_blocks_from_the_head_down(small_resnet, small_vit):
    from attnexplain.randomization import cascade_steps, parameter_layers, randomization_blocks

    resnet = [name for name, _ in randomization_blocks(small_resnet)]
    assert resnet == [
        "fc",
        "layer4.1",
        "layer4.0",
        "layer3.1",
        "layer3.0",
        "layer2.1",
        "layer2.0",
        "layer1.1",
        "layer1.0",
        "bn1 + conv1",
    ]  # a normalisation alone is no step: it joins the next block
    vit = [name for name, _ in randomization_blocks(small_vit)]
    assert vit[:3] == ["heads.head", "encoder.ln + encoder.layers.encoder_layer_2", "encoder.layers.encoder_layer_1"]
    capped = cascade_steps(small_resnet, 3)
    assert [name for name, _ in capped] == ["fc", "layer4.1", "layer4.0 … bn1 + conv1"]
    # The last step leaves no trained parameter; every layer is randomized exactly once.
    randomized = [id(layer) for _, layers in capped for layer in layers]
    assert sorted(randomized) == sorted(id(layer) for layer in parameter_layers(small_resnet))


def test_randomization_similarities_on_signed_and_absolute_maps_as_adebayo():
    from skimage.metrics import structural_similarity

    from attnexplain.randomization import map_similarities, ssim

    rng = np.random.default_rng(4)
    signed = rng.standard_normal((24, 24)).cumsum(0).cumsum(1)  # smooth, both signs
    flipped = map_similarities(signed, -signed)
    assert flipped["spearman"] == pytest.approx(-1.0) and flipped["spearman_abs"] == pytest.approx(1.0)
    assert flipped["ssim_abs"] == pytest.approx(1.0) and flipped["ssim"] < 0
    # Normalised before SSIM: a randomized model's map 1000 times larger is still the same map.
    assert ssim(signed, 1000 * signed) == pytest.approx(1.0)
    scaled = (np.clip(signed / np.percentile(np.abs(signed), 99), -1, 1) + 1) / 2
    other = rng.random((24, 24))
    assert ssim(signed, other) == pytest.approx(
        structural_similarity(
            scaled, (np.clip(other / np.percentile(other, 99), -1, 1) + 1) / 2, win_size=7, data_range=1.0
        )
    )
    assert ssim(other, other * 7, signed=False) == pytest.approx(1.0)
    # Maps without negative values (most methods'): signed and absolute are the same map, and SSIM is
    # not inflated by shifting them into [0.5, 1].
    positive = map_similarities(other, rng.random((24, 24)))
    assert positive["ssim"] == positive["ssim_abs"] < 0.2 and positive["spearman"] == positive["spearman_abs"]
    assert math.isnan(ssim(np.ones((24, 24)), other)) and math.isnan(ssim(other[:2], other[:2]))
    assert math.isnan(map_similarities(np.ones((8, 8)), other[:8, :8])["spearman"])  # no order to keep
    # A randomized model the method could not explain: no value at all, never a similarity to zeros.
    assert all(math.isnan(v) for v in map_similarities(other, np.full((24, 24), np.nan)).values())


def test_randomization_nan_never_counts_as_a_pass():
    from attnexplain.randomization import randomization_scores, randomization_verdict

    nan = math.nan
    # Two images, three steps; the first image's head step could not be measured.
    similarities = {
        "spearman": np.array([[nan, 0.1, 0.0], [0.9, 0.8, 0.1]]),
        "spearman_abs": np.array([[nan, 0.1, 0.0], [0.9, 0.8, 0.1]]),
    }
    head, early = randomization_scores(similarities, 2)
    assert math.isnan(head[0]) and math.isnan(early[0])  # never 0
    assert randomization_verdict(head, early) == (pytest.approx(0.9), True)  # the image with a value judges
    assert randomization_verdict(np.array([nan, nan]), np.array([nan, nan])) == (None, True)
    # The head alone fails a map that ignores it; the early mean alone fails one that changes slowly.
    assert randomization_verdict(np.array([1.0]), np.array([0.45]))[1]
    assert randomization_verdict(np.array([0.4]), np.array([0.6]))[1]
    assert not randomization_verdict(np.array([0.3, -0.2]), np.array([0.4, 0.2]))[1]


# --- the "metrics" key of results.jsonl records (shared schema) ----------------------------------


def _record(**metrics_key):
    return {
        "image": "a.png",
        "output": "images/a.png",
        "detail": "images/a.png/detail.html",
        "predictions": [{"index": 0, "label": None, "prob": 0.9}],
        "target": {"index": 0, "label": None, "prob": 0.9},
        "methods": ["gradcam"],
        "files": {"gradcam": {"overlay": "overlay-gradcam.jpg"}},
        **metrics_key,
    }


@pytest.mark.parametrize(
    "table,problem",
    [
        ({"gradcam": {"deletion": 0.2, "pointing": 1}, "random": {"deletion": 0.5}}, None),
        ({"gradcam": {"deletion": float("nan")}}, "not a finite number"),
        ({"gradcam": {"deletion": True}}, "not a finite number"),
        ({"gradcam": {"deletion": "0.2"}}, "not a finite number"),
        ({"<script>": {"deletion": 0.2}}, "not one of its methods"),
        ({"gradcam": [0.2]}, "not a table of values"),
        ({"gradcam": {f"m{i}": 0.0 for i in range(65)}}, "not a table of values"),
        ({"gradcam": {"x" * 101: 0.0}}, "without a short name"),
        ([["gradcam", 0.2]], "not a table of methods"),
    ],
)
def test_an_earlier_records_metrics_are_validated_on_resume_and_merge(table, problem):
    from attnexplain.records import ok_record_problem

    assert ok_record_problem(_record()) is None
    found = ok_record_problem(_record(metrics=table))
    assert (found is None) if problem is None else (problem in found), found
