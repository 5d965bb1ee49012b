"""The OpenCLIP plugin: a tiny open_clip CLIP built here from a configuration file of open_clip's
format, its state_dict saved with torch.save, loaded through ``open_clip:CONFIG:WEIGHTS`` as a user
would; scores checked against the model's own forward, maps against rollout and Chefer written out
here with hooks on its nn.MultiheadAttention."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")

from attnexplain_openclip.plugin import plugin  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from PIL import Image  # noqa: E402

from attnexplain import explain, load_model  # noqa: E402
from attnexplain.cli import main  # noqa: E402
from attnexplain.errors import AttnExplainError, ModelLoadError  # noqa: E402
from attnexplain.plugin_api import use_plugins  # noqa: E402
from attnexplain.preprocess import prepare  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
IMAGE = REPO / "samples" / "images" / "cat-on-grass.png"
PROMPTS = ("a photo of a cat", "a photo of a dog", "grass")
CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8, "mlp_ratio": 2},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(autouse=True)
def openclip_installed():
    with use_plugins(plugin, keep_installed=True):
        yield


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("openclip")
    (folder / "tiny-clip.json").write_text(json.dumps(CONFIG))
    torch.manual_seed(0)
    model = open_clip.CLIP(**CONFIG).eval()
    torch.save(model.state_dict(), folder / "tiny-clip.pt")
    return folder / "tiny-clip.json", folder / "tiny-clip.pt"


def _name(saved) -> str:
    return f"open_clip:{saved[0]}:{saved[1]}"


def _reference(saved) -> torch.nn.Module:
    model = open_clip.CLIP(**json.loads(saved[0].read_text())).eval()
    model.load_state_dict(torch.load(saved[1], weights_only=True))
    return model


def _pixels(loaded) -> torch.Tensor:
    return prepare(np.asarray(Image.open(IMAGE).convert("RGB")), loaded.preprocessing).tensor


def _text(model, prompts) -> torch.Tensor:
    tokens = open_clip.tokenizer.SimpleTokenizer(context_length=16)(list(prompts))
    with torch.no_grad():
        return F.normalize(model.encode_text(tokens), dim=-1)


def test_an_open_clip_name_scores_prompts_by_the_models_own_logits_and_softmax(saved):
    loaded = load_model(_name(saved), prompts=PROMPTS)
    assert loaded.plugin.name == "openclip" and loaded.labels == list(PROMPTS)
    pixels = _pixels(loaded)
    assert tuple(pixels.shape[-2:]) == (32, 32)
    with torch.no_grad():
        logits = loaded.module(pixels)
    model = _reference(saved)
    tokens = open_clip.tokenizer.SimpleTokenizer(context_length=16)(list(PROMPTS))
    with torch.no_grad():
        image, text, scale = model(pixels, tokens)
    expected = scale * image @ text.T
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    _, probabilities = loaded.plugin.class_scores(loaded.module, logits)
    torch.testing.assert_close(probabilities, torch.softmax(expected, dim=1), rtol=1e-4, atol=1e-5)


def test_a_model_with_a_logit_bias_has_a_sigmoid_per_prompt(tmp_path):
    """init_logit_bias in the configuration: trained with the sigmoid loss (SigLIP-style), so each
    prompt's probability is the sigmoid of scale · cosine + bias, independent of the others."""
    config = dict(CONFIG, init_logit_bias=-2.0)
    (tmp_path / "biased.json").write_text(json.dumps(config))
    torch.manual_seed(1)
    model = open_clip.CLIP(**config).eval()
    torch.save(model.state_dict(), tmp_path / "biased.pt")
    loaded = load_model(f"open_clip:{tmp_path / 'biased.json'}:{tmp_path / 'biased.pt'}", prompts=PROMPTS)
    pixels = _pixels(loaded)
    with torch.no_grad():
        logits = loaded.module(pixels)
        image = F.normalize(model.encode_image(pixels), dim=-1)
    expected = model.logit_scale.exp() * image @ _text(model, PROMPTS).T + model.logit_bias
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    _, probabilities = loaded.plugin.class_scores(loaded.module, logits)
    torch.testing.assert_close(probabilities, torch.sigmoid(expected), rtol=1e-4, atol=1e-5)


