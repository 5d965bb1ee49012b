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
        assert all(
            after[name].device.type == "cpu" and torch.equal(after[name], value) for name, value in before.items()
        )


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


class _MixedLayouts(torch.nn.Module):
    """A convolution's (B, C, H, W) map, then channels-last (B, H, W, C) layers: torch's LayerNorm
    (its definition says so), a module of its own that keeps that shape (a residual block), one that
    permutes by hand (no evidence: refused) and a softmax along the last dimension (attention)."""

    class Mix(torch.nn.Module):
        def forward(self, x):
            return x + 0.5 * x.roll(1, dims=1)

    class Permuted(torch.nn.Module):
        def forward(self, x):
            return x.permute(0, 2, 3, 1) * 1.0

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.norm = torch.nn.LayerNorm(8)
        self.mix = self.Mix()
        self.permuted = self.Permuted()
        self.attn = torch.nn.Softmax(dim=-1)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        x = self.conv(x)
        y = self.mix(self.norm(x.permute(0, 2, 3, 1)))
        z = self.permuted(x)
        a = self.attn(x[:, :2] @ x[:, :2].transpose(2, 3))  # (B, 2, 16, 16): rows against rows
        return self.head(y.mean(dim=(1, 2)) + z.mean(dim=(1, 2)) + a.mean())


def _loaded_generic(model):
    from attnexplain.loading import LoadedModel
    from attnexplain.plugins import ModelPlugin

    return LoadedModel(
        module=model.eval(), source="<test>", loader="object", architecture="mixed", plugin=ModelPlugin()
    )


def test_channels_last_outputs_are_laid_out_on_evidence_and_refused_without():
    import numpy as np
    import pytest
    import torch.nn.functional as F

    from attnexplain import explain
    from attnexplain.errors import MethodError
    from attnexplain.images import image_from
    from attnexplain.planning import default_layer, layer_maps
    from attnexplain.preprocess import prepare

    model = _MixedLayouts()
    loaded = _loaded_generic(model)
    batch = torch.zeros(1, 3, 64, 64)
    maps = {info.name: shape for info, shape in layer_maps(loaded, batch)}
    # LayerNorm and the block after it are channels-last: read as (B, C, H, W) after a permute.
    assert maps["conv"] == (1, 8, 16, 16) and maps["norm"] == maps["mix"] == (1, 8, 16, 16)
    # A hand-made permute says nothing, and a softmax along the last dimension is attention.
    assert maps["permuted"] is None and maps["attn"] is None
    assert default_layer(loaded, batch) == "mix"

    image = np.random.default_rng(0).random((64, 64, 3)).astype(np.float32)
    result = explain(loaded, image, "gradcam", layer="mix", size=64)
    # Grad-CAM by hand on the (B, C, H, W) map: the channel weights are the mean gradients.
    captured = {}
    hook = model.mix.register_forward_hook(lambda module, args, output: captured.update(out=output))
    tensor = prepare(image_from(image).pixels, result.preprocessing).tensor
    logits = model(tensor)
    hook.remove()
    activation = captured["out"].permute(0, 3, 1, 2)
    gradient = torch.autograd.grad(logits[0, result.target.index], captured["out"])[0].permute(0, 3, 1, 2)
    cam = F.relu((gradient.mean(dim=(2, 3), keepdim=True) * activation).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=(64, 64), mode="bilinear", align_corners=False)[0, 0].detach().numpy()
    assert np.corrcoef(result.heatmap.ravel(), cam.ravel())[0, 1] > 0.999

    for layer, reason in (("permuted", "does not fit the input image"), ("attn", "attention probabilities")):
        with pytest.raises(MethodError, match=reason) as refused:
            explain(loaded, image, "gradcam", layer=layer, size=64)
        assert "\n" not in str(refused.value)


def test_a_plugins_odd_or_failing_layout_word_is_no_word():
    from attnexplain.loading import LoadedModel
    from attnexplain.planning import layer_maps
    from attnexplain.plugins import ModelPlugin

    class Odd(ModelPlugin):
        name = "odd"

        def layer_layout(self, model, layer):
            if layer == "norm":
                raise RuntimeError("broken plugin")
            return "sideways" if layer == "permuted" else ["channels_first"]

    model = _MixedLayouts()
    loaded = LoadedModel(module=model.eval(), source="<test>", loader="object", architecture="mixed", plugin=Odd())
    maps = {info.name: shape for info, shape in layer_maps(loaded, torch.zeros(1, 3, 64, 64))}
    assert maps["norm"] == maps["mix"] == (1, 8, 16, 16) and maps["conv"] == (1, 8, 16, 16)
    assert maps["permuted"] is None and maps["attn"] is None
