"""Write the sample pictures in samples/images/ (and their object masks in samples/masks/).

    .venv/bin/python samples/make_images.py

Held-out composites (drawn from ``SAMPLE_SEED``, never used in training) plus a downscaled copy of
scikit-image's real ``chelsea`` photo. Deterministic: running it again rewrites identical files.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import skimage.data

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from composites import LABELS, SAMPLE_SEED, TEXTURES, make_composite  # noqa: E402

SIZE = 192  # 1.5x the models' input side: nicer to look at, still under 100 KB as PNG
PICTURES = [("cat", "grass"), ("rocket", "brick"), ("coffee", "gravel"), ("astronaut", "grass")]


def main() -> None:
    images, masks = HERE / "images", HERE / "masks"
    images.mkdir(exist_ok=True)
    masks.mkdir(exist_ok=True)
    for index, (label, texture) in enumerate(PICTURES):
        rng = np.random.default_rng([SAMPLE_SEED, index])
        image, mask = make_composite(rng, LABELS.index(label), TEXTURES.index(texture), SIZE)
        name = f"{label}-on-{texture}"
        cv2.imwrite(str(images / f"{name}.png"), image[:, :, ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 9])
        cv2.imwrite(str(masks / f"{name}.png"), mask.astype(np.uint8) * 255, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    chelsea = skimage.data.chelsea()
    small = cv2.resize(chelsea, (300, 200), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(images / "chelsea.jpg"), small[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    for path in sorted(images.iterdir()):
        print(f"{path.relative_to(HERE.parent)}: {path.stat().st_size / 1000:.0f} KB")


if __name__ == "__main__":
    main()
