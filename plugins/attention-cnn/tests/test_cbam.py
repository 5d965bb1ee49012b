"""The CBAM CNN and its plugin method ``cbam_spatial``: per-stage spatial attention, each on its own
grid, shown under its own name beside Grad-CAM.

Run from the repository root: ``.venv/bin/python -m pytest -q plugins/attention-cnn/tests``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("ATTNEXPLAIN_OFFLINE", "1")  # nothing here may download

from attnexplain_attention_cnn.cbam import CBAMCNN  # noqa: E402
from attnexplain_attention_cnn.model import AttentionPoolingCNN  # noqa: E402
from attnexplain_attention_cnn.plugin import CBAM_SPATIAL  # noqa: E402
from attnexplain_attention_cnn.plugin import plugin as attention_plugin  # noqa: E402

from attnexplain import explain  # noqa: E402
from attnexplain.errors import MethodError  # noqa: E402
from attnexplain.loading import load_model  # noqa: E402
from attnexplain.method_registry import find_method, plugin_methods  # noqa: E402
from attnexplain.preprocess import Preprocessing, prepare  # noqa: E402

KWARGS = {"channels": [8, 16, 16, 24], "reduction": 4, "image_size": 64}


@pytest.fixture(scope="module")
def cbam_model() -> CBAMCNN:
    """Random weights with random BatchNorm statistics, so that the spatial maps are far from flat."""
    torch.manual_seed(0)
    model = CBAMCNN(num_classes=4, **KWARGS)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    """A real photo (Chelsea the cat, scikit-image, CC0), not square, as RGB uint8."""
    from skimage import data

    return data.chelsea()[::4, ::4].copy()


def _spatial_maps_by_hand(model: CBAMCNN, batch: torch.Tensor) -> list[torch.Tensor]:
    """Every stage's Ms = σ(BN(conv7×7([mean; max] over channels of Mc ⊗ F))), from the weights."""
    maps = []
    with torch.no_grad():
        x = model.features.stem(batch)
        for name, stage in model.features.named_children():
            if name == "stem":
                continue
            x = stage.convs(x)
            channel = stage.cbam.channel
            pooled = channel.mlp(x.mean(dim=(2, 3))) + channel.mlp(x.amax(dim=(2, 3)))
            x = x * torch.sigmoid(pooled)[:, :, None, None]
            spatial = stage.cbam.spatial
            stacked = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
            weights = torch.sigmoid(spatial.bn(spatial.conv(stacked)))
            maps.append(weights[:, 0])
            x = x * weights
    return maps


