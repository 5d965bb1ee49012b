"""The Show, Attend and Tell captioner and its plugin contract, on real model outputs.

Run from the repository root: ``.venv/bin/python -m pytest -q plugins/attention-cnn/tests``. The
sample tests use ``samples/models/captioner-composites.pt`` (``samples/train.py --only captioner``),
the shipped ``samples/images`` with their masks and held-out composites of ``samples/composites.py``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("ATTNEXPLAIN_OFFLINE", "1")  # nothing here may download

from attnexplain_attention_cnn.captioner import ShowAttendTell, doubly_stochastic_penalty  # noqa: E402
from attnexplain_attention_cnn.model import AttentionPoolingCNN  # noqa: E402
from attnexplain_attention_cnn.plugin import plugin as attention_plugin  # noqa: E402

from attnexplain.loading import load_model  # noqa: E402
from attnexplain.plugins import select_plugin  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
SAMPLES = REPO / "samples"
SAMPLE_CAPTIONER = SAMPLES / "models" / "captioner-composites.pt"
VOCABULARY = ["<pad>", "<start>", "<end>", "a", "an", "on", "cat", "rocket", "grass", "brick"]

needs_sample = pytest.mark.skipif(not SAMPLE_CAPTIONER.is_file(), reason="run from the repository, with samples/")


@pytest.fixture(scope="module")
def random_captioner() -> ShowAttendTell:
    torch.manual_seed(0)
    model = ShowAttendTell(VOCABULARY, channels=(8, 16), hidden_size=24, attention_dim=12, max_length=5)
    with torch.no_grad():
        model.attention.score.weight.mul_(10.0)
    return model.eval()


def test_the_doubly_stochastic_penalty_is_the_papers_sum_over_positions():
    torch.manual_seed(1)
    alphas = torch.softmax(torch.randn(3, 4, 6), dim=-1)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.float32)
    expected = 0.0
    for b in range(3):
        for i in range(6):
            attended = sum(float(alphas[b, t, i]) for t in range(4) if mask[b, t])
            expected += (1.0 - attended) ** 2
    assert float(doubly_stochastic_penalty(alphas, mask)) == pytest.approx(expected / 3, rel=1e-6)


def test_attention_is_the_softmax_of_additive_scores_and_the_context_their_average(random_captioner):
    torch.manual_seed(2)
    annotations, hidden = torch.randn(2, 9, 16), torch.randn(2, 24)
    attention = random_captioner.attention
    context, alpha, scores = attention(annotations, hidden)
    with torch.no_grad():
        w_a, w_h, w = attention.project_annotations, attention.project_hidden, attention.score.weight[0]
        expected_scores = torch.stack(
            [torch.stack([w @ torch.tanh(w_a(annotations[b, i]) + w_h(hidden[b])) for i in range(9)]) for b in range(2)]
        )
    torch.testing.assert_close(scores, expected_scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alpha, torch.softmax(expected_scores, dim=1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(context, (alpha[..., None] * annotations).sum(1), atol=1e-5, rtol=1e-5)


def test_greedy_captions_are_the_argmax_of_the_models_own_teacher_forced_scores(random_captioner):
    torch.manual_seed(3)
    images = torch.randn(3, 3, 32, 32)
    for image, caption in zip(images, random_captioner.generate(images)):
        assert 1 <= len(caption) <= 5
        logits, alphas = random_captioner(image[None], torch.tensor([caption]))
        assert logits[0].argmax(dim=-1).tolist() == caption
        assert alphas.shape == (1, len(caption), 64)  # an 8×8 map
        assert torch.allclose(alphas.sum(-1), torch.ones(1, len(caption)))


def test_a_vocabulary_without_the_special_words_first_is_refused():
    with pytest.raises(ValueError, match="<pad>, <start>, <end>"):
        ShowAttendTell(["a", "cat", "<pad>", "<start>", "<end>"])
    with pytest.raises(ValueError, match="once"):
        ShowAttendTell(["<pad>", "<start>", "<end>", "cat", "cat"])
    with pytest.raises(ValueError, match="'dog'"):
        ShowAttendTell(VOCABULARY).words_to_ids(["a", "dog"])


def test_the_plugin_knows_the_captioner_and_only_it_as_one(random_captioner):
    assert select_plugin(random_captioner) is attention_plugin
    assert attention_plugin.task(random_captioner) == "captioning"
    captioning = attention_plugin.captioning(random_captioner)
    assert captioning is not None and captioning.vocabulary == tuple(VOCABULARY)
    assert captioning.end == VOCABULARY.index("<end>")
    assert captioning.feature_layer == "encoder.block1" and captioning.attention_module == "attention"
    image = torch.randn(1, 3, 32, 32)
    assert captioning.generate(image) == random_captioner.generate(image)[0]
    words = torch.tensor([[3, 6, 5, 8, 2]])
    log_probs = captioning.score(image, words)
    assert log_probs.shape == (1, 5, len(VOCABULARY))
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(1, 5))
    assert attention_plugin.captioning(AttentionPoolingCNN(num_classes=3)) is None


@pytest.fixture(scope="module")
def sample_captioner():
    return load_model(SAMPLE_CAPTIONER)


@needs_sample
def test_the_sample_is_small_and_loads_as_a_captioner(sample_captioner):
    assert SAMPLE_CAPTIONER.stat().st_size < 2_000_000
    assert sample_captioner.architecture == "ShowAttendTell"
    assert sample_captioner.plugin is attention_plugin and sample_captioner.describe()["task"] == "captioning"


@needs_sample
@pytest.mark.heavy
def test_the_samples_noun_attention_peaks_on_the_object_of_held_out_composites(sample_captioner):
    """Through explain_caption, as `run` does: the caption right for most images, and α of the noun
    peaking on the object's mask far more often than a random map's peak would."""
    sys.path.insert(0, str(SAMPLES))
    from composites import LABELS, TEST_SEED, caption, make_composites_with_textures

    from attnexplain.captioning import explain_caption

    images, labels, textures, masks = make_composites_with_textures(30, TEST_SEED)
    right = hits = 0
    for image, label, texture, mask in zip(images, labels, textures, masks):
        explanation = explain_caption(sample_captioner, image)
        right += explanation.text == caption(int(label), int(texture))
        given = caption(int(label), int(texture))
        (noun,) = explain_caption(sample_captioner, image, caption=given, target=LABELS[label]).words
        row, column = np.unravel_index(int(noun.attention.argmax()), noun.attention.shape)
        hits += bool(mask[row, column])
    assert right / len(images) >= 0.8, f"{right}/30 captions right"
    assert hits / len(images) >= 0.6, f"the noun's α peaks on the object in {hits}/30"
    assert masks.mean() < 0.2  # a random map's peak lands on the object that rarely


@needs_sample
def test_run_on_a_shipped_composite_captions_it_and_the_nouns_attention_is_on_the_cat(tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from attnexplain.cli import main

    photo = SAMPLES / "images" / "cat-on-grass.png"
    result = CliRunner().invoke(main, ["run", str(SAMPLE_CAPTIONER), str(photo), "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["caption"] == "a cat on grass"
    folder = Path(report["outputs"]["directory"])
    noun = next(entry for entry in report["words"] if entry["word"] == "cat")
    attention = np.load(folder / noun["files"]["attention_npy"])
    mask = np.asarray(Image.open(SAMPLES / "masks" / "cat-on-grass.png").convert("L")) > 127
    # The map is at the model's input (128²); the photo and its mask are larger.
    row, column = np.unravel_index(int(attention.argmax()), attention.shape)
    scale = mask.shape[0] / attention.shape[0]
    assert mask[int((row + 0.5) * scale), int((column + 0.5) * scale)]
    assert noun["probability"] > 0.5
