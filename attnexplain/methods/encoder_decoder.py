"""Relevance of an encoder–decoder transformer's image tokens for one decoder output (Chefer, Gur &
Wolf 2021, "Generic Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder
Transformers", §3, eqs. 6–11; their DETR and LXMERT generators).

Every attention map A is weighted by its gradient: Ā = E_heads[(∇A ⊙ A)⁺]. Relevance starts as
R_ii = I (image tokens), R_tt = I (the words), R_ti = 0 (words → image), and each layer adds:

- encoder self-attention:   R_ii += Ā·R_ii                                   (eq. 6)
- decoder self-attention:   R_tt += Ā·R_tt,  R_ti += Ā·R_ti                  (eqs. 6–7)
- decoder cross-attention:  R_ti += R̄_ttᵀ·Ā·R̄_ii                             (eqs. 10–11)

where R̄ = (R − I) with rows normalised to sum to 1, plus I: a self-relevance's residual part
kept at the weight of the identity (their ``handle_residual``; a row of R − I summing to 0 adds
nothing). The word's row of R_ti over the image tokens is its relevance map.
"""

from __future__ import annotations

from typing import Sequence

import torch


def weighted_attention(attention: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Ā = mean over heads of relu(∇A ⊙ A): (B, heads, Q, K) → (B, Q, K)."""
    return torch.relu(gradient.float() * attention.float()).mean(dim=1)


def normalized_self_relevance(relevance: torch.Tensor) -> torch.Tensor:
    """R̄ = I + rows of (R − I) normalised to sum to 1 (a zero row stays zero): (B, N, N)."""
    identity = torch.eye(relevance.shape[-1], dtype=relevance.dtype, device=relevance.device)
    residual = relevance - identity
    sums = residual.sum(dim=-1, keepdim=True)
    return torch.where(sums > 0, residual / sums.clamp_min(1e-30), torch.zeros_like(residual)) + identity


def encoder_decoder_relevance(
    encoder: Sequence[torch.Tensor],
    encoder_gradients: Sequence[torch.Tensor],
    decoder: Sequence[torch.Tensor],
    decoder_gradients: Sequence[torch.Tensor],
    cross: Sequence[torch.Tensor],
    cross_gradients: Sequence[torch.Tensor],
) -> torch.Tensor:
    """R_ti (B, T, N): each decoder position's relevance over the N image tokens, from the
    attention of every layer (input first) and its gradient with respect to one output. Decoder
    layer k attends to the words (``decoder[k]``), then to the image (``cross[k]``)."""
    if len(decoder) != len(cross):
        raise ValueError(f"{len(decoder)} decoder self-attention layers but {len(cross)} cross-attention layers")
    batch, _, words, tokens = cross[0].shape
    options = {"dtype": torch.float32, "device": cross[0].device}
    image = torch.eye(tokens, **options).expand(batch, tokens, tokens)
    for attention, gradient in zip(encoder, encoder_gradients):
        image = image + weighted_attention(attention, gradient) @ image
    image_bar = normalized_self_relevance(image)
    text = torch.eye(words, **options).expand(batch, words, words)
    text_image = torch.zeros(batch, words, tokens, **options)
    for self_attention, self_gradient, attention, gradient in zip(decoder, decoder_gradients, cross, cross_gradients):
        weighted = weighted_attention(self_attention, self_gradient)
        text, text_image = text + weighted @ text, text_image + weighted @ text_image
        text_image = text_image + normalized_self_relevance(text).transpose(1, 2) @ (
            weighted_attention(attention, gradient) @ image_bar
        )
    return text_image
