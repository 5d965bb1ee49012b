"""End-to-end throughput of `attnexplain batch` against the bare explanation core, and its memory.

    python benchmarks/batch_throughput.py [--images 200] [--size 64] [--images-per-batch 16]
                                          [--workers 2] [--memory 200,2000] [--device cpu]

Prints: images/s of run_batch (decode + explain + write everything) versus compute_maps alone on the
same preprocessed batches (goal: >= 0.8x), and the peak resident memory of a whole run (in a fresh
process each) at each --memory image count (goal: flat).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "samples" / "models" / "resnet-composites.pt"


def make_images(folder: Path, count: int, side: int = 160) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
    for index in range(count):
        sub = folder / f"part{index % 10}"
        sub.mkdir(parents=True, exist_ok=True)
        pixels = np.roll(base, index, axis=1)
        Image.fromarray(pixels).save(sub / f"img{index:05d}.jpg", quality=90)


def _settings(args):
    from attnexplain.batch import BatchSettings
    from attnexplain.explanation import MethodOptions

    return BatchSettings(method=args.method, size=(args.size, args.size),
                         images_per_batch=args.images_per_batch, workers=args.workers,
                         options=MethodOptions())


def throughput(args) -> None:
    import torch

    from attnexplain.batch import collect_inputs, run_batch
    from attnexplain.explanation import compute_maps, default_layer, resolve_methods
    from attnexplain.images import load_image
    from attnexplain.loading import load_model
    from attnexplain.preprocess import Preprocessing, prepare

    loaded = load_model(MODEL, device=args.device)
    settings = _settings(args)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        make_images(folder, args.images)
        preprocessing = (loaded.preprocessing or Preprocessing()).with_overrides(size=settings.size)
        tensors = [prepare(load_image(item.path).pixels, preprocessing).tensor
                   for item in collect_inputs([str(folder)]).images]
        methods = resolve_methods(loaded, args.method)
        batches = [torch.cat(tensors[i:i + args.images_per_batch]).to(args.device)
                   for i in range(0, len(tensors), args.images_per_batch)]
        layers = [default_layer(loaded, batches[0][:1])] if methods[0].family == "cam" else []
        compute_maps(loaded, batches[0], methods, layers)  # warm-up
        bare = 0.0
        for _ in range(2):  # best of two: the first pass still pays for lazy initialisation
            began = time.perf_counter()
            for batch in batches:
                maps = compute_maps(loaded, batch, methods, layers)
                for heatmap in maps.maps.values():
                    heatmap.cpu()
            bare = max(bare, len(tensors) / (time.perf_counter() - began))
        began = time.perf_counter()
        result = run_batch(loaded, {"model": str(MODEL)}, [str(folder)], Path(tmp) / "out", settings,
                           quiet=True, device=args.device)
        end_to_end = result.ok / (time.perf_counter() - began)
    print(f"bare compute_maps : {bare:8.1f} images/s ({args.images} images, batch "
          f"{args.images_per_batch}, {args.size}px, {args.method}, {args.device})")
    print(f"attnexplain batch : {end_to_end:8.1f} images/s (decode + explain + write all outputs)")
    print(f"ratio             : {end_to_end / bare:8.2f}x  (goal >= 0.80x)")


def memory_child(args) -> None:
    """One whole run in this process; prints its peak resident memory."""
    from attnexplain.batch import run_batch
    from attnexplain.loading import load_model

    loaded = load_model(MODEL, device=args.device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        make_images(folder, args.images, side=96)
        result = run_batch(loaded, {"model": str(MODEL)}, [str(folder)], Path(tmp) / "out",
                           _settings(args), quiet=True, device=args.device)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"images": args.images, "ok": result.ok, "peak_rss_mib": round(peak_mib, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--images-per-batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory", default="200,2000",
                        help="Image counts for the peak-memory runs (comma-separated; '' skips).")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args)
        return
    throughput(args)
    for count in [int(c) for c in args.memory.split(",") if c.strip()]:
        command = [sys.executable, __file__, "--memory-child", "--images", str(count),
                   "--size", str(args.size), "--images-per-batch", str(args.images_per_batch),
                   "--workers", str(args.workers), "--method", args.method, "--device", args.device]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        figures = json.loads(output.strip().splitlines()[-1])
        print(f"peak memory       : {figures['peak_rss_mib']:8.1f} MiB for {figures['images']} images")


if __name__ == "__main__":
    main()
