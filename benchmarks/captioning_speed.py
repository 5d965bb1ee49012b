"""What explaining a caption costs, as a ratio to the captioner's own generation.

    python benchmarks/captioning_speed.py [--repeats 21] [--threads 1] [--models sample,hf] [--methods gradcam]

Two captioners, each on one image, alternating REPEATS times after a warm-up:

- ``sample``: the Show, Attend and Tell sample (samples/models/captioner-composites.pt, plugins/
  attention-cnn installed) on a shipped composite;
- ``hf``: a Hugging Face VisionEncoderDecoderModel built here from configs (ViT-Tiny-sized encoder,
  224 pixels in 16-pixel patches; a 4-layer GPT-2 decoder of width 192 with cross-attention;
  a word-level vocabulary of 1,000), random weights, saved with save_pretrained and loaded from
  that folder as a user would (plugins/transformers installed). It writes 15 words.

Timed: ``generate``, the model's own caption without gradients as a user runs it (the sample's
greedy decoding; ``model.generate`` under its generation_config, default attention), and
``explain_caption``, attnexplain's whole explanation of every word. Printed: the median of each,
the median of the paired ratios explain ÷ generate (pairs alternate: on a shared machine single
timings spread, ratios within a pair much less), and the parts of explain_caption from its own
timings, each as a median ratio to the paired generate:

- ``generate_s``: the generation that records every word's attention and probability (one pass);
- ``score_s``: the one teacher-forced forward under grad that the gradient maps need;
- ``explain_s`` ÷ words: one partial backward per word (down to the feature map and the attention).

``--methods`` names each word's gradient maps (default Grad-CAM): e.g. ``gradcam,gradcampp,
xgradcam,layercam,hirescam,eigencam``, which share that one backward per word.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from attnexplain import explain_caption, load_image, load_model  # noqa: E402
from attnexplain.planning import plan_preprocessing  # noqa: E402
from attnexplain.preprocess import prepare  # noqa: E402


def sample() -> tuple[Any, Any, Callable[[], None]]:
    model = load_model(REPO / "samples" / "models" / "captioner-composites.pt")
    image = load_image(REPO / "samples" / "images" / "coffee-on-gravel.png")
    batch = prepare(image.pixels, plan_preprocessing(model)).tensor
    return model, image, lambda: model.module.generate(batch)


def hugging_face(folder: Path) -> tuple[Any, Any, Callable[[], None]]:
    import numpy as np
    import transformers
    from PIL import Image
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    words = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"] + [f"w{i}" for i in range(996)]
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=word_level, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]"
    )
    encoder = transformers.ViTConfig(
        hidden_size=192,
        num_hidden_layers=12,
        num_attention_heads=3,
        intermediate_size=768,
        image_size=224,
        patch_size=16,
    )
    decoder = transformers.GPT2Config(
        vocab_size=len(words), n_embd=192, n_layer=4, n_head=3, n_positions=64, add_cross_attention=True,
        is_decoder=True, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 1, 0, 2
    model = transformers.VisionEncoderDecoderModel(config).eval()
    generation = model.generation_config
    generation.decoder_start_token_id, generation.eos_token_id, generation.pad_token_id = 1, 2, 0
    generation.max_length = generation.min_length = 16
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    transformers.ViTImageProcessor().save_pretrained(folder)
    pixels = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "photo.png")
    loaded = load_model(folder)
    image = load_image(folder / "photo.png")
    batch = prepare(image.pixels, plan_preprocessing(loaded)).tensor
    return loaded, image, lambda: loaded.module.generate(pixel_values=batch)


def measure(name: str, model: Any, image: Any, generate: Callable[[], None], repeats: int, methods: str) -> None:
    generate(), explain_caption(model, image, methods=methods)  # warm-up
    times: dict[str, list[float]] = {"generate": [], "explain_caption": []}
    parts: dict[str, list[float]] = {"generate_s": [], "score_s": [], "backward per word": []}
    words = 0
    for _ in range(repeats):
        started = time.perf_counter()
        generate()
        times["generate"].append(time.perf_counter() - started)
        started = time.perf_counter()
        explanation = explain_caption(model, image, methods=methods)
        times["explain_caption"].append(time.perf_counter() - started)
        words = len(explanation.words)
        for key in ("generate_s", "score_s"):
            parts[key].append(explanation.timings[key] / times["generate"][-1])
        parts["backward per word"].append(explanation.timings["explain_s"] / words / times["generate"][-1])
    ratios = [e / g for e, g in zip(times["explain_caption"], times["generate"])]
    print(f"{name}: {words} words, {repeats} pairs, methods {methods}")
    for key, values in times.items():
        print(f"  {key:<18} median {1000 * statistics.median(values):8.1f} ms")
    print(f"  explain_caption ÷ generate: median of paired ratios {statistics.median(ratios):.2f}×")
    for key, values in parts.items():
        print(f"    {key:<18} ÷ generate: {statistics.median(values):.2f}×")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="sample,hf", help="comma-separated: sample, hf")
    parser.add_argument("--methods", default="gradcam", help="each word's gradient maps, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    chosen = args.models.split(",")
    if "sample" in chosen:
        measure("sample (Show, Attend and Tell)", *sample(), args.repeats, args.methods)
    if "hf" in chosen:
        with tempfile.TemporaryDirectory() as folder:
            measure("hf (ViT-Tiny-sized + 4-layer GPT-2)", *hugging_face(Path(folder)), args.repeats, args.methods)


if __name__ == "__main__":
    main()
