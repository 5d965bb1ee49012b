"""Plugin API v2 as the core uses it: forward arguments and the recording context on every forward,
tuple outputs picked by the plugin, the probe skipping outputs that ignore the input, attention
recorded per layer on its own grid, plugin-named methods, and the family-pass registry."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnexplain import explain
from attnexplain.capture import probe_layers
from attnexplain.engine import compute_maps
from attnexplain.errors import MethodError
from attnexplain.loading import LoadedModel
from attnexplain.method_registry import find_method, method_clashes
from attnexplain.methods import METHODS, Method
from attnexplain.options import MethodOptions
from attnexplain.passes import PASSES, PassOutput, register_pass
from attnexplain.planning import default_layer, resolve_methods
from attnexplain.plugin_api import use_plugins
from attnexplain.plugins import ModelPlugin, SpatialAttention, discover_plugins


def _photo(height: int = 40, width: int = 56) -> np.ndarray:
    """A non-square RGB picture with structure (a bright square off centre)."""
    pixels = np.full((height, width, 3), 40, dtype=np.uint8)
    pixels[8:24, 30:50] = (230, 200, 60)
    return pixels


def _loaded(module: nn.Module, plugin: ModelPlugin, size: int = 32) -> LoadedModel:
    from attnexplain.preprocess import Preprocessing

    return LoadedModel(
        module=module.eval(),
        source="<test>",
        loader="object",
        architecture="test",
        plugin=plugin,
        preprocessing=Preprocessing(size=(size, size)),
    )


# --- item 13: forward arguments and the recording context --------------------------------------


class _NeedsScale(nn.Module):
    """A CNN whose forward needs a keyword argument, and notes every call's value."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Linear(6, 3)
        self.seen: list[object] = []

    def forward(self, x: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
        self.seen.append(scale)
        if scale is None:
            raise TypeError("forward() needs scale=")
        return self.head(torch.relu(self.conv(x * scale)).mean(dim=(2, 3)))


class _ScalePlugin(ModelPlugin):
    name = "scale-test"

    def forward_kwargs(self, model, input_size):
        return {"scale": 0.5}


@pytest.mark.parametrize(
    "method",
    [
        "gradcam",
        "scorecam",
        "ablationcam",
        "smoothgradcampp",
        "saliency",
        "integrated_gradients",
        "occlusion",
        "rise",
        "guided_gradcam",
    ],
)
def test_every_forward_gets_the_plugins_keyword_arguments(method):
    model = _NeedsScale()
    loaded = _loaded(model, _ScalePlugin())
    options = MethodOptions(window=8, stride=8, samples=4, steps=4, aug_smooth=method == "gradcam")
    result = explain(
        loaded,
        _photo(),
        method,
        options=options,
        layer="conv" if method in ("gradcam", "scorecam", "ablationcam", "smoothgradcampp", "guided_gradcam") else None,
    )
    assert np.isfinite(result.heatmap).all()
    assert model.seen and all(scale == 0.5 for scale in model.seen)


class _RecordedCNN(nn.Module):
    """Two stages, each with a sigmoid spatial gate, at 16² and 8² for a 32-pixel input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.stage1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.gate1 = nn.Conv2d(4, 1, 3, padding=1)
        self.stage2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.gate2 = nn.Conv2d(4, 1, 3, padding=1)
        self.head = nn.Linear(4, 2)
        self.recording = False
        self.recorded_while: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.recorded_while.append(self.recording)
        x = torch.relu(self.stage1(x))
        x = x * torch.sigmoid(self.gate1(x))
        x = torch.relu(self.stage2(x))
        x = x * torch.sigmoid(self.gate2(x))
        return self.head(x.mean(dim=(2, 3)))


class _SpatialPlugin(ModelPlugin):
    """Records each gate's sigmoid as SpatialAttention on its own grid, inside a recording context."""

    name = "spatial-test"

    def attention_modules(self, model):
        return ["gate1", "gate2"]

    @contextmanager
    def capture_attention(self, model, names, sink):
        def make_hook(name):
            def hook(module, args, output):
                weights = torch.sigmoid(output)[:, 0]
                sink[name] = SpatialAttention(weights, weights.shape[-2], weights.shape[-1])

            return hook

        handles = [model.get_submodule(name).register_forward_hook(make_hook(name)) for name in names]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def _recording(self, model):
        model.recording = True
        try:
            yield
        finally:
            model.recording = False

    def recording(self, model):
        return self._recording(model)


def test_attention_is_recorded_inside_the_plugins_recording_context():
    model = _RecordedCNN()
    explain(_loaded(model, _SpatialPlugin()), _photo(), "attention,gradcam", layer="stage2")
    # The attention pass ran inside the context; the CAM pass outside it.
    assert sorted(model.recorded_while) == [False, True]
    assert model.recording is False


# --- item 11: attention recorded per layer on its own grid -------------------------------------


def test_spatial_attention_map_is_the_mean_of_each_layers_resized_min_max_scaled_map():
    model = _RecordedCNN()
    loaded = _loaded(model, _SpatialPlugin())
    result = explain(loaded, _photo(), "attention")

    # Independently: the gates by hand, each resized bilinearly to the input, scaled to [0, 1].
    from attnexplain.preprocess import prepare

    batch = prepare(_photo(), loaded.preprocessing).tensor
    with torch.no_grad():
        x = torch.relu(model.stage1(batch))
        first = torch.sigmoid(model.gate1(x))
        x = torch.relu(model.stage2(x * first))
        second = torch.sigmoid(model.gate2(x))
    assert first.shape[-1] == 16 and second.shape[-1] == 8
    expected = []
    for gate in (first, second):
        resized = F.interpolate(gate, size=(32, 32), mode="bilinear", align_corners=False)[0, 0].numpy()
        expected.append((resized - resized.min()) / (resized.max() - resized.min()))
    np.testing.assert_allclose(result.heatmap, np.mean(expected, axis=0), atol=1e-5)
    grid = result.maps["attention"].attention_grid
    assert grid.shape == (2, 1, 16, 16)  # per layer and head, at the finest layer's grid


@pytest.mark.parametrize("method", ["rollout", "chefer"])
def test_chaining_methods_are_refused_for_spatial_attention(method):
    loaded = _loaded(_RecordedCNN(), _SpatialPlugin())
    with pytest.raises(MethodError) as refused:
        explain(loaded, _photo(), method)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{method} chains attention")
    assert "--method attention" in message


# --- item 14: tuple outputs -------------------------------------------------------------------


class _TupleLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)

    def forward(self, x):
        features = torch.relu(self.conv(x))
        return features, features.mean()  # (hidden states, an auxiliary value)


