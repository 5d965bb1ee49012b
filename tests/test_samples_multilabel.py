"""The shipped multi-label sample: loaded from disk it reads its scores as sigmoids (its checkpoint
says "multilabel": true), names both objects of held-out two-object composites, and each label's
map peaks on an object more often than a random map would."""

from __future__ import annotations

import numpy as np
import pytest
from composites import LABELS, MULTILABEL_TEST_SEED, make_two_object_composites  # samples/, via conftest

import attnexplain

HELD_OUT = 12


@pytest.mark.heavy
def test_the_multilabel_sample_names_both_objects_and_maps_each_label(tmp_path):
    from conftest import SAMPLES

    model = attnexplain.load_model(SAMPLES / "models" / "multilabel-composites.pt")
    assert model.labels == LABELS and model.scoring.kind == "sigmoid"
    pictures, pairs, masks = make_two_object_composites(HELD_OUT, MULTILABEL_TEST_SEED, 96)
    exact = on_an_object = maps = 0
    area = 0.0
    for picture, objects, object_masks in zip(pictures, pairs, masks):
        named = [LABELS[int(i)] for i in objects]
        explanation = attnexplain.explain(model, picture, "gradcam", target=named)
        exact += sorted(p.label for p in explanation.present) == sorted(named)
        assert sum(p.prob for p in explanation.predictions) > 1.0  # independent probabilities
        for label in named:
            heatmap = explanation.maps[f"gradcam@{label}"].heatmap
            assert explanation.maps[f"gradcam@{label}"].target.label == label
            peak = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
            on_an_object += bool(object_masks.any(axis=0)[peak])
            area += float(object_masks.any(axis=0).mean())
            maps += 1
    assert exact >= HELD_OUT * 0.7  # 89% on 300 held-out images
    assert on_an_object / maps > 2 * area / maps  # 62% on 200 maps, against 19% for a random map
