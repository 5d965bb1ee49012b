"""Train the multi-label sample: a small CNN with a sigmoid per class on composites of two objects.

    .venv/bin/python samples/train.py --only multilabel [--out samples/models]
    .venv/bin/python samples/train_multilabel.py --measure [--images 100]

Writes ``multilabel-composites.pt``: the example plugin's CBAM CNN (plugins/attention-cnn) with
four outputs, trained with a binary cross-entropy per class on two-object composites
(:func:`composites.make_two_object_composites`), one-object composites and object-free textures,
and saved with ``"multilabel": true``, so that attnexplain reads its scores as independent sigmoids.
``--measure`` explains each label of held-out two-object composites with Grad-CAM and measures the
map against that object's mask (pointing game, share of the map's mass inside the mask), beside a
random map's expectation and the other object's mask: the figures in samples/README.md.
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
from composites import (  # noqa: E402
    BACKGROUND_SEED,
    LABELS,
    MULTILABEL_TEST_SEED,
    MULTILABEL_TRAIN_SEED,
    TRAIN_SEED,
    make_backgrounds,
    make_composites,
    make_two_object_composites,
)
from train import MEAN, STD, fp16_state_dict, to_tensor, train  # noqa: E402

SIZE = 96
FILE = "multilabel-composites.pt"
KWARGS = {"channels": [16, 32, 64, 96], "reduction": 8, "image_size": SIZE, "num_classes": len(LABELS)}
TWO_OBJECTS, ONE_OBJECT, BACKGROUNDS, TEST_IMAGES = 2400, 1200, 400, 300
EPOCHS = 4


def build() -> torch.nn.Module:
    try:
        from attnexplain_attention_cnn.cbam import CBAMCNN
    except ImportError:
        sys.exit("CBAMCNN comes from the example plugin: pip install -e plugins/attention-cnn first.")
    return CBAMCNN(**KWARGS)


def multi_hot(pairs: np.ndarray) -> torch.Tensor:
    """(n, classes) 0/1 targets from (n, k) object indices (-1: no object)."""
    targets = torch.zeros(len(pairs), len(LABELS))
    for row, objects in enumerate(pairs):
        for index in objects:
            if index >= 0:
                targets[row, int(index)] = 1.0
    return targets


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    two, pairs, _ = make_two_object_composites(TWO_OBJECTS, MULTILABEL_TRAIN_SEED, SIZE)
    one, labels, _ = make_composites(ONE_OBJECT, TRAIN_SEED, SIZE)
    empty = make_backgrounds(BACKGROUNDS, BACKGROUND_SEED, SIZE)
    objects = np.concatenate([pairs, np.stack([labels, np.full(ONE_OBJECT, -1)], 1), np.full((BACKGROUNDS, 2), -1)])
    test, test_pairs, _ = make_two_object_composites(TEST_IMAGES, MULTILABEL_TEST_SEED, SIZE)
    return to_tensor(np.concatenate([two, one, empty])), multi_hot(objects), to_tensor(test), multi_hot(test_pairs)


def exact_match(model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """(share of images whose labels above 0.5 are exactly their two objects, per-label accuracy)."""
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([torch.sigmoid(model(x[i : i + 200])) for i in range(0, len(x), 200)]) > 0.5
    right = predicted == targets.bool()
    return float(right.all(dim=1).float().mean()), float(right.float().mean())


def train_multilabel(out: Path, epochs: int = EPOCHS) -> Path:
    """Train the sample and write it to ``out``/multilabel-composites.pt; returns the path."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(5)
    started = time.perf_counter()
    x_train, y_train, x_test, y_test = _data()
    print(f"data: {len(x_train)} train images, {len(x_test)} test ({time.perf_counter() - started:.0f} s)", flush=True)
    model = build().to(memory_format=torch.channels_last)
    train(
        "CBAMCNN",
        model,
        x_train,
        y_train.argmax(1),
        epochs=epochs,
        lr=3e-3,
        weight_decay=1e-4,
        batch_size=64,
        warmup_epochs=0.3,
        shift=8,
        label_smoothing=0.0,
        seed=5,
        targets=y_train,
        loss_function=F.binary_cross_entropy_with_logits,
    )
    state_dict = fp16_state_dict(model)
    reloaded = build()
    reloaded.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()})
    exact, per_label = exact_match(reloaded, x_test, y_test)
    out.mkdir(parents=True, exist_ok=True)
    path = out / FILE
    torch.save(
        {
            "arch": "CBAMCNN",
            "arch_kwargs": KWARGS,
            "state_dict": state_dict,
            "labels": list(LABELS),
            "multilabel": True,
            "preprocessing": {"size": [SIZE, SIZE], "mean": MEAN, "std": STD},
            "metrics": {"test_exact_match": exact, "test_label_accuracy": per_label, "epochs": epochs},
        },
        path,
    )
    print(
        f"multilabel: exact match {exact:.4f}, per-label accuracy {per_label:.4f} on {len(x_test)} held-out "
        f"two-object composites, {time.perf_counter() - started:.0f} s, {path} ({path.stat().st_size / 1e6:.2f} MB)",
        flush=True,
    )
    return path


def measure(model_path: Path, images: int, method: str = "gradcam", layer: str | None = None) -> dict[str, float]:
    """Each label's map on held-out two-object composites against that object's mask."""
    import attnexplain

    torch.set_num_threads(1)
    loaded = attnexplain.load_model(model_path)
    pictures, pairs, masks = make_two_object_composites(images, MULTILABEL_TEST_SEED + 1, SIZE)
    hits = wrong_hits = inside = other = area = 0.0
    count = 0
    for picture, objects, object_masks in zip(pictures, pairs, masks):
        for which in (0, 1):
            mask, elsewhere = object_masks[which], object_masks[1 - which]
            if not mask.any():
                continue  # hidden under the other object
            label = LABELS[int(objects[which])]
            heatmap = attnexplain.explain(loaded, picture, method, target=label, layer=layer).heatmap
            heatmap = np.clip(heatmap, 0.0, None)
            peak = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
            hits += float(mask[peak])
            wrong_hits += float(elsewhere[peak])
            total = float(heatmap.sum()) or 1.0
            inside += float(heatmap[mask].sum()) / total
            other += float(heatmap[elsewhere].sum()) / total
            area += float(mask.mean())
            count += 1
    return {
        "maps": count,
        "pointing_game": hits / count,
        "pointing_at_the_other_object": wrong_hits / count,
        "mass_inside_mask": inside / count,
        "mass_on_the_other_object": other / count,
        "random_map": area / count,  # a random map's expected pointing and mass: the mask's area
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "models")
    parser.add_argument("--measure", action="store_true", help="measure the saved model's maps instead of training")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--layer", default=None, help="the CAM layer (default: the model's)")
    args = parser.parse_args()
    if args.measure:
        figures = measure(args.out / FILE, args.images, args.method, args.layer)
        print(
            " ".join(
                f"{key} {value:.3f}" if isinstance(value, float) else f"{key} {value}" for key, value in figures.items()
            )
        )
    else:
        train_multilabel(args.out, args.epochs)


if __name__ == "__main__":
    main()
