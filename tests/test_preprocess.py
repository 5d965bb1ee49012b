"""Preprocessing: the tensor the model sees, and which part of the photo that is."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from attnexplain.errors import AttnExplainError
from attnexplain.preprocess import Preprocessing, from_torchvision_transforms, prepare


def _photo(height=300, width=451):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def test_weights_preset_matches_torchvision_transforms():
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    preprocessing = from_torchvision_transforms(weights.transforms(), source="test")
    assert preprocessing.size == (224, 224) and preprocessing.resize == 256
    pixels = _photo()
    ours = prepare(pixels, preprocessing).tensor
    theirs = weights.transforms()(torch.from_numpy(pixels).permute(2, 0, 1))
    assert ours.shape == (1, 3, 224, 224)
    assert torch.allclose(ours[0], theirs, atol=1e-6)


def test_centre_crop_box_is_the_region_kept():
    preprocessing = Preprocessing(size=(224, 224), resize=256)
    left, top, right, bottom = prepare(_photo(300, 451), preprocessing).box
    # shorter side 300 → 256, so 451 → 384; the 224 crop keeps 224/256 of the height, centred.
    scale = 300 / 256
    assert np.isclose(bottom - top, 224 * scale) and np.isclose(right - left, 224 * scale, atol=1)
    assert np.isclose((left + right) / 2, 451 / 2, atol=scale) and np.isclose((top + bottom) / 2, 150, atol=scale)


def test_no_resize_means_the_whole_photo():
    prepared = prepare(_photo(), Preprocessing(size=(96, 128)))
    assert prepared.tensor.shape == (1, 3, 96, 128)
    assert prepared.box == (0.0, 0.0, 451.0, 300.0)


def test_overrides_keep_the_crop_ratio_and_check_values():
    base = Preprocessing(size=(224, 224), resize=256)
    bigger = base.with_overrides(size=[448])
    assert bigger.size == (448, 448) and bigger.resize == 512
    assert base.with_overrides(mean=[0.5], std=[0.25, 0.25, 0.25]).mean == (0.5, 0.5, 0.5)
    with pytest.raises(AttnExplainError, match="std"):
        base.with_overrides(std=[0, 1, 1])
    with pytest.raises(AttnExplainError, match="mean"):
        base.with_overrides(mean=[0.1, 0.2])
    with pytest.raises(AttnExplainError, match="size"):
        base.with_overrides(size=[2])
