"""A captioner through `attnexplain run`: the caption, and each word's attention α, alignment scores e
and Grad-CAM, checked against the model's own outputs recomputed here; a given caption scored; one
word explained; bad input refused in one line.

The captioner is the attention-cnn plugin's ShowAttendTell with fixed random weights, saved as a
checkpoint and loaded from disk as a user would; the core knows it only through the plugin's
``captioning`` hook (a captioner of this test's own, with its own plugin, runs too).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from attnexplain.cli import main
from attnexplain.plugin_api import Captioning, ModelPlugin, use_plugins

captioner_module = pytest.importorskip("attnexplain_attention_cnn.captioner")

VOCABULARY = ["<pad>", "<start>", "<end>", "a", "an", "on", "astronaut", "cat", "coffee", "rocket", "brick", "grass"]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
KWARGS = {"vocabulary": VOCABULARY, "channels": [8, 16, 24], "hidden_size": 32, "attention_dim": 16, "max_length": 6}


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _clean_failure(result, *words: str) -> str:
    assert result.exit_code != 0
    output = result.output.strip()
    assert "Traceback" not in output and len(output.splitlines()) == 1, output
    assert output.startswith("Error: ") and all(word in output for word in words), output
    return output


@pytest.fixture(scope="module")
def captioner():
    """Random weights with random BatchNorm statistics and sharpened scores, so that α is far from
    uniform and differs from word to word; it never ends a caption (stopped at its max_length)."""
    torch.manual_seed(0)
    model = captioner_module.ShowAttendTell(**KWARGS)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
        model.attention.score.weight.mul_(20.0)
        model.output.bias[:3] -= 20.0  # no <pad>, <start> or <end>: it writes max_length words
    return model.eval()


@pytest.fixture(scope="module")
def captioner_file(captioner, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("captioner") / "captioner.pt"
    torch.save(
        {
            "arch": "ShowAttendTell",
            "arch_kwargs": KWARGS,
            "state_dict": captioner.state_dict(),
            "preprocessing": {"size": [64, 64], "mean": MEAN, "std": STD},
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A 64×64 picture (the model's input size, so preprocessing only normalises it)."""
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    pixels[16:40, 20:44] = [230, 40, 40]
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    Image.fromarray(pixels).save(path)
    return path, pixels