def _attention_by_hand(model, pixels):
    """Every resblock's per-head attention (need_weights forced on by a pre-hook), in the graph."""
    kept = []

    def per_head(module, args, kwargs):
        return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

    handles = []
    for block in model.visual.transformer.resblocks:
        handles.append(block.attn.register_forward_pre_hook(per_head, with_kwargs=True))
        handles.append(block.attn.register_forward_hook(lambda m, a, out: kept.append(out[1])))
    try:
        image = F.normalize(model.encode_image(pixels), dim=-1)
    finally:
        for handle in handles:
            handle.remove()
    return kept, image


def _same_map(heatmap: np.ndarray, grid: torch.Tensor) -> None:
    reference = F.interpolate(grid.reshape(1, 1, 4, 4), size=(32, 32), mode="bilinear", align_corners=False)
    reference = reference[0, 0].detach().numpy()
    assert reference.max() > 0
    np.testing.assert_allclose(heatmap / heatmap.max(), reference / reference.max(), atol=1e-4)


def test_rollout_and_chefer_are_the_class_tokens_through_the_visual_resblocks(saved):
    loaded = load_model(_name(saved), prompts=PROMPTS)
    explanation = explain(loaded, IMAGE, ["rollout", "chefer"], target="grass")
    assert explain(loaded, IMAGE, "auto", target="grass").method == "chefer"
    model = _reference(saved)
    attentions, image = _attention_by_hand(model, _pixels(loaded))
    assert attentions[0].shape == (1, 2, 17, 17)
    rollout = torch.eye(17)
    for attention in attentions:
        mixed = 0.5 * attention[0].detach().mean(dim=0) + 0.5 * torch.eye(17)
        rollout = (mixed / mixed.sum(dim=-1, keepdim=True)) @ rollout
    _same_map(explanation.maps["rollout"].heatmap, rollout[0, 1:])
    score = (model.logit_scale.exp() * image @ _text(model, ["grass"]).T)[0, 0]
    gradients = torch.autograd.grad(score, [attention._base for attention in attentions])
    relevance = torch.eye(17)
    for attention, gradient in zip(attentions, gradients):
        weighted = torch.relu(gradient.reshape(attention.shape)[0] * attention[0]).mean(dim=0)
        relevance = relevance + weighted @ relevance
    _same_map(explanation.maps["chefer"].heatmap, relevance[0, 1:])


def test_cam_and_legrad_give_each_prompt_its_own_map(saved):
    loaded = load_model(_name(saved), prompts=PROMPTS)
    methods = ["gradcam", "legrad", "attention", "saliency"]
    cat = explain(loaded, IMAGE, methods, target="a photo of a cat")
    grass = explain(loaded, IMAGE, methods, target="grass")
    for method in methods:
        assert np.isfinite(cat.maps[method].heatmap).all(), method
    for method in ("legrad", "saliency"):
        assert not np.allclose(cat.maps[method].heatmap, grass.maps[method].heatmap), method
    assert cat.maps["gradcam"].layers == ["visual.transformer.resblocks.1.ln_1"]
    np.testing.assert_allclose(cat.maps["attention"].heatmap, grass.maps["attention"].heatmap)  # prompt-blind


