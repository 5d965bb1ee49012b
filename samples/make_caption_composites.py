"""Held-out composites with a mask per caption word, for `attnexplain evaluate` on the sample captioner.

    .venv/bin/python samples/make_caption_composites.py OUT [--images 100] [--seed 1]
    attnexplain evaluate samples/models/captioner-composites.pt OUT/images --masks OUT/masks

Writes OUT/images/NNNN.png and OUT/masks/NNNN/<word>.png: the object's mask for its noun ("cat"),
the background's (every pixel but the object's) for its texture word ("grass"). Drawn with
``TEST_SEED`` by default: never trained on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from composites import TEST_SEED, write_caption_composites  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--seed", type=int, default=TEST_SEED)
    args = parser.parse_args()
    write_caption_composites(args.out, args.images, args.seed)
    print(f"{args.images} composites in {args.out / 'images'}, their word masks in {args.out / 'masks'}")


if __name__ == "__main__":
    main()
