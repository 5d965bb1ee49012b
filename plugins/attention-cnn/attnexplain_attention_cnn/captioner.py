"""A "Show, Attend and Tell" image captioner: a small CNN encoder, an LSTM decoder with soft attention.

Xu et al. 2015 (Show, Attend and Tell: Neural Image Caption Generation with Visual Attention, §3.1,
§4.2) caption an image word by word. The encoder's feature map gives L annotation vectors a_i (one
per position, i = row · w + column); at step t the decoder, in state h_{t-1}, scores every position,
turns the scores into weights and reads a context vector:

    e_ti  = wᵀ tanh(W_a a_i + W_h h_{t-1})          alignment score (additive, Bahdanau et al. 2015)
    α_t   = softmax(e_t)                             over the L positions
    β_t   = σ(f_β(h_{t-1}))                          the gate: how much of the image this step reads
    ẑ_t   = β_t · Σ_i α_ti a_i                       context vector
    h_t   = LSTM([E y_{t-1}; ẑ_t], h_{t-1})
    p(y_t) ∝ exp(L_o(E y_{t-1} + L_h h_t + L_z ẑ_t))   the deep output layer

trained with the word's cross-entropy plus the doubly stochastic regularisation
λ Σ_i (1 − Σ_t α_ti)², which asks every position to be attended about once over the caption.

:class:`AdditiveAttention` computes (context, α, e) in one call per step, so a forward hook on it
reads the very α the context was computed from, and e before the softmax. The captioner's
vocabulary is an argument (JSON), so a checkpoint carries it in ``arch_kwargs``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .model import strided_backbone

#: The special words every vocabulary starts with, in this order.
PAD, START, END = "<pad>", "<start>", "<end>"


class AdditiveAttention(nn.Module):
    """Soft attention of one decoder state over the L annotation vectors.

    ``forward(annotations (B, L, C), hidden (B, H))`` returns ``(context (B, C), alpha (B, L),
    scores (B, L))``: the context is Σ α_i a_i (before the gate), α the softmax of the scores e.
    """

    def __init__(self, channels: int, hidden_size: int, attention_dim: int) -> None:
        super().__init__()
        self.project_annotations = nn.Linear(channels, attention_dim)  # W_a a_i (+ bias)
        self.project_hidden = nn.Linear(hidden_size, attention_dim, bias=False)  # W_h h_{t-1}
        self.score = nn.Linear(attention_dim, 1, bias=False)  # wᵀ tanh(.)

    def forward(
        self, annotations: torch.Tensor, hidden: torch.Tensor, projected: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if projected is None:
            projected = self.project_annotations(annotations)
        scores = self.score(torch.tanh(projected + self.project_hidden(hidden)[:, None, :])).squeeze(-1)
        alpha = torch.softmax(scores, dim=1)
        context = torch.bmm(alpha.unsqueeze(1), annotations).squeeze(1)
        return context, alpha, scores


class ShowAttendTell(nn.Module):
    """A captioner: CNN encoder → feature map (B, C, h, w) → LSTM decoder with additive attention.

    The encoder has a stem and ``len(channels) - 1`` stages, each starting with a stride-2
    convolution: the default turns a 128×128 input into a 16×16 map (256 positions). All arguments
    are JSON values, so a checkpoint can name them in ``arch_kwargs``.

    Args:
        vocabulary: the words, index → word; must start with ``<pad>``, ``<start>``, ``<end>``.
        channels: output channels of the stem, then of each stage.
        convs_per_stage: convolutions per stage after the stem (the first one strided).
        embedding_dim, hidden_size, attention_dim: the decoder's sizes.
        init_from_features: initialise the LSTM state from the mean feature vector, as the paper
            does. False starts from a learned state, so that everything the decoder knows about the
            image comes through its attention (the sample's choice; see samples/README.md).
        max_length: the longest caption :meth:`generate` writes (words, ``<end>`` included).
        image_size: the input side the model was trained at (a preprocessing hint; any size runs).
    """

    def __init__(
        self,
        vocabulary: Sequence[str],
        channels: Sequence[int] = (24, 48, 96),
        convs_per_stage: int = 2,
        embedding_dim: int = 32,
        hidden_size: int = 128,
        attention_dim: int = 64,
        init_from_features: bool = True,
        max_length: int = 12,
        image_size: int = 128,
    ) -> None:
        super().__init__()
        self.vocabulary = [str(word) for word in vocabulary]
        if self.vocabulary[:3] != [PAD, START, END] or len(set(self.vocabulary)) != len(self.vocabulary):
            raise ValueError(f"vocabulary must start with {PAD}, {START}, {END} and name each word once")
        channels = [int(c) for c in channels]
        if len(channels) < 1 or convs_per_stage < 1:
            raise ValueError("channels needs at least one entry and convs_per_stage must be >= 1")
        self.image_size = int(image_size)
        self.max_length = int(max_length)
        self.init_from_features = bool(init_from_features)
        self.encoder = strided_backbone(channels, convs_per_stage)
        features, words = channels[-1], len(self.vocabulary)
        self.embedding = nn.Embedding(words, embedding_dim)
        self.attention = AdditiveAttention(features, hidden_size, attention_dim)
        self.gate = nn.Linear(hidden_size, 1)  # f_β
        self.lstm = nn.LSTMCell(embedding_dim + features, hidden_size)
        self.init_state = nn.Linear(features, 2 * hidden_size)  # from the mean feature vector
        self.learned_state = nn.Parameter(torch.zeros(2 * hidden_size))  # or not from the image
        self.output_hidden = nn.Linear(hidden_size, embedding_dim)  # L_h
        self.output_context = nn.Linear(features, embedding_dim)  # L_z
        self.output = nn.Linear(embedding_dim, words)  # L_o

    @property
    def start(self) -> int:
        return self.vocabulary.index(START)

    @property
    def end(self) -> int:
        return self.vocabulary.index(END)

    @property
    def last_block(self) -> str:
        """Name (relative to the model) of the encoder's last block: the feature map attended over."""
        return "encoder." + list(self.encoder.named_children())[-1][0]

    def _begin(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        annotations = self.encoder(images).flatten(2).transpose(1, 2)  # (B, L, C): a_i
        if self.init_from_features:
            state = torch.tanh(self.init_state(annotations.mean(dim=1)))
        else:
            state = self.learned_state.expand(len(images), -1)
        hidden, cell = state.chunk(2, dim=1)
        return annotations, self.attention.project_annotations(annotations), (hidden.contiguous(), cell.contiguous())

    def _step(
        self,
        annotations: torch.Tensor,
        projected: torch.Tensor,
        previous: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One word: (logits (B, V), alpha (B, L), new state) given the previous word (B,)."""
        hidden = state[0]
        context, alpha, _scores = self.attention(annotations, hidden, projected)
        context = torch.sigmoid(self.gate(hidden)) * context  # β_t ẑ_t
        embedded = self.embedding(previous)
        state = self.lstm(torch.cat([embedded, context], dim=1), state)
        logits = self.output(embedded + self.output_hidden(state[0]) + self.output_context(context))
        return logits, alpha, state

    def forward(self, images: torch.Tensor, words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing: ``words`` (B, T) are the caption's words (``<end>`` included, no
        ``<start>``); returns (logits (B, T, V) of each word given the ones before it, alpha (B, T, L))."""
        annotations, projected, state = self._begin(images)
        previous = torch.full((len(images),), self.start, dtype=torch.long, device=images.device)
        logits, alphas = [], []
        for t in range(words.shape[1]):
            step_logits, alpha, state = self._step(annotations, projected, previous, state)
            logits.append(step_logits)
            alphas.append(alpha)
            previous = words[:, t]
        return torch.stack(logits, dim=1), torch.stack(alphas, dim=1)

    @torch.no_grad()
    def generate(self, images: torch.Tensor, max_length: int | None = None) -> list[list[int]]:
        """Greedy decoding: each image's words, ``<end>`` included when it was written."""
        limit = self.max_length if max_length is None else int(max_length)
        annotations, projected, state = self._begin(images)
        previous = torch.full((len(images),), self.start, dtype=torch.long, device=images.device)
        captions: list[list[int]] = [[] for _ in range(len(images))]
        done = torch.zeros(len(images), dtype=torch.bool, device=images.device)
        for _ in range(limit):
            logits, _alpha, state = self._step(annotations, projected, previous, state)
            previous = logits.argmax(dim=1)
            for i in range(len(images)):
                if not done[i]:
                    captions[i].append(int(previous[i]))
            done |= previous == self.end
            if bool(done.all()):
                break
        return captions

    def words_to_ids(self, words: Sequence[str]) -> list[int]:
        """The ids of ``words`` (a ValueError names the first one not in the vocabulary)."""
        ids = []
        for word in words:
            if word not in self.vocabulary:
                raise ValueError(f"{word!r} is not in the vocabulary")
            ids.append(self.vocabulary.index(word))
        return ids


def doubly_stochastic_penalty(alphas: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_i (1 − Σ_t α_ti)² per caption, averaged over the batch (Xu et al. 2015, eq. 14).

    ``alphas`` (B, T, L); ``mask`` (B, T) is 1 for the steps that belong to the caption."""
    attended = (alphas * mask[:, :, None]).sum(dim=1)  # (B, L)
    return ((1.0 - attended) ** 2).sum(dim=1).mean()