def test_cbam_spatial_equals_the_stages_maps_resized_scaled_and_averaged(cbam_model, picture):
    result = explain(cbam_model, picture, CBAM_SPATIAL)
    batch = prepare(picture, Preprocessing(size=(64, 64))).tensor
    stage_maps = _spatial_maps_by_hand(cbam_model, batch)
    assert [tuple(m.shape[-2:]) for m in stage_maps] == [(16, 16), (8, 8), (4, 4)]  # own grids
    scaled = []
    for stage_map in stage_maps:
        resized = F.interpolate(stage_map[:, None], size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
        scaled.append((resized - resized.min()) / (resized.max() - resized.min()))
    expected = torch.stack(scaled).mean(dim=0).numpy()
    np.testing.assert_allclose(result.heatmap, expected, atol=1e-5)
    grid = result.maps[CBAM_SPATIAL].attention_grid
    assert grid.shape == (3, 1, 16, 16)
    np.testing.assert_allclose(grid[0, 0], stage_maps[0][0].numpy(), atol=1e-6)  # the finest as is


def test_recording_leaves_the_output_unchanged(cbam_model, picture):
    batch = prepare(picture, Preprocessing(size=(64, 64))).tensor
    sink: dict = {}
    with torch.no_grad():
        plain = cbam_model(batch)
        with attention_plugin.capture_attention(cbam_model, cbam_model.spatial_gates, sink):
            recorded = cbam_model(batch)
    assert torch.equal(plain, recorded)
    assert [sink[name].height for name in cbam_model.spatial_gates] == [16, 8, 4]


def test_auto_gives_cbam_spatial_and_gradcam_on_the_last_stage(cbam_model, picture):
    result = explain(cbam_model, picture)
    assert list(result.maps) == [CBAM_SPATIAL, "gradcam"]
    assert result.maps["gradcam"].layers == ["features.stage3"]
    assert result.model.plugin.name == "attention-cnn"


@pytest.mark.parametrize("method", ["rollout", "chefer", "legrad"])
def test_chaining_methods_are_refused_with_one_line(cbam_model, picture, method):
    with pytest.raises(MethodError) as refused:
        explain(cbam_model, picture, method)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{method}: CBAM's spatial attention")


def test_cbam_spatial_is_this_plugins_and_refused_elsewhere(picture):
    assert plugin_methods()[CBAM_SPATIAL][0].name == "attention-cnn"
    assert find_method(CBAM_SPATIAL).paper.startswith("Woo et al. 2018")
    with pytest.raises(MethodError, match="has no CBAM blocks"):
        explain(AttentionPoolingCNN(num_classes=3), picture, CBAM_SPATIAL)
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with pytest.raises(MethodError, match="cbam_spatial is provided by plugin attention-cnn for its models"):
        explain(plain, picture, CBAM_SPATIAL)


def test_cli_writes_cbam_spatial_beside_gradcam_with_its_own_wording(tmp_path, cbam_model):
    from click.testing import CliRunner
    from PIL import Image

    from attnexplain.cli import main

    checkpoint = tmp_path / "cbam.pt"
    torch.save(
        {
            "arch": "CBAMCNN",
            "arch_kwargs": {**KWARGS, "num_classes": 4},
            "state_dict": cbam_model.state_dict(),
            "labels": ["cat", "dog", "car", "cup"],
        },
        checkpoint,
    )
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(photo)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["run", str(checkpoint), str(photo), "--method", f"{CBAM_SPATIAL},gradcam", "--out", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["methods"] == [CBAM_SPATIAL, "gradcam"]
    assert report["model"]["architecture"] == "CBAMCNN"
    folder = Path(report["outputs"]["directory"])
    for method in (CBAM_SPATIAL, "gradcam"):
        heatmap = np.load(folder / report["outputs"]["maps"][method]["heatmap"])
        assert heatmap.shape == (64, 64) and heatmap.max() > heatmap.min()
        assert (folder / report["outputs"]["maps"][method]["overlay"]).is_file()
    page = (folder / report["outputs"]["report_html"]).read_text(encoding="utf-8")
    assert "CBAM: Convolutional Block Attention Module" in page
    assert "learned spatial attention" in page

    refused = CliRunner().invoke(
        main, ["run", str(checkpoint), str(photo), "--method", "rollout", "--out", str(tmp_path / "refused")]
    )
    assert refused.exit_code != 0
    lines = refused.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: rollout: CBAM's spatial attention"), refused.output
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())


def test_methods_command_lists_cbam_spatial_with_its_plugin():
    from click.testing import CliRunner

    from attnexplain.cli import main

    result = CliRunner().invoke(main, ["methods"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if CBAM_SPATIAL in line)
    assert "attention-cnn" in line and "Woo et al. 2018" in line


def test_builder_and_checkpoint_load_through_the_plugin(tmp_path, cbam_model):
    checkpoint = tmp_path / "cbam.pt"
    torch.save(
        {"arch": "CBAMCNN", "arch_kwargs": {**KWARGS, "num_classes": 4}, "state_dict": cbam_model.state_dict()},
        checkpoint,
    )
    loaded = load_model(checkpoint)
    assert isinstance(loaded.module, CBAMCNN) and loaded.plugin.name == "attention-cnn"
    assert loaded.preprocessing.size == (64, 64)  # the plugin reads the model's image_size


SAMPLE_CBAM = Path(__file__).resolve().parents[3] / "samples" / "models" / "cbam-composites.pt"


@pytest.mark.skipif(not SAMPLE_CBAM.is_file(), reason="run from the attnexplain repository, with its samples/")
def test_the_trained_cbam_sample_attends_to_the_object_and_names_its_map():
    """samples/models/cbam-composites.pt (samples/train.py --only cbam), loaded from disk as users do:
    accurate on held-out composites, and its learned spatial attention peaks on the object far more
    often than a peak placed at random would."""
    import sys

    sys.path.insert(0, str(SAMPLE_CBAM.parents[1]))
    from composites import LABELS, TEST_SEED, make_composites

    model = load_model(SAMPLE_CBAM)
    assert model.labels == LABELS and model.architecture == "CBAMCNN"
    images, labels, masks = make_composites(40, TEST_SEED)
    hits = correct = 0
    for image, label, mask in zip(images, labels, masks):
        explanation = explain(model, image)  # auto: the plugin's own map beside Grad-CAM
        assert list(explanation.maps) == [CBAM_SPATIAL, "gradcam"]
        heatmap = explanation.maps[CBAM_SPATIAL].heatmap
        row, column = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
        hits += bool(mask[row, column])
        correct += explanation.predictions[0].index == int(label)
    assert correct / len(masks) >= 0.85
    assert hits / len(masks) >= 0.6 and hits / len(masks) > 3 * masks.mean()
