"""Train the detection sample: a tiny DETR on 64-pixel object composites, one box each.

    .venv/bin/python samples/train_detr.py [--steps 2500] [--out samples/models]
    .venv/bin/python samples/train_detr.py --measure [--images 100]

Writes ``detr-composites/``: a transformers ``DetrForObjectDetection`` (a two-stage ResNet backbone,
d_model 32, one encoder and two decoder layers, 8 object queries) and its image processor, trained
with DETR's own loss (Hungarian matching, classes, L1 and GIoU on the boxes, every decoder layer's)
on composites whose box is the pasted object's mask's. ``--measure`` explains the best box of
held-out composites with ``chefer`` (Chefer 2021b's encoder–decoder relevance), ``attention`` (the
last decoder layer's cross-attention) and ``gradcam`` (the backbone) and counts how often each map's
peak is on the object's mask, beside a random peak's chance (the mask's share of the image): the
figures in samples/README.md. The model is small and briefly trained: its boxes are rough.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from composites import LABELS, TEST_SEED, TRAIN_SEED, make_composites  # noqa: E402

SIDE = 64
NAME = "detr-composites"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def mask_box(mask: np.ndarray) -> list[float]:
    """The mask's bounding box as DETR's target: centre x, centre y, width, height in shares."""
    ys, xs = np.nonzero(mask)
    left, right, top, bottom = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    return [(left + right) / 2 / SIDE, (top + bottom) / 2 / SIDE, (right - left) / SIDE, (bottom - top) / SIDE]


def build() -> torch.nn.Module:
    import transformers

    backbone = transformers.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", out_features=["stage2"]
    )
    id2label = dict(enumerate(LABELS))
    config = transformers.DetrConfig(
        backbone_config=backbone,
        num_queries=8,
        encoder_layers=1,
        decoder_layers=2,
        d_model=32,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        id2label=id2label,
        label2id={label: index for index, label in id2label.items()},
        auxiliary_loss=True,
    )
    return transformers.DetrForObjectDetection(config)


def train(steps: int, out: Path) -> None:
    import transformers

    torch.manual_seed(0)
    images, labels, masks = make_composites(1200, TRAIN_SEED, size=SIDE)
    boxes = torch.tensor(np.array([mask_box(mask) for mask in masks]), dtype=torch.float32)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    pixels = (pixels - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    model = build().train()
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4)
    began = time.perf_counter()
    for step in range(1, steps + 1):
        chosen = torch.randint(0, len(pixels), (16,))
        targets = [{"class_labels": torch.tensor([int(labels[i])]), "boxes": boxes[i][None]} for i in chosen]
        loss = model(pixel_values=pixels[chosen], labels=targets).loss
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimiser.step()
        if step % 250 == 0:
            print(f"step {step}: loss {float(loss):.3f} ({time.perf_counter() - began:.0f} s)", flush=True)
    model.eval().save_pretrained(out / NAME)
    processor = transformers.DetrImageProcessor(
        size={"shortest_edge": SIDE, "longest_edge": 2 * SIDE}, image_mean=list(MEAN), image_std=list(STD)
    )
    processor.save_pretrained(out / NAME)


def measure(folder: Path, count: int) -> dict[str, float]:
    """Share of held-out composites whose map peaks on the object, per method, and a random peak's."""
    from attnexplain.engine import compute_maps
    from attnexplain.loading import load_model
    from attnexplain.methods import METHODS
    from attnexplain.preprocess import prepare

    loaded = load_model(folder)
    layer = loaded.plugin.default_layer(loaded.module)
    methods = ("chefer", "attention", "gradcam")
    images, _, masks = make_composites(count, TEST_SEED, size=SIDE)
    hits = dict.fromkeys(methods, 0)
    for image, mask in zip(images, masks):
        computed = compute_maps(
            loaded, prepare(image, loaded.preprocessing).tensor, [METHODS[m] for m in methods], [layer]
        )
        for method in methods:
            heatmap = computed.maps[method][0].numpy()
            hits[method] += bool(mask[np.unravel_index(np.argmax(heatmap), heatmap.shape)])
    found = {method: hits[method] / count for method in methods}
    found["random"] = float(masks.mean())
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "models")
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--measure", action="store_true", help="measure the saved model instead of training")
    parser.add_argument("--images", type=int, default=100)
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    if arguments.measure:
        print(measure(arguments.out / NAME, arguments.images))
    else:
        train(arguments.steps, arguments.out)


if __name__ == "__main__":
    main()
