"""What explaining a caption costs, as a ratio to the captioner's own generation.

    python benchmarks/captioning_speed.py [--repeats 21] [--threads 1]

On the sample captioner (samples/models/captioner-composites.pt, plugins/attention-cnn installed)
and a shipped composite, alternates, REPEATS times after a warm-up:

- ``generate``: the model's greedy caption, no gradients (what a user runs the model for);
- ``explain_caption``: attnexplain's whole explanation of every word: that generation, one
  teacher-forced forward recording every word's α and e, and Grad-CAM of each word's
  log-probability (one backward per word, down to the feature map only).

Prints the median of each and the median of the paired ratios (pairs alternate: on a shared machine
single timings spread, ratios within a pair much less).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from attnexplain import explain_caption, load_image, load_model  # noqa: E402
from attnexplain.planning import plan_preprocessing  # noqa: E402
from attnexplain.preprocess import prepare  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(REPO / "samples" / "models" / "captioner-composites.pt")
    image = load_image(REPO / "samples" / "images" / "coffee-on-gravel.png")
    batch = prepare(image.pixels, plan_preprocessing(model)).tensor

    def generate() -> None:
        model.module.generate(batch)

    def explain() -> None:
        explain_caption(model, image)

    generate(), explain()  # warm-up
    times: dict[str, list[float]] = {"generate": [], "explain_caption": []}
    for _ in range(args.repeats):
        for name, work in (("generate", generate), ("explain_caption", explain)):
            started = time.perf_counter()
            work()
            times[name].append(time.perf_counter() - started)
    ratios = [e / g for e, g in zip(times["explain_caption"], times["generate"])]
    words = len(explain_caption(model, image).words)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {words} words, {args.repeats} pairs")
    for name, values in times.items():
        print(f"  {name:<16} median {1000 * statistics.median(values):7.1f} ms")
    print(f"  explain_caption ÷ generate: median of paired ratios {statistics.median(ratios):.2f}×")


if __name__ == "__main__":
    main()
