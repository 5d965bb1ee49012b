"""CLIP and SigLIP explained against text prompts: tiny dual encoders built from configs with a
word-level tokenizer written here, saved with save_pretrained and loaded from disk as a user would;
scores checked against the models' own logits_per_image, maps against Grad-CAM written out here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402
from PIL import Image  # noqa: E402

from attnexplain import explain, load_model  # noqa: E402
from attnexplain.cli import main  # noqa: E402
from attnexplain.errors import AttnExplainError, ModelLoadError  # noqa: E402
from attnexplain.preprocess import prepare  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
IMAGE = REPO / "samples" / "images" / "cat-on-grass.png"
WORDS = ["a", "photo", "of", "the", "cat", "dog", "on", "grass", "rocket", "mug", "b"]
PROMPTS = ("a photo of a cat", "a photo of a dog", "grass")
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def word_tokenizer(words: list[str]):
    """A CLIP byte-pair tokenizer whose merges spell exactly ``words`` (and their letters)."""
    special = ["<|startoftext|>", "<|endoftext|>"]
    vocab: dict[str, int] = {token: index for index, token in enumerate(special)}
    merges: list[tuple[str, str]] = []

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for letter in sorted({c for word in words for c in word}):
        add(letter)
        add(letter + "</w>")
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        merged = symbols[0]
        for symbol in symbols[1:]:
            pair = (merged, symbol)
            if pair not in merges:
                merges.append(pair)
            merged += symbol
            add(merged)
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges)


def _save(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_dual(family: str, folder: Path, seed: int = 0) -> Path:
    """A random CLIP or SigLIP of two blocks a tower, 32-pixel images in 8-pixel patches, saved."""
    torch.manual_seed(seed)
    tokenizer = word_tokenizer(WORDS)
    text = dict(
        TOWER,
        vocab_size=len(tokenizer),
        max_position_embeddings=16,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(TOWER, image_size=32, patch_size=8)
    if family == "clip":
        model = transformers.CLIPModel(
            transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
        )
    else:
        model = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision))
        with torch.no_grad():  # a bias far from 0 shows that it is added
            model.logit_bias.fill_(-1.5)
            model.logit_scale.fill_(1.0)
    return _save(model.eval(), tokenizer, folder)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    return tiny_dual("clip", tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def siglip_folder(tmp_path_factory) -> Path:
    return tiny_dual("siglip", tmp_path_factory.mktemp("siglip") / "tiny-siglip")


def _pixels(loaded) -> torch.Tensor:
    return prepare(np.asarray(Image.open(IMAGE).convert("RGB")), loaded.preprocessing).tensor


def _models_own_logits(folder: Path, family: str, prompts, pixels: torch.Tensor) -> torch.Tensor:
    """logits_per_image of the dual encoder itself, loaded by transformers, on its tokenizer's ids."""
    model_class = transformers.CLIPModel if family == "clip" else transformers.SiglipModel
    model = model_class.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    if family == "clip":
        tokens = tokenizer(list(prompts), padding=True, return_tensors="pt")
        inputs = dict(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
    else:
        tokens = tokenizer(list(prompts), padding="max_length", max_length=16, return_tensors="pt")
        inputs = dict(input_ids=tokens.input_ids)
    with torch.no_grad():
        return model(pixel_values=pixels, **inputs).logits_per_image


def test_clip_with_prompts_scores_each_prompt_by_the_models_own_logits_and_softmax(clip_folder):
    loaded = load_model(clip_folder, prompts=PROMPTS)
    assert loaded.labels == list(PROMPTS)
    assert loaded.plugin.name == "transformers"
    pixels = _pixels(loaded)
    with torch.no_grad():
        logits = loaded.module(pixels)
    expected = _models_own_logits(clip_folder, "clip", PROMPTS, pixels)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    scores, probabilities = loaded.plugin.class_scores(loaded.module, logits)
    torch.testing.assert_close(probabilities, torch.softmax(expected, dim=1), rtol=1e-4, atol=1e-5)
    # The text tower is not part of the classifier: only the vision tower's layers are explained.
    assert not any(name.startswith("text_model") for name, _ in loaded.module.named_modules())


def test_siglip_probabilities_are_a_sigmoid_of_scale_times_cosine_plus_bias_each(siglip_folder):
    loaded = load_model(siglip_folder, prompts=PROMPTS)
    pixels = _pixels(loaded)
    with torch.no_grad():
        logits = loaded.module(pixels)
    expected = _models_own_logits(siglip_folder, "siglip", PROMPTS, pixels)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    _, probabilities = loaded.plugin.class_scores(loaded.module, logits)
    torch.testing.assert_close(probabilities, torch.sigmoid(expected), rtol=1e-4, atol=1e-5)
    assert probabilities.sum().item() != pytest.approx(1.0, abs=1e-3)  # independent, not a softmax


def test_one_clip_prompt_shows_the_cosine_similarity_not_a_softmax_of_one(clip_folder):
    explanation = explain(clip_folder, IMAGE, "gradcam", prompt="a photo of a cat")
    model = transformers.CLIPModel.from_pretrained(clip_folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(clip_folder)
    pixels = _pixels(explanation.model)
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels).pooler_output
        text = model.get_text_features(**tokenizer(["a photo of a cat"], return_tensors="pt")).pooler_output
    cosine = F.cosine_similarity(image, text).item()
    assert explanation.predictions[0].label == "a photo of a cat"
    assert explanation.predictions[0].prob == pytest.approx(cosine, abs=1e-4)
    assert abs(cosine) < 0.999  # a softmax of one prompt would say 1.0
    assert any("cosine similarity" in note for note in explanation.model.notes)


def test_a_prompts_gradcam_is_gradcam_of_its_similarity_at_the_vision_layer(clip_folder):
    layer = "vision_model.encoder.layers.1.layer_norm1"
    explanation = explain(clip_folder, IMAGE, "gradcam", prompts=list(PROMPTS), target="grass", layer=layer)
    # Grad-CAM written out here: hooks on the dual encoder's own layer, the gradient of the
    # similarity logit of "grass" (index 2) computed by transformers' forward.
    model = transformers.CLIPModel.from_pretrained(clip_folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(clip_folder)
    tokens = tokenizer(list(PROMPTS), padding=True, return_tensors="pt")
    pixels = _pixels(explanation.model)
    kept = {}
    module = model.get_submodule(layer)
    handle = module.register_forward_hook(lambda m, a, out: kept.update(out=out) or out.retain_grad())
    try:
        logits = model(pixel_values=pixels, **tokens).logits_per_image
    finally:
        handle.remove()
    logits[0, 2].backward()
    activation, gradient = kept["out"][0, 1:], kept["out"].grad[0, 1:]  # patches, not the class token
    weights = gradient.mean(dim=0)
    cam = torch.relu((activation * weights).sum(dim=1)).reshape(1, 1, 4, 4)
    reference = F.interpolate(cam, size=(32, 32), mode="bilinear", align_corners=False)[0, 0].detach().numpy()
    heatmap = explanation.maps["gradcam"].heatmap
    assert heatmap.shape == reference.shape
    assert reference.max() > 0
    np.testing.assert_allclose(heatmap / heatmap.max(), reference / reference.max(), atol=1e-4)
    assert explanation.target.label == "grass"


def test_prompt_dependent_methods_give_each_prompt_its_own_map_and_rollout_does_not(clip_folder):
    loaded = load_model(clip_folder, prompts=PROMPTS)
    methods = ["chefer", "rollout", "legrad", "gradcam", "saliency"]
    cat = explain(loaded, IMAGE, methods, target="a photo of a cat")
    grass = explain(loaded, IMAGE, methods, target="grass")
    for method in methods:
        assert np.isfinite(cat.maps[method].heatmap).all(), method
    for method in ("chefer", "legrad", "gradcam", "saliency"):
        assert not np.allclose(cat.maps[method].heatmap, grass.maps[method].heatmap), method
    np.testing.assert_allclose(cat.maps["rollout"].heatmap, grass.maps["rollout"].heatmap)  # prompt-blind


def _siglip_by_hand(folder: Path, prompt: str, pixels: torch.Tensor):
    """transformers' own SiglipModel on ``pixels``: the encoder's attention (output_attentions), the
    pooling head's per-head attention (a hook on its nn.MultiheadAttention), each block's tokens,
    and the prompt's logit (scale · cosine + bias), all in one graph."""
    model = transformers.SiglipModel.from_pretrained(folder, attn_implementation="eager").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    tokens = tokenizer([prompt], padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        text = F.normalize(model.get_text_features(input_ids=tokens.input_ids).pooler_output, dim=-1)
    vision = model.vision_model
    kept: dict = {}

    def per_head(module, args, kwargs):
        return args, {**kwargs, "average_attn_weights": False}

    handles = [
        vision.head.attention.register_forward_pre_hook(per_head, with_kwargs=True),
        vision.head.attention.register_forward_hook(lambda m, a, out: kept.update(head=out[1])),
    ]
    handles += [
        block.register_forward_hook(lambda m, a, out, i=i: kept.update({i: out}))
        for i, block in enumerate(vision.encoder.layers)
    ]
    try:
        out = vision(pixel_values=pixels, output_attentions=True)
    finally:
        for handle in handles:
            handle.remove()

    def logit(pooled: torch.Tensor) -> torch.Tensor:
        return (model.logit_scale.exp() * F.normalize(pooled, dim=-1) @ text.T + model.logit_bias)[0, 0]

    blocks = [kept[i][0] if isinstance(kept[i], tuple) else kept[i] for i in range(len(vision.encoder.layers))]
    return model, list(out.attentions), kept["head"], blocks, logit(out.pooler_output), logit


def _on_image(grid: torch.Tensor) -> np.ndarray:
    side = int(grid.numel() ** 0.5)
    image = F.interpolate(grid.reshape(1, 1, side, side), size=(32, 32), mode="bilinear", align_corners=False)
    return image[0, 0].detach().numpy()


def _same_map(heatmap: np.ndarray, reference: np.ndarray) -> None:
    assert reference.max() > 0
    np.testing.assert_allclose(heatmap / heatmap.max(), reference / reference.max(), atol=1e-4)


def test_siglip_rollout_and_raw_attention_read_its_pooling_probe_through_the_encoder(siglip_folder):
    """SigLIP has no class token: its pooling head's probe attends over the patches. Rollout is the
    probe's attention (heads averaged) times the encoder's rollout (½A + ½I per layer, rows
    normalised); raw attention is the probe's attention itself: both by hand here."""
    explanation = explain(siglip_folder, IMAGE, ["rollout", "attention"], prompts=list(PROMPTS), target="grass")
    pixels = _pixels(explanation.model)
    _, attentions, head, _, _, _ = _siglip_by_hand(siglip_folder, "grass", pixels)
    rollout = torch.eye(16)
    for attention in attentions:
        mixed = 0.5 * attention[0].mean(dim=0) + 0.5 * torch.eye(16)
        rollout = (mixed / mixed.sum(dim=-1, keepdim=True)) @ rollout
    probe = head[0].mean(dim=0)  # (1, 16)
    _same_map(explanation.maps["rollout"].heatmap, _on_image(probe @ rollout))
    _same_map(explanation.maps["attention"].heatmap, _on_image(probe))


def test_cli_run_explains_siglip_with_its_attention_methods_and_writes_the_explorer(siglip_folder, tmp_path):
    out = tmp_path / "out"
    methods = "rollout,attention,chefer,legrad"
    args = ["run", str(siglip_folder), str(IMAGE), "--prompts", "a cat,grass", "--method", methods, "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(next(out.rglob("report.json")).read_text())
    text = json.dumps(report)
    assert all(method in text for method in methods.split(","))


def test_siglip_chefer_is_the_probes_gradient_weighted_attention_over_the_encoders_relevance(siglip_folder):
    """Chefer 2021b with the probe as the class token: R = I + Σ Ē·R through the encoder (Ē the
    heads' mean of relu(∇A ⊙ A) for the prompt's logit), then the probe's Ē times R; each prompt
    its own map. By hand on transformers' SiglipModel."""
    loaded = load_model(siglip_folder, prompts=PROMPTS)
    explanation = explain(loaded, IMAGE, "chefer", target="grass")
    assert explain(loaded, IMAGE, "auto", target="grass").method == "chefer"
    other = explain(loaded, IMAGE, "chefer", target="a photo of a cat")
    assert not np.allclose(other.heatmap, explanation.heatmap)
    _, attentions, head, _, score, _ = _siglip_by_hand(siglip_folder, "grass", _pixels(loaded))
    gradients = torch.autograd.grad(score, attentions + [head._base])
    relevance = torch.eye(16)
    for attention, gradient in zip(attentions, gradients[:-1]):
        relevance = relevance + torch.relu(gradient[0] * attention[0]).mean(dim=0) @ relevance
    probe = torch.relu(gradients[-1].reshape(head.shape)[0] * head[0]).mean(dim=0)
    _same_map(explanation.heatmap, _on_image(probe @ relevance))


def test_siglip_legrad_is_its_authors_pooling_head_on_every_blocks_tokens(siglip_folder):
    """LeGrad as its authors define it for SigLIP, by hand on transformers' own SiglipModel: each
    block's tokens through the pooling head (as they are), relu of the prompt's logit's gradient
    with respect to the head's attention in that call, heads averaged, summed over blocks; zeroed
    where the same map for the empty prompt "a photo of a", min-max scaled, is above 0.8."""
    explanation = explain(siglip_folder, IMAGE, "legrad", prompts=list(PROMPTS), target="grass")
    model, _, _, blocks, _, logit = _siglip_by_hand(siglip_folder, "grass", _pixels(explanation.model))
    tokens = transformers.AutoTokenizer.from_pretrained(siglip_folder)(
        ["a photo of a"], padding="max_length", max_length=16, return_tensors="pt"
    )
    with torch.no_grad():
        empty = F.normalize(model.get_text_features(input_ids=tokens.input_ids).pooler_output, dim=-1)
    head = model.vision_model.head
    kept: dict = {}
    handles = [
        head.attention.register_forward_pre_hook(
            lambda m, args, kwargs: (args, {**kwargs, "average_attn_weights": False}), with_kwargs=True
        ),
        head.attention.register_forward_hook(lambda m, a, out: kept.update(attention=out[1])),
    ]
    prompt_map, empty_map = torch.zeros(16), torch.zeros(16)
    try:
        for block in blocks:
            pooled = head(block)  # the model's own head on the block's tokens, no post_layernorm
            attention = kept["attention"]._base  # the softmax the head computed its output from
            for score, summed in (
                (logit(pooled), prompt_map),
                ((F.normalize(pooled, dim=-1) @ empty.T)[0, 0], empty_map),
            ):
                gradient = torch.autograd.grad(score, attention, retain_graph=True)[0].reshape(kept["attention"].shape)
                summed += torch.relu(gradient[0]).mean(dim=0)[0]
    finally:
        for handle in handles:
            handle.remove()
    scaled = (empty_map - empty_map.min()) / (empty_map.max() - empty_map.min())
    assert prompt_map[scaled > 0.8].max() > 0  # the correction removes something here
    _same_map(explanation.heatmap, _on_image(torch.where(scaled > 0.8, 0.0, prompt_map)))


def test_siglip_gradcam_lays_its_patch_tokens_on_the_grid(siglip_folder):
    """Grad-CAM on a SigLIP block, every prompt: all the block's tokens are patches (the probe is
    the head's alone). By hand on transformers' SiglipModel."""
    layer = "vision_model.encoder.layers.1.layer_norm1"
    loaded = load_model(siglip_folder, prompts=PROMPTS)
    model = transformers.SiglipModel.from_pretrained(siglip_folder).eval()
    tokens = transformers.AutoTokenizer.from_pretrained(siglip_folder)(
        list(PROMPTS), padding="max_length", max_length=16, return_tensors="pt"
    )
    kept: dict = {}
    module = model.get_submodule(layer)
    drawn = 0
    for index, prompt in enumerate(PROMPTS):
        heatmap = explain(loaded, IMAGE, "gradcam", target=prompt, layer=layer).heatmap
        handle = module.register_forward_hook(lambda m, a, out: kept.update(out=out) or out.retain_grad())
        try:
            logits = model(pixel_values=_pixels(loaded), input_ids=tokens.input_ids).logits_per_image
        finally:
            handle.remove()
        logits[0, index].backward()
        activation, gradient = kept["out"][0], kept["out"].grad[0]
        cam = torch.relu((activation * gradient.mean(dim=0)).sum(dim=1))
        if cam.max() > 0:
            drawn += 1
            _same_map(heatmap, _on_image(cam))
        else:
            assert heatmap.max() == 0, prompt
    assert drawn  # at least one prompt's map is not all zero


def test_a_clip_folder_without_prompts_is_refused_naming_the_options(clip_folder, tmp_path):
    result = CliRunner().invoke(main, ["run", str(clip_folder), str(IMAGE), "--out", str(tmp_path / "out")])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "--prompt" in lines[0] and "--prompts" in lines[0], result.output
    with pytest.raises(ModelLoadError, match="--prompt"):
        explain(clip_folder, IMAGE)


def test_prompts_for_a_model_that_reads_no_text_are_refused(tmp_path):
    vit = transformers.ViTForImageClassification(
        transformers.ViTConfig(image_size=32, patch_size=8, num_labels=2, **TOWER)
    ).eval()
    with pytest.raises(AttnExplainError, match="reads no text"):
        explain(vit, IMAGE, "gradcam", prompt="a cat")


def test_cli_run_with_prompts_names_each_prompt_and_escapes_it_in_the_page(clip_folder, tmp_path):
    hostile = "<script>alert(1)</script> cat"
    out = tmp_path / "out"
    args = ["run", str(clip_folder), str(IMAGE), "--prompts", f"a photo of a cat,{hostile}", "--method", "gradcam"]
    result = CliRunner().invoke(main, [*args, "--target", hostile, "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(next(out.rglob("report.json")).read_text())
    assert report["target"]["label"] == hostile
    assert sorted(p["label"] for p in report["predictions"]) == sorted(["a photo of a cat", hostile])
    page = next(out.rglob("report.html")).read_text()
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; cat" in page


def test_prompts_from_a_file_one_per_line(clip_folder, tmp_path):
    listing = tmp_path / "prompts.txt"
    listing.write_text("a photo of a cat\n\na photo of a dog, on grass\n", encoding="utf-8")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        ["run", str(clip_folder), str(IMAGE), "--prompts", f"@{listing}", "--method", "gradcam", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    labels = {p["label"] for p in json.loads(next(out.rglob("report.json")).read_text())["predictions"]}
    assert labels == {"a photo of a cat", "a photo of a dog, on grass"}


@pytest.mark.parametrize(
    "content, says",
    [
        (b"", "empty"),
        (b"\x00\x01\x02\xff\xfe binary", "UTF-8"),
        (b"cat\x00dog\n", "control characters"),
        (b"x" * (2 * 1024 * 1024), "bytes"),
        (b"a cat\na cat\n", "twice"),
        (("y" * 5000).encode(), "characters"),
    ],
)
def test_hostile_prompt_files_are_refused_in_one_line(clip_folder, tmp_path, content, says):
    listing = tmp_path / "prompts.txt"
    listing.write_bytes(content)
    result = CliRunner().invoke(main, ["run", str(clip_folder), str(IMAGE), "--prompts", f"@{listing}"])
    assert result.exit_code == 2, result.output
    assert says in result.output
    assert "Traceback" not in result.output


def test_prompt_and_prompts_together_are_refused(clip_folder):
    result = CliRunner().invoke(main, ["run", str(clip_folder), str(IMAGE), "--prompt", "a", "--prompts", "b,c"])
    assert result.exit_code == 2 and "not both" in result.output


def sentencepiece_siglip(folder: Path) -> Path:
    """A tiny SigLIP saved with its own kind of tokenizer: a SiglipTokenizer over a sentencepiece
    model trained here on a few captions (nothing downloaded)."""
    import io

    sentencepiece = pytest.importorskip("sentencepiece")
    captions = [*PROMPTS, "a cat on grass", "a dog on grass", "a photo of grass", "a rocket on brick", "a mug"]
    trained = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(captions * 20),
        model_writer=trained,
        vocab_size=40,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    folder.mkdir(parents=True)
    (folder / "spiece.model").write_bytes(trained.getvalue())
    tokenizer = transformers.SiglipTokenizer(vocab_file=str(folder / "spiece.model"))
    assert max(len(tokenizer(prompt).input_ids) for prompt in PROMPTS) <= 16  # no prompt truncated
    torch.manual_seed(1)
    text = dict(TOWER, vocab_size=len(tokenizer), max_position_embeddings=16, pad_token_id=0, eos_token_id=1)
    vision = dict(TOWER, image_size=32, patch_size=8)
    model = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision))
    return _save(model.eval(), tokenizer, folder)


def test_a_siglip_folder_with_its_sentencepiece_tokenizer_scores_prompts_by_its_own_logits(tmp_path):
    folder = sentencepiece_siglip(tmp_path / "siglip-sp")
    assert (folder / "spiece.model").exists() and not (folder / "vocab.json").exists()
    loaded = load_model(folder, prompts=PROMPTS)
    pixels = _pixels(loaded)
    with torch.no_grad():
        logits = loaded.module(pixels)
    expected = _models_own_logits(folder, "siglip", PROMPTS, pixels)
    assert not torch.allclose(expected[0, 0], expected[0, 1])  # the prompts' tokens differ
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    result = CliRunner().invoke(
        main, ["run", str(folder), str(IMAGE), "--prompts", "a cat,grass", "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output


def test_a_corrupt_sentencepiece_model_is_refused_in_one_line(tmp_path):
    folder = sentencepiece_siglip(tmp_path / "siglip-sp")
    (folder / "spiece.model").write_bytes(b"\x0a\xff\xff not a sentencepiece model" * 10)
    with pytest.raises(ModelLoadError, match="could not load the tokenizer") as refused:
        load_model(folder, prompts=PROMPTS)
    assert "\n" not in str(refused.value)
    result = CliRunner().invoke(
        main, ["run", str(folder), str(IMAGE), "--prompt", "a cat", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "could not load the tokenizer" in result.output


def test_a_folder_without_its_tokenizer_is_refused_in_one_line(tmp_path):
    folder = tiny_dual("clip", tmp_path / "clip")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="holds no tokenizer"):
        load_model(folder, prompts=PROMPTS)


def _three_images_counting_encodes(tmp_path: Path, monkeypatch) -> tuple[Path, list]:
    """A folder of three photos, and the list each prompt set the plugin encodes is appended to."""
    from attnexplain_transformers import prompts as prompt_module

    images = tmp_path / "images"
    images.mkdir()
    for index in range(3):
        Image.open(IMAGE).convert("RGB").rotate(90 * index).save(images / f"{index}.png")
    calls: list = []
    original = prompt_module.encode_prompts
    monkeypatch.setattr(prompt_module, "encode_prompts", lambda *a: calls.append(a[1]) or original(*a))
    return images, calls


def test_batch_with_prompts_encodes_the_text_once_and_writes_the_gallery(clip_folder, tmp_path, monkeypatch):
    images, calls = _three_images_counting_encodes(tmp_path, monkeypatch)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        [
            "batch",
            str(clip_folder),
            str(images),
            "--prompts",
            ",".join(PROMPTS),
            "--method",
            "gradcam",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert calls == [PROMPTS]
    run = json.loads((out / "report.json").read_text())["run"]
    assert run["model_spec"]["prompts"] == list(PROMPTS)
    assert (out / "index.html").is_file()
    assert "grass" in (out / "index.html").read_text() or any(PROMPTS[0] in p.read_text() for p in out.rglob("*.json"))


def test_an_hf_name_loads_a_cached_clip_and_its_tokenizer_without_downloading(clip_folder, tmp_path, monkeypatch):
    """models--tiny-org--tiny-clip laid out as huggingface_hub writes it (snapshot files are links
    into blobs/); HF_HUB_OFFLINE: any attempt to reach the Hub would fail."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--tiny-org--tiny-clip"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for number, source in enumerate(sorted(clip_folder.iterdir())):
        (repo / "blobs" / f"blob{number}").write_bytes(source.read_bytes())
        (snapshot / source.name).symlink_to(Path("..", "..", "blobs", f"blob{number}"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    from_name = load_model("hf:tiny-org/tiny-clip", prompts=PROMPTS)
    from_folder = load_model(clip_folder, prompts=PROMPTS)
    pixels = _pixels(from_folder)
    with torch.no_grad():
        torch.testing.assert_close(from_name.module(pixels), from_folder.module(pixels))
    assert from_name.labels == list(PROMPTS)


def test_the_sample_clip_names_held_out_objects_and_its_prompt_maps_point_at_them():
    """The shipped sample (samples/train_clip.py) on composites it never saw: the object prompts
    classify them, and Chefer's map of the right prompt peaks on the object's mask far more often
    than a random map's 10% (samples/README.md has the figures on 200 images)."""
    import sys

    sys.path.insert(0, str(REPO / "samples"))
    from composites import TEST_SEED, make_composites_with_textures
    from train_clip import FOLDER, OBJECT_PROMPTS, SIZE

    images, labels, _, masks = make_composites_with_textures(12, TEST_SEED, SIZE)
    loaded = load_model(REPO / "samples" / "models" / FOLDER, prompts=OBJECT_PROMPTS)
    named, peaks = 0, 0
    for image, label, mask in zip(images, labels, masks):
        explanation = explain(loaded, image, "chefer", target=OBJECT_PROMPTS[label])
        named += explanation.predictions[0].label == OBJECT_PROMPTS[label]
        heatmap = explanation.heatmap
        peaks += bool(mask[np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)])
    assert named >= 11
    assert peaks >= 8


def test_evaluate_measures_a_prompts_map_against_the_named_objects_mask(tmp_path):
    """`evaluate` with --prompts: the target is the prompt the model picks, localised against the
    object's mask (the sample CLIP names these composites right, and Chefer points at them)."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for name in ("cat-on-grass.png", "rocket-on-brick.png"):
        (images / name).write_bytes((REPO / "samples" / "images" / name).read_bytes())
        (masks / name).write_bytes((REPO / "samples" / "masks" / name).read_bytes())
    prompts = "a photo of an astronaut,a photo of a cat,a photo of a coffee,a photo of a rocket"
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        ["evaluate", str(REPO / "samples" / "models" / "clip-composites"), str(images), "--masks", str(masks)]
        + ["--prompts", prompts, "--method", "chefer", "--metrics", "pointing", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (out / "evaluation.jsonl").read_text().splitlines() if line.strip()]
    targets = {Path(line["image"]).name: line["target"]["label"] for line in lines if "target" in line}
    assert targets == {"cat-on-grass.png": "a photo of a cat", "rocket-on-brick.png": "a photo of a rocket"}
    summary = json.loads((out / "evaluation.json").read_text())
    assert summary["methods"]["chefer"]["pointing"]["mean"] == 1.0  # both maps peak on the object
    assert summary["methods"]["random"]["pointing"]["mean"] < 1.0


def test_explain_with_new_prompts_reprompts_a_loaded_model_without_changing_it(clip_folder):
    loaded = load_model(clip_folder, prompts=PROMPTS)
    explanation = explain(loaded, IMAGE, "gradcam", prompts=["grass", "a photo of a dog"])
    assert {p.label for p in explanation.predictions} == {"grass", "a photo of a dog"}
    assert loaded.labels == list(PROMPTS) and loaded.module.text_embeds.shape[0] == len(PROMPTS)
    with pytest.raises(AttnExplainError, match="not both"):
        explain(loaded, IMAGE, "gradcam", prompt="grass", prompts=["a cat"])


def test_a_prompts_legrad_is_legrad_written_out_on_the_dual_encoder(clip_folder):
    """LeGrad as its authors compute it for CLIP, by hand on transformers' own CLIPModel: each
    block's tokens averaged, post_layernorm, projection, cosine with the prompt's text embedding;
    relu of its gradient with respect to that block's attention, averaged over heads and queries,
    at the patch keys; the mean over blocks."""
    explanation = explain(clip_folder, IMAGE, "legrad", prompts=list(PROMPTS), target="grass")
    model = transformers.CLIPModel.from_pretrained(clip_folder, attn_implementation="eager").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(clip_folder)
    with torch.no_grad():
        text = model.get_text_features(**tokenizer(["grass"], return_tensors="pt")).pooler_output
    text = F.normalize(text, dim=-1)
    pixels = _pixels(explanation.model)
    blocks = model.vision_model.encoder.layers
    kept = {}
    handles = [
        block.register_forward_hook(lambda m, a, out, i=i: kept.update({i: out})) for i, block in enumerate(blocks)
    ]
    try:
        out = model.vision_model(pixel_values=pixels, output_attentions=True)
    finally:
        for handle in handles:
            handle.remove()
    maps = []
    for index, attention in enumerate(out.attentions):
        tokens = kept[index][0] if isinstance(kept[index], tuple) else kept[index]
        image = F.normalize(model.visual_projection(model.vision_model.post_layernorm(tokens.mean(dim=1))), dim=-1)
        score = (model.logit_scale.exp() * image @ text.T)[0, 0]
        gradient = torch.autograd.grad(score, attention, retain_graph=True)[0]
        maps.append(torch.relu(gradient).mean(dim=(1, 2))[0, 1:].reshape(4, 4))
    grid = torch.stack(maps).mean(dim=0)
    reference = F.interpolate(grid[None, None], size=(32, 32), mode="bilinear", align_corners=False)[0, 0].numpy()
    heatmap = explanation.maps["legrad"].heatmap
    assert reference.max() > 0
    np.testing.assert_allclose(heatmap / heatmap.max(), reference / reference.max(), atol=1e-4)


def test_batch_truth_names_prompts_and_the_gallery_judges_the_sample_clip_by_them(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("cat-on-grass.png", "rocket-on-brick.png", "coffee-on-gravel.png"):
        (images / name).write_bytes((REPO / "samples" / "images" / name).read_bytes())
    truth = tmp_path / "truth.csv"
    truth.write_text(
        "image,class\ncat-on-grass.png,a photo of a cat\nrocket-on-brick.png,a photo of a rocket\n"
        "coffee-on-gravel.png,a photo of a cat\n"  # wrong on purpose: the gallery must count it wrong
    )
    prompts = "a photo of an astronaut,a photo of a cat,a photo of a coffee,a photo of a rocket"
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        ["batch", str(REPO / "samples" / "models" / "clip-composites"), str(images), "--prompts", prompts]
        + ["--truth", str(truth), "--method", "chefer", "--out", str(out), "--quiet"],
    )
    assert result.exit_code == 0, result.output
    judged = json.loads((out / "report.json").read_text())["truth"]
    assert (judged["judged"], judged["correct"]) == (3, 2)
    # the coffee, called a cat by the truth file, is predicted as a class no truth names: "(other)"
    assert judged["confusion"]["a photo of a cat"] == {"a photo of a cat": 1, "(other)": 1}


def test_siglip_legrad_encodes_its_empty_prompt_once_for_a_batch(siglip_folder, tmp_path, monkeypatch):
    """LeGrad's empty prompt is encoded once with the prompts, not per image or chunk."""
    images, calls = _three_images_counting_encodes(tmp_path, monkeypatch)
    args = ["batch", str(siglip_folder), str(images), "--prompts", "a cat,grass", "--method", "legrad"]
    result = CliRunner().invoke(main, args + ["--images-per-batch", "1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert calls == [("a cat", "grass"), ("a photo of a",)]
