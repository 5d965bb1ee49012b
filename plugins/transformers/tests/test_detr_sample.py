"""The shipped detection sample (``samples/train_detr.py``, a tiny DETR trained on one-object
composites) loaded from disk: on composites it never saw, the explained box's ``chefer`` map peaks on
the object far more often than a random peak would, and more often than the raw cross-attention."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

from attnexplain.engine import compute_maps  # noqa: E402
from attnexplain.loading import load_model  # noqa: E402
from attnexplain.methods import METHODS  # noqa: E402
from attnexplain.preprocess import prepare  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
HELD_OUT = 40


@pytest.mark.heavy
def test_the_detr_samples_chefer_map_peaks_on_the_detected_object():
    sys.path.insert(0, str(REPO / "samples"))
    from composites import LABELS, TEST_SEED, make_composites

    loaded = load_model(REPO / "samples" / "models" / "detr-composites")
    assert loaded.labels == LABELS and loaded.plugin.task(loaded.module) == "detection"
    images, _, masks = make_composites(HELD_OUT, TEST_SEED, size=64)
    hits = {"chefer": 0, "attention": 0}
    for image, mask in zip(images, masks):
        computed = compute_maps(loaded, prepare(image, loaded.preprocessing).tensor, [METHODS[m] for m in hits], [])
        for method in hits:
            heatmap = computed.maps[method][0].numpy()
            hits[method] += bool(mask[np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)])
    chance = float(masks.mean())  # a random peak's chance of landing on the object
    assert hits["chefer"] / HELD_OUT > 3 * chance
    assert hits["chefer"] > hits["attention"]