class _TupleModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.block = _TupleLayer()
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        features, _ = self.block(x)
        return self.head(features.mean(dim=(2, 3)))


class _FirstOfTuple(ModelPlugin):
    name = "tuple-test"

    def select_output(self, model, layer, output):
        return output[0] if isinstance(output, tuple) else super().select_output(model, layer, output)


def test_a_layer_returning_a_tuple_is_explained_through_the_tensor_the_plugin_picks():
    model = _TupleModel()
    loaded = _loaded(model, _FirstOfTuple())
    result = explain(loaded, _photo(), "gradcam", layer="block")

    # Grad-CAM by hand on the picked tensor: channel weights = mean gradient, ReLU of the sum.
    from attnexplain.preprocess import prepare

    batch = prepare(_photo(), loaded.preprocessing).tensor
    features = torch.relu(model.block.conv(batch)).detach().requires_grad_(True)
    logits = model.head(features.mean(dim=(2, 3)))
    target = int(logits.argmax())
    (gradient,) = torch.autograd.grad(logits[0, target], features)
    cam = torch.relu((gradient.mean(dim=(2, 3), keepdim=True) * features).sum(dim=1))[0].detach()
    expected = F.interpolate(cam[None, None], size=(32, 32), mode="bilinear", align_corners=False)[0, 0]
    np.testing.assert_allclose(result.heatmap, expected.numpy(), rtol=1e-4, atol=1e-6)
    assert result.target.index == target


