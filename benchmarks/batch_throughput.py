"""End-to-end throughput of `attnexplain batch` against the bare explanation core, and its memory.

    python benchmarks/batch_throughput.py [--images 200] [--size 64] [--images-per-batch 16]
                                          [--workers 2[,4...]] [--pairs 3] [--memory 200,2000]
                                          [--device cpu]
    python benchmarks/batch_throughput.py --arch resnet50 --photos --images 96 --memory ''
    python benchmarks/batch_throughput.py --arch resnet50 --photos --images 96 --parallel-batches 1,2 --memory ''
    python benchmarks/batch_throughput.py --simulated-device-ms 10 --photos --workers 1,2,4 --memory ''
    python benchmarks/batch_throughput.py --stages --images 300 --memory ''

The first form explains 160-pixel synthetic JPEGs with the shipped sample ResNet. ``--arch NAME``
saves a torchvision NAME with random weights as a state_dict and loads it the way a user would
(``--arch``), at 224×224 unless ``--size`` says otherwise; ``--photos`` explains scikit-image's
photos (astronaut, chelsea, coffee, rocket) written as JPEGs of 480 to 1920 pixels on the long side.

``--simulated-device-ms MS`` explains with a small network whose forward sleeps MS milliseconds per
image of the batch: a device that costs the CPU nothing, as a GPU does, so that the ratio shows
whether decoding and writing keep such a device busy (``--workers 1,2,4`` compares worker counts).

Prints: images/s of run_batch (decode + explain + write everything) versus compute_maps alone on the
same preprocessed batches, one at a time on torch's threads (goal: >= 0.9x), timed alternately in
``--pairs`` pairs (bare, then run_batch at each worker count and ``--parallel-batches`` count) with
the median of the paired ratios; for a parallel count above 1, also against compute_maps on as
many replicas at once (what the pipeline around the model costs); where an image's time goes
(the timings results.jsonl records); and the peak resident memory of a whole run (in a fresh
process each) at each --memory image count (goal: flat). ``--stages`` instead times the stages of
one whole run_batch (CPU time by ``time.thread_time`` on each thread, see ``stage_timing.py``) and
prints the CPU milliseconds per image of each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

from stage_timing import StageClock

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "samples" / "models" / "resnet-composites.pt"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
LONG_SIDES = (480, 800, 1280, 1920)


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


def make_photos(folder: Path, count: int) -> None:
    """Real photos at the sizes people have them: each of PHOTOS at each of LONG_SIDES, in turn."""
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        photo = Image.fromarray(getattr(data, PHOTOS[index % len(PHOTOS)])())
        long_side = LONG_SIDES[(index // len(PHOTOS)) % len(LONG_SIDES)]
        scale = long_side / max(photo.size)
        resized = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.Resampling.BICUBIC)
        resized.save(folder / f"photo{index:05d}.jpg", quality=90)


def sleeping_model(device_ms_per_image: float):
    """A small network whose forward sleeps ``device_ms_per_image`` per image: the CPU's share of a
    forward that runs on a device (the sleep releases the GIL, as a CUDA synchronisation does)."""
    import torch

    class SleepingNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = torch.nn.Sequential(
                torch.nn.Conv2d(3, 8, 3, stride=4),
                torch.nn.ReLU(),
                torch.nn.Conv2d(8, 16, 3, stride=2),
                torch.nn.ReLU(),
            )
            self.head = torch.nn.Linear(16, 10)

        def forward(self, x):
            time.sleep(device_ms_per_image / 1000 * x.shape[0])
            return self.head(self.features(x).mean(dim=(2, 3)))

    torch.manual_seed(0)
    return SleepingNet()


def load(args):
    """The model under test and the spec run_batch fingerprints it by."""
    from attnexplain.loading import load_model

    if args.simulated_device_ms is not None:
        from attnexplain.loading import LoadedModel, _finish

        loaded = LoadedModel(sleeping_model(args.simulated_device_ms), "sleeping-net", "module")
        _finish(loaded, None, args.device)
        return loaded, {"model": f"sleeping-net-{args.simulated_device_ms}ms"}
    if args.arch is None:
        return load_model(MODEL, device=args.device), {"model": str(MODEL)}
    import torch
    import torchvision

    torch.manual_seed(0)
    path = Path(args.tmp) / f"{args.arch}.pt"
    torch.save(torchvision.models.get_model(args.arch).eval().state_dict(), path)
    return load_model(path, arch=args.arch, device=args.device), {"model": str(path), "arch": args.arch}


def make_inputs(args, folder: Path) -> None:
    if args.photos:
        make_photos(folder, args.images)
    else:
        make_images(folder, args.images, side=96 if args.memory_child else 160)


def _settings(args, workers: int | None = None):
    from attnexplain.batch_stages import BatchSettings
    from attnexplain.explanation import MethodOptions

    return BatchSettings(
        method=args.method,
        size=(args.size, args.size),
        images_per_batch=args.images_per_batch,
        workers=workers if workers is not None else args.worker_counts[0],
        parallel_batches=args.parallel_counts[0],
        overlay_format=args.overlay_format,
        overlay_size=args.overlay_size,
        options=MethodOptions(),
    )


def _model_name(args) -> str:
    if args.simulated_device_ms is not None:
        return f"sleeping net, {args.simulated_device_ms:g} ms of device per image"
    return args.arch or "sample ResNet"


def throughput(args) -> None:
    import torch

    from attnexplain.batch import run_batch
    from attnexplain.explanation import compute_maps, plan_explanation
    from attnexplain.images import load_image
    from attnexplain.inputs import collect_inputs
    from attnexplain.preprocess import prepare
    from attnexplain.records import read_results
    from attnexplain.replicas import ModelReplicas

    loaded, spec = load(args)
    settings = _settings(args)
    folder = Path(args.tmp) / "in"
    make_inputs(args, folder)
    plan = plan_explanation(loaded, args.method, size=settings.size)
    tensors = [
        prepare(load_image(item.path).pixels, plan.preprocessing).tensor
        for item in collect_inputs([str(folder)]).images
    ]
    batches = [
        torch.cat(tensors[i : i + args.images_per_batch]).to(args.device)
        for i in range(0, len(tensors), args.images_per_batch)
    ]
    compute_maps(loaded, batches[0], plan.methods, plan.layers)  # warm-up

    def maps_on_cpu(model, batch):
        maps = compute_maps(model, batch, plan.methods, plan.layers)
        return [heatmap.cpu() for heatmap in maps.maps.values()]

    def bare_pass(parallel: int = 1) -> tuple[float, float]:
        """compute_maps over the batches: one at a time on torch's threads (what the goal is
        measured against), or ``parallel`` at once on replicas, as run_batch explains them."""
        began, cpu = time.perf_counter(), time.process_time()
        if parallel == 1:
            for batch in batches:
                maps_on_cpu(loaded, batch)
        else:
            with ModelReplicas(loaded, parallel) as replicas:
                explaining = deque()
                for batch in batches:
                    explaining.append(replicas.submit(maps_on_cpu, batch))
                    while len(explaining) >= replicas.count:
                        explaining.popleft().result()
                for future in explaining:
                    future.result()
        return len(tensors) / (time.perf_counter() - began), (time.process_time() - cpu) / len(tensors)

    def batch_pass(workers: int, parallel: int | None):
        out = Path(args.tmp) / "out"
        shutil.rmtree(out, ignore_errors=True)
        began, cpu = time.perf_counter(), time.process_time()
        settings = dataclasses.replace(_settings(args, workers), parallel_batches=parallel)
        result = run_batch(loaded, spec, [str(folder)], out, settings, quiet=True, device=args.device)
        rate = result.ok / (time.perf_counter() - began)
        return rate, (time.process_time() - cpu) / result.ok, out

    configs = [(workers, parallel) for parallel in args.parallel_counts for workers in args.worker_counts]
    bare_parallel = sorted({p for p in args.parallel_counts if p is not None and p > 1})
    bare_pass()  # the first pass still pays for lazy initialisation
    bares: list[tuple[float, float]] = []
    bares_parallel: dict[int, list[tuple[float, float]]] = {p: [] for p in bare_parallel}
    runs: dict[tuple, list[tuple[float, float]]] = {config: [] for config in configs}
    ratios: dict[tuple, list[float]] = {config: [] for config in configs}
    own_ratios: dict[tuple, list[float]] = {config: [] for config in configs}
    for _ in range(args.pairs):  # alternated: a load that comes and goes hits both sides
        bares.append(bare_pass())
        for parallel in bare_parallel:
            bares_parallel[parallel].append(bare_pass(parallel))
        for config in configs:
            rate, cpu, out = batch_pass(*config)
            runs[config].append((rate, cpu))
            ratios[config].append(rate / bares[-1][0])
            if config[1] in bares_parallel:
                own_ratios[config].append(rate / bares_parallel[config[1]][-1][0])
    records = [r for r in read_results(out / "results.jsonl") if r.get("status") == "ok"]
    stages = {
        key: 1000 * sum(r["timings"].get(key, 0.0) for r in records) / len(records) for key in records[0]["timings"]
    }
    pixels = sum(r["image_info"]["width"] * r["image_info"]["height"] for r in records) / len(records)

    def listed(values, form="{:.1f}") -> str:
        return ", ".join(form.format(v) for v in values)

    print(
        f"bare compute_maps : {listed(b[0] for b in bares)} images/s ({args.images} images, "
        f"{_model_name(args)}, batch {args.images_per_batch}, {args.size}px, {args.method}, "
        f"{args.device}, {torch.get_num_threads()} torch threads); CPU "
        f"{listed((1000 * b[1] for b in bares))} ms/image"
    )
    for parallel, passes in bares_parallel.items():
        print(
            f"bare, {parallel} at once: {listed(b[0] for b in passes)} images/s (compute_maps on "
            f"{parallel} replicas, as run_batch with {parallel} parallel batches); CPU "
            f"{listed((1000 * b[1] for b in passes))} ms/image"
        )
    for config in configs:
        workers, parallel = config
        named = f"{workers} workers, {'default' if parallel is None else parallel} parallel batches"
        print(
            f"attnexplain batch : {listed(r[0] for r in runs[config])} images/s with {named} "
            f"(decode + explain + write all outputs; photos {pixels / 1e6:.2f} MP on "
            f"average); CPU {listed(1000 * r[1] for r in runs[config])} ms/image (all threads)"
        )
        print(
            f"ratio, {named} : median {statistics.median(ratios[config]):.2f}x of "
            f"{args.pairs} pairs ({listed(ratios[config], '{:.2f}')}; goal >= 0.90x)"
        )
        if own_ratios[config]:
            print(
                f"  against bare with {parallel} at once: median "
                f"{statistics.median(own_ratios[config]):.2f}x ({listed(own_ratios[config], '{:.2f}')})"
            )
    print(
        "per image (ms)    : "
        + ", ".join(f"{key[:-2]} {value:.1f}" for key, value in stages.items())
        + "  (wall time on its thread; threads overlap)"
    )


#: What ``--stages`` times: (label, module, attribute) of each function a stage is; the functions
#: are looked up by the pipeline when it runs, so a timing wrapper put in their place sees every call.
STAGES = (
    ("sha256 of the file", "attnexplain.inputs", "file_sha256"),
    ("decode", "attnexplain.images", "load_image"),
    ("preprocess", "attnexplain.preprocess", "prepare"),
    ("model (explain_decoded, on the model's threads)", "attnexplain.batch", "explain_decoded"),
    ("overlay", "attnexplain.render", "render_explained_overlay"),
    ("overlay's encode", "attnexplain.report", "encode_image"),
    ("heatmap .npy", "attnexplain.report", "write_npy"),
    ("shrink photo + overlay (photo.jpg, thumbnail)", "attnexplain.render", "downscale"),
    ("encode photo.jpg + thumbnail", "attnexplain.render", "encode_image"),
    ("detail page: viewer data", "attnexplain.viewer", "viewer_data"),
    ("detail page: HTML", "attnexplain.gallery", "render_detail"),
    ("atomic folder: staging + rename", "attnexplain._atomic", "atomic_directory"),
    ("results.jsonl line (fsync included)", "attnexplain.records", "ResultsLog.append"),
    ("report refresh", "attnexplain.batch_ledger", "RunLedger.refresh"),
    ("read_image, whole", "attnexplain.batch", "read_image"),
    ("write_image, whole", "attnexplain.batch", "write_image"),
)


def stage_profile(args) -> None:
    """One whole run_batch with each stage's CPU time (``time.thread_time`` on the thread that runs
    it) summed: a light wrapper per stage, not a profiler, whose per-call overhead would inflate
    the Python-heavy stages (the detail page) several times."""
    import cv2
    import torch

    from attnexplain.batch import run_batch

    # OpenCV's and torch's own thread pools would do part of a stage's work on threads whose time
    # no wrapper sees: one thread each, so that every stage's CPU is on the thread that calls it.
    cv2.setNumThreads(0)
    torch.set_num_threads(1)
    loaded, spec = load(args)
    folder = Path(args.tmp) / "in"
    make_inputs(args, folder)
    stages = StageClock(STAGES, time.thread_time, contexts=("atomic_directory",))
    # A first run pays for the imports and lazy initialisation of a fresh process (~2 s of CPU):
    # not an image's cost.
    run_batch(loaded, spec, [str(folder)], Path(args.tmp) / "warm-up", _settings(args), quiet=True, device=args.device)
    stages.reset()
    began_cpu, began_main = time.process_time(), time.thread_time()
    result = run_batch(
        loaded, spec, [str(folder)], Path(args.tmp) / "out", _settings(args), quiet=True, device=args.device
    )
    total, main = time.process_time() - began_cpu, time.thread_time() - began_main
    per_image = 1000 / result.ok
    print(
        f"CPU ms per image by stage ({result.ok} images, {_model_name(args)}, "
        f"{args.worker_counts[0]} workers, OpenCV and torch on one thread each; time.thread_time "
        f"on the thread that runs each; the last two hold the others):"
    )
    for label, seconds in stages.spent.items():
        print(f"  {label:48s} {seconds * per_image:7.2f}")
    print(f"  {'whole run, the calling thread':48s} {main * per_image:7.2f}  (the model's with --parallel-batches 1)")
    print(f"  {'whole run, every thread (process_time)':48s} {total * per_image:7.2f}")


def memory_child(args) -> None:
    """One whole run in this process; prints its peak resident memory."""
    from attnexplain.batch import run_batch

    loaded, spec = load(args)
    folder = Path(args.tmp) / "in"
    make_inputs(args, folder)
    result = run_batch(
        loaded, spec, [str(folder)], Path(args.tmp) / "out", _settings(args), quiet=True, device=args.device
    )
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"images": args.images, "ok": result.ok, "peak_rss_mib": round(peak_mib, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument(
        "--arch", help="A torchvision model with random weights (e.g. resnet50) instead of the shipped sample ResNet."
    )
    parser.add_argument(
        "--photos", action="store_true", help="Real photos of 480-1920 px instead of 160 px synthetic images."
    )
    parser.add_argument("--size", type=int, help="Model input side (default: 64, 224 with --arch).")
    parser.add_argument("--images-per-batch", type=int, default=16)
    parser.add_argument(
        "--workers",
        default="2",
        help="Decode/write worker threads of run_batch; a comma-separated list "
        "(e.g. 1,2,4) times each against the same bare passes.",
    )
    parser.add_argument(
        "--parallel-batches",
        help="run_batch's parallel batches (BatchSettings.parallel_batches); a "
        "comma-separated list (e.g. 1,2), 'default' for its rule (the default; "
        "1 with --simulated-device-ms, as on a GPU). Each count > 1 is also "
        "timed bare, on as many replicas.",
    )
    parser.add_argument(
        "--pairs",
        type=int,
        default=3,
        help="Alternated (bare, run_batch) pairs; the median paired ratio is the figure.",
    )
    parser.add_argument(
        "--simulated-device-ms",
        type=float,
        help="Explain with a small network whose forward sleeps this many ms per "
        "image (a device that costs no CPU, as a GPU).",
    )
    parser.add_argument("--stages", action="store_true", help="Profile one run_batch: CPU ms per image of each stage.")
    parser.add_argument("--method", default="gradcam")
    parser.add_argument(
        "--overlay-size",
        type=int,
        default=2048,
        help="Overlays' longer side, as `attnexplain batch --overlay-size` (default 2048).",
    )
    parser.add_argument(
        "--overlay-format",
        default="jpg",
        choices=("png", "jpg"),
        help="Overlay files, as `attnexplain batch --overlay-format` (default jpg).",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--memory", default="200,2000", help="Image counts for the peak-memory runs (comma-separated; '' skips)."
    )
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.worker_counts = [int(count) for count in args.workers.split(",")]
    if args.parallel_batches is None:
        args.parallel_batches = "1" if args.simulated_device_ms is not None else "default"
    args.parallel_counts = [None if count == "default" else int(count) for count in args.parallel_batches.split(",")]
    if args.size is None:
        args.size = 224 if args.arch else 64
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        if args.memory_child:
            memory_child(args)
            return
        if args.stages:
            stage_profile(args)
            return
        throughput(args)
    for count in [int(c) for c in args.memory.split(",") if c.strip()]:
        command = [
            sys.executable,
            __file__,
            "--memory-child",
            "--images",
            str(count),
            "--size",
            str(args.size),
            "--images-per-batch",
            str(args.images_per_batch),
            "--workers",
            str(args.worker_counts[0]),
            "--method",
            args.method,
            "--device",
            args.device,
            "--parallel-batches",
            args.parallel_batches.split(",")[0],
        ]
        if args.simulated_device_ms is not None:
            command += ["--simulated-device-ms", str(args.simulated_device_ms)]
        command += (["--arch", args.arch] if args.arch else []) + (["--photos"] if args.photos else [])
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        figures = json.loads(output.strip().splitlines()[-1])
        print(f"peak memory       : {figures['peak_rss_mib']:8.1f} MiB for {figures['images']} images")


if __name__ == "__main__":
    main()