def test_cli_run_with_prompts_writes_a_report_naming_them(saved, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", _name(saved), str(IMAGE), "--prompts", "a cat,grass", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(next(out.rglob("report.json")).read_text())
    assert "a cat" in json.dumps(report) and "grass" in json.dumps(report)


@pytest.mark.parametrize(
    "arch, weights, says",
    [
        ("ViT-Nope-1", None, "has no architecture"),
        ("ViT-B-32", "no_such_tag", "neither a weights file nor a pretrained tag"),
        ("ViT-B-32", "laion2b_s34b_b79k", "nothing is downloaded"),
    ],
)
def test_unknown_names_and_uncached_tags_are_refused_in_one_line(arch, weights, says, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HOME", str(tmp_path))
    name = f"open_clip:{arch}" + (f":{weights}" if weights else "")
    with pytest.raises(AttnExplainError, match=says) as refused:
        load_model(name, prompts=PROMPTS)
    assert "\n" not in str(refused.value)


def test_a_pretrained_tag_is_read_from_open_clips_cache_without_downloading(saved, tmp_path, monkeypatch):
    """ViT-B-32:laion2b_s34b_b79k resolves to the file the Hugging Face cache holds for its hub
    repository. The tiny weights put there do not fit ViT-B-32: the refusal names the cached file,
    which shows that it was found and read (and that nothing else was fetched)."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    (snapshot / "open_clip_pytorch_model.bin").write_bytes(saved[1].read_bytes())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(ModelLoadError, match="do not fit") as refused:
        load_model("open_clip:ViT-B-32:laion2b_s34b_b79k", prompts=PROMPTS)
    assert str(snapshot / "open_clip_pytorch_model.bin") in str(refused.value)


def test_hostile_files_are_refused_in_one_line(saved, tmp_path):
    other = dict(CONFIG, embed_dim=8)
    (tmp_path / "other.json").write_text(json.dumps(other))
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint" * 20)
    (tmp_path / "list.json").write_text("[1, 2]")
    # Memory bombs: refused before open_clip allocates anything (this would ask for ~10¹³ parameters).
    wide = dict(CONFIG, vision_cfg=dict(CONFIG["vision_cfg"], width=10**6))
    (tmp_path / "wide.json").write_text(json.dumps(wide))
    deep = dict(CONFIG, text_cfg=dict(CONFIG["text_cfg"], layers=250, width=16_000))
    (tmp_path / "deep.json").write_text(json.dumps(deep))
    cases = [
        (f"open_clip:{tmp_path / 'other.json'}:{saved[1]}", "do not fit"),
        (f"open_clip:{saved[0]}:{tmp_path / 'garbage.pt'}", "could not be read as a state_dict"),
        (f"open_clip:{tmp_path / 'list.json'}:{saved[1]}", "holds no vision_cfg"),
        (f"open_clip:{tmp_path / 'wide.json'}:{saved[1]}", r"vision_cfg\.width = 1000000"),
        (f"open_clip:{tmp_path / 'deep.json'}:{saved[1]}", "parameters, more than"),
    ]
    for name, says in cases:
        with pytest.raises(ModelLoadError, match=says) as refused:
            load_model(name, prompts=PROMPTS)
        assert "\n" not in str(refused.value)
    result = CliRunner().invoke(main, ["run", cases[1][0], str(IMAGE), "--prompt", "a cat"])
    assert result.exit_code != 0 and "Traceback" not in result.output


def test_an_open_clip_model_without_prompts_is_refused_naming_the_options(saved):
    with pytest.raises(AttnExplainError, match="--prompt"):
        load_model(_name(saved))


def test_importing_the_plugin_imports_neither_torch_nor_open_clip():
    code = (
        "import sys, attnexplain, attnexplain_openclip.plugin; "
        "print(sorted(m for m in ('torch', 'open_clip') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_batch_with_prompts_encodes_the_text_once_and_writes_the_gallery(saved, tmp_path, monkeypatch):
    from attnexplain_openclip import plugin as plugin_module

    images = tmp_path / "images"
    images.mkdir()
    for index in range(3):
        Image.open(IMAGE).convert("RGB").rotate(90 * index).save(images / f"{index}.png")
    calls = []
    original = plugin_module.encode_prompts
    monkeypatch.setattr(plugin_module, "encode_prompts", lambda *a: calls.append(a) or original(*a))
    out = tmp_path / "out"
    args = ["batch", _name(saved), str(images), "--prompts", ",".join(PROMPTS), "--method", "chefer", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert len(calls) == 1
    assert json.loads((out / "report.json").read_text())["run"]["model_spec"]["prompts"] == list(PROMPTS)
    assert (out / "index.html").is_file()
