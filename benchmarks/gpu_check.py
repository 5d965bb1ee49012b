"""The device check (issue #29): everything to measure on a CUDA GPU, in one call, into one file.

    python benchmarks/gpu_check.py                      # on a machine with a CUDA GPU: < 8 minutes
    python benchmarks/gpu_check.py --device cpu --quick # small sizes, a few images: < 1 minute on a CPU

Writes ``--out`` (default ``gpu_check.md``): a Markdown table of every figure, followed by the same
figures as one JSON block (what the test suite reads back). Sections, each skipped with the reason
once the time budget (``--budget-s``, 420 s) is spent:

- **device**: what ``--device auto`` picks (CUDA where there is one), the card, bf16 support, what
  ``--precision auto`` resolves to there.
- **methods**: images per second of Grad-CAM (the five gradient CAMs together), rollout and Chefer on
  ViT-B/16 (torchvision ``vit_b_16``, random weights: no download), integrated gradients and Score-CAM
  on ResNet-50 (random weights), at fp32, bf16 and fp16 (fp16 refused on the CPU: recorded so), each as
  a ratio to the bare forward of the same batch in the same precision (paired, alternating, median:
  :func:`methods_speed.paired_ratio`), and the bare forward's own images per second per precision.
- **channels_last**: the bare ResNet-50 forward and Grad-CAM in channels_last memory format against
  the default (paired), to decide whether the GPU path should convert the model.
- **batch**: ``attnexplain batch`` end to end (decode, explain, write) on generated photos (2,000; quick:
  16) against the bare explanation core (``compute_maps``) on the same preprocessed batches; the
  GPU's peak memory per phase and its allocated memory sampled over the run (flat: no growth).
- **evaluate**: ``attnexplain evaluate``'s defaults on 50 composites (quick: 4) with the shipped
  sample ResNet, wall time and images per minute.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batch_throughput import make_photos  # noqa: E402
from evaluate_speed import write_composites  # noqa: E402
from methods_speed import GRADIENT_CAMS, loaded_model, paired_ratio, photos  # noqa: E402

from attnexplain.engine import compute_maps  # noqa: E402
from attnexplain.errors import AttnExplainError  # noqa: E402
from attnexplain.explanation import resolve_methods  # noqa: E402
from attnexplain.options import MethodOptions  # noqa: E402
from attnexplain.precision import model_precision, resolve_precision  # noqa: E402

SAMPLE_RESNET = Path(__file__).resolve().parents[1] / "samples" / "models" / "resnet-composites.pt"
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much each section measures: the full check on a GPU, or ``--quick`` on a CPU."""

    side: int = 224
    cnn: str = "resnet50"  # the CNN of every CAM and attribution row
    scorecam_layer: str = "layer4"  # ResNet-50's: 2,048 channels, as many masked forwards per image
    cam_batch: int = 32
    vit_batch: int = 32
    ig_batch: int = 8
    ig_steps: int = 32
    scorecam_batch: int = 2
    repeats: int = 5
    batch_photos: int = 2000
    images_per_batch: int = 32
    evaluate_images: int = 50
    evaluate_side: int | None = None  # the sample ResNet's own 128 px
    tiny_vit: bool = False  # a 2-layer ViT instead of ViT-B/16 (--quick)


QUICK = Sizes(
    side=32,
    cnn="resnet18",
    scorecam_layer="layer1",  # 64 channels
    cam_batch=2,
    vit_batch=2,
    ig_batch=1,
    ig_steps=4,
    scorecam_batch=1,
    repeats=2,
    batch_photos=16,
    images_per_batch=8,
    evaluate_images=2,
    evaluate_side=64,
    tiny_vit=True,
)


class Clock:
    """The time budget: a section starts only while some is left."""

    def __init__(self, budget_s: float) -> None:
        self.started, self.budget_s = time.perf_counter(), budget_s

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)


