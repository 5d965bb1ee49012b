"""How much maps vary relative to their level, (max - min) / |mean|: trained sample models against
the same models with random weights (and a random torchvision Swin-T), every method at its default
options, on samples/images. The figures behind ``attnexplain.render.NEARLY_FLAT_VARIATION``.

    PYTHONPATH=.:plugins/attention-cnn .venv/bin/python benchmarks/map_variation.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchvision

import attnexplain
from attnexplain.engine import compute_maps
from attnexplain.explanation import plan_explanation
from attnexplain.images import load_image
from attnexplain.preprocess import prepare

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
MODELS = {
    "resnet-composites.pt": "gradcam,layercam,eigencam,saliency,rise",
    "vit-composites.pt": "rollout,attention,chefer,legrad,gradcam,rise",
    "cbam-composites.pt": "cbam_spatial,gradcam",
    "attention-cnn-composites.pt": "auto",
}


def variation(heatmap: np.ndarray) -> float:
    values = np.asarray(heatmap, dtype=np.float64)
    return float((values.max() - values.min()) / abs(values.mean()))


def randomized(module: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(1)
    for layer in module.modules():
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
    return module


def show(name: str, weights: str, loaded, methods: str, photos: list[np.ndarray]) -> None:
    plan = plan_explanation(loaded, methods)
    batch = torch.cat([prepare(photo, plan.preprocessing).tensor for photo in photos])
    computed = compute_maps(loaded, batch, plan.methods, plan.layers)
    for method, maps in computed.maps.items():
        values = [variation(m) for m in maps.float().numpy()]
        print(f"{name:28s} {weights:7s} {method:13s} {min(values):8.3g} {max(values):8.3g}", flush=True)


def main() -> None:
    photos = [load_image(path).pixels for path in sorted((SAMPLES / "images").iterdir())]
    print(f"{'model':28s} {'weights':7s} {'method':13s} {'lowest':>8s} {'highest':>8s}  (of {len(photos)} images)")
    for file, methods in MODELS.items():
        for weights in ("trained", "random"):
            loaded = attnexplain.load_model(SAMPLES / "models" / file)
            if weights == "random":
                randomized(loaded.module)
            show(file, weights, loaded, methods, photos)
    torch.manual_seed(0)
    show(
        "torchvision swin_t",
        "random",
        attnexplain.load_model(torchvision.models.swin_t(num_classes=6).eval()),
        "rollout",
        photos,
    )


if __name__ == "__main__":
    main()
