"""Tiny Hugging Face captioners for the tests, built from configs with a word-level tokenizer made
here and saved with save_pretrained as a user would (tokenizer and image processor beside the
model): a ViT encoder and a GPT-2 or BERT decoder with cross-attention. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

WORDS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]", "a", "an", "cat", "dog", "on", "grass", "gravel", "coffee", "the"]
PAD, BOS, EOS, UNK = 0, 1, 2, 3
SIZE, PATCH = 32, 8  # a 4×4 patch grid after the class token


def tokenizer(words=WORDS):
    from tokenizers import Tokenizer, models, pre_tokenizers

    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=word_level, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]"
    )


def encoder_config():
    return transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=SIZE,
        patch_size=PATCH,
    )


def save(model, folder: Path, *, beams: int, words=WORDS, suppress=(PAD, BOS, UNK)) -> Path:
    """The model with the generation settings a user would save (special tokens other than the end
    word suppressed, so that the caption is words), its tokenizer (of ``words``) and image processor."""
    model.config.decoder_start_token_id, model.config.pad_token_id, model.config.eos_token_id = BOS, PAD, EOS
    generation = model.generation_config
    generation.decoder_start_token_id, generation.eos_token_id, generation.pad_token_id = BOS, EOS, PAD
    generation.max_length, generation.num_beams, generation.suppress_tokens = 5, beams, list(suppress)
    generation.do_sample = False
    model.eval().save_pretrained(folder)
    tokenizer(words).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": SIZE, "width": SIZE}).save_pretrained(folder)
    return folder


def captioner(decoder_config):
    """A ViT encoder and ``decoder_config``'s decoder, with sharper attention than the default
    initialisation's near-uniform one."""
    config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder_config(), decoder_config)
    model = transformers.VisionEncoderDecoderModel(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "attn.weight" in name or "q_attn" in name or "query" in name or "key" in name:
                parameter.mul_(8.0)
    return model


def gpt2_captioner(folder: Path) -> Path:
    """ViT + GPT-2, greedy, saved in ``folder``."""
    torch.manual_seed(0)
    sizes = {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 32}
    decoder = transformers.GPT2Config(
        vocab_size=len(WORDS), **sizes, add_cross_attention=True, is_decoder=True, bos_token_id=BOS, eos_token_id=EOS
    )
    return save(captioner(decoder), folder, beams=1)


def bert_captioner(folder: Path) -> Path:
    """ViT + BERT, beam search over 3 beams, saved in ``folder``: on the tests' photo its returned
    beam runs through beams 0, 1, 2, 0 and its caption is not the greedy one (seed chosen so)."""
    torch.manual_seed(11)
    sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    decoder = transformers.BertConfig(
        vocab_size=len(WORDS), **sizes, max_position_embeddings=32, is_decoder=True, add_cross_attention=True
    )
    return save(captioner(decoder), folder, beams=3)


#: Vocabulary entries that are markup and a path, in place of "cat" and "dog".
HOSTILE_WORDS = {6: "<img src=x onerror=alert(1)>", 7: "../x"}


def hostile_captioner(folder: Path) -> Path:
    """The ViT + GPT-2 captioner whose tokenizer writes :data:`HOSTILE_WORDS`, and whose saved
    generation settings let it write nothing else (the end word suppressed too: four words)."""
    torch.manual_seed(0)
    sizes = {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 32}
    decoder = transformers.GPT2Config(
        vocab_size=len(WORDS), **sizes, add_cross_attention=True, is_decoder=True, bos_token_id=BOS, eos_token_id=EOS
    )
    words = [HOSTILE_WORDS.get(i, word) for i, word in enumerate(WORDS)]
    suppress = [i for i in range(len(WORDS)) if i not in HOSTILE_WORDS]
    return save(captioner(decoder), folder, beams=1, words=words, suppress=suppress)
