"""Chefer et al. 2021b's relevance for an encoder–decoder transformer whose decoder's queries read
the image's tokens (a DETR): "Generic Attention-model Explainability for Interpreting Bi-Modal and
Encoder-Decoder Transformers", ICCV 2021, the rules of its section 3 for the image tokens i and the
queries q.

Three relevance matrices start as R_ii = I, R_qq = I, R_qi = 0 and are updated layer by layer, in the
order the model runs them, with each layer's gradient-weighted attention Ā = E_h[(∇A ⊙ A)⁺] (eq. 5,
the gradient of the explained score):

- encoder self-attention among the image tokens (eq. 6): R_ii ← R_ii + Ā·R_ii;
- decoder self-attention among the queries (eqs. 6, 7): R_qq ← R_qq + Ā·R_qq, R_qi ← R_qi + Ā·R_qi;
- decoder cross-attention from the queries to the image (eq. 10): R_qi ← R_qi + R̄_qqᵀ·Ā·R̄_ii, with
  the self-attention relevances normalised as eqs. 8 and 9 say: R̄ = (R − I) / (row sums of R − I) + I,
  so that the additions of the self-attention layers weigh as much as the identity (the residual).
  A row of R − I that sums to 0 (a token no self-attention added relevance to) stays 0, where the
  authors' code divides by 0 and drops the whole addition (its NaNs set to 0).

Rule 11 (R_qq ← R_qq + Ā·R_iq) adds nothing here: the image tokens never attend to the queries, so
R_iq stays 0. The explained query's row of R_qi, over the image tokens, is the map.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..plugins import EncoderDecoderAttention

ROLES = ("encoder", "decoder", "cross")


def gradient_weighted(attention: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Ā = E_h[(∇A ⊙ A)⁺] (eq. 5): (B, heads, rows, keys) → (B, rows, keys)."""
    return torch.relu(gradient.float() * attention.float()).mean(dim=1)


def normalised_self_relevance(relevance: torch.Tensor) -> torch.Tensor:
    """R̄ = (R − I) / (row sums of R − I) + I (eqs. 8 and 9); a row of R − I summing to 0 stays 0."""
    identity = torch.eye(relevance.shape[-1], dtype=relevance.dtype, device=relevance.device)
    added = relevance - identity
    sums = added.sum(dim=-1, keepdim=True)
    return added / torch.where(sums > 0, sums, torch.ones_like(sums)) + identity


def query_relevance(layers: Sequence[EncoderDecoderAttention], gradients: Sequence[torch.Tensor]) -> torch.Tensor:
    """R_qi after every layer: (B, queries, image tokens). ``layers`` in the order the model ran
    them, ``gradients`` the explained score's gradient with respect to each one's probabilities."""
    cross = [layer.probabilities for layer in layers if layer.role == "cross"]
    if not cross:
        raise ValueError("no decoder cross-attention was recorded")
    batch, _, queries, tokens = cross[0].shape
    options = {"dtype": torch.float32, "device": cross[0].device}
    image = torch.eye(tokens, **options).expand(batch, tokens, tokens)  # R_ii
    query = torch.eye(queries, **options).expand(batch, queries, queries)  # R_qq
    query_image = torch.zeros(batch, queries, tokens, **options)  # R_qi
    for layer, gradient in zip(layers, gradients, strict=True):
        if layer.role not in ROLES:
            raise ValueError(f"a recorded layer's role is {layer.role!r}, not one of {', '.join(ROLES)}")
        expected = {"encoder": (tokens, tokens), "decoder": (queries, queries), "cross": (queries, tokens)}[layer.role]
        if tuple(layer.probabilities.shape[-2:]) != expected:
            raise ValueError(
                f"its {layer.role} attention is {tuple(layer.probabilities.shape[-2:])}, not "
                f"{expected} for {queries} queries and {tokens} image tokens"
            )
        weighted = gradient_weighted(layer.probabilities, gradient)
        if layer.role == "encoder":
            image = image + weighted @ image
        elif layer.role == "decoder":
            query, query_image = query + weighted @ query, query_image + weighted @ query_image
        else:
            mixed = normalised_self_relevance(query).transpose(-1, -2) @ weighted @ normalised_self_relevance(image)
            query_image = query_image + mixed
    return query_image


__all__ = ["ROLES", "gradient_weighted", "normalised_self_relevance", "query_relevance"]