def test_a_tuple_layer_without_the_plugins_choice_is_refused_in_one_line():
    loaded = _loaded(_TupleModel(), ModelPlugin())
    with pytest.raises(MethodError) as refused:
        explain(loaded, _photo(), "gradcam", layer="block")
    assert "returns tuple, not a tensor" in str(refused.value) and "\n" not in str(refused.value)


def test_the_probe_describes_a_tuple_layer_by_the_tensor_the_plugin_picks():
    model = _TupleModel()
    plugin = _FirstOfTuple()
    probed = probe_layers(
        model, torch.zeros(1, 3, 32, 32), select=lambda name, output: plugin.select_output(model, name, output)
    )
    assert {info.name: info.shape for info in probed}["block"] == (1, 5, 32, 32)


# --- item 16: the probe skips outputs that do not depend on the input ---------------------------


class _BiasTable(nn.Module):
    """Like a relative position bias: a small network applied to a constant table, (1, H, W, heads)."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Linear(2, 4)

    def forward(self, table):
        return self.mlp(table)


class _WithConstantOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bias = _BiasTable()
        self.register_buffer("table", torch.randn(1, 7, 7, 2))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        features = torch.relu(self.conv(x))
        bias = self.bias(self.table)  # (1, 7, 7, 4): 4-D and "spatial", but the same for every input
        return self.head(features.mean(dim=(2, 3))) + bias.mean()


def test_default_layer_skips_a_module_output_that_ignores_the_input():
    model = _WithConstantOutput().eval()
    probed = {info.name: info for info in probe_layers(model, torch.zeros(1, 3, 32, 32))}
    assert probed["bias"].is_spatial and not probed["bias"].depends_on_input
    assert probed["conv"].depends_on_input
    loaded = _loaded(model, ModelPlugin())
    assert default_layer(loaded, torch.zeros(1, 3, 32, 32)) == "conv"
    result = explain(loaded, _photo(), "gradcam")
    assert result.layer == "conv" and result.heatmap.max() > 0


def test_a_model_recording_no_gradient_keeps_every_layer_a_candidate():
    class NoGrad(_WithConstantOutput):
        def forward(self, x):
            with torch.no_grad():
                return super().forward(x)

    probed = probe_layers(NoGrad().eval(), torch.zeros(1, 3, 32, 32))
    assert all(info.depends_on_input for info in probed)


# --- item 12: plugin-named methods ------------------------------------------------------------


def _own_map(attentions, size):
    return attentions[-1].weights  # the last stage's gate, on its own grid


class _NamingPlugin(_SpatialPlugin):
    name = "naming-test"

    def methods(self):
        return [
            Method(
                name="last_gate",
                family="attention",
                needs_gradient=False,
                summary="The last stage's gate.",
                applies_to="tests",
                cost="1 forward",
                paper="Nobody 2026, Tests",
                compute=_own_map,
                scale="gate",
            )
        ]

    def refuse_method(self, model, method):
        return "the test plugin does not do that." if method == "layercam" else None


def test_a_plugins_method_runs_under_its_own_name_and_wording():
    loaded = _loaded(_RecordedCNN(), _NamingPlugin())
    result = explain(loaded, _photo(), "last_gate,attention")
    assert list(result.maps) == ["last_gate", "attention"]
    assert result.maps["last_gate"].heatmap.shape == (32, 32)
    from attnexplain.viewer import method_entry

    with use_plugins(_NamingPlugin()):
        entry = method_entry(result.maps["last_gate"], "cat", 32)
    assert entry["summary"] == "The last stage's gate." and entry["paper"] == "Nobody 2026, Tests"


def test_a_method_the_plugin_refuses_is_an_error_when_named_and_left_out_of_auto():
    loaded = _loaded(_RecordedCNN(), _NamingPlugin())
    with pytest.raises(MethodError, match=r"^layercam: the test plugin does not do that\.$"):
        resolve_methods(loaded, "layercam")

    class AutoPicksRefused(_NamingPlugin):
        def default_method(self, model):
            return "layercam,gradcam"

    names = [m.name for m in resolve_methods(_loaded(_RecordedCNN(), AutoPicksRefused()), "auto")]
    assert names == ["gradcam"]


def test_find_method_names_the_plugin_that_provides_a_method():
    with use_plugins(_NamingPlugin()):
        assert find_method("last_gate").name == "last_gate"
        with pytest.raises(MethodError, match="last_gate is provided by plugin naming-test for its models"):
            find_method("last_gate", ModelPlugin())
        with pytest.raises(MethodError, match="Unknown method 'nonsense'"):
            find_method("nonsense", ModelPlugin())
    assert find_method("gradcam", ModelPlugin()) is METHODS["gradcam"]


def test_a_method_is_built_from_keyword_arguments_only():
    with pytest.raises(TypeError):
        Method("ones", "constant", False, "All ones.", "any", "1 forward", "-", lambda batch: batch)


class _Clashing(ModelPlugin):
    name = "clashing"

    def methods(self):
        return [dataclass_replace(METHODS["gradcam"])]


def dataclass_replace(method: Method) -> Method:
    import dataclasses

    return dataclasses.replace(method, summary="mine")


class _EntryPoint:
    """What discovery reads of an entry point."""

    def __init__(self, name, plugin):
        self.name, self.value, self.dist, self._plugin = name, f"tests:{name}", None, plugin

    def load(self):
        return self._plugin


def test_a_plugin_whose_method_clashes_with_a_built_in_adds_no_method_and_says_why(monkeypatch):
    import importlib.metadata

    from attnexplain.catalog import method_listing
    from attnexplain.method_registry import plugin_methods, refused_plugin_methods

    points = [_EntryPoint("clashing", _Clashing()), _EntryPoint("naming", _NamingPlugin())]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: points)
    # Discovery does not ask for methods (that imports torch, which listings must not pay for).
    found = {info.entry_point: info for info in discover_plugins()}
    assert found["clashing"].plugin is not None and found["naming"].plugin is not None
    clashing = found["clashing"].plugin.name
    with use_plugins(*found.values()):
        assert "'gradcam' has the name of a built-in method" in refused_plugin_methods()[clashing]
        assert find_method("gradcam") is METHODS["gradcam"]  # the built-in keeps its name
        assert all(plugin.name != clashing for plugin, _ in plugin_methods().values())
        listed, errors = method_listing()
        assert "'gradcam' has the name of a built-in method" in errors[clashing]
        assert [m["name"] for m in listed].count("gradcam") == 1
    assert method_clashes(_NamingPlugin()) is None


# --- the registry: a family is a pass registered in one place -----------------------------------


def test_a_new_family_is_a_registered_pass_and_needs_no_dispatcher():
    assert list(PASSES)[:4] == ["cam", "attention", "gates", "input"]

    @register_pass("constant")
    def constant_pass(run, methods):
        maps = {m.name: m.compute(run.batch) for m in methods}
        run.targets()
        return PassOutput(maps=maps, layers={m.name: [] for m in maps and methods})

    try:
        method = Method(
            name="ones",
            family="constant",
            needs_gradient=False,
            summary="All ones.",
            applies_to="any",
            cost="1 forward",
            paper="-",
            compute=lambda batch: torch.ones(batch.shape[0], *batch.shape[-2:]),
        )
        loaded = _loaded(_RecordedCNN(), ModelPlugin())
        computed = compute_maps(loaded, torch.zeros(2, 3, 32, 32), [method, METHODS["gradcam"]], ["stage2"])
        assert list(computed.maps) == ["ones", "gradcam"]
        assert torch.equal(computed.maps["ones"], torch.ones(2, 32, 32))
        with pytest.raises(ValueError, match="already has a pass"):
            register_pass("constant")(constant_pass)
    finally:
        del PASSES["constant"]
    with pytest.raises(MethodError, match="No pass computes the family of ones"):
        compute_maps(loaded, torch.zeros(1, 3, 32, 32), [method], [])
