"""Tests of the attnexplain-timm plugin (random weights only; small inputs: a few seconds on 2 cores).

Run with: .venv/bin/python -m pytest -q plugins/timm/tests
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

from attnexplain_timm.plugin import create, plugin  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from attnexplain import explain  # noqa: E402
from attnexplain.cli import main  # noqa: E402
from attnexplain.explanation import compute_maps  # noqa: E402
from attnexplain.images import load_image  # noqa: E402
from attnexplain.loading import LoadedModel, load_model  # noqa: E402
from attnexplain.methods import METHODS  # noqa: E402
from attnexplain.plugins import discover_plugins, select_plugin  # noqa: E402
from attnexplain.preprocess import prepare  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
IMAGE = REPO / "samples" / "images" / "cat-on-grass.png"


def _loaded(model: torch.nn.Module) -> LoadedModel:
    model.eval()
    return LoadedModel(
        module=model,
        source="<test>",
        loader="object",
        architecture=type(model).__name__,
        plugin=select_plugin(model),
        preprocessing=plugin.preprocessing(model),
    )


def _batch(model: torch.nn.Module, size: int) -> torch.Tensor:
    """The sample photo and a noise image, preprocessed as the plugin says, at size x size."""
    torch.manual_seed(0)
    preprocessing = plugin.preprocessing(model).with_overrides(size=size)
    photo = prepare(load_image(IMAGE).pixels, preprocessing).tensor
    noise = (torch.rand(1, 3, size, size) - 0.5) * 4
    return torch.cat([photo, noise])


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


# --- an independent ViT forward: attention written out from the blocks' qkv weights ---------------


def reference_forward(model, batch: torch.Tensor, block_outputs: list | None = None):
    """Every block's attention probabilities (B, heads, T, T), by hand, and the logits; with
    ``block_outputs``, each block's output is appended to it and the graph is kept (for gradients)."""
    with torch.set_grad_enabled(block_outputs is not None):
        x = model.norm_pre(model._pos_embed(model.patch_embed(batch)))  # prefix tokens + positions
        attentions = []
        for block in model.blocks:
            attn = block.attn
            assert isinstance(attn.q_norm, torch.nn.Identity) and isinstance(attn.norm, torch.nn.Identity)
            h = block.norm1(x)
            batch_size, tokens, _ = h.shape
            qkv = h @ attn.qkv.weight.T + attn.qkv.bias
            qkv = qkv.reshape(batch_size, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            probabilities = torch.softmax(q @ k.transpose(-2, -1) / attn.head_dim**0.5, dim=-1)
            attentions.append(probabilities)
            mixed = (probabilities @ v).transpose(1, 2).reshape(batch_size, tokens, -1)
            x = x + block.ls1(mixed @ attn.proj.weight.T + attn.proj.bias)
            x = x + block.ls2(block.mlp(block.norm2(x)))
            if block_outputs is not None:
                block_outputs.append(x)
        logits = model.forward_head(model.norm(x))
    return attentions, logits


def reference_rollout(attentions, prefix_tokens: int, grid: tuple[int, int]) -> np.ndarray:
    """Abnar & Zuidema in NumPy: heads averaged, 0.5·A + 0.5·I row-normalised, chained; class row."""
    joint = None
    for attention in attentions:
        fused = attention.double().numpy().mean(axis=1)
        mixed = 0.5 * fused + 0.5 * np.eye(fused.shape[-1])
        mixed /= mixed.sum(axis=-1, keepdims=True)
        joint = mixed if joint is None else mixed @ joint
    return joint[:, 0, prefix_tokens:].reshape(-1, *grid)


@pytest.fixture(scope="module")
def vit():
    """A fixed-size ViT (dynamic_img_size off): timm's own constructor, as a user would build it."""
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=4).eval()


@pytest.fixture(scope="module")
def deit_distilled():
    """Distilled DeiT (class + distillation token) built by the plugin: dynamic input size."""
    torch.manual_seed(1)
    return create("deit_tiny_distilled_patch16_224", img_size=64, depth=4).eval()


# --- discovery and selection -------------------------------------------------------------------


def test_discovered_through_its_entry_point():
    infos = {info.name: info for info in discover_plugins()}
    assert "timm" in infos, infos
    info = infos["timm"]
    assert info.error is None
    assert (info.distribution, info.version) == ("attnexplain-timm", "0.1.0")
    assert info.plugin.source_prefix == "timm"


