"""How often each method's heatmap peak falls on the object, on held-out composites.

    .venv/bin/python samples/evaluate.py [--images 200]
    .venv/bin/python samples/evaluate.py --vit-layers [--images 200]

For every held-out composite (seed ``TEST_SEED``, never trained on) and every method that applies to
the model, explain the model's top prediction and check whether the heatmap's maximum lies inside the
pasted object's mask. Prints a Markdown table for samples/README.md. ``--vit-layers`` instead
compares the CAM methods at each of the sample ViT's layers (where its default CAM layer comes from).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from composites import TEST_SEED, make_composites  # noqa: E402

MODELS = {
    "resnet-composites.pt": (
        "gradcam",
        "gradcampp",
        "xgradcam",
        "layercam",
        "hirescam",
        "eigencam",
        "scorecam",
        "saliency",
        "integrated_gradients",
        "smoothgrad",
        "occlusion",
        "guided_gradcam",
    ),
    "vit-composites.pt": ("rollout", "chefer", "attention", "saliency", "integrated_gradients"),
    "attention-cnn-composites.pt": ("attention", "gradcam"),
}


def peak_in_mask(heatmap: np.ndarray, mask: np.ndarray) -> bool:
    y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return bool(mask[y, x])


def evaluate(model_file: Path, methods: tuple[str, ...], images: int) -> dict[str, tuple[float, float]]:
    """Per method: (share of peaks inside the mask, accuracy on the same images)."""
    import attnexplain

    model = attnexplain.load_model(model_file)
    pixels, labels, masks = make_composites(images, TEST_SEED)
    hits = dict.fromkeys(methods, 0)
    correct = 0
    for image, label, mask in zip(pixels, labels, masks):
        # One call per image: methods of the same family share their pass.
        explanation = attnexplain.explain(model, image, methods)
        for method in methods:
            hits[method] += peak_in_mask(explanation.maps[method].heatmap, mask)
        correct += explanation.predictions[0].index == int(label)
    return {method: (hits[method] / images, correct / images) for method in methods}


VIT_CAM_METHODS = ("gradcam", "layercam", "hirescam")


def centre_peak_rate(masks: np.ndarray) -> float:
    """The hit rate of a map that always peaks at the image's centre."""
    height, width = masks.shape[1:]
    return float(masks[:, height // 2, width // 2].mean())


def evaluate_vit_layers(model_file: Path, images: int, batch_size: int = 50) -> dict[str, dict[str, tuple[float, int]]]:
    """Per ViT layer (each block's ``ln_1`` and output) and CAM method: (share of peaks inside the
    mask, number of all-zero maps); "rollout" under the key "(attention)" for context."""
    import torch

    import attnexplain
    from attnexplain.engine import compute_maps
    from attnexplain.planning import plan_explanation
    from attnexplain.preprocess import prepare

    loaded = attnexplain.load_model(model_file)
    pixels, _, masks = make_composites(images, TEST_SEED)
    blocks = [name for name, _ in loaded.module.encoder.layers.named_children()]
    layers = [f"encoder.layers.{block}{part}" for block in blocks for part in (".ln_1", "")]
    plan = plan_explanation(loaded, list(VIT_CAM_METHODS), layers[0])
    rollout = plan_explanation(loaded, "rollout")
    hits: dict[str, dict[str, list[int]]] = {}
    for start in range(0, images, batch_size):
        batch = torch.cat([prepare(image, plan.preprocessing).tensor for image in pixels[start : start + batch_size]])
        batch_masks = masks[start : start + batch_size]
        runs = [(layer, plan.methods, [layer]) for layer in layers] + [("(attention)", rollout.methods, [])]
        for key, methods, used in runs:
            computed = compute_maps(loaded, batch, methods, used)
            for method, maps in computed.maps.items():
                tally = hits.setdefault(key, {}).setdefault(method, [0, 0])
                for heatmap, mask in zip(maps.detach().cpu().numpy(), batch_masks):
                    tally[0] += peak_in_mask(heatmap, mask)
                    tally[1] += not heatmap.any()
    return {
        key: {method: (hit / images, zeros) for method, (hit, zeros) in by_method.items()}
        for key, by_method in hits.items()
    }


def print_vit_layers(images: int) -> None:
    file_name = "vit-composites.pt"
    results = evaluate_vit_layers(HERE / "models" / file_name, images)
    _, _, masks = make_composites(images, TEST_SEED)
    print(f"{file_name}, {images} held-out composites: peak inside the object (all-zero maps)\n")
    print("| layer | " + " | ".join(VIT_CAM_METHODS) + " |")
    print("| --- |" + " --- |" * len(VIT_CAM_METHODS))
    for layer, by_method in results.items():
        if layer == "(attention)":
            continue
        cells = [f"{by_method[m][0]:.1%} ({by_method[m][1]})" for m in VIT_CAM_METHODS]
        print(f"| `{layer}` | " + " | ".join(cells) + " |")
    rollout_rate, _ = results["(attention)"]["rollout"]
    print(
        f"\nrollout (the `auto` default): {rollout_rate:.1%}; a map peaking at the centre: "
        f"{centre_peak_rate(masks):.1%}; a random peak (mean object coverage): {masks.mean():.1%}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument(
        "--vit-layers",
        action="store_true",
        help="compare gradcam, layercam and hirescam at each of the sample ViT's layers",
    )
    args = parser.parse_args()
    if args.vit_layers:
        print_vit_layers(args.images)
        return
    # Share of the image the objects cover: the rate a map that peaks at random would reach.
    _, _, masks = make_composites(args.images, TEST_SEED)
    print(
        f"held-out composites: {args.images}; objects cover {masks.mean():.1%} of the pixels "
        f"on average (a random peak's hit rate)\n"
    )
    print("| model | method | peak inside the object | top-1 accuracy |")
    print("| --- | --- | --- | --- |")
    for file_name, methods in MODELS.items():
        for method, (rate, accuracy) in evaluate(HERE / "models" / file_name, methods, args.images).items():
            print(f"| {file_name} | {method} | {rate:.1%} | {accuracy:.1%} |")


if __name__ == "__main__":
    main()
