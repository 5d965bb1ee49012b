"""RISE (Petsiuk et al. 2018) against its formula written out, with fixed masks."""

from __future__ import annotations

import numpy as np
import torch
from conftest import correlation

import attnexplain
from attnexplain.explanation import MethodOptions
from attnexplain.images import load_image
from attnexplain.methods.rise import rise, rise_masks
from attnexplain.preprocess import Preprocessing, prepare

SIZE = 64


def test_rise_is_the_probability_weighted_mean_of_its_masks(small_resnet, photo):
    """S = Σᵢ p(target | I ⊙ Mᵢ) · Mᵢ / (N · p), by hand, one masked image at a time, with masks the
    test draws itself (not the method's generator)."""
    image = prepare(load_image(photo).pixels, Preprocessing(size=(SIZE, SIZE))).tensor
    masks = (torch.rand(12, SIZE, SIZE, generator=torch.Generator().manual_seed(5)) > 0.5).float()
    target = 2
    expected = np.zeros((SIZE, SIZE))
    with torch.no_grad():
        for mask in masks:
            probability = torch.softmax(small_resnet(image * mask), dim=1)[0, target]
            expected += float(probability) * mask.double().numpy()
    expected /= len(masks) * 0.5
    probabilities = lambda inputs: torch.softmax(small_resnet(inputs), dim=1)
    computed = rise(None, image, [target], probabilities=probabilities, masks=masks, batch_size=5)
    np.testing.assert_allclose(computed[0].numpy(), expected, rtol=1e-4, atol=1e-6)


def test_rise_masks_are_the_papers():
    masks = rise_masks(40, (SIZE, 48))
    assert masks.shape == (40, SIZE, 48) and masks.min() >= 0 and masks.max() <= 1
    assert 0.35 < float(masks.mean()) < 0.65  # cells kept with probability 0.5
    # Upsampled from a 7 x 7 grid: smooth, so neighbouring pixels are close.
    assert float((masks[:, 1:] - masks[:, :-1]).abs().max()) < 0.2
    torch.testing.assert_close(rise_masks(40, (SIZE, 48)), masks)  # seeded
    assert not torch.equal(masks[0], masks[1])


def test_rise_uses_samples_masks_and_explains_the_target(small_resnet, photo):
    few = attnexplain.explain(
        small_resnet, photo, "rise", size=SIZE, target=1, options=MethodOptions(samples=8, batch_size=3)
    )
    again = attnexplain.explain(
        small_resnet, photo, "rise", size=SIZE, target=1, options=MethodOptions(samples=8, batch_size=8)
    )
    np.testing.assert_allclose(few.heatmap, again.heatmap, rtol=1e-5, atol=1e-7)  # seeded, chunking aside
    image = prepare(load_image(photo).pixels, Preprocessing(size=(SIZE, SIZE))).tensor
    probabilities = lambda inputs: torch.softmax(small_resnet(inputs), dim=1)
    expected = rise(None, image, [1], probabilities=probabilities, masks=rise_masks(8, (SIZE, SIZE)))
    assert correlation(few.heatmap, expected[0].numpy()) >= 0.9999
