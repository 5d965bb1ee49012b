"""Train the sample CLIP: a tiny Hugging Face ``CLIPModel`` trained contrastively on the object
composites with generated captions ("a cat on grass"), saved with ``save_pretrained`` (model,
tokenizer, image processor) as ``samples/models/clip-composites/``, then measured on held-out
composites through attnexplain itself, loading the folder as a user would.

    .venv/bin/python samples/train.py --only clip          # train, save, measure
    .venv/bin/python samples/train_clip.py --measure-only  # measure the saved folder
    .venv/bin/python samples/train_clip.py --write OUT     # the held-out composites for `evaluate`

Measured (samples/README.md, "Text prompts: the sample CLIP"): zero-shot accuracy over the four
object prompts ("a photo of a cat", ...), and how often each prompt's map peaks on what it names:
an object prompt on the object's mask, a texture prompt ("grass") on the background (~mask),
against a random map's rate (the share of the image the named region covers); and the share of
each map's mass on that region, against the same share for a random map.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from composites import LABELS, TEST_SEED, TEXTURES, TRAIN_SEED, caption, make_composites_with_textures  # noqa: E402

SIZE = 64
PATCH = 8
FOLDER = "clip-composites"
# CLIP's own normalisation (what CLIPImageProcessor applies by default).
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
#: Training captions: the composite's caption, alone and after "a photo of". The evaluation's
#: prompts ("a photo of a cat", "grass") are never a whole training caption.
TEMPLATES = ("{}", "a photo of {}")
OBJECT_PROMPTS = [f"a photo of {'an' if name[0] in 'aeiou' else 'a'} {name}" for name in LABELS]
TEXTURE_PROMPTS = list(TEXTURES)
METHODS = ("chefer", "gradcam", "legrad", "rollout")


def captions() -> list[str]:
    """Every training caption: template-major, then label, then texture."""
    return [
        template.format(caption(label, texture))
        for template in TEMPLATES
        for label in range(len(LABELS))
        for texture in range(len(TEXTURES))
    ]


def caption_index(template: int, label: int, texture: int) -> int:
    return (template * len(LABELS) + label) * len(TEXTURES) + texture


def tokenizer():
    """A CLIP byte-pair tokenizer whose merges spell exactly the captions' and prompts' words."""
    from transformers import CLIPTokenizer

    words = sorted({word for text in captions() + OBJECT_PROMPTS + TEXTURE_PROMPTS for word in text.split()})
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges: list[tuple[str, str]] = []
    for letter in sorted({c for word in words for c in word}):
        vocab.setdefault(letter, len(vocab))
        vocab.setdefault(letter + "</w>", len(vocab))
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        merged = symbols[0]
        for symbol in symbols[1:]:
            if (merged, symbol) not in merges:
                merges.append((merged, symbol))
            merged += symbol
            vocab.setdefault(merged, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges)


def build(tokens) -> torch.nn.Module:
    from transformers import CLIPConfig, CLIPModel

    text = dict(
        TEXT,
        vocab_size=len(tokens),
        max_position_embeddings=16,
        bos_token_id=tokens.bos_token_id,
        eos_token_id=tokens.eos_token_id,
        pad_token_id=tokens.pad_token_id,
    )
    vision = dict(VISION, image_size=SIZE, patch_size=PATCH)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=64))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def train(model, tokens, images: np.ndarray, labels: np.ndarray, textures: np.ndarray, steps: int) -> None:
    """Image→text cross-entropy over every caption (both templates of the image's caption are
    right, half each), with CLIP's learned temperature: the contrastive loss without the false
    negatives a batch holding two "a cat on grass" would have."""
    x = to_tensor(images)
    text = tokens(captions(), padding=True, return_tensors="pt")
    rng = np.random.default_rng(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:  # warm-up, then cosine decay
            group["lr"] = 1e-3 * min(1.0, (step + 1) / 100) * 0.5 * (1 + np.cos(np.pi * step / steps))
        batch = rng.choice(len(x), 64, replace=False)
        pixels = x[batch]
        flip = torch.from_numpy(rng.random(len(batch)) < 0.5)
        pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
        out = model(pixel_values=pixels, input_ids=text.input_ids, attention_mask=text.attention_mask)
        target = torch.zeros_like(out.logits_per_image)
        for row, index in enumerate(batch):
            for template in range(len(TEMPLATES)):
                target[row, caption_index(template, int(labels[index]), int(textures[index]))] = 1 / len(TEMPLATES)
        loss = F.cross_entropy(out.logits_per_image, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"  step {step:4d}  loss {loss.item():.3f}", flush=True)
    model.eval()


def save(model, tokens, folder: Path) -> None:
    from transformers import CLIPImageProcessor

    model.save_pretrained(folder)
    tokens.save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}, image_mean=MEAN, image_std=STD
    ).save_pretrained(folder)


def measure(folder: Path, count: int) -> dict[str, float]:
    """Zero-shot accuracy and map peaks on ``count`` held-out composites, through attnexplain."""
    from attnexplain import explain, load_model

    images, labels, textures, masks = make_composites_with_textures(count, TEST_SEED, SIZE)
    loaded = load_model(folder, prompts=OBJECT_PROMPTS + TEXTURE_PROMPTS)
    with torch.no_grad():
        logits = loaded.module(to_tensor(images))
    accuracy = float((logits[:, : len(LABELS)].argmax(1).numpy() == labels).mean())
    hits = {(method, kind): 0 for method in METHODS for kind in ("object", "texture")}
    mass = {key: 0.0 for key in hits}  # the share of the map's (positive) mass on the named region
    for image, label, texture, mask in zip(images, labels, textures, masks):
        for kind, prompt, region in (
            ("object", OBJECT_PROMPTS[label], mask),
            ("texture", TEXTURE_PROMPTS[texture], ~mask),
        ):
            explanation = explain(loaded, image, list(METHODS), target=prompt)
            for method in METHODS:
                heatmap = explanation.maps[method].heatmap
                row, column = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
                hits[(method, kind)] += bool(region[row, column])
                positive = np.clip(heatmap, 0, None)
                mass[(method, kind)] += float(positive[region].sum() / max(positive.sum(), 1e-12))
    figures = {"zero-shot accuracy": accuracy, "random map, object": float(masks.mean())}
    figures["random map, texture"] = 1 - figures["random map, object"]
    for (method, kind), hit in hits.items():
        figures[f"{method}, {kind} prompt"] = hit / count
    for (method, kind), share in mass.items():
        figures[f"{method}, {kind} prompt, mass"] = share / count
    return figures


def write_held_out(out: Path, count: int) -> None:
    """The ``count`` held-out composites measured above as files for ``attnexplain evaluate``,
    grouped by background: OUT/<texture>/images/NNNN.png and their object masks
    OUT/<texture>/masks/NNNN.png (white = object), so that a texture prompt is measured on the
    images it names with ``--background-label`` (its region: every pixel but the object's)."""
    from PIL import Image

    images, _, textures, masks = make_composites_with_textures(count, TEST_SEED, SIZE)
    for index, (image, texture, mask) in enumerate(zip(images, textures, masks)):
        for kind, pixels in (("images", image), ("masks", mask.astype(np.uint8) * 255)):
            folder = out / TEXTURES[texture] / kind
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / f"{index:04d}.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "models")
    parser.add_argument("--train-images", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--test-images", type=int, default=200)
    parser.add_argument("--measure-only", action="store_true", help="measure the saved folder, do not train")
    parser.add_argument("--write", type=Path, help="write the held-out composites and masks here, and stop")
    args = parser.parse_args(argv)
    if args.write is not None:
        write_held_out(args.write, args.test_images)
        return
    torch.set_num_threads(1)
    torch.manual_seed(0)
    folder = args.out / FOLDER
    if not args.measure_only:
        started = time.perf_counter()
        images, labels, textures, _ = make_composites_with_textures(args.train_images, TRAIN_SEED, SIZE)
        print(f"data: {len(images)} captioned composites ({time.perf_counter() - started:.0f} s)", flush=True)
        tokens = tokenizer()
        model = build(tokens)
        train(model, tokens, images, labels, textures, args.steps)
        save(model, tokens, folder)
        size = sum(path.stat().st_size for path in folder.iterdir())
        print(f"saved {folder} ({size / 1e6:.1f} MB, {time.perf_counter() - started:.0f} s)", flush=True)
    started = time.perf_counter()
    for name, value in measure(folder, args.test_images).items():
        print(f"  {name:<34} {value:6.1%}")
    print(f"measured on {args.test_images} held-out composites ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