def synchronised(device: torch.device, function: Callable[[], Any]) -> Callable[[], None]:
    """``function`` that returns once the device has finished its work (CUDA runs asynchronously)."""

    def run() -> None:
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run


def device_section(device: torch.device) -> dict[str, Any]:
    from attnexplain.loading import resolve_device

    info: dict[str, Any] = {
        "auto_picks": str(resolve_device("auto")),
        "device": str(device),
        "cuda_available": torch.cuda.is_available(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "precision_auto": resolve_precision("auto", device),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(
            card=properties.name,
            memory_gib=round(properties.total_memory / 2**30, 1),
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    return info


def bare_forward(module: torch.nn.Module, batch: torch.Tensor, precision: str) -> Callable[[], Any]:
    """The model's inference forward on ``batch`` in ``precision``: what every ratio divides by."""

    def forward() -> None:
        with torch.inference_mode(), model_precision(module, precision):
            module(batch)

    return forward


def method_rows(sizes: Sizes) -> list[tuple[str, str, str, list[str], str, dict[str, Any]]]:
    """(what, torchvision model, methods, layers, the Sizes field of its batch, options) per row."""
    return [
        ("gradcam (the five gradient CAMs together)", sizes.cnn, ",".join(GRADIENT_CAMS), ["layer4"], "cam_batch", {}),
        ("rollout, ViT-B/16", "vit_b_16", "rollout", [], "vit_batch", {}),
        ("chefer, ViT-B/16", "vit_b_16", "chefer", [], "vit_batch", {}),
        ("integrated_gradients", sizes.cnn, "integrated_gradients", [], "ig_batch", {"steps": "ig_steps"}),
        (f"scorecam ({sizes.scorecam_layer})", sizes.cnn, "scorecam", [sizes.scorecam_layer], "scorecam_batch", {}),
    ]


def vit_model(sizes: Sizes) -> Any:
    """ViT-B/16 with random weights (a 2-layer ViT of 8-pixel patches for ``--quick``), built for
    the check's size, its head drawn at random (torchvision's starts at zero: every class alike)."""
    from torchvision.models import VisionTransformer

    from attnexplain.loading import LoadedModel
    from attnexplain.plugins import select_plugin

    if not sizes.tiny_vit:
        loaded = loaded_model("vit_b_16", image_size=sizes.side)
    else:
        torch.manual_seed(0)
        module = VisionTransformer(
            image_size=sizes.side, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
        ).eval()
        module.requires_grad_(False)
        loaded = LoadedModel(module=module, source="tiny-vit", loader="benchmark", plugin=select_plugin(module))
    torch.nn.init.normal_(loaded.module.heads.head.weight, std=0.02)
    return loaded


def methods_section(device: torch.device, sizes: Sizes, clock: Clock) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    models: dict[str, Any] = {}
    side = sizes.side
    for what, arch, names, layers, batch_field, settings in method_rows(sizes):
        if arch not in models:
            models[arch] = vit_model(sizes) if arch == "vit_b_16" else loaded_model(arch)
            models[arch].module.to(device)
        loaded = models[arch]
        count = getattr(sizes, batch_field)
        batch = photos(count, side).to(device)
        methods = resolve_methods(loaded, names)
        for precision in PRECISIONS:
            row: dict[str, Any] = {"what": what, "model": arch, "precision": precision, "images": count, "side": side}
            rows.append(row)
            if clock.left() <= 0:
                row["skipped"] = "time budget spent"
                continue
            options = MethodOptions(
                precision=precision, **{key: getattr(sizes, value) for key, value in settings.items()}
            )
            try:
                resolve_precision(precision, device)
            except AttnExplainError as error:
                row["skipped"] = str(error)
                continue
            bare = synchronised(device, bare_forward(loaded.module, batch, precision))
            explained = synchronised(device, lambda: compute_maps(loaded, batch, methods, layers, options=options))
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            ratio, seconds = paired_ratio(bare, explained, sizes.repeats)
            row.update(ratio=round(ratio, 3), images_per_s=round(count / seconds, 2), method_ms=round(seconds * 1e3, 2))
            row["bare_images_per_s"] = round(count / _median_seconds(bare, sizes.repeats), 2)
            if device.type == "cuda":
                row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return rows


def _median_seconds(function: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def channels_last_section(device: torch.device, sizes: Sizes, clock: Clock) -> list[dict[str, Any]]:
    """Bare forward and Grad-CAM of the CNN with the model and batch in channels_last, against the default layout
    (paired: default, then channels_last), at each precision the device takes."""
    rows: list[dict[str, Any]] = []
    default, converted = loaded_model(sizes.cnn), loaded_model(sizes.cnn)
    default.module.to(device)
    converted.module.to(device, memory_format=torch.channels_last)
    batch = photos(sizes.cam_batch, sizes.side).to(device)
    batch_last = batch.contiguous(memory_format=torch.channels_last)
    methods = resolve_methods(default, "gradcam")
    for precision in PRECISIONS:
        for what in ("bare forward", "gradcam"):
            row: dict[str, Any] = {"what": what, "precision": precision, "images": sizes.cam_batch}
            rows.append(row)
            if clock.left() <= 0:
                row["skipped"] = "time budget spent"
                continue
            try:
                resolve_precision(precision, device)
            except AttnExplainError as error:
                row["skipped"] = str(error)
                continue
            options = MethodOptions(precision=precision)
            if what == "bare forward":
                first = bare_forward(default.module, batch, precision)
                second = bare_forward(converted.module, batch_last, precision)
            else:
                first = lambda: compute_maps(default, batch, methods, ["layer4"], options=options)  # noqa: E731
                second = lambda: compute_maps(converted, batch_last, methods, ["layer4"], options=options)  # noqa: E731
            ratio, _ = paired_ratio(synchronised(device, first), synchronised(device, second), sizes.repeats)
            row["channels_last_time_ratio"] = round(ratio, 3)  # < 1: channels_last is faster
    return rows


class MemorySampler:
    """The GPU's allocated memory (CUDA) or the process's resident memory (elsewhere), every
    ``interval`` seconds while it runs, in GiB."""

    def __init__(self, device: torch.device, interval: float = 0.5) -> None:
        self.device, self.interval, self.samples = device, interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**30
        with open("/proc/self/statm") as statm:  # Linux: resident pages
            import os

            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(round(self.now(), 3))

    def __enter__(self) -> "MemorySampler":
        self.samples.append(round(self.now(), 3))
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(round(self.now(), 3))


def batch_section(device: torch.device, sizes: Sizes, clock: Clock, tmp: Path) -> dict[str, Any]:
    """``attnexplain batch`` on generated photos against compute_maps on the same preprocessed
    batches, with the memory over each phase."""
    from attnexplain.batch import run_batch
    from attnexplain.batch_stages import BatchSettings
    from attnexplain.explanation import plan_explanation
    from attnexplain.images import load_image
    from attnexplain.inputs import collect_inputs
    from attnexplain.loading import load_model
    from attnexplain.preprocess import prepare

    if clock.left() <= 0:
        return {"skipped": "time budget spent"}
    folder, out = tmp / "photos", tmp / "batch-out"
    made = time.perf_counter()
    # 16 distinct photos (480 to 1920 px, as people have them), copied to the count: each copy is
    # decoded and written all the same.
    distinct = min(16, sizes.batch_photos)
    make_photos(folder / "distinct", distinct)
    sources = sorted((folder / "distinct").iterdir())
    for index in range(sizes.batch_photos):
        shutil.copyfile(sources[index % distinct], folder / f"photo{index:05d}.jpg")
    shutil.rmtree(folder / "distinct")
    result: dict[str, Any] = {"photos": sizes.batch_photos, "make_photos_s": round(time.perf_counter() - made, 1)}
    torch.manual_seed(0)
    import torchvision

    weights = tmp / f"{sizes.cnn}.pt"
    torch.save(torchvision.models.get_model(sizes.cnn).eval().state_dict(), weights)
    loaded = load_model(weights, arch=sizes.cnn, device=str(device))
    precision = resolve_precision("auto", device)
    options = MethodOptions(precision="auto")
    settings = BatchSettings(
        method="gradcam", size=(sizes.side, sizes.side), images_per_batch=sizes.images_per_batch, options=options
    )
    plan = plan_explanation(loaded, "gradcam", size=settings.size)
    phases: dict[str, Any] = {}

    images = collect_inputs([str(folder)]).images[:distinct]  # the copies: the same tensors again
    tensors = [prepare(load_image(item.path).pixels, plan.preprocessing).tensor for item in images]

    def bare_core() -> float:
        """compute_maps on the same preprocessed batches (moved to the device, maps to the host)."""
        started = time.perf_counter()
        for start in range(0, sizes.batch_photos, sizes.images_per_batch):
            count = min(sizes.images_per_batch, sizes.batch_photos - start)
            batch = torch.cat([tensors[(start + i) % distinct] for i in range(count)]).to(device)
            computed = compute_maps(loaded, batch, plan.methods, plan.layers, options=options)
            [heatmap.cpu() for heatmap in computed.maps.values()]
        return time.perf_counter() - started

    def whole_batch() -> float:
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        spec = {"model": str(weights), "arch": sizes.cnn}
        done = run_batch(loaded, spec, [str(folder)], out, settings, quiet=True, device=str(device))
        result["ok"] = done.ok
        return time.perf_counter() - started

    for name, phase in (("bare compute_maps (preprocessed batches)", bare_core), ("attnexplain batch", whole_batch)):
        if clock.left() <= 0:
            phases[name] = {"skipped": "time budget spent"}
            continue
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with MemorySampler(device) as memory:
            seconds = phase()
        phases[name] = {
            "seconds": round(seconds, 2),
            "images_per_s": round(sizes.batch_photos / seconds, 2),
            "memory_gib_samples": memory.samples,
            "memory_gib_first_half_max": max(memory.samples[: max(1, len(memory.samples) // 2)]),
            "memory_gib_second_half_max": max(memory.samples[len(memory.samples) // 2 :]),
        }
        if device.type == "cuda":
            phases[name]["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    result.update(precision=precision, method="gradcam", model=sizes.cnn, side=sizes.side, phases=phases)
    timed = [phase for phase in phases.values() if "seconds" in phase]
    if len(timed) == 2:
        result["ratio_batch_to_bare"] = round(timed[0]["seconds"] / timed[1]["seconds"], 3)  # throughputs
    return result


def evaluate_section(device: torch.device, sizes: Sizes, clock: Clock, tmp: Path) -> dict[str, Any]:
    """``evaluate``'s defaults on composites with the shipped sample ResNet."""
    import warnings

    from attnexplain.evaluation import EvaluationSettings, evaluate
    from attnexplain.loading import load_model

    if clock.left() <= 0:
        return {"skipped": "time budget spent"}
    warnings.simplefilter("ignore")  # Captum's notes on its hooks
    folder = tmp / "composites"
    write_composites(folder, sizes.evaluate_images, 128)
    loaded = load_model(SAMPLE_RESNET, device=str(device))
    settings = EvaluationSettings(size=sizes.evaluate_side, options=MethodOptions(precision="auto"))
    started = time.perf_counter()
    evaluation = evaluate(loaded, [str(folder / "images")], settings, masks=folder / "masks", out=tmp / "eval-out")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    return {
        "images": sizes.evaluate_images,
        "ok": evaluation["images"]["ok"],
        "methods": evaluation["settings"]["methods"],
        "metrics": evaluation["settings"]["metrics"],
        "precision": resolve_precision("auto", device),
        "seconds": round(seconds, 2),
        "images_per_min": round(60 * sizes.evaluate_images / seconds, 1),
    }


def markdown(results: dict[str, Any]) -> str:
    device = results["device"]
    lines = [
        f"# attnexplain device check: {device.get('card', device['device'])}",
        "",
        f"`--device auto` picks **{device['auto_picks']}**; `--precision auto` there: **{device['precision_auto']}**; "
        f"torch {device['torch']}; {'quick sizes' if results['quick'] else 'full sizes'}; "
        f"{results['seconds']:.0f} s in all.",
        "",
        "| what | precision | images | images/s | ÷ bare forward (paired median) | bare forward images/s |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in results["methods"]:
        if "skipped" in row:
            lines.append(f"| {row['what']} | {row['precision']} | {row['images']} | skipped: {row['skipped']} | | |")
        else:
            lines.append(
                f"| {row['what']} | {row['precision']} | {row['images']} | {row['images_per_s']:.1f} | "
                f"{row['ratio']:.2f}× | {row['bare_images_per_s']:.1f} |"
            )
    lines += ["", "| channels_last, the CNN | precision | time ÷ default layout |", "| --- | --- | ---: |"]
    for row in results["channels_last"]:
        value = row.get("channels_last_time_ratio")
        lines.append(
            f"| {row['what']} | {row['precision']} | {f'{value:.2f}×' if value is not None else row.get('skipped')} |"
        )
    batch = results["batch"]
    lines += ["", f"batch ({batch.get('photos', 0)} generated photos, gradcam, {batch.get('model')}):", ""]
    for name, phase in batch.get("phases", {}).items():
        if "seconds" in phase:
            lines.append(
                f"- {name}: {phase['images_per_s']:.1f} images/s; memory (GiB) first half max "
                f"{phase['memory_gib_first_half_max']}, second half max {phase['memory_gib_second_half_max']}"
                + (f", peak {phase['peak_gib']}" if "peak_gib" in phase else "")
            )
        else:
            lines.append(f"- {name}: skipped ({phase['skipped']})")
    if "ratio_batch_to_bare" in batch:
        lines.append(f"- batch ÷ bare core: {batch['ratio_batch_to_bare']:.2f}× the throughput")
    evaluation = results["evaluate"]
    if "seconds" in evaluation:
        lines += [
            "",
            f"evaluate (defaults, {evaluation['images']} composites, sample ResNet): {evaluation['seconds']:.1f} s, "
            f"{evaluation['images_per_min']:.1f} images/min",
        ]
    lines += ["", "```json", json.dumps(results, indent=1), "```", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (CUDA where there is one), cuda, cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes and few images (a CPU in < 1 minute)")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.md"), help="the results file (Markdown + JSON)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="no section starts after this many seconds")
    parser.add_argument(
        "--sections", default="methods,channels_last,batch,evaluate", help="comma-separated, in this order"
    )
    args = parser.parse_args()
    from attnexplain.loading import resolve_device

    device = torch.device(resolve_device(args.device))
    sizes = QUICK if args.quick else Sizes()
    clock = Clock(args.budget_s)
    sections = args.sections.split(",")
    results: dict[str, Any] = {
        "quick": args.quick,
        "device": device_section(device),
        "sizes": dataclasses.asdict(sizes),
    }
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        results["methods"] = methods_section(device, sizes, clock) if "methods" in sections else []
        results["channels_last"] = channels_last_section(device, sizes, clock) if "channels_last" in sections else []
        results["batch"] = batch_section(device, sizes, clock, tmp) if "batch" in sections else {"skipped": "not asked"}
        results["evaluate"] = (
            evaluate_section(device, sizes, clock, tmp) if "evaluate" in sections else {"skipped": "not asked"}
        )
    results["seconds"] = round(time.perf_counter() - clock.started, 1)
    args.out.write_text(markdown(results))
    print(markdown(results).split("```json")[0])
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
