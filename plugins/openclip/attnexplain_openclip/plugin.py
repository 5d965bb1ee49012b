"""The OpenCLIP plugin: ``open_clip:ARCH:WEIGHTS`` (:mod:`.loading`) explained against text prompts.

Given prompts, the plugin encodes them once with open_clip's tokenizer and the model's text tower
and hands the core a prompt classifier: the image tower (``visual``, under the same name) and the
prompts' unit text embeddings, whose forward returns the model's own logits per prompt
(``logit_scale.exp() · cos(image, text)``, ``+ logit_bias`` where the model has one). CLIP's
probabilities are the softmax over the prompts (one prompt: the cosine similarity itself); a model
with a logit bias (trained with the sigmoid loss) has a sigmoid per prompt.

The image tower is open_clip's ``VisionTransformer``: [class token, patches] through batch-first
``resblocks`` whose ``attn`` is an ``nn.MultiheadAttention`` (recorded per head with
:func:`capture_multihead_attention`), so the CAM family (on a block's tokens), rollout, raw attention,
Chefer and LeGrad (each block's tokens averaged, ``ln_post`` and ``proj``, as its authors read
OpenCLIP's CLIP) apply as to any class-token ViT.

Registered under the entry-point group ``attnexplain.plugins`` as ``openclip``. torch and open_clip
are imported inside the methods only, so discovering the plugin costs nothing.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

from attnexplain.plugin_api import (
    MethodError,
    ModelLoadError,
    ModelPlugin,
    NamedModel,
    Preprocessing,
    TokenGrid,
    TokenReadout,
    vit_cam_block,
)

from . import loading

if TYPE_CHECKING:
    import torch

#: open_clip's defaults where a model names no preprocessing (OpenAI's CLIP statistics).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
#: Prompts encoded per text-tower forward.
TEXT_BATCH = 256
BLOCKS = "visual.transformer.resblocks"


def _is_open_clip(model: Any) -> bool:
    return type(model).__module__.startswith("open_clip.") and hasattr(model, "encode_text")


def _is_classifier(model: Any) -> bool:
    classifier = sys.modules.get(f"{__package__}.classifier")  # imported with the first prompts
    return classifier is not None and isinstance(model, classifier.OpenClipPrompts)


class OpenClipPlugin(ModelPlugin):
    name = "openclip"
    families = (
        "OpenCLIP CLIP (open_clip:ARCH:WEIGHTS) with --prompt/--prompts: "
        "CAM family, rollout, attention, chefer, legrad",
    )
    source_prefix = "open_clip"

    # --- loading ----------------------------------------------------------------------------------

    def specificity(self, model: Any) -> int | None:
        return 30 if _is_classifier(model) or _is_open_clip(model) else None

    def load_named(self, name: str, weights: str | None) -> NamedModel:
        found = loading.weights_file(name, weights) if weights else None  # before building: fails fast
        model = loading.build(name)
        read = None
        if found is not None:
            read = loading.load_weights(model, name, found[0])
            model.visual.preprocess_cfg = found[1]
        return NamedModel(
            module=model,
            architecture=f"OpenCLIP {name}",
            weights=read,
            preprocessing=self.preprocessing(model),
            notes=() if read else ("random weights: name a weights file or a cached pretrained tag",),
            random_weights=read is None,
        )

    def with_prompts(self, model: Any, prompts: tuple[str, ...] | None) -> NamedModel | None:
        if not (_is_open_clip(model) or _is_classifier(model)):
            return super().with_prompts(model, prompts)
        if prompts is None:
            raise ModelLoadError(
                "An OpenCLIP model compares an image with text, so it needs prompts to explain: pass "
                "--prompt 'a photo of a cat' or --prompts 'a cat,a dog' (prompt=, prompts= in explain())."
            )
        from .classifier import OpenClipPrompts

        dual = model.dual if _is_classifier(model) else model
        classifier = OpenClipPrompts(dual, encode_prompts(dual, prompts))
        return NamedModel(
            module=classifier,
            architecture=f"OpenCLIP {type(dual).__name__} with prompts",
            weights=None,
            labels=list(prompts),
            preprocessing=self.preprocessing(dual),
            notes=classifier.notes(),
            random_weights=False,
        )

    def preprocessing(self, model: Any) -> Preprocessing | None:
        if not (_is_open_clip(model) or _is_classifier(model)):
            return None
        visual = model.visual
        size = visual.image_size if isinstance(visual.image_size, (tuple, list)) else (visual.image_size,) * 2
        # What the pretrained tag's configuration says (loading.load_weights sets it), else open_clip's
        # defaults: OpenAI's statistics, bicubic, the shorter side resized, then a centre crop.
        config = getattr(visual, "preprocess_cfg", None) or {}
        mean, std = config.get("mean", OPENAI_MEAN), config.get("std", OPENAI_STD)
        return Preprocessing(
            size=(int(size[0]), int(size[1])),
            resize=int(min(size)),
            mean=(float(mean[0]), float(mean[1]), float(mean[2])),
            std=(float(std[0]), float(std[1]), float(std[2])),
            interpolation=str(config.get("interpolation", "bicubic")),
            source="open_clip",
        )

    def task(self, model: Any) -> str:
        return "zero-shot classification" if _is_classifier(model) else "classification"

    def class_scores(self, model: Any, output: Any) -> tuple["torch.Tensor", "torch.Tensor"]:
        if not _is_classifier(model):
            raise MethodError(
                "An OpenCLIP model compares an image with text: pass --prompt or --prompts to explain it."
            )
        return model.scores(output)

    # --- layers and attention ------------------------------------------------------------------------

    def default_method(self, model: Any) -> str | None:
        # A method that depends on the prompt (rollout and raw attention give every prompt one map).
        return "chefer" if _is_classifier(model) else None

    def _blocks(self, model: Any) -> list[str]:
        visual = getattr(model, "visual", None)
        blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
        return [f"{BLOCKS}.{index}" for index in range(len(blocks))] if blocks is not None else []

    def default_layer(self, model: Any) -> str | None:
        blocks = self._blocks(model)
        return f"{blocks[vit_cam_block(len(blocks))]}.ln_1" if blocks else None

    def attention_modules(self, model: Any) -> list[str]:
        return [f"{block}.attn" for block in self._blocks(model)] if _is_classifier(model) else []

    def token_grid(self, model: Any, input_size: tuple[int, int]) -> TokenGrid | None:
        if not _is_classifier(model):
            return None
        patch = model.visual.patch_size
        patch_h, patch_w = (patch, patch) if isinstance(patch, int) else (int(patch[0]), int(patch[1]))
        return TokenGrid(prefix_tokens=1, height=input_size[0] // patch_h, width=input_size[1] // patch_w, query=0)

    @contextmanager
    def capture_attention(self, model: Any, names: list[str], sink: dict[str, "torch.Tensor"]) -> Iterator[None]:
        from attnexplain.plugin_api import capture_multihead_attention

        with capture_multihead_attention(model, names, sink):
            yield

    def token_readout(self, model: Any) -> TokenReadout | None:
        """LeGrad's reading of a block, as its authors read OpenCLIP's CLIP: the block's tokens
        averaged, ``ln_post`` and ``proj``, then the similarity with every prompt."""
        if not _is_classifier(model):
            return None
        import torch.nn.functional as F

        visual = model.visual

        def scores(tokens: "torch.Tensor") -> "torch.Tensor":
            embedding = visual.ln_post(tokens.mean(dim=1)) @ visual.proj
            return model.logits(F.normalize(embedding, dim=-1))

        return TokenReadout(self._blocks(model), scores)


def encode_prompts(dual: Any, prompts: tuple[str, ...]) -> "torch.Tensor":
    """The prompts' unit-length text embeddings (P, D), computed once."""
    import torch
    import torch.nn.functional as F

    tokenizer = loading.tokenizer(dual)
    device = next(dual.parameters()).device
    embeddings = []
    with torch.no_grad():
        for start in range(0, len(prompts), TEXT_BATCH):
            tokens = tokenizer(list(prompts[start : start + TEXT_BATCH])).to(device)
            embeddings.append(F.normalize(dual.encode_text(tokens).float(), dim=-1))
    return torch.cat(embeddings)


plugin = OpenClipPlugin()