def _tensor(pixels: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255.0
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _reference(model, x: torch.Tensor, ids: list[int]):
    """α per step from the model's own teacher-forced forward (no hooks), and Grad-CAM of each
    word's log-probability written out here: (α (T, h, w), cams (T, h, w), log-probs (T,))."""
    kept = []
    handle = model.get_submodule(model.last_block).register_forward_hook(lambda m, a, out: kept.append(out))
    try:
        with torch.enable_grad():
            for parameter in model.parameters():
                parameter.requires_grad_(True)
            logits, alphas = model(x, torch.tensor([ids]))
    finally:
        handle.remove()
    features = kept[0]
    height, width = features.shape[-2:]
    log_probs = torch.log_softmax(logits[0], dim=-1)
    cams, scores = [], []
    for t, word in enumerate(ids):
        (gradient,) = torch.autograd.grad(log_probs[t, word], features, retain_graph=True)
        cams.append(F.relu((gradient.mean(dim=(2, 3), keepdim=True) * features).sum(dim=1))[0].detach())
        scores.append(float(log_probs[t, word].detach()))
    return alphas[0].detach().reshape(-1, height, width), torch.stack(cams), scores


def _upsampled(grid: torch.Tensor, size: int = 64) -> np.ndarray:
    return F.interpolate(grid[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()


def test_run_writes_the_models_own_caption_and_each_words_attention_and_gradcam(
    captioner, captioner_file, photo, tmp_path
):
    path, pixels = photo
    result = _run("run", captioner_file, path, "--out", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    x = _tensor(pixels)
    generated = captioner.generate(x)[0]
    assert len(generated) == KWARGS["max_length"] and captioner.end not in generated
    words = [VOCABULARY[i] for i in generated]
    assert report["caption"] == " ".join(words) and report["caption_source"] == "generated"
    assert report["task"] == "captioning" and report["model"]["plugin"] == "attention-cnn"
    assert report["end_probability"] is None  # stopped at its length limit
    # α, e and the probabilities were recorded while the model wrote its caption (one pass).
    assert report["attention_source"] == "generation" and report["attention_layout"] == {"layers": 1, "heads": 1}

    alphas, cams, log_probs = _reference(captioner, x, generated)
    folder = Path(report["outputs"]["directory"])
    assert [w["word"] for w in report["words"]] == words
    for t, entry in enumerate(report["words"]):
        files = entry["files"]
        attention = np.load(folder / files["attention_npy"])
        np.testing.assert_allclose(attention, _upsampled(alphas[t]), atol=1e-6)
        scores = torch.from_numpy(np.load(folder / files["alignment_scores_npy"]))
        # e is what α is the softmax of, on the feature map's grid.
        np.testing.assert_allclose(torch.softmax(scores.flatten(), 0).reshape(scores.shape), alphas[t], atol=1e-6)
        np.testing.assert_allclose(np.load(folder / files["gradcam_npy"]), _upsampled(cams[t]), rtol=1e-4, atol=1e-7)
        assert entry["probability"] == pytest.approx(np.exp(log_probs[t]), rel=1e-5)
        assert (folder / files["attention"]).stat().st_size > 0 and (folder / files["gradcam"]).is_file()
    # α differs from word to word (else the strip would show one map four times).
    assert not torch.allclose(alphas[0], alphas[1], atol=1e-4)
    assert (folder / "attention-strip.png").is_file()
    page = (folder / "report.html").read_text(encoding="utf-8")
    for word in words:
        assert f"“{word}”" in page
    assert json.loads((folder / "report.json").read_text())["caption"] == report["caption"]


def test_run_scores_a_given_caption_by_teacher_forcing_and_explains_one_target_word(
    captioner, captioner_file, photo, tmp_path
):
    path, pixels = photo
    result = _run(
        "run", captioner_file, path, "--caption", "a cat on grass", "--target", "cat", "--out", tmp_path, "--json"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["caption"] == "a cat on grass" and report["caption_source"] == "given"
    assert report["attention_source"] == "teacher forcing"
    ids = [VOCABULARY.index(w) for w in ["a", "cat", "on", "grass", "<end>"]]
    alphas, _cams, log_probs = _reference(captioner, _tensor(pixels), ids)
    assert [entry["probability"] for entry in report["word_probabilities"]] == pytest.approx(
        list(np.exp(log_probs[:4])), rel=1e-5
    )
    assert report["end_probability"] == pytest.approx(np.exp(log_probs[4]), rel=1e-5)
    assert report["log_probability"] == pytest.approx(sum(log_probs), rel=1e-5)
    assert [entry["word"] for entry in report["words"]] == ["cat"]  # only the target's maps
    attention = np.load(Path(report["outputs"]["directory"]) / report["words"][0]["files"]["attention_npy"])
    np.testing.assert_allclose(attention, _upsampled(alphas[1]), atol=1e-6)


def test_bad_captioner_input_is_refused_in_one_line(captioner_file, photo, tmp_path):
    path, _ = photo
    _clean_failure(
        _run("run", captioner_file, path, "--caption", "a dog on grass", "--out", tmp_path), "'dog'", "vocabulary"
    )
    _clean_failure(_run("run", captioner_file, path, "--caption", "  ", "--out", tmp_path), "empty")
    _clean_failure(
        _run("run", captioner_file, path, "--caption", "a cat on grass", "--target", "rocket", "--out", tmp_path),
        "'rocket'",
        "a cat on grass",
    )
    _clean_failure(
        _run("run", captioner_file, path, "--method", "scorecam", "--out", tmp_path), "scorecam does not apply"
    )
    _clean_failure(_run("run", captioner_file, path, "--method", "rollout", "--out", tmp_path), "rollout does not")
    _clean_failure(_run("run", captioner_file, path, "--method", "nosuch", "--out", tmp_path), "Unknown method")
    _clean_failure(_run("run", captioner_file, path, "--layer", "nowhere", "--out", tmp_path), "'nowhere'")
    _clean_failure(_run("run", captioner_file, path, "--head-fusion", "max", "--out", tmp_path), "--head-fusion")
    assert not any(tmp_path.iterdir())  # nothing written on a refusal


def test_caption_is_refused_for_a_model_that_does_not_caption(tmp_path, photo):
    from attnexplain_attention_cnn.model import AttentionPoolingCNN

    path, _ = photo
    model_file = tmp_path / "classifier.pt"
    torch.save(
        {
            "arch": "AttentionPoolingCNN",
            "arch_kwargs": {"num_classes": 3},
            "state_dict": AttentionPoolingCNN(num_classes=3).state_dict(),
        },
        model_file,
    )
    _clean_failure(
        _run("run", model_file, path, "--caption", "a cat", "--out", tmp_path / "out"), "--caption", "captioning"
    )


class _TinyCaptioner(torch.nn.Module):
    """A captioner of this test's own: a fixed 2×2 grid, attention by dot product with a learned
    query per previous word; its attention module returns a dict, not a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Conv2d(3, 4, kernel_size=16, stride=16)
        self.attend = _DotAttention()
        self.queries = torch.nn.Embedding(4, 4)
        self.out = torch.nn.Linear(4, 4)

    def forward(self, images: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        annotations = self.encoder(images).flatten(2).transpose(1, 2)
        previous = torch.cat([torch.zeros_like(words[:, :1]), words[:, :-1]], dim=1)
        logits = []
        for t in range(words.shape[1]):
            context = self.attend(annotations, self.queries(previous[:, t]))["context"]
            logits.append(self.out(context))
        return torch.stack(logits, dim=1)


class _DotAttention(torch.nn.Module):
    def forward(self, annotations: torch.Tensor, query: torch.Tensor) -> dict[str, torch.Tensor]:
        scores = (annotations * query[:, None]).sum(-1)
        weights = torch.softmax(scores, dim=1)
        return {"context": (weights[..., None] * annotations).sum(1), "weights": weights, "scores": scores}


class _TinyPlugin(ModelPlugin):
    name = "tiny-captioner"

    def specificity(self, model):
        return 30 if isinstance(model, _TinyCaptioner) else None

    def captioning(self, model):
        if not isinstance(model, _TinyCaptioner):
            return None
        return Captioning(
            vocabulary=("<start>", "<end>", "red", "blue"),
            end=1,
            feature_layer="encoder",
            attention_module="attend",
            generate=lambda image: [2, 3, 1],
            score=lambda images, words: torch.log_softmax(model(images, words), dim=-1),
            read_attention=lambda output: (output["weights"], output["scores"]),
        )


def test_a_captioner_of_another_plugin_is_explained_through_the_captioning_hook_alone(photo):
    from attnexplain.captioning import explain_caption

    _, pixels = photo
    torch.manual_seed(1)
    model = _TinyCaptioner().eval()
    with use_plugins(_TinyPlugin()):
        explanation = explain_caption(model, pixels, size=32)
    assert explanation.caption == ["red", "blue"] and explanation.grid == (2, 2)
    assert explanation.words[0].attention.shape == (32, 32)
    # α recomputed from the tiny model's own layers on the same prepared input.
    from attnexplain.preprocess import prepare

    x = prepare(pixels, explanation.preprocessing).tensor
    with torch.no_grad():
        annotations = model.encoder(x).flatten(2).transpose(1, 2)
        for word, previous in zip(explanation.words, [0, 2]):
            query = model.queries(torch.tensor([previous]))
            expected = torch.softmax((annotations * query[:, None]).sum(-1), dim=1).reshape(2, 2)
            np.testing.assert_allclose(word.attention_grid, expected.numpy(), atol=1e-6)
            np.testing.assert_allclose(
                np.exp(word.alignment_scores) / np.exp(word.alignment_scores).sum(), word.attention_grid, atol=1e-6
            )


def test_layers_refuses_a_captioner_in_one_line(captioner_file):
    # batch captions (tests/test_caption_batch.py); evaluate measures a captioner's words
    # (tests/test_caption_evaluation.py)
    _clean_failure(_run("layers", captioner_file), "`attnexplain layers`", "captioning")


def test_explain_points_a_captioner_to_explain_caption(captioner):
    import attnexplain
    from attnexplain.errors import MethodError

    with pytest.raises(MethodError, match=r"explain_caption\(\)"):
        attnexplain.explain(captioner, np.zeros((64, 64, 3), np.uint8))


class _HostilePlugin(_TinyPlugin):
    """Words from a model's file that are markup and paths; a reader of the attention that fails."""

    name = "hostile-captioner"

    def __init__(self, vocabulary: tuple[str, ...], generated: list[int], broken_reader: bool = False) -> None:
        self.vocabulary, self.generated, self.broken_reader = vocabulary, generated, broken_reader

    def captioning(self, model):
        plain = super().captioning(model)
        return Captioning(
            vocabulary=self.vocabulary,
            end=1,
            feature_layer="encoder",
            attention_module="attend",
            generate=lambda image: list(self.generated),
            score=plain.score,
            read_attention=(lambda output: output.weights) if self.broken_reader else plain.read_attention,
        )


def test_words_read_from_a_model_are_escaped_in_the_page_and_kept_out_of_file_paths(photo, tmp_path):
    from attnexplain.captioning import explain_caption

    _, pixels = photo
    torch.manual_seed(1)
    model = _TinyCaptioner().eval()
    vocabulary = ("<start>", "<end>", "../../escaped", "<script>alert(1)</script>")
    with use_plugins(_HostilePlugin(vocabulary, [2, 3, 1])):
        explanation = explain_caption(model, pixels, size=32)
    report = explanation.save(tmp_path / "out")
    assert report["caption"] == "../../escaped <script>alert(1)</script>"
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert all((tmp_path / "out" / name).resolve().parent == (tmp_path / "out").resolve() for name in written)
    assert not (tmp_path / "escaped").exists() and not any(tmp_path.glob("*escaped*"))
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_a_plugin_whose_attention_reader_fails_is_a_one_line_error_naming_it(photo):
    from attnexplain.captioning import explain_caption
    from attnexplain.errors import AttnExplainError

    _, pixels = photo
    model = _TinyCaptioner().eval()
    with use_plugins(_HostilePlugin(("<start>", "<end>", "red", "blue"), [2, 3, 1], broken_reader=True)):
        with pytest.raises(
            AttnExplainError, match=r"hostile-captioner's captioning\(\).read_attention failed"
        ) as raised:
            explain_caption(model, pixels, size=32)
    assert "\n" not in str(raised.value)


class _RecordingPlugin(_TinyPlugin):
    """The tiny captioner with a generation that hands back its attention (API v2), the shape of
    which ``attention_shape`` sets: right, (words, 1, 1, 4), or wrong."""

    name = "recording-captioner"

    def __init__(self, attention_shape: tuple[int, ...]) -> None:
        self.attention_shape = attention_shape

    def captioning(self, model):
        from dataclasses import replace

        from attnexplain.plugin_api import CaptionSteps

        def generate_recorded(image):
            return CaptionSteps(
                ids=[2, 3, 1],
                log_probabilities=torch.log(torch.tensor([0.5, 0.25, 0.125])),
                attention=torch.full(self.attention_shape, 0.25),
                grid=(2, 2),
            )

        return replace(super().captioning(model), generate_recorded=generate_recorded)


def test_attention_and_probabilities_come_from_a_recording_generation_and_a_misshapen_one_is_refused(photo):
    """With ``generate_recorded`` the words' attention and probabilities are what the generation
    recorded (here made up by the plugin, so distinguishable from the model's own forward); a
    recording of the wrong shape is a one-line error naming the hook."""
    from attnexplain.captioning import explain_caption
    from attnexplain.errors import AttnExplainError

    _, pixels = photo
    model = _TinyCaptioner().eval()
    with use_plugins(_RecordingPlugin((3, 1, 1, 4))):
        explanation = explain_caption(model, pixels, size=32)
    assert explanation.attention_source == "generation" and explanation.caption == ["red", "blue"]
    assert explanation.probabilities == pytest.approx([0.5, 0.25]) and explanation.end_probability == pytest.approx(
        0.125
    )
    for word in explanation.words:
        np.testing.assert_allclose(word.attention_grid, np.full((2, 2), 0.25))
        assert word.alignment_scores is None and word.gradcam.shape == (32, 32)
    with use_plugins(_RecordingPlugin((3, 2, 4))):
        with pytest.raises(AttnExplainError, match=r"recording-captioner's captioning\(\).generate_recorded") as raised:
            explain_caption(model, pixels, size=32)
    assert "\n" not in str(raised.value)
