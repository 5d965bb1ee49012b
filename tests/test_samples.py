"""The shipped sample models look at the object: the heatmap's peak falls inside its mask."""

from __future__ import annotations

import numpy as np
import pytest
from composites import LABELS, TEST_SEED, make_composites  # samples/, on sys.path via conftest

import attnexplain

HELD_OUT = 40


@pytest.fixture(scope="module")
def held_out():
    return make_composites(HELD_OUT, TEST_SEED)


def _peak_inside(heatmap, mask) -> bool:
    y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return bool(mask[y, x])


@pytest.mark.parametrize(
    "model_file,method",
    [
        ("resnet-composites.pt", "gradcam"),
        ("vit-composites.pt", "rollout"),
    ],
)
def test_peak_falls_inside_the_object_for_most_images(held_out, model_file, method):
    from conftest import SAMPLES

    model = attnexplain.load_model(SAMPLES / "models" / model_file)
    assert model.labels == LABELS
    pixels, labels, masks = held_out
    hits = correct = 0
    for image, label, mask in zip(pixels, labels, masks):
        explanation = attnexplain.explain(model, image, method)
        assert explanation.method == method and explanation.heatmap.shape == mask.shape
        hits += _peak_inside(explanation.heatmap, mask)
        correct += explanation.predictions[0].index == int(label)
    coverage = masks.mean()  # what a randomly placed peak would score
    assert correct / HELD_OUT >= 0.85
    assert hits / HELD_OUT > 0.5 and hits / HELD_OUT > 2 * coverage
