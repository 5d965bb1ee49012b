"""Hooks and probes: the layer shapes found without computing equal those of a real forward."""

from __future__ import annotations

import torch

from attnexplain.capture import _probe, probe_layers


def test_probing_on_the_meta_device_finds_the_shapes_of_a_real_forward(small_resnet, small_vit):
    for model, size in ((small_resnet, 64), (small_vit, 64)):
        before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        probed = probe_layers(model, torch.zeros(1, 3, size, size))
        assert probed == _probe(model, torch.zeros(1, 3, size, size))  # a real forward
        after = model.state_dict()  # the model's own tensors stay where and what they were
        assert all(after[name].device.type == "cpu" and torch.equal(after[name], value)
                   for name, value in before.items())


class _OffsetOutsideParameters(torch.nn.Module):
    """Keeps a tensor as a plain attribute, which the meta-device probe cannot move."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2)
        self.offset = torch.ones(4, 1, 1)

    def forward(self, x):
        return self.conv(x) * self.offset


def test_a_model_the_meta_device_cannot_run_is_probed_all_the_same():
    model = _OffsetOutsideParameters()
    probed = probe_layers(model, torch.zeros(1, 3, 16, 16))
    assert [(info.name, info.shape) for info in probed] == [("conv", (1, 4, 7, 7))]
