"""The prompt classifier an OpenCLIP model becomes with prompts (imported with the first prompts,
not with the plugin: it imports torch)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from attnexplain.plugin_api import PromptLogits


class OpenClipPrompts(PromptLogits):
    """An OpenCLIP model with its prompts' text embeddings: image → (B, prompts) logits. A model
    with a logit bias was trained with the sigmoid loss: a sigmoid per prompt."""

    def __init__(self, dual: Any, text_embeds: torch.Tensor) -> None:
        bias = getattr(dual, "logit_bias", None)
        super().__init__(text_embeds, dual.logit_scale, bias, sigmoid=bias is not None)
        object.__setattr__(self, "dual", dual)  # not a child: its text tower is done with
        self.visual = dual.visual

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.logits(F.normalize(self.visual(pixel_values), dim=-1))
