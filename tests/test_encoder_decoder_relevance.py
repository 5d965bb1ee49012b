"""Chefer et al. 2021b's encoder–decoder relevance (attnexplain.methods.encoder_decoder) against the
paper's rules written out here in numpy, image by image, on random attention and gradients; and its
refusals of a recording whose roles or shapes do not fit. (A DETR end to end, from disk, is in
plugins/transformers/tests/test_detection_transformers.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnexplain.methods.encoder_decoder import query_relevance
from attnexplain.plugins import EncoderDecoderAttention

TOKENS, QUERIES, HEADS, BATCH = 6, 3, 2, 2


def _layer(role: str, rows: int, keys: int, generator: torch.Generator):
    probabilities = torch.rand(BATCH, HEADS, rows, keys, generator=generator).softmax(dim=-1)
    gradient = torch.randn(BATCH, HEADS, rows, keys, generator=generator)
    return EncoderDecoderAttention(probabilities, role), gradient


def _recording(generator: torch.Generator):
    shapes = {"encoder": (TOKENS, TOKENS), "decoder": (QUERIES, QUERIES), "cross": (QUERIES, TOKENS)}
    roles = ["encoder", "encoder", "decoder", "cross", "decoder", "cross"]
    pairs = [_layer(role, *shapes[role], generator) for role in roles]
    return [layer for layer, _ in pairs], [gradient for _, gradient in pairs]


def _by_hand(layers, gradients, image: int) -> np.ndarray:
    def bar(layer, gradient):
        product = gradient[image].numpy() * layer.probabilities[image].numpy()
        return np.maximum(product, 0).mean(axis=0)

    def normalised(relevance):
        eye = np.eye(len(relevance))
        sums = (relevance - eye).sum(axis=1, keepdims=True)
        return (relevance - eye) / np.where(sums == 0, 1, sums) + eye

    r_ii, r_qq, r_qi = np.eye(TOKENS), np.eye(QUERIES), np.zeros((QUERIES, TOKENS))
    for layer, gradient in zip(layers, gradients):
        a = bar(layer, gradient)
        if layer.role == "encoder":
            r_ii = r_ii + a @ r_ii
        elif layer.role == "decoder":
            r_qq, r_qi = r_qq + a @ r_qq, r_qi + a @ r_qi
        else:
            r_qi = r_qi + normalised(r_qq).T @ a @ normalised(r_ii)
    return r_qi


def test_query_relevance_follows_the_papers_rules_layer_by_layer():
    layers, gradients = _recording(torch.Generator().manual_seed(0))
    relevance = query_relevance(layers, gradients)
    assert relevance.shape == (BATCH, QUERIES, TOKENS)
    for image in range(BATCH):
        np.testing.assert_allclose(relevance[image].numpy(), _by_hand(layers, gradients, image), rtol=1e-5, atol=1e-6)


def test_a_self_attention_row_with_no_relevance_keeps_the_identity_instead_of_dividing_by_zero():
    layers, gradients = _recording(torch.Generator().manual_seed(1))
    gradients[2][:, :, 1] = 0  # the first decoder layer gives query 1 no relevance: R_qq − I's row is 0
    relevance = query_relevance(layers, gradients)
    assert torch.isfinite(relevance).all()
    for image in range(BATCH):
        np.testing.assert_allclose(relevance[image].numpy(), _by_hand(layers, gradients, image), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda layers: [EncoderDecoderAttention(layers[0].probabilities, "memory"), *layers[1:]], "not one of"),
        (
            lambda layers: [EncoderDecoderAttention(layers[3].probabilities, "decoder"), *layers[1:]],
            r"\(3, 6\), not \(3, 3\)",
        ),
        (lambda layers: [layer for layer in layers if layer.role != "cross"], "no decoder cross-attention"),
    ],
)
def test_a_recording_whose_roles_do_not_fit_is_refused(change, message):
    layers, gradients = _recording(torch.Generator().manual_seed(2))
    changed = change(layers)
    with pytest.raises(ValueError, match=message):
        query_relevance(changed, gradients[: len(changed)])
