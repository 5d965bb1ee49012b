"""Squeeze-and-excitation gates: the learned channel attention of EfficientNet, MobileNetV3, RegNetY."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision

import attnexplain
from attnexplain.errors import MethodError
from attnexplain.preprocess import Preprocessing, prepare


@pytest.fixture(scope="module")
def gated_model():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=5).eval()
    with torch.no_grad():  # random, non-uniform gates (a fresh model's are all 0.5)
        for module in model.modules():
            if isinstance(module, torchvision.ops.SqueezeExcitation):
                module.fc2.bias.normal_(0, 2)
        # A fresh MobileNetV3's signal dies out before its head: every class would score 0, which
        # run and batch refuse for maps of a class (gradcam beside gates)
        model.classifier[-1].bias.normal_(0, 1)
    return model


def test_gates_are_the_values_the_blocks_multiply_by(gated_model):
    from skimage import data

    image = data.chelsea()
    result = attnexplain.explain(gated_model, image, "gates", size=96)
    blocks = [n for n, m in gated_model.named_modules() if isinstance(m, torchvision.ops.SqueezeExcitation)]
    summary = result.maps["gates"].gates
    assert [entry["block"] for entry in summary] == blocks
    # Independent: the block's input and output, from plain hooks; gate = output / input.
    store = {}
    block = gated_model.get_submodule(blocks[-1])
    handle = block.register_forward_hook(lambda m, i, o: store.update(inp=i[0], out=o))
    with torch.no_grad():
        gated_model(prepare(image, Preprocessing(size=(96, 96))).tensor)
    handle.remove()
    ratio = (store["out"] / store["inp"]).flatten(2).nanmedian(dim=2).values[0]
    top = summary[-1]["top"]
    expected = torch.topk(ratio, len(top))
    assert [t["channel"] for t in top] == expected.indices.tolist()
    assert np.allclose([t["gate"] for t in top], expected.values.numpy(), atol=1e-5)
    assert abs(summary[-1]["mean"] - float(ratio.mean())) < 1e-4
    maps = result.maps["gates"].gate_maps
    assert maps.shape[0] == 8 and np.allclose(maps[0], store["inp"][0, top[0]["channel"]].numpy())


def test_gates_report_and_refusal(tmp_path, gated_model, small_resnet):
    from skimage import data

    result = attnexplain.explain(gated_model, data.coffee(), "gates,gradcam", size=96)
    report = result.save(tmp_path / "out")
    assert report["maps"]["gates"]["gates"][-1]["top"]
    assert (tmp_path / "out" / report["outputs"]["maps"]["gates"]["gate_maps"]).is_file()
    assert "Learned channel gates" in (tmp_path / "out" / "report.html").read_text()
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report
    with pytest.raises(MethodError, match="squeeze-and-excitation"):
        attnexplain.explain(small_resnet, data.coffee(), "gates", size=64)
