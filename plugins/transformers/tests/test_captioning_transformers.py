"""Hugging Face captioners through `attnexplain run`: a VisionEncoderDecoderModel (ViT + GPT-2, greedy;
ViT + BERT, beam search) built here from configs with a word-level tokenizer made here, saved with
save_pretrained and loaded from disk as a user would; nothing downloaded.

Checked against the model itself: the caption is its own ``generate``'s; each word's cross-attention
per layer and head (recorded during the generation) equals ``model(..., output_attentions=True)``'s on
the caption, reshaped here by hand; the probabilities are the teacher-forced forward's; the relevance
is Chefer et al. 2021b's encoder–decoder rules, computed here independently (``.retain_grad()`` and
``backward`` per word, their reference code's matrix loop). BLIP and broken folders are refused in one
line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from attnexplain import explain_caption
from attnexplain.cli import main

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from captioner_folders import BOS, EOS, PATCH, SIZE, WORDS, bert_captioner, gpt2_captioner, tokenizer  # noqa: E402


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _clean_failure(result, *words: str) -> str:
    assert result.exit_code != 0
    output = result.output.strip()
    assert "Traceback" not in output and len(output.splitlines()) == 1, output
    assert output.startswith("Error: ") and all(word in output for word in words), output
    return output


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory) -> Path:
    return gpt2_captioner(tmp_path_factory.mktemp("vit-gpt2"))


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory) -> Path:
    return bert_captioner(tmp_path_factory.mktemp("vit-bert"))


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    """A photo at the model's size, so that preprocessing only normalises it."""
    pixels = np.random.default_rng(3).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    pixels[4:20, 8:28] = [230, 40, 40]
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    Image.fromarray(pixels).save(path)
    return path


def _reference(folder: Path, photo: Path):
    """The model as transformers loads it, in eager attention, and the photo as its processor reads it."""
    model = transformers.VisionEncoderDecoderModel.from_pretrained(folder, attn_implementation="eager").eval()
    processor = transformers.ViTImageProcessor.from_pretrained(folder)
    return model, processor(images=Image.open(photo).convert("RGB"), return_tensors="pt").pixel_values


def _teacher_forced(model, pixels, ids: list[int]):
    inputs = torch.tensor([[BOS] + ids[:-1]])
    return model(pixel_values=pixels, decoder_input_ids=inputs, output_attentions=True)


