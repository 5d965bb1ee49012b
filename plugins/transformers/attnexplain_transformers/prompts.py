"""CLIP and SigLIP with text prompts: a zero-shot classifier whose classes are the prompts.

A dual encoder (``CLIPModel``, ``SiglipModel``) compares an image with texts. Given prompts, the
plugin encodes them once with the model's own tokenizer (from the model's folder) and text tower,
and hands the core a :class:`PromptClassifier`: an image-only module whose forward returns, per
prompt, the model's own logit (``logit_scale.exp() · cos(image, text)``, plus ``logit_bias`` for
SigLIP), exactly ``logits_per_image``. What the scores mean is the model's: CLIP's probabilities
are the softmax over the prompts, SigLIP's a sigmoid per prompt. With one CLIP prompt a softmax is
1.0 whatever the image, so the score shown is the cosine similarity itself.

The classifier's children are the dual encoder's vision tower under the same names
(``vision_model.encoder.layers.3.layer_norm1``), so every layer, attention module and token grid
the plugin knows for the dual encoder is the classifier's too. The text tower is not a child: it
ran once, and no method looks at it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnexplain.plugin_api import (
    MethodError,
    ModelLoadError,
    NamedModel,
    TokenGrid,
    TokenReadout,
    not_a_regular_file,
    shown,
    vit_cam_block,
)

from .folder import DUAL_ENCODERS, transformers_quiet
from .pooling_probe import HEAD_ATTENTION, capture_with_probe, pooled_by_head

if TYPE_CHECKING:
    import torch

#: Families whose probabilities are a sigmoid per prompt (trained with the sigmoid loss).
SIGMOID_FAMILIES = ("siglip",)
#: Prompts encoded per text-tower forward (a few thousand prompts at once would hold all their tokens).
TEXT_BATCH = 256
#: Files a tokenizer is read from; each must be a small regular file (a real CLIP's tokenizer.json
#: is 3.5 MB, SigLIP's spiece.model 0.8 MB; multilingual vocabularies reach ~35 MB).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "special_tokens_map.json",
    "added_tokens.json",
)
MAX_TOKENIZER_FILE_BYTES = 64 * 1024 * 1024
#: LeGrad's empty prompt for SigLIP, its authors': its map masks a prompt's where it is high.
EMPTY_PROMPT = "a photo of a"


def is_dual_encoder(model: Any) -> bool:
    """A CLIP or SigLIP image–text model (not its classifier variant)."""
    return type(model).__name__ in DUAL_ENCODERS and type(model).__module__.startswith("transformers.")


def is_prompt_classifier(model: Any) -> bool:
    return isinstance(model, _classifier_class())


def family(model: Any) -> str:
    """``clip`` or ``siglip``, of a dual encoder or a prompt classifier."""
    dual = model.dual if is_prompt_classifier(model) else model
    return DUAL_ENCODERS[type(dual).__name__]


def with_prompts(model: Any, prompts: tuple[str, ...] | None) -> NamedModel | None:
    """The dual encoder ``model`` (or the one under a prompt classifier) as a classifier of ``prompts``."""
    if prompts is None:
        raise ModelLoadError(
            f"{type(model).__name__} compares an image with text, so it needs prompts to explain: "
            f"pass --prompt 'a photo of a cat' or --prompts 'a cat,a dog' (prompt=, prompts= in explain())."
        )
    dual = model.dual if is_prompt_classifier(model) else model
    text = encode_prompts(dual, prompts)
    classifier = _classifier_class()(dual, text, sigmoid=family(dual) in SIGMOID_FAMILIES)
    return NamedModel(
        module=classifier,
        architecture=f"{type(dual).__name__} with prompts",
        weights=None,
        labels=list(prompts),
        notes=classifier.notes(),
        random_weights=False,
    )


def encode_prompts(dual: Any, prompts: tuple[str, ...]) -> "torch.Tensor":
    """The prompts' unit-length text embeddings (P, D), computed once with the model's tokenizer."""
    import torch
    import torch.nn.functional as F

    tokenizer = load_tokenizer(dual)
    longest = int(getattr(dual.config.text_config, "max_position_embeddings", 77))
    siglip = family(dual) == "siglip"
    device = next(dual.parameters()).device
    embeddings = []
    with torch.no_grad():
        for start in range(0, len(prompts), TEXT_BATCH):
            chunk = list(prompts[start : start + TEXT_BATCH])
            try:
                # SigLIP was trained on texts padded to its full length (its processor pads so).
                tokens = tokenizer(
                    chunk,
                    padding="max_length" if siglip else True,
                    truncation=True,
                    max_length=longest,
                    return_tensors="pt",
                )
            except Exception as error:  # noqa: BLE001 - the folder's tokenizer
                raise ModelLoadError(f"The model's tokenizer could not read the prompts: {_line(error)}") from None
            inputs = {key: value.to(device) for key, value in tokens.items() if key in ("input_ids", "attention_mask")}
            if siglip:
                inputs.pop("attention_mask", None)  # SigLIP's text tower attends to its padding, as trained
            embeddings.append(F.normalize(dual.get_text_features(**inputs).pooler_output.float(), dim=-1))
    return torch.cat(embeddings)


def load_tokenizer(dual: Any) -> Any:
    """The tokenizer saved next to the model (``save_pretrained`` of the tokenizer or processor),
    read from the folder the model was loaded from; nothing downloaded, no code run."""
    folder = Path(str(getattr(dual, "name_or_path", "") or ""))
    if not str(folder) or not folder.is_dir():
        raise ModelLoadError(
            f"{type(dual).__name__} was not loaded from a folder, so its tokenizer is unknown: load it "
            f"from its save_pretrained folder (holding the tokenizer's files too)."
        )
    present = [name for name in TOKENIZER_FILES if (folder / name).exists()]
    if not present:
        raise ModelLoadError(
            f"{folder} holds no tokenizer ({', '.join(TOKENIZER_FILES[:2])}, ...): save the model's "
            f"tokenizer or processor into the folder with save_pretrained."
        )
    for name in present:
        problem = not_a_regular_file(folder / name)
        if problem is not None:
            raise ModelLoadError(f"Tokenizer file {folder / name} {problem}.")
        size = (folder / name).stat().st_size
        if size > MAX_TOKENIZER_FILE_BYTES:
            raise ModelLoadError(
                f"Tokenizer file {folder / name} is {size:,} bytes; at most {MAX_TOKENIZER_FILE_BYTES:,} are accepted."
            )
    from transformers import AutoTokenizer

    try:
        with transformers_quiet():
            return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as error:  # noqa: BLE001 - what the folder holds
        raise ModelLoadError(f"transformers could not load the tokenizer in {folder}: {_line(error)}") from None


def _line(error: BaseException) -> str:
    return f"{type(error).__name__}: {shown(' '.join(str(error).split()), 200)}"


def class_scores(model: Any, output: Any) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(scores, probabilities) of a prompt classifier's logits: softmax over the prompts (CLIP),
    sigmoid each (SigLIP), the cosine similarity for a single CLIP prompt."""
    if not is_prompt_classifier(model):
        raise MethodError(
            f"{type(model).__name__} compares an image with text: pass --prompt or --prompts to explain it."
        )
    return model.scores(output)


