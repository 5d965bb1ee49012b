"""The scores of a model that compares an image with text prompts, for the plugins that build a
prompt classifier (:meth:`~attnexplain.plugins.ModelPlugin.with_prompts`).

A dual encoder (CLIP, SigLIP, OpenCLIP) scores an image against a text by ``logit_scale.exp() ·
cos(image, text)`` (``+ logit_bias`` where it was trained with the sigmoid loss). With the prompts
encoded once, :class:`PromptLogits` holds their unit text embeddings and the model's scale and bias;
a plugin's classifier subclasses it, computes the image's unit embedding in ``forward`` and returns
:meth:`PromptLogits.logits` of it. :meth:`PromptLogits.scores` is what its ``class_scores`` answers.
"""

from __future__ import annotations

import torch
from torch import nn


class PromptLogits(nn.Module):
    """Unit image embeddings → the model's logits for fixed prompts; what those logits mean.

    ``text_embeds``: (prompts, D) unit text embeddings. ``logit_scale``: the model's parameter, the
    logarithm of the scale (as CLIP stores it). ``logit_bias``: the model's bias, or None (CLIP).
    ``sigmoid``: the probabilities are a sigmoid per prompt (SigLIP), else a softmax over them."""

    def __init__(
        self, text_embeds: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor | None, *, sigmoid: bool
    ) -> None:
        super().__init__()
        self.sigmoid = sigmoid
        self.register_buffer("text_embeds", text_embeds)
        self.register_buffer("logit_scale", logit_scale.detach().float().exp().reshape(()))
        bias = logit_bias.detach().float() if logit_bias is not None else torch.zeros(1)
        self.register_buffer("logit_bias", bias.reshape(()))

    def logits(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, D) unit image embeddings → (B, prompts) logits: scale · cosine + bias."""
        text = self.text_embeds.to(image_embeds.dtype)
        return self.logit_scale * image_embeds @ text.T + self.logit_bias

    def notes(self) -> tuple[str, ...]:
        """What the report says of the classifier: how many prompts, and for a single softmax
        prompt that its score is the cosine similarity."""
        count = int(self.text_embeds.shape[0])
        notes = [f"zero-shot classifier over {count} text prompt{'s' if count > 1 else ''}"]
        if count == 1 and not self.sigmoid:
            notes.append("one prompt: the score shown is the image–text cosine similarity, not a probability")
        return tuple(notes)

    def scores(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, probabilities) of the logits: a softmax over the prompts, a sigmoid each, or for
        a single softmax prompt (1.0 on any image) the cosine similarity itself."""
        logits = output.float().detach()
        if self.sigmoid:
            return output, torch.sigmoid(logits)
        if output.shape[1] == 1:
            return output, (logits - self.logit_bias) / self.logit_scale
        return output, torch.softmax(logits, dim=1)
