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


def test_stretch_then_crop_keeps_the_box_it_shows():
    """resize_to stretches the whole photo, then the centre crop is taken (Hugging Face's DeiT)."""
    preprocessing = Preprocessing(size=(224, 224), resize_to=(256, 256))
    pixels = _photo(300, 451)
    prepared = prepare(pixels, preprocessing)
    stretched = torchvision.transforms.functional.resize(torch.from_numpy(pixels).permute(2, 0, 1),
                                                         [256, 256], antialias=True)
    expected = torchvision.transforms.functional.normalize(
        stretched[:, 16:240, 16:240].float() / 255, list(preprocessing.mean), list(preprocessing.std))
    assert torch.allclose(prepared.tensor[0], expected, atol=1e-6)
    left, top, right, bottom = prepared.box
    assert np.allclose([left, top, right, bottom], [16 * 451 / 256, 16 * 300 / 256,
                                                    240 * 451 / 256, 240 * 300 / 256])
    assert preprocessing.with_overrides(size=112).resize_to == (128, 128)
    assert preprocessing.as_dict()["resize_to"] == [256, 256]
    assert "resize_to" not in Preprocessing().as_dict()  # other models' reports are unchanged


def test_crop_rounds_down_puts_an_odd_margins_pixel_after_the_crop():
    pixels = _photo(9, 12)  # a 3-pixel margin across, 2 down: round(1.5) = 2, floor = 1
    kept = {flag: prepare(pixels, Preprocessing(size=(7, 9), resize=9, crop_rounds_down=flag,
                                                mean=(0, 0, 0), std=(1, 1, 1)))
            for flag in (False, True)}
    assert kept[True].box == (1.0, 1.0, 10.0, 8.0) and kept[False].box == (2.0, 1.0, 11.0, 8.0)
    assert torch.allclose(kept[True].tensor[0] * 255, torch.from_numpy(pixels[1:8, 1:10]).permute(2, 0, 1).float())


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