def attention_class(model: Any) -> type | None:
    """The vision tower's attention class, whose second output is its probabilities."""
    recorded = (getattr(model.dual, "_can_record_outputs", None) or {}).get("attentions")
    return recorded if isinstance(recorded, type) else None


def encoder_attention_modules(model: Any) -> list[str]:
    """The vision tower's self-attention modules, input to output."""
    attention = attention_class(model)
    if attention is None:
        return []
    return [name for name, module in model.named_modules() if isinstance(module, attention)]


def pooling_head(model: Any) -> str | None:
    """SigLIP's attention-pooling head's attention (its probe's ``MultiheadAttention``), if any."""
    if family(model) != "siglip" or not hasattr(model.vision_model, "head"):
        return None
    return HEAD_ATTENTION


def attention_modules(model: Any) -> list[str]:
    """The vision tower's self-attention modules, input to output, then SigLIP's pooling head,
    whose probe plays the class token's part (:mod:`.pooling_probe`)."""
    encoder = encoder_attention_modules(model)
    head = pooling_head(model)
    return encoder + [head] if encoder and head else encoder


def capture_attention(model: Any, names: list[str], sink: dict[str, "torch.Tensor"]) -> Any:
    """SigLIP's recording over [probe, patches] (:mod:`.pooling_probe`); None for CLIP, whose
    attention modules return their probabilities as any ViT's do."""
    head = pooling_head(model)
    if head is None:
        return None
    encoder = set(encoder_attention_modules(model))
    unknown = [name for name in names if name not in encoder and name != head]
    if unknown:
        raise MethodError(
            f"Layer {unknown[0]!r} is not an attention module whose probabilities the transformers plugin "
            f"records ({', '.join(attention_modules(model))})."
        )
    return capture_with_probe(model, [name for name in names if name != head], head if head in names else None, sink)


