"""The Ray engine's overhead: `batch --engine ray` against the local engine on the same images.

    python benchmarks/ray_engine_throughput.py [--images 200] [--pairs 3] [--ray-workers 1]
    python benchmarks/ray_engine_throughput.py --arch resnet50 [--images 200] [--pairs 3]

Inputs and models as in batch_throughput.py (160-pixel synthetic JPEGs; the shipped sample ResNet at
64 px, or a torchvision NAME with random weights at 224 px). One local Ray instance with this machine's
cores is started once (as ``batch --engine ray`` starts it; its start-up is timed and printed apart);
then, ``--pairs`` times, a local run and a Ray run into fresh folders, alternately, and the ratio of
their images/s per pair. Prints each pair and the median ratio (robust to other load on a shared
machine). A Ray run also pays, every time, for starting its actors (each loads the model once) and Ray
Data's set-up: the time of a one-image Ray run, timed in each pair too, so that the rate past that
fixed cost is printed as well.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from batch_throughput import _settings, load, make_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--arch", help="A torchvision model with random weights (e.g. resnet50).")
    parser.add_argument("--size", type=int, help="Model input side (default: 64, 224 with --arch).")
    parser.add_argument("--images-per-batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="The local engine's threads.")
    parser.add_argument("--ray-workers", type=int, default=1, help="Ray actors (one CPU each).")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--overlay-format", default="jpg")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    args.size = args.size or (224 if args.arch else 64)

    from attnexplain.batch import run_batch
    from attnexplain.ray_engine import RayCluster, ray_session

    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        loaded, spec = load(args)
        settings = _settings(args)
        folder = Path(tmp) / "in"
        make_images(folder, args.images)
        one = Path(tmp) / "one"
        make_images(one, 1)

        cluster = RayCluster(workers=args.ray_workers)
        began = time.perf_counter()
        session = ray_session(cluster)  # the local instance `batch --engine ray` starts
        session.__enter__()
        start_up = time.perf_counter() - began

        def timed(engine: str, inputs: Path, index: int) -> float:
            out = Path(tmp) / f"out-{engine}-{index}"
            began = time.perf_counter()
            result = run_batch(
                loaded,
                spec,
                [str(inputs)],
                out,
                settings,
                quiet=True,
                device=args.device,
                cluster=cluster if engine == "ray" else None,
            )
            seconds = time.perf_counter() - began
            assert result.ok == result.total, result
            return seconds

        first_run = timed("ray", one, -1)
        ratios, marginal_ratios = [], []
        model = args.arch or "sample ResNet"
        print(
            f"{args.images} images, {model}, {args.size}px, batch {args.images_per_batch}, {args.method}, "
            f"{args.device}; local: {args.workers} threads; ray: {args.ray_workers} actor(s), "
            f"{os.cpu_count()} CPUs"
        )
        for index in range(args.pairs):
            local = args.images / timed("local", folder, index)
            seconds = timed("ray", folder, index)
            remote = args.images / seconds
            # Past the fixed cost of a run (a one-image run, timed in the same pair), the rate of
            # the images themselves: what a run of many more images tends to.
            marginal = (args.images - 1) / max(seconds - timed("ray", one, index), 1e-9)
            ratios.append(remote / local)
            marginal_ratios.append(marginal / local)
            print(
                f"pair {index + 1}: local {local:6.1f} images/s, ray {remote:6.1f} images/s, "
                f"ratio {remote / local:.2f}; ray past its fixed cost {marginal:6.1f} images/s, "
                f"ratio {marginal / local:.2f}"
            )
        print(
            f"median ratio ray/local : {statistics.median(ratios):.2f} "
            f"(past the fixed cost: {statistics.median(marginal_ratios):.2f})"
        )
        print(f"starting the local Ray instance ({os.cpu_count()} CPUs): {start_up:.1f} s")
        print(f"a one-image Ray run (actor start + model load + Ray Data set-up): {first_run:.1f} s")
        session.__exit__(None, None, None)


if __name__ == "__main__":
    main()
