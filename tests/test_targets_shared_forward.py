"""Several targets of one image at the cost of one forward and a backward per target, where the
method is a CAM of the layer's activation and gradient alone: the maps are bit-equal to those of a whole pass
per target (a contrast's too), and the model runs forward once; methods that need more (Score-CAM's
forwards) keep a pass per target. A model saved to disk and loaded as a user would."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnexplain
from attnexplain.loading import load_model
from attnexplain.options import MethodOptions

SIZE = 24
LABELS = ["cat", "dog", "bird", "fish"]
NET_SOURCE = """
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.features = torch.nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.features(torch.relu(self.stem(x)))).mean((2, 3)))
"""
SHARED = ["gradcam", "gradcampp", "xgradcam", "layercam", "hirescam", "gradcam_elementwise", "eigengradcam"]


@pytest.fixture
def loaded(tmp_path):
    source = tmp_path / "net.py"
    source.write_text(NET_SOURCE)
    namespace: dict = {}
    exec(compile(NET_SOURCE, str(source), "exec"), namespace)
    torch.manual_seed(11)
    weights = tmp_path / "net.pt"
    torch.save({"state_dict": namespace["Net"]().state_dict(), "labels": LABELS}, weights)
    return load_model(weights, arch=f"{source}:Net")


@pytest.fixture
def picture() -> torch.Tensor:
    return torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))


def _forwards(model, call) -> tuple[object, int]:
    count = []
    handle = model.module.register_forward_pre_hook(lambda module, args: count.append(1))
    try:
        return call(), len(count)
    finally:
        handle.remove()


@pytest.mark.parametrize("versus", [None, "fish"])
def test_shared_forward_maps_equal_a_pass_per_target(loaded, picture, versus):
    settings = {"size": SIZE, "layer": "features", "versus": versus}
    together, forwards = _forwards(
        loaded, lambda: attnexplain.explain(loaded, picture, SHARED, target=["cat", "dog", "bird"], **settings)
    )
    assert forwards == 1
    for label in ("cat", "dog", "bird"):
        alone = attnexplain.explain(loaded, picture, SHARED, target=label, **settings)
        for method in SHARED:
            np.testing.assert_array_equal(together.maps[f"{method}@{label}"].heatmap, alone.maps[method].heatmap)
            assert together.maps[f"{method}@{label}"].target.label == label


def test_a_method_of_many_forwards_keeps_a_pass_per_target(loaded, picture):
    options = MethodOptions(batch_size=64)
    together, forwards = _forwards(
        loaded,
        lambda: attnexplain.explain(
            loaded, picture, "scorecam", target=["cat", "dog"], size=SIZE, layer="features", options=options
        ),
    )
    alone = attnexplain.explain(loaded, picture, "scorecam", target="dog", size=SIZE, layer="features", options=options)
    np.testing.assert_allclose(together.maps["scorecam@dog"].heatmap, alone.maps["scorecam"].heatmap, rtol=1e-5)
    assert forwards >= 4  # a forward of its own and Score-CAM's masked copies, per target


def test_a_contrast_with_one_of_the_shared_targets_is_refused(loaded, picture):
    with pytest.raises(attnexplain.errors.MethodError, match="same class"):
        attnexplain.explain(loaded, picture, "gradcam", target=["cat", "dog"], versus="dog", size=SIZE)
