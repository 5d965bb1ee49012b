"""What a text prompt's map costs, as a multiple of one bare image forward of the same CLIP.

A CLIP with ViT-B/32's vision tower (12 blocks, width 768, 224 pixels; random weights from its
config, nothing downloaded) and a small text tower, saved with save_pretrained and loaded with
prompts as a user would: the prompts are encoded once, when the model loads (timed apart, as a
multiple of the bare forward). Then, per method, the map of the top prompt for a batch
(``compute_maps``) and a bare ``torch.no_grad()`` forward of the prompt classifier (the image tower
and the similarity with the cached text) run alternately; the figure is the median of the per-pair
ratios, which a shared machine's load affects less. Run:

    .venv/bin/python benchmarks/prompt_speed.py [--batch 8] [--repeats 7] [--prompts 10] [--folder DIR]

``--folder samples/models/clip-composites``: the shipped sample CLIP (64 pixels) instead.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from attnexplain_transformers.prompts import encode_prompts

from attnexplain import load_model
from attnexplain.explanation import compute_maps, plan_explanation
from attnexplain.preprocess import prepare

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "samples"))
sys.path.insert(0, str(REPO / "benchmarks"))
from composites import LABELS, TEXTURES, make_composites_with_textures  # noqa: E402
from methods_speed import paired_ratio  # noqa: E402
from train_clip import tokenizer  # noqa: E402

METHODS = ["gradcam", "chefer", "legrad", "rollout", "gradcam,chefer,legrad"]


def vit_b32_clip(folder: Path) -> Path:
    """A ViT-B/32 CLIP from its config (random weights), with the sample's tokenizer, saved."""
    import transformers

    torch.manual_seed(0)
    tokens = tokenizer()
    text = dict(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        vocab_size=len(tokens),
        max_position_embeddings=16,
        bos_token_id=tokens.bos_token_id,
        eos_token_id=tokens.eos_token_id,
        pad_token_id=tokens.pad_token_id,
    )
    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224)
    vision["patch_size"] = 32
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=512)
    transformers.CLIPModel(config).eval().save_pretrained(folder)
    tokens.save_pretrained(folder)
    return folder


def _seconds(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--folder", type=Path, help="a CLIP folder to time instead of a ViT-B/32 one")
    args = parser.parse_args()
    words = [f"a photo of {'an' if n[0] in 'aeiou' else 'a'} {n}" for n in LABELS] + list(TEXTURES)
    words += [f"a {label} on {texture}" for label in LABELS for texture in TEXTURES]
    prompts = words[: args.prompts]
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.folder or vit_b32_clip(Path(scratch) / "clip")
        loaded = load_model(folder, prompts=prompts)
        module = loaded.module
        started = time.perf_counter()
        encode_prompts(module.dual, tuple(prompts))  # what loading with prompts did once
        encoding = time.perf_counter() - started
    size = loaded.preprocessing.size
    images = make_composites_with_textures(args.batch, 1, 128)[0]
    batch = torch.cat([prepare(image, loaded.preprocessing).tensor for image in images])

    def bare():
        with torch.no_grad():
            module(batch)

    bare()
    forward = statistics.median(_seconds(bare) for _ in range(3))
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"CLIP {args.folder or 'ViT-B/32'}, batch {args.batch} at {size[0]}×{size[1]}, {len(prompts)} prompts")
    print(
        f"the prompts' text (tokenizer read, text tower run), once when the model loads: "
        f"{encoding * 1e3:.0f} ms, {encoding / forward:.2f}× a bare forward\n"
    )
    print("| method | median ms | ÷ bare forward (paired median) |")
    print("| --- | ---: | ---: |")
    for names in METHODS:
        plan = plan_explanation(loaded, names, None)

        def run(plan=plan):
            compute_maps(loaded, batch, plan.methods, plan.layers, preprocessing=plan.preprocessing)

        ratio, took = paired_ratio(bare, run, args.repeats)
        print(f"| {names} | {took * 1e3:.0f} | {ratio:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
