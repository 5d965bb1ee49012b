"""How often each method's heatmap peak falls on the object, on held-out composites.

    .venv/bin/python samples/evaluate.py [--images 200]

For every held-out composite (seed ``TEST_SEED``, never trained on) and every method that applies to
the model, explain the model's top prediction and check whether the heatmap's maximum lies inside the
pasted object's mask. Prints a Markdown table for samples/README.md.
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
    "resnet-composites.pt": ("gradcam", "gradcampp", "xgradcam", "layercam", "hirescam", "eigencam",
                             "scorecam", "saliency", "integrated_gradients", "smoothgrad",
                             "occlusion", "guided_gradcam"),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    args = parser.parse_args()
    # Share of the image the objects cover: the rate a map that peaks at random would reach.
    _, _, masks = make_composites(args.images, TEST_SEED)
    print(f"held-out composites: {args.images}; objects cover {masks.mean():.1%} of the pixels "
          f"on average (a random peak's hit rate)\n")
    print("| model | method | peak inside the object | top-1 accuracy |")
    print("| --- | --- | --- | --- |")
    for file_name, methods in MODELS.items():
        for method, (rate, accuracy) in evaluate(HERE / "models" / file_name, methods,
                                                 args.images).items():
            print(f"| {file_name} | {method} | {rate:.1%} | {accuracy:.1%} |")


if __name__ == "__main__":
    main()
