"""Several targets from one forward: Grad-CAM of every label of the shipped multi-label sample, as
``--target a,b,c,d`` computes them (one forward, one backward per label, the graph retained:
``engine.each_target_maps``) against a whole pass per label (what it cost before), and against a
bare forward of the model.

    python benchmarks/several_targets.py [--pairs 15] [--images 8] [--method gradcam] [--threads 1]

Timed alternately in ``--pairs`` pairs (shared, then one pass per label) on the same preprocessed
batch; prints each one's median and the median of the paired ratios (goal: below 1, towards
(1 forward + N backwards) / N (forward + backward)).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "plugins" / "attention-cnn"))
MODEL = REPO / "samples" / "models" / "multilabel-composites.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=15)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from attnexplain.engine import compute_maps, each_target_maps
    from attnexplain.loading import load_model
    from attnexplain.planning import plan_explanation

    torch.set_num_threads(args.threads)
    loaded = load_model(MODEL)
    plan = plan_explanation(loaded, args.method, None)
    batch = torch.rand(args.images, 3, *plan.preprocessing.size, generator=torch.Generator().manual_seed(0))
    labels = list(loaded.labels)
    settings = {"preprocessing": plan.preprocessing}

    def shared() -> None:
        each_target_maps(loaded, batch, plan.methods, plan.layers, labels, **settings)

    def separate() -> None:
        for label in labels:
            compute_maps(loaded, batch, plan.methods, plan.layers, target=label, **settings)

    def bare() -> None:
        with torch.no_grad():
            loaded.module(batch)

    def timed(call) -> float:
        started = time.perf_counter()
        call()
        return time.perf_counter() - started

    for call in (shared, separate, bare):  # warm-up
        call()
    times: dict[str, list[float]] = {"shared": [], "separate": [], "bare": []}
    for _ in range(args.pairs):
        times["shared"].append(timed(shared))
        times["separate"].append(timed(separate))
        times["bare"].append(timed(bare))
    ratios = [a / b for a, b in zip(times["shared"], times["separate"])]
    print(
        f"{args.method}, {len(labels)} labels, {args.images} images of {plan.preprocessing.size}, "
        f"{args.threads} thread(s), {args.pairs} pairs"
    )
    for name, values in times.items():
        print(f"  {name:9s} median {1000 * statistics.median(values):8.1f} ms")
    print(f"  shared ÷ a pass per label: median of paired ratios {statistics.median(ratios):.3f}")
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"  shared ÷ bare forward: {medians['shared'] / medians['bare']:.2f}; "
        f"a pass per label ÷ bare forward: {medians['separate'] / medians['bare']:.2f}"
    )


if __name__ == "__main__":
    main()
