"""Hugging Face image captioners: ``VisionEncoderDecoderModel`` with a ViT-family encoder (class
token, then the patches) and a decoder that cross-attends to it (GPT-2, BERT, ...).

The caption is the model's own ``generate`` under its ``generation_config`` (greedy or beam
search), run with ``output_attentions`` and ``output_logits``: every word's cross-attention (each
decoder layer, each head, the step's query over the encoder's tokens) and its log-probability come
from that one pass; for beam search, the rows of the beam that was returned (``beam_indices``).
Hugging Face's attention modules return the softmax probabilities only, never the scores before
it, so a word has no alignment scores here.

The gradient maps come from one teacher-forced forward with ``output_attentions``: the encoder's
self-attention, the decoder's self- and cross-attention are the tensors the forward multiplies the
values with (eager attention; dropout is the identity in eval mode), so the core's one backward per
word gives Grad-CAM on the encoder's last token map (``encoder.layernorm``) and Chefer et al.
2021b's encoder–decoder relevance.

BLIP (``BlipForConditionalGeneration``) is refused: its ``generate`` runs the text decoder as a
decoder-only model, whose generation output holds no cross-attention, so its words' attention over
the image cannot be recorded from the generation pass the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from attnexplain.plugin_api import CaptionAttention, Captioning, CaptionSteps, MethodError, ModelLoadError

from .prompts import load_tokenizer

if TYPE_CHECKING:
    import torch

#: Encoders whose tokens are [class token, patches row by row] at the config's image size.
CLASS_TOKEN_ENCODERS = ("vit", "deit")
#: Captioning classes this module explains, and those it refuses with the reason.
REFUSED = {
    "BlipForConditionalGeneration": "BLIP's generate runs its text decoder as a decoder-only model, whose "
    "generation output holds no cross-attention, so its words' attention over the image cannot be recorded "
    "from the generation pass as for a VisionEncoderDecoderModel",
}


def is_captioner(model: Any) -> bool:
    return type(model).__name__ in ("VisionEncoderDecoderModel", *REFUSED) and hasattr(model, "config")


def _special_tokens(model: Any) -> int:
    """Tokens before the patches: the class token (and DeiT's distillation token)."""
    return 2 if model.config.encoder.model_type == "deit" else 1


def _patch(model: Any) -> tuple[int, int]:
    patch = model.config.encoder.patch_size
    return (int(patch[0]), int(patch[1])) if isinstance(patch, (list, tuple)) else (int(patch), int(patch))


def _grid(model: Any) -> tuple[int, int]:
    size = model.config.encoder.image_size
    sides = size if isinstance(size, (list, tuple)) else (size, size)
    return (int(sides[0]) // _patch(model)[0], int(sides[1]) // _patch(model)[1])


def _token_id(*values: Any) -> int | None:
    for value in values:
        if isinstance(value, (list, tuple)) and value:
            value = value[0]
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def captioning(model: Any) -> Captioning:
    """The model as a captioner (see the module's docstring); a one-line refusal for BLIP and for an
    encoder whose tokens are not a class token and a patch grid."""
    import torch

    name = type(model).__name__
    if name in REFUSED:
        raise MethodError(f"{name} is not explained as a captioner: {REFUSED[name]}.")
    encoder_type = model.config.encoder.model_type
    if encoder_type not in CLASS_TOKEN_ENCODERS:
        raise MethodError(
            f"This VisionEncoderDecoderModel's encoder is a {encoder_type!r} model; attnexplain lays the "
            f"encoder's tokens on the image for {', '.join(CLASS_TOKEN_ENCODERS)} encoders (a class token, "
            f"then the patches)."
        )
    config, generation = model.config, model.generation_config
    start = _token_id(config.decoder_start_token_id, generation.decoder_start_token_id, config.decoder.bos_token_id)
    end = _token_id(generation.eos_token_id, config.eos_token_id, config.decoder.eos_token_id)
    if start is None or end is None:
        raise MethodError(
            "The VisionEncoderDecoderModel's config names no decoder_start_token_id or eos_token_id, so "
            "it cannot write a caption; set them in its config (or generation_config) and save it again."
        )
    tokenizer = load_tokenizer(model)
    size = int(config.decoder.vocab_size)
    known = min(size, len(tokenizer))
    words = tokenizer.batch_decode([[i] for i in range(known)], skip_special_tokens=False)
    vocabulary = tuple(words) + tuple(f"<id {i}>" for i in range(known, size))
    height, width = _grid(model)
    special = _special_tokens(model)
    cross_names = [n for n, _ in model.decoder.named_modules() if n.endswith("crossattention")]

    def fitting(images: torch.Tensor) -> torch.Tensor:
        side = (height * _patch(model)[0], width * _patch(model)[1])
        if tuple(images.shape[-2:]) != side:
            raise MethodError(
                f"This captioner's {encoder_type} encoder takes {side[0]}×{side[1]} images (its config's image_size), "
                f"not {images.shape[-2]}×{images.shape[-1]}: leave --size out."
            )
        return images

    def decoder_inputs(words_: torch.Tensor) -> torch.Tensor:
        starts = torch.full_like(words_[:, :1], start)
        return torch.cat([starts, words_[:, :-1]], dim=1)

    def generate_recorded(image: torch.Tensor) -> CaptionSteps:
        out = model.generate(
            pixel_values=fitting(image), output_attentions=True, output_logits=True, return_dict_in_generate=True
        )
        ids = [int(i) for i in out.sequences[0, 1:]]
        beams = getattr(out, "beam_indices", None)
        if beams is not None:  # the returned beam's rows; -1 past its end
            ids = ids[: int((beams[0] >= 0).sum())]
        while ids and ids[-1] == generation.pad_token_id and end != generation.pad_token_id:
            ids.pop()  # padding after the end word
        rows = [0 if beams is None else int(beams[0, t]) for t in range(len(ids))]
        attention = torch.stack(
            [torch.stack([layer[rows[t], :, -1] for layer in out.cross_attentions[t]]) for t in range(len(ids))]
        )  # (T, layers, heads, N)
        log_probs = torch.stack(
            [torch.log_softmax(out.logits[t][rows[t]].float(), dim=-1)[ids[t]] for t in range(len(ids))]
        )
        return CaptionSteps(
            ids=ids,
            log_probabilities=log_probs,
            attention=attention[..., special : special + height * width],
            grid=(height, width),
        )

    def score_attention(images: torch.Tensor, words_: torch.Tensor) -> CaptionAttention:
        # The weights are frozen: the image and the word embeddings are made to require grad, so
        # that every attention map is in the graph (the first decoder layer's self-attention depends
        # on the words alone); no gradient is taken down to them.
        embeddings = model.decoder.get_input_embeddings()
        hook = embeddings.register_forward_hook(lambda _m, _a, output: output.detach().requires_grad_())
        try:
            out = model(
                pixel_values=fitting(images).detach().requires_grad_(),
                decoder_input_ids=decoder_inputs(words_),
                output_attentions=True,
            )
        finally:
            hook.remove()
        return CaptionAttention(
            log_probabilities=torch.log_softmax(out.logits.float(), dim=-1),
            encoder=tuple(out.encoder_attentions),
            decoder=tuple(out.decoder_attentions),
            cross=tuple(out.cross_attentions),
            grid_start=special,
        )

    def score(images: torch.Tensor, words_: torch.Tensor) -> torch.Tensor:
        out = model(pixel_values=fitting(images), decoder_input_ids=decoder_inputs(words_))
        return torch.log_softmax(out.logits.float(), dim=-1)

    def generate(image: torch.Tensor) -> list[int]:
        return generate_recorded(image).ids

    def read_attention(output: Any) -> tuple[torch.Tensor, None]:
        weights = output[1]  # (B, heads, queries, tokens): the last query is the step's
        return weights[:, :, -1, special : special + height * width].mean(dim=1), None

    def feature_grid(tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, special : special + height * width]
        return patches.reshape(len(tokens), height, width, -1).permute(0, 3, 1, 2)

    def encode(caption: str) -> list[int]:
        ids = [int(i) for i in tokenizer(caption, add_special_tokens=False)["input_ids"]]
        unknown = [
            word
            for word in caption.split()
            if tokenizer.unk_token_id in tokenizer(word, add_special_tokens=False)["input_ids"]
        ]
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not in its vocabulary ({tokenizer.unk_token} stands for it)")
        return ids

    if not cross_names:
        raise ModelLoadError(
            "This VisionEncoderDecoderModel's decoder has no cross-attention (add_cross_attention), so it "
            "never looks at the image."
        )
    return Captioning(
        vocabulary=vocabulary,
        end=end,
        feature_layer="encoder.layernorm",
        attention_module="decoder." + cross_names[-1],
        generate=generate,
        score=score,
        read_attention=read_attention,
        generate_recorded=generate_recorded,
        feature_grid=feature_grid,
        encode=encode,
        score_attention=score_attention,
        score_formula="none exposed: Hugging Face's attention modules return only the softmax probabilities α "
        "(mean over the decoder's layers and heads, renormalised over the patches)",
    )