def test_selected_for_timm_models_only(vit):
    from torchvision.models.resnet import BasicBlock, ResNet

    assert select_plugin(vit).name == "timm"
    assert select_plugin(create("test_resnet")).name == "timm"
    assert select_plugin(ResNet(BasicBlock, [1, 1, 1, 1])).name != "timm"
    assert plugin.specificity(torch.nn.Linear(2, 2)) is None


def test_preprocessing_follows_pretrained_cfg(vit):
    resnet = plugin.preprocessing(create("resnet18"))
    # crop_pct 0.95 → timm's eval transform: Resize(floor(224 / 0.95)) then CenterCrop(224).
    assert (resnet.size, resnet.resize, resnet.interpolation) == ((224, 224), 235, "bicubic")
    assert resnet.mean == pytest.approx((0.485, 0.456, 0.406)) and resnet.source == "timm pretrained_cfg"
    fixed = plugin.preprocessing(vit)  # cfg says 224, the model only takes its img_size
    assert (fixed.size, fixed.resize, fixed.mean) == ((64, 64), 71, (0.5, 0.5, 0.5))


# --- ViT / DeiT attention ----------------------------------------------------------------------


@pytest.mark.parametrize("which,size,prefix", [("vit", 64, 1), ("deit_distilled", 48, 2)])
def test_rollout_matches_a_hand_computed_reference(which, size, prefix, request):
    model = request.getfixturevalue(which)
    names = plugin.attention_modules(model)
    assert names == [f"blocks.{i}.attn" for i in range(4)]
    grid = plugin.token_grid(model, (size, size))
    assert (grid.prefix_tokens, grid.query, grid.height, grid.width) == (prefix, 0, size // 16, size // 16)

    batch = _batch(model, size)
    reference, reference_logits = reference_forward(model, batch)
    captured = {}
    with torch.no_grad(), plugin.capture_attention(model, names, captured):
        logits = model(batch)
    torch.testing.assert_close(logits, reference_logits, atol=1e-4, rtol=1e-4)
    for name, expected in zip(names, reference):
        torch.testing.assert_close(captured[name], expected, atol=1e-5, rtol=1e-4)

    computed = compute_maps(_loaded(model), batch, [METHODS["rollout"]], [])
    expected = reference_rollout(reference, prefix, (grid.height, grid.width))
    expected = F.interpolate(
        torch.from_numpy(expected)[:, None].float(), size=(size, size), mode="bilinear", align_corners=False
    )[:, 0].numpy()
    heatmaps = computed.maps["rollout"].numpy()
    for image in range(batch.shape[0]):
        assert _pearson(heatmaps[image], expected[image]) >= 0.999


@pytest.mark.parametrize("which,size,prefix", [("vit", 64, 1), ("deit_distilled", 48, 2)])
def test_legrad_matches_the_authors_formula(which, size, prefix, request):
    """Bousselham et al. 2024 by hand: per block l, the model's head (norm, fc_norm, classifier) on
    the mean of that block's output tokens gives sˡ; relu(∂sˡ/∂Aˡ) averaged over heads and queries,
    patch keys only; mean over blocks."""
    model = request.getfixturevalue(which)
    batch = _batch(model, size)
    targets = torch.tensor([1, 3])
    computed = compute_maps(_loaded(model), batch, [METHODS["legrad"]], [], targets=targets)
    tokens = []
    attentions, _ = reference_forward(model, batch.clone().requires_grad_(True), tokens)
    side = size // 16
    for image, target in enumerate(targets.tolist()):
        per_layer = []
        for block_tokens, attention in zip(tokens, attentions):
            score = model.head(model.fc_norm(model.norm(block_tokens.mean(dim=1))))[image, target]
            (gradient,) = torch.autograd.grad(score, attention, retain_graph=True)
            per_layer.append(gradient[image].clamp_min(0).mean(dim=(0, 1))[prefix:])
        grid = torch.stack(per_layer).mean(dim=0).reshape(1, 1, side, side)
        expected = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
        assert _pearson(computed.maps["legrad"][image].numpy(), expected.detach().numpy()) >= 0.999


def test_chefer_gives_a_finite_informative_map(vit):
    result = explain(vit, IMAGE, "chefer", size=64)
    assert result.heatmap.shape == (64, 64)
    assert np.isfinite(result.heatmap).all() and result.heatmap.std() > 0


def test_capture_keeps_the_output_and_restores_fused_attention(vit):
    names = plugin.attention_modules(vit)
    modules = [vit.get_submodule(name) for name in names]
    for module in modules:
        module.fused_attn = True  # the fast path timm takes by default
    batch = _batch(vit, 64)
    with torch.no_grad():
        before = vit(batch)
        sink = {}
        with plugin.capture_attention(vit, names, sink):
            assert not any(module.fused_attn for module in modules)
            during = vit(batch)
        after = vit(batch)
    torch.testing.assert_close(during, before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    assert all(module.fused_attn is True for module in modules)
    assert not any(module.attn_drop._forward_hooks for module in modules)
    assert set(sink) == set(names) and sink[names[0]].shape == (2, 3, 17, 17)  # 1 + 4x4 tokens

    with pytest.raises(RuntimeError, match="boom"), plugin.capture_attention(vit, names, {}):
        raise RuntimeError("boom")  # restored on errors too
    assert all(module.fused_attn is True for module in modules)


def test_recorded_attention_carries_the_models_gradient(deit_distilled):
    from attnexplain.capture import attention_gradients, frozen_parameters

    names = plugin.attention_modules(deit_distilled)
    batch = _batch(deit_distilled, 48)[:1].requires_grad_(True)
    sink = {}
    with frozen_parameters(deit_distilled), plugin.capture_attention(deit_distilled, names, sink):
        score = deit_distilled(batch)[0, 3]
        gradients = attention_gradients(score, [sink[name] for name in names])
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in gradients)
    result = explain(deit_distilled, IMAGE, "auto", size=48)  # auto: rollout, 2 prefix tokens
    assert result.method == "rollout" and result.heatmap.shape == (48, 48)
    assert np.isfinite(result.heatmap).all() and result.heatmap.std() > 0


def test_vits_without_a_class_token_fall_back_to_gradcam_on_the_patch_grid():
    model = create("test_vit2")  # global average pooling, no class token: no query to roll out
    assert plugin.attention_modules(model) == [] and plugin.token_grid(model, (64, 64)) is None
    # The core's choice, the last map it can read: the patch projection (the blocks' tokens have no
    # grid here, and the attention internals are no maps).
    assert plugin.default_layer(model) is None
    result = explain(model, IMAGE, "auto", size=64)
    assert (result.method, result.layer) == ("gradcam", "patch_embed.proj")


@pytest.mark.parametrize("which", ["vit", "deit_distilled"])
def test_gradcam_on_vit_blocks_uses_the_token_grid(which, request):
    """Block outputs are (B, prefix + patches, C): the default layout drops the prefix tokens (class,
    distillation) and lays the patches out as the map, the same as pytorch-grad-cam's ViT
    reshape_transform."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = request.getfixturevalue(which)
    layer = f"blocks.{len(model.blocks) // 2}.norm1"  # the half-depth block's input (vit_cam_block)
    assert plugin.default_layer(model) == layer
    result = explain(model, IMAGE, "gradcam", size=64)
    assert result.layer == layer and result.heatmap.std() > 0
    prefix = model.num_prefix_tokens

    def reshape(tensor):
        patches = tensor[:, prefix:, :].reshape(tensor.size(0), 4, 4, tensor.size(2))
        return patches.permute(0, 3, 1, 2)

    model.requires_grad_(True)
    try:
        with GradCAM(model=model, target_layers=[model.get_submodule(layer)], reshape_transform=reshape) as cam:
            preprocessing = plugin.preprocessing(model).with_overrides(size=64)  # timm's mean/std
            batch = prepare(load_image(IMAGE).pixels, preprocessing).tensor
            reference = cam(input_tensor=batch, targets=[ClassifierOutputTarget(result.target.index)])[0]
    finally:
        model.requires_grad_(False)
    assert np.corrcoef(result.heatmap.ravel(), reference.ravel())[0, 1] >= 0.999


# --- CNNs: Grad-CAM ----------------------------------------------------------------------------


@pytest.mark.parametrize("name,layer", [("convnext_atto", "stages.3"), ("resnet18", "layer4")])
def test_gradcam_on_timm_cnns(name, layer):
    torch.manual_seed(0)
    model = create(name)
    result = explain(model, IMAGE, "auto", size=64)
    assert (result.method, result.layer) == ("gradcam", layer)
    assert result.heatmap.shape == (64, 64)
    assert np.isfinite(result.heatmap).all() and result.heatmap.std() > 0


# --- the command line ----------------------------------------------------------------------------


def _run(*args: str):
    return CliRunner().invoke(main, ["run", *args], catch_exceptions=False)


def _stdout(result) -> str:
    return getattr(result, "stdout", result.output)


@pytest.mark.parametrize("spec,method", [("timm:test_vit", "rollout"), ("timm:test_convnext", "gradcam")])
def test_cli_runs_a_timm_model_by_name(spec, method, tmp_path):
    result = _run(spec, str(IMAGE), "--size", "64", "--out", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(_stdout(result))
    assert report["model"]["plugin"] == "timm" and report["method"] == method
    assert report["preprocessing"]["size"] == [64, 64]
    overlay = Path(report["outputs"]["directory"]) / report["outputs"]["maps"][method]["overlay"]
    assert overlay.is_file() and overlay.stat().st_size > 0


def test_cli_loads_a_state_dict_with_arch(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "weights.pt"
    torch.save(create("test_vit", num_classes=3).state_dict(), weights)
    result = _run(
        str(weights), str(IMAGE), "--arch", "timm:test_vit", "--size", "64", "--out", str(tmp_path / "out"), "--json"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(_stdout(result))
    assert report["model"]["architecture"] == "timm:test_vit" and report["model"]["plugin"] == "timm"
    assert report["method"] == "rollout" and {p["index"] for p in report["predictions"]} <= {0, 1, 2}


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("timm:vit_tiny_patch16_22", "Did you mean vit_tiny_patch16_224"),
        ("timm:resnet50:a1_in1k", "--arch timm:resnet50.a1_in1k"),
    ],
)
def test_cli_errors_are_one_line(spec, expected, tmp_path):
    result = _run(spec, str(IMAGE), "--out", str(tmp_path))
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and expected in lines[0], result.output


def test_named_model_is_what_load_model_returns():
    loaded = load_model("timm:test_vit")
    assert (loaded.loader, loaded.architecture, loaded.plugin.name) == ("timm", "test_vit", "timm")
    assert loaded.preprocessing.size == (160, 160) and loaded.preprocessing.source == "timm pretrained_cfg"
    assert loaded.module.dynamic_img_size is True


def test_arch_names_shared_with_torchvision_stay_torchvisions():
    from attnexplain.plugins import all_builders

    builders = all_builders()
    assert builders["resnet18"][0].name == "torchvision"  # torchvision state_dicts keep working
    assert builders["timm:resnet18"][0].name == "timm"
    assert builders["vit_tiny_patch16_224"][0].name == "timm"  # unambiguous: plain name too
    assert builders["timm:resnet50.a1_in1k"][0].name == "timm"  # pretrained tags: their cfg


# --- channels-last families: laid out, never read as (B, C, H, W) ----------------------------------


def _axis_ratio(heatmap: np.ndarray) -> float:
    """How evenly a map's variation is spread over its two axes: the smaller of the variances of its
    row means and column means over the larger. Stripes (a (B, H, W, C) map read as (B, C, H, W):
    positions along width by channel) vary along one axis only: on timm's Swin at 224 the misread
    last stage and final norm give 0.005-0.006, the right readings 0.4-0.8; other families' right
    maps with random weights gave 0.03 (cpubone_nano's head) to 0.95."""
    centred = heatmap.astype(np.float64) - heatmap.mean()
    rows, columns = centred.mean(axis=1).var(), centred.mean(axis=0).var()
    return float(min(rows, columns) / max(rows, columns, 1e-30))


def _family_representatives() -> dict[str, str]:
    """One small model per timm family (the module of timm.models that builds it), by its name."""
    import re

    sizes = ["atto", "femto", "pico", "nano", "tiny", "xxs", "xs", "small", "s"]

    def smallness(name: str) -> tuple:
        found = [i for i, size in enumerate(sizes) if re.search(rf"(^|_){size}($|_|\d)", name)]
        return (found[0] if found else len(sizes), len(name), name)

    families: dict[str, list[str]] = {}
    for name in timm.list_models():
        module = timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]
        families.setdefault(module, []).append(name)
    return {family: min(names, key=smallness) for family, names in sorted(families.items())}


#: The channels-last families (and ConvNeXt, whose blocks work channels-last inside), at their own
#: input size: Swin's stages, MaxViT's partition attention, MambaOut's stages are (B, H, W, C).
FAST_FAMILIES = {
    "swin_transformer": ("swin_tiny_patch4_window7_224", "norm"),
    "convnext": ("convnext_atto", "stages.3"),
    "maxxvit": ("maxvit_pico_rw_256", "norm"),
    "mambaout": ("mambaout_femto", "stages"),
}


def _explained_without_stripes(name: str, **kwargs):
    torch.manual_seed(0)
    result = explain(load_model(f"timm:{name}"), IMAGE, "gradcam", **kwargs)
    assert np.isfinite(result.heatmap).all() and result.heatmap.std() > 0
    assert _axis_ratio(result.heatmap) > 0.01, (name, result.layer, _axis_ratio(result.heatmap))
    return result


@pytest.mark.parametrize("family", sorted(FAST_FAMILIES))
def test_channels_last_families_are_explained_without_stripes(family):
    name, layer = FAST_FAMILIES[family]
    assert _explained_without_stripes(name).layer == layer


def test_swin_stages_are_laid_out_and_attention_is_no_cam_layer():
    # The model and layer: layers.3 is (1, 7, 7, 768), channels-last.
    _explained_without_stripes("swin_tiny_patch4_window7_224", layer="layers.3")
    result = CliRunner().invoke(main, ["layers", "timm:swin_tiny_patch4_window7_224", "--json"])
    assert result.exit_code == 0, result.output
    listing = json.loads(_stdout(result))
    layers = {layer["name"]: layer for layer in listing["layers"]}
    assert listing["default"] == "norm"
    assert layers["layers.3"]["shape"] == [1, 7, 7, 768] and layers["layers.3"]["map_shape"] == [1, 768, 7, 7]
    assert layers["patch_embed.proj"]["map_shape"] == [1, 96, 56, 56]
    assert not any(name.endswith(("softmax", "attn_drop")) for name in layers)
    # Every channels-last output listed is laid out as channels first.
    for layer in layers.values():
        if len(layer["shape"]) == 4 and layer["shape"][-1] in (96, 192, 384, 768) and layer["shape"][1] < 96:
            assert layer["map_shape"] == [1, layer["shape"][3], *layer["shape"][1:3]], layer


@pytest.mark.heavy
@pytest.mark.parametrize("family", sorted(_family_representatives()))
def test_every_timm_family_is_explained_without_stripes_or_refused_with_a_reason(family):
    from attnexplain.errors import AttnExplainError
    from attnexplain.render import flat_map

    name = _family_representatives()[family]
    torch.manual_seed(0)
    try:
        result = explain(load_model(f"timm:{name}"), IMAGE, "gradcam")
    except AttnExplainError as refused:  # a one-line reason is a promise kept; stripes are not
        assert "\n" not in str(refused)
        return
    assert np.isfinite(result.heatmap).all()
    # A random model's Grad-CAM may be all zero (every weighted channel negative): the report says
    # the map is flat. A map with contrast must not be stripes.
    if flat_map(result.heatmap) is None:
        assert _axis_ratio(result.heatmap) > 0.01, (name, result.layer, _axis_ratio(result.heatmap))


def test_swin_window_attention_is_recorded_where_the_model_puts_each_token():
    from attnexplain.plugins import WindowedAttention

    torch.manual_seed(0)
    model = create("swin_tiny_patch4_window7_224").eval()
    names = plugin.attention_modules(model)
    assert len(names) == 12 and names[1] == "layers.0.blocks.1.attn"  # every block, shifted ones too
    sink: dict = {}
    batch = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        reference = model(batch)
        with plugin.capture_attention(model, names, sink):
            assert torch.allclose(model(batch), reference, atol=1e-4)  # the output is the model's
    recorded = sink["layers.0.blocks.1.attn"]
    assert isinstance(recorded, WindowedAttention) and (recorded.height, recorded.width) == (56, 56)
    assert recorded.probabilities.shape == (1, 64, 3, 49, 49)
    assert torch.allclose(recorded.probabilities.sum(dim=-1), torch.ones(1, 64, 3, 49))
    # Where the block really puts each token: its own roll and partition of a map of position numbers.
    block = model.get_submodule("layers.0.blocks.1")
    windows = {}
    hook = block.attn.register_forward_pre_hook(lambda module, args: windows.update(x=args[0]))
    numbers = torch.arange(56 * 56, dtype=torch.float32).reshape(1, 56, 56, 1).expand(1, 56, 56, 96)
    with torch.no_grad():
        block._attn(numbers.contiguous())
    hook.remove()
    assert torch.equal(windows["x"][:, :, 0].long(), recorded.positions)
    # Rollout (auto) then works on timm's Swin, as on torchvision's.
    result = explain(model, IMAGE, "auto")
    assert result.method == "rollout" and np.isfinite(result.heatmap).all() and result.heatmap.std() > 0
