"""The Python API takes what a notebook holds: PIL images, float arrays, tensors, a module and its
labels; and it fails the way the CLI does (one clear line) on what it cannot use."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import attnexplain
from attnexplain.errors import AttnExplainError, ImageError, ModelLoadError
from attnexplain.images import image_from


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    """A non-square RGB picture, (40, 56, 3) uint8."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)


def test_method_options_are_a_top_level_name_and_import_attnexplain_stays_light():
    from attnexplain.options import MethodOptions

    assert attnexplain.MethodOptions is MethodOptions and "MethodOptions" in dir(attnexplain)
    code = "import sys, attnexplain; attnexplain.MethodOptions(steps=4); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_every_in_memory_form_gives_the_same_pixels(pixels):
    floats = pixels.astype(np.float64) / 255.0
    tensor = torch.from_numpy(floats.transpose(2, 0, 1)).float()
    forms = {
        "uint8 array": pixels,
        "PIL image": Image.fromarray(pixels),
        "float array": floats,
        "float32 array": floats.astype(np.float32),
        "(3, H, W) tensor": tensor,
        "(1, 3, H, W) tensor": tensor[None],
        "uint8 tensor (torchvision.io)": torch.from_numpy(pixels.transpose(2, 0, 1).copy()),
    }
    for form, image in forms.items():
        converted = image_from(image)
        assert converted.size == (56, 40), form
        assert np.abs(converted.pixels.astype(int) - pixels).max() <= 1, form


def test_grayscale_forms_become_three_equal_channels(pixels):
    gray = pixels[:, :, 0]
    for image in (
        gray.astype(np.float32) / 255.0,
        torch.from_numpy(gray[None].astype(np.float32) / 255.0),
        Image.fromarray(gray),
    ):
        converted = image_from(image).pixels
        assert converted.shape == (40, 56, 3)
        assert np.abs(converted[:, :, 2].astype(int) - gray).max() <= 1


@pytest.mark.parametrize(
    "image, message",
    [
        (np.full((8, 8, 3), 255.0), r"values in \[0, 1\]; this one spans \[255, 255\]"),
        (np.full((8, 8, 3), np.nan), "NaN or infinite"),
        (np.zeros((8, 8, 3), dtype=np.int64), "uint8 \\(0-255\\) or floats in \\[0, 1\\], not int64"),
        (np.zeros((8, 8, 5), dtype=np.uint8), r"shape \(H, W\), \(H, W, 3\) or \(H, W, 4\), not uint8 \(8, 8, 5\)"),
        (np.zeros((0, 8, 3), dtype=np.uint8), "empty"),
        (torch.zeros(2, 3, 8, 8), "One image at a time"),
        (torch.zeros(8, 8, 3), r"\(3, H, W\) or \(1, 3, H, W\), channels first, not \(8, 8, 3\)"),
        (torch.full((3, 8, 8), -1.5), "normalised tensor"),
        ([[0, 1], [1, 0]], "not a list"),
    ],
)
def test_images_that_cannot_be_used_are_clear_errors(image, message):
    with pytest.raises(ImageError, match=message) as error:
        image_from(image)
    assert "\n" not in str(error.value)


def test_explain_takes_a_float_tensor_and_a_module_with_labels(small_resnet, pixels):
    tensor = torch.from_numpy(pixels.transpose(2, 0, 1).astype(np.float32) / 255.0)
    labels = ["cat", "dog", "fox", "owl", "elk"]
    from_tensor = attnexplain.explain(small_resnet, tensor, "gradcam", size=64, labels=labels)
    from_array = attnexplain.explain(small_resnet, pixels, "gradcam", size=64)
    assert from_tensor.target.label in labels
    assert np.allclose(from_tensor.heatmap, from_array.heatmap, atol=1e-2)
    assert from_tensor.target.index == from_array.target.index and from_array.target.label is None
    # The labels are the explanation's: the model given in is not changed.
    loaded = attnexplain.load_model(small_resnet, labels=labels)
    assert loaded.labels == labels and loaded.loader == "object"
    relabelled = attnexplain.explain(loaded, pixels, "gradcam", size=64, labels=list("ABCDE"))
    assert relabelled.target.label in list("ABCDE") and loaded.labels == labels


def test_explain_with_a_missing_gpu_says_so_not_torch(small_resnet, pixels, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(AttnExplainError, match="sees no CUDA GPU"):
        attnexplain.explain(small_resnet, pixels, "gradcam", size=64, device="cuda")
    with pytest.raises(AttnExplainError, match="sees no CUDA GPU"):
        attnexplain.load_model(small_resnet, device="cuda")


def test_a_module_in_memory_is_left_as_it_is(small_resnet):
    parameter = next(small_resnet.parameters())
    before = parameter.requires_grad
    loaded = attnexplain.load_model(small_resnet)
    assert loaded.module is small_resnet and next(small_resnet.parameters()).requires_grad == before
    with pytest.raises(ModelLoadError, match="already built"):
        attnexplain.load_model(small_resnet, arch="resnet18")
    with pytest.raises(ModelLoadError, match="not a dict"):
        attnexplain.load_model({"a": 1})
