"""A Hugging Face captioner's words explained by the methods ``--method`` names at an encoder layer
``--layer`` names: a tiny ViT + GPT-2 VisionEncoderDecoderModel saved with save_pretrained and loaded
from disk. The CAMs are checked against their formulas on the layer's tokens laid on the patch grid
by hand, with the gradient of the word's log-probability taken by hand (a forward hook and
``torch.autograd.grad`` on the model's own teacher-forced forward); saliency against Captum called
on a module of this test's own; Chefer's relevance is still there beside them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from attnexplain import explain_caption

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from captioner_folders import BOS, EOS, PATCH, SIZE, WORDS, gpt2_captioner  # noqa: E402

LAYER = "encoder.layers.0"  # the first ViT block: a token map with a class token
GRID = SIZE // PATCH


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return gpt2_captioner(tmp_path_factory.mktemp("vit-gpt2"))


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    pixels = np.random.default_rng(5).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    pixels[8:24, 4:20] = [40, 200, 60]
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    Image.fromarray(pixels).save(path)
    return path


def _forced(model, pixels: torch.Tensor, steps: list[int]) -> torch.Tensor:
    """Each image's (T, V) log-probabilities of the caption ``steps`` under teacher forcing."""
    inputs = torch.tensor([[BOS] + steps[:-1]]).expand(len(pixels), -1)
    return torch.log_softmax(model(pixel_values=pixels, decoder_input_ids=inputs).logits, dim=-1)


class _WordScore(torch.nn.Module):
    def __init__(self, model, steps: list[int], t: int) -> None:
        super().__init__()
        self.model, self.steps, self.t = model, steps, t

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return _forced(self.model, images, self.steps)[:, self.t, self.steps[self.t]]


def test_cams_at_an_encoder_layer_and_saliency_of_each_word_match_hooks_autograd_and_captum(folder, photo):
    from captum.attr import Saliency

    explanation = explain_caption(str(folder), str(photo), methods="gradcam,layercam,hirescam,saliency", layer=LAYER)
    model = transformers.VisionEncoderDecoderModel.from_pretrained(folder, attn_implementation="eager").eval()
    pixels = transformers.ViTImageProcessor.from_pretrained(folder)(
        images=Image.open(photo).convert("RGB"), return_tensors="pt"
    ).pixel_values
    steps = [WORDS.index(w) for w in explanation.caption] + ([EOS] if explanation.end_probability is not None else [])
    kept = []

    def keep(_module, _args, output):
        kept.append(output[0] if isinstance(output, tuple) else output)

    handle = model.get_submodule(LAYER).register_forward_hook(keep)
    try:
        log_probs = _forced(model, pixels, steps)[0]
    finally:
        handle.remove()
    tokens = kept[0]
    activation = tokens[0, 1:].detach().t().reshape(-1, GRID, GRID)  # class token dropped, (C, h, w)
    assert explanation.to_dict()["cam_layer"] == LAYER
    for word in explanation.words:
        (gradient,) = torch.autograd.grad(log_probs[word.position, steps[word.position]], tokens, retain_graph=True)
        g = gradient[0, 1:].t().reshape(-1, GRID, GRID)
        expected = {
            "gradcam": F.relu((g.mean(dim=(1, 2), keepdim=True) * activation).sum(dim=0)),
            "layercam": F.relu((F.relu(g) * activation).sum(dim=0)),
            "hirescam": F.relu((g * activation).sum(dim=0)),
        }
        for name, grid in expected.items():
            upsampled = F.interpolate(grid[None, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)
            np.testing.assert_allclose(word.maps[name], upsampled[0, 0].numpy(), rtol=1e-3, atol=1e-6, err_msg=name)
        saliency = Saliency(_WordScore(model, steps, word.position)).attribute(pixels.clone().requires_grad_())
        np.testing.assert_allclose(word.maps["saliency"], saliency.abs().amax(dim=1)[0].numpy(), rtol=1e-3, atol=1e-6)
        assert word.relevance is not None and word.relevance.shape == (SIZE, SIZE)  # the default relevance stays
    assert any(word.maps["gradcam"].max() > 0 for word in explanation.words)