@pytest.mark.parametrize("which", ["gpt2", "bert"])
def test_run_writes_the_models_own_caption_with_each_words_cross_attention_per_layer_and_head(
    which, gpt2_folder, bert_folder, photo, tmp_path
):
    folder = gpt2_folder if which == "gpt2" else bert_folder
    result = _run("run", folder, photo, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    out = tmp_path / "photo"
    report = json.loads((out / "report.json").read_text())
    model, pixels = _reference(folder, photo)
    with torch.no_grad():
        search = model.generate(pixel_values=pixels, return_dict_in_generate=True)
        generated = search.sequences[0, 1:].tolist()
        if which == "bert":  # beam search whose returned beam changes rows: the rows read must follow it
            assert (search.beam_indices[0] > 0).any()
            assert model.generate(pixel_values=pixels, num_beams=1)[0, 1:].tolist() != generated
    ended = EOS in generated
    caption_ids = generated[: generated.index(EOS)] if ended else generated
    assert report["caption"] == " ".join(WORDS[i] for i in caption_ids)
    assert report["attention_source"] == "generation"
    assert report["attention_layout"] == {"layers": 2, "heads": 2}
    assert all(word["alignment_scores"] is None for word in report["words"])  # HF exposes none
    steps = caption_ids + ([EOS] if ended else [])
    with torch.no_grad():
        forced = _teacher_forced(model, pixels, steps)
    log_probs = torch.log_softmax(forced.logits[0], dim=-1)
    for t, entry in enumerate(report["words"]):
        assert entry["probability"] == pytest.approx(float(log_probs[t, steps[t]].exp()), rel=1e-4)
        layered = np.load(out / entry["files"]["layer_attention_npy"])
        expected = np.stack(
            [layer[0, :, t, 1:].reshape(2, SIZE // PATCH, SIZE // PATCH).numpy() for layer in forced.cross_attentions]
        )
        np.testing.assert_allclose(layered, expected, atol=1e-5)
        assert not np.allclose(layered[0, 0], layered[1, 1], atol=1e-3)  # layers and heads differ
        for key in ("attention", "gradcam", "relevance"):
            assert (out / entry["files"][key]).stat().st_size > 0
    if ended:
        assert report["end_probability"] == pytest.approx(float(log_probs[len(caption_ids), EOS].exp()), rel=1e-4)
    page = (out / "report.html").read_text()
    assert "per layer (rows) and head (columns)" in page and "Chefer et al. 2021b" in page


def _chefer_reference(model, pixels, steps: list[int], t: int) -> np.ndarray:
    """Word t's relevance over the patches, as Chefer et al.'s generator computes it: a backward
    from the word's log-probability, every attention's .grad, and their rules one matrix at a time."""
    pixels = pixels.clone().requires_grad_()
    embeddings = model.decoder.get_input_embeddings()
    hook = embeddings.register_forward_hook(lambda _m, _a, output: output.detach().requires_grad_())
    try:
        out = _teacher_forced(model, pixels, steps)
    finally:
        hook.remove()
    maps = [*out.encoder_attentions, *out.decoder_attentions, *out.cross_attentions]
    for attention in maps:
        attention.retain_grad()
    torch.log_softmax(out.logits[0, t], dim=-1)[steps[t]].backward()

    def cam(attention):  # avg_heads
        return (attention.grad[0] * attention[0]).clamp(min=0).mean(dim=0).detach()

    def handle_residual(relevance):
        relevance = relevance - torch.eye(len(relevance))
        relevance = relevance / relevance.sum(dim=-1, keepdim=True)
        relevance[torch.isnan(relevance)] = 0
        return relevance + torch.eye(len(relevance))

    tokens, words = out.cross_attentions[0].shape[-1], len(steps)
    r_ii, r_tt, r_ti = torch.eye(tokens), torch.eye(words), torch.zeros(words, tokens)
    for attention in out.encoder_attentions:
        r_ii = r_ii + cam(attention) @ r_ii
    for self_attention, cross in zip(out.decoder_attentions, out.cross_attentions):
        r_tt_add, r_ti_add = cam(self_attention) @ r_tt, cam(self_attention) @ r_ti
        r_tt, r_ti = r_tt + r_tt_add, r_ti + r_ti_add
        r_ti = r_ti + handle_residual(r_tt).t() @ cam(cross) @ handle_residual(r_ii)
    return r_ti[t, 1:].reshape(SIZE // PATCH, SIZE // PATCH).numpy()


def test_each_words_relevance_is_chefers_encoder_decoder_rollout_and_gradcam_is_on_the_patch_map(gpt2_folder, photo):
    explanation = explain_caption(str(gpt2_folder), str(photo))
    model, pixels = _reference(gpt2_folder, photo)
    steps = [WORDS.index(w) for w in explanation.caption] + ([EOS] if explanation.end_probability is not None else [])
    assert explanation.grid == (SIZE // PATCH, SIZE // PATCH) and explanation.feature_layer == "encoder.layernorm"
    for word in (explanation.words[0], explanation.words[-1]):
        expected = _chefer_reference(model, pixels, steps, word.position)
        assert word.relevance_grid is not None and expected.max() > 0
        np.testing.assert_allclose(word.relevance_grid, expected, rtol=1e-4, atol=1e-6)
        assert word.gradcam.shape == (SIZE, SIZE) and np.isfinite(word.gradcam).all()
        assert word.attention_grid.sum() == pytest.approx(1.0, abs=1e-5)
    assert len({tuple(np.round(w.relevance_grid.ravel(), 6)) for w in explanation.words}) > 1


def test_a_given_caption_is_tokenized_and_scored_by_teacher_forcing(bert_folder, photo, tmp_path):
    result = _run("run", bert_folder, photo, "--caption", "a cat on grass", "--target", "cat", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "photo" / "report.json").read_text())
    assert report["caption"] == "a cat on grass" and report["caption_source"] == "given"
    assert report["attention_source"] == "teacher forcing" and [w["word"] for w in report["words"]] == ["cat"]
    model, pixels = _reference(bert_folder, photo)
    steps = [WORDS.index(w) for w in ("a", "cat", "on", "grass")] + [EOS]
    with torch.no_grad():
        forced = _teacher_forced(model, pixels, steps)
    log_probs = torch.log_softmax(forced.logits[0], dim=-1)
    expected = [float(log_probs[t, steps[t]].exp()) for t in range(4)]
    assert [p["probability"] for p in report["word_probabilities"]] == pytest.approx(expected, rel=1e-4)
    layered = np.load(tmp_path / "photo" / report["words"][0]["files"]["layer_attention_npy"])
    np.testing.assert_allclose(layered[1, 0].ravel(), forced.cross_attentions[1][0, 0, 1, 1:].numpy(), atol=1e-5)


def test_blip_is_refused_in_one_line_naming_why(photo, tmp_path):
    config = transformers.BlipConfig(
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "image_size": SIZE,
            "patch_size": PATCH,
        },
        text_config={
            "vocab_size": len(WORDS),
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "encoder_hidden_size": 32,
            "max_position_embeddings": 32,
        },
    )
    folder = tmp_path / "blip"
    transformers.BlipForConditionalGeneration(config).eval().save_pretrained(folder)
    _clean_failure(
        _run("run", folder, photo, "--out", tmp_path / "out"), "BlipForConditionalGeneration", "cross-attention"
    )
    assert not (tmp_path / "out").exists()


def test_a_captioner_folder_without_tokenizer_or_start_token_is_refused_in_one_line(gpt2_folder, photo, tmp_path):
    bare = tmp_path / "bare"
    model = transformers.VisionEncoderDecoderModel.from_pretrained(gpt2_folder)
    model.save_pretrained(bare)
    _clean_failure(_run("run", bare, photo, "--out", tmp_path / "out"), "tokenizer")
    model.config.decoder_start_token_id = None
    model.generation_config.decoder_start_token_id = None
    model.config.decoder.bos_token_id = None
    model.save_pretrained(bare)
    tokenizer().save_pretrained(bare)
    _clean_failure(_run("run", bare, photo, "--out", tmp_path / "out"), "decoder_start_token_id")
    assert not (tmp_path / "out").exists()
    _clean_failure(_run("run", gpt2_folder, photo, "--caption", "a zebra", "--out", tmp_path / "out"), "'zebra'")
    _clean_failure(_run("run", gpt2_folder, photo, "--size", 48, "--out", tmp_path / "out"), "32×32", "--size")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("half, field", [("decoder", "n_layer"), ("encoder", "num_hidden_layers")])
def test_a_captioner_config_asking_for_a_huge_encoder_or_decoder_is_refused_before_it_is_built(
    half, field, gpt2_folder, photo, tmp_path
):
    """An encoder–decoder's halves ("encoder", "decoder" in config.json) are held to the same
    limits as any model's, GPT-2's own field names included: 50,000 decoder layers would take
    an hour to build on the meta device before the weights check could refuse them."""
    folder = tmp_path / "huge"
    shutil.copytree(gpt2_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config[half][field] = 50_000
    (folder / "config.json").write_text(json.dumps(config))
    _clean_failure(_run("run", folder, photo, "--out", tmp_path / "out"), f"{half}.{field} = 50000")
