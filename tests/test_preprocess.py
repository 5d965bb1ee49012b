"""Preprocessing: the tensor the model sees, and which part of the photo that is."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms.v2.functional

from attnexplain.errors import AttnExplainError
from attnexplain.preprocess import Preprocessing, from_torchvision_transforms, prepare


def _photo(height=300, width=451):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _camera_photo(size=(451, 300)):
    """A real photo (scikit-image's coffee) at a size that is no multiple of the crop: random noise
    would hide how a resize treats smooth regions, where the kernels' roundings show."""
    from PIL import Image
    from skimage import data

    return np.asarray(Image.fromarray(data.coffee()).resize(size, Image.Resampling.BICUBIC))


@pytest.mark.parametrize(
    "weights_name",
    [
        "ResNet18_Weights.IMAGENET1K_V1",  # bilinear, 256 → 224
        "EfficientNet_B3_Weights.IMAGENET1K_V1",
    ],
)  # bicubic, 320 → 300
def test_weights_preset_matches_torchvision_transforms(weights_name):
    from PIL import Image
    from torchvision.transforms import v2

    weights = torchvision.models.get_weight(weights_name)
    preset = weights.transforms()
    preprocessing = from_torchvision_transforms(preset, source="test")
    pixels = _camera_photo()
    ours = prepare(pixels, preprocessing).tensor[0]
    assert ours.shape == (3, *preset.crop_size * 2)
    # The same preset written with torchvision.transforms.v2 on the uint8 photo: the same 8-bit
    # pixels (one grey level is 0.017 after normalising; what is left is float rounding).
    as_v2 = v2.Compose(
        [
            v2.Resize(preset.resize_size, interpolation=preset.interpolation, antialias=True),
            v2.CenterCrop(preset.crop_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(preset.mean, preset.std),
        ]
    )
    assert torch.allclose(ours, as_v2(torch.from_numpy(pixels.copy()).permute(2, 0, 1)), atol=1e-5)
    # The preset itself on a PIL image (how ImageFolder feeds it): one grey level at most, rarely.
    on_pil = preset(Image.fromarray(pixels))
    levels = (ours - on_pil).abs() * torch.tensor(preset.std).view(3, 1, 1) * 255
    assert levels.max() < 2.5 and (levels > 0.5).float().mean() < 0.005
    # The v1 kernel on request: the preset on a uint8 tensor, bit for bit.
    v1 = prepare(pixels, replace(preprocessing, resize_v2=False)).tensor[0]
    assert torch.allclose(v1, preset(torch.from_numpy(pixels.copy()).permute(2, 0, 1)), atol=1e-6)
    assert not torch.equal(v1, ours)  # the two kernels do differ: the choice above is a real one


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
    stretched = torchvision.transforms.v2.functional.resize(
        torch.from_numpy(pixels).permute(2, 0, 1), [256, 256], antialias=True
    )
    expected = torchvision.transforms.functional.normalize(
        stretched[:, 16:240, 16:240].float() / 255, list(preprocessing.mean), list(preprocessing.std)
    )
    assert torch.allclose(prepared.tensor[0], expected, atol=1e-6)
    left, top, right, bottom = prepared.box
    assert np.allclose([left, top, right, bottom], [16 * 451 / 256, 16 * 300 / 256, 240 * 451 / 256, 240 * 300 / 256])
    assert preprocessing.with_overrides(size=112).resize_to == (128, 128)
    assert preprocessing.as_dict()["resize_to"] == [256, 256]
    assert "resize_to" not in Preprocessing().as_dict()  # other models' reports are unchanged


def test_crop_rounds_down_puts_an_odd_margins_pixel_after_the_crop():
    pixels = _photo(9, 12)  # a 3-pixel margin across, 2 down: round(1.5) = 2, floor = 1
    kept = {
        flag: prepare(
            pixels, Preprocessing(size=(7, 9), resize=9, crop_rounds_down=flag, mean=(0, 0, 0), std=(1, 1, 1))
        )
        for flag in (False, True)
    }
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