def token_grid(model: Any, input_size: tuple[int, int]) -> TokenGrid:
    """CLIP's tokens: [class token, patches]. SigLIP's are the patches alone; its attention is
    recorded with its pooling probe first (:mod:`.pooling_probe`), the query of its maps."""
    patch_h, patch_w = _patch_size(model)
    return TokenGrid(prefix_tokens=1, height=input_size[0] // patch_h, width=input_size[1] // patch_w, query=0)


def _patch_size(model: Any) -> tuple[int, int]:
    patch = model.dual.config.vision_config.patch_size
    return (patch, patch) if isinstance(patch, int) else (int(patch[0]), int(patch[1]))


def layer_map(model: Any, output: "torch.Tensor", input_size: tuple[int, int]) -> "torch.Tensor | None":
    """A SigLIP block's (B, patches, C) tokens on the patch grid (no prefix token: the probe is in
    the attention recording only); None for CLIP (the grid's class token is dropped as for any ViT)."""
    if family(model) != "siglip" or output.dim() != 3:
        return None
    patch_h, patch_w = _patch_size(model)
    height, width = input_size[0] // patch_h, input_size[1] // patch_w
    if output.shape[1] != height * width:
        return None
    return output.transpose(1, 2).reshape(output.shape[0], output.shape[2], height, width)


def default_method(model: Any) -> str:
    """What ``--method auto`` explains a prompt with: a method that depends on the prompt (rollout
    and raw attention do not: every prompt would get the same map): Chefer's gradient-weighted
    attention, which its authors apply to CLIP (SigLIP's through its pooling probe)."""
    return "chefer"


def default_layer(model: Any) -> str | None:
    """The vision tower's block at half depth, its first norm (as for the classifier ViTs)."""
    vision = [name.rpartition(".")[0] for name in encoder_attention_modules(model)]
    if not vision:
        return None
    block = vision[vit_cam_block(len(vision))]
    return f"{block}.layer_norm1"


def token_readout(model: Any) -> TokenReadout | None:
    """LeGrad's reading of a block, its authors' for CLIP and SigLIP: CLIP's tokens averaged, normed
    and projected; SigLIP's pooled by its attention-pooling head applied to the block's tokens as
    they are (LeGrad then differentiates the head's attention in that call, and masks the map
    where an empty prompt's, :data:`EMPTY_PROMPT`, is high); then the similarity with every prompt."""
    import torch.nn.functional as F

    vision = model.vision_model
    blocks = [name.rpartition(".")[0] for name in encoder_attention_modules(model)]
    if not model.sigmoid:

        def clip_scores(tokens: "torch.Tensor") -> "torch.Tensor":
            embedding = model.visual_projection(vision.post_layernorm(tokens.mean(dim=1)))
            return model.logits(F.normalize(embedding, dim=-1))

        return TokenReadout(blocks, clip_scores)
    if pooling_head(model) is None:
        return None
    empty = empty_prompt_embedding(model)

    def siglip_scores(pooled: "torch.Tensor") -> "torch.Tensor":
        return model.logits(F.normalize(pooled, dim=-1))

    def empty_prompt_score(pooled: "torch.Tensor") -> "torch.Tensor":
        return F.normalize(pooled, dim=-1) @ empty.to(pooled.dtype)[0]

    return TokenReadout(
        blocks,
        siglip_scores,
        pooling=lambda tokens: pooled_by_head(vision.head, tokens),
        reference=empty_prompt_score,
    )


def empty_prompt_embedding(model: Any) -> "torch.Tensor":
    """The prompt classifier's (1, D) text embedding of :data:`EMPTY_PROMPT`, encoded once."""
    found = getattr(model, "empty_prompt_embeds", None)
    if found is None:
        found = encode_prompts(model.dual, (EMPTY_PROMPT,))
        object.__setattr__(model, "empty_prompt_embeds", found)
    return found


_CLASS: type | None = None


def _classifier_class() -> type:
    """:class:`PromptClassifier`, defined on first use so that importing the plugin imports no torch."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _define_classifier()
    return _CLASS


def _define_classifier() -> type:
    import torch.nn.functional as F

    from attnexplain.plugin_api import PromptLogits

    class PromptClassifier(PromptLogits):
        """A dual encoder with its prompts' text embeddings: image → (B, prompts) logits, the
        model's ``logits_per_image`` for those prompts."""

        def __init__(self, dual: Any, text_embeds: torch.Tensor, *, sigmoid: bool) -> None:
            super().__init__(text_embeds, dual.logit_scale, getattr(dual, "logit_bias", None), sigmoid=sigmoid)
            object.__setattr__(self, "dual", dual)  # not a child: its text tower is done with
            self.vision_model = dual.vision_model
            if hasattr(dual, "visual_projection"):
                self.visual_projection = dual.visual_projection

        def image_embeds(self, pixel_values: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            features = self.dual.get_image_features(pixel_values=pixel_values, **kwargs).pooler_output
            return F.normalize(features, dim=-1)

        def forward(self, pixel_values: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return self.logits(self.image_embeds(pixel_values, **kwargs))

    return PromptClassifier
