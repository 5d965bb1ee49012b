"""What --precision bf16 and channels_last buy on the CPU: paired, alternating medians.

    python benchmarks/precision_speed.py [--batch 8] [--repeats 7] [--threads N]

ResNet-50 and ViT-B/16 (torchvision, random weights) at 224×224 on a batch of photos: images per
second of the bare forward and of the default method (Grad-CAM at layer4; rollout for the ViT) at
bf16, each as a ratio to the same at fp32 (run one after the other in pairs, median of the per-pair
ratios: :func:`methods_speed.paired_ratio`). Then ResNet-50 with the model and batch in channels_last
memory format against the default layout, at fp32 and bf16. A CPU without AVX512-BF16 or AMX runs
bf16 emulated, slower than fp32: ``auto`` keeps fp32 on every CPU for that reason.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods_speed import loaded_model, paired_ratio, photos  # noqa: E402

from attnexplain.engine import compute_maps  # noqa: E402
from attnexplain.explanation import resolve_methods  # noqa: E402
from attnexplain.options import MethodOptions  # noqa: E402
from attnexplain.precision import model_precision  # noqa: E402


def bare(loaded: Any, batch: torch.Tensor, precision: str) -> Callable[[], None]:
    def forward() -> None:
        with torch.inference_mode(), model_precision(loaded.module, precision):
            loaded.module(batch)

    return forward


def explained(loaded: Any, batch: torch.Tensor, method: str, layers: list[str], precision: str) -> Callable[[], None]:
    methods, options = resolve_methods(loaded, method), MethodOptions(precision=precision)
    return lambda: compute_maps(loaded, batch, methods, layers, options=options) and None


def row(what: str, ratio_and_seconds: tuple[float, float], count: int) -> None:
    ratio, seconds = ratio_and_seconds
    print(f"| {what} | {count / seconds:.2f} | {ratio:.2f}× |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    flags = open("/proc/cpuinfo").read() if Path("/proc/cpuinfo").exists() else ""
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch} at 224×224, "
        f"AVX512-BF16: {'avx512_bf16' in flags}, AMX-BF16: {'amx_bf16' in flags}\n"
    )
    batch = photos(args.batch, 224)
    print("| bf16 against fp32 | bf16 images/s | bf16 time ÷ fp32 time (paired median) |")
    print("| --- | ---: | ---: |")
    for name, method, layers in (("resnet50", "gradcam", ["layer4"]), ("vit_b_16", "rollout", [])):
        loaded = loaded_model(name)
        if name == "vit_b_16":  # torchvision's head starts at zero: every class alike, nothing to explain
            torch.nn.init.normal_(loaded.module.heads.head.weight, std=0.02)
        row(
            f"{name}, bare forward",
            paired_ratio(bare(loaded, batch, "fp32"), bare(loaded, batch, "bf16"), args.repeats),
            args.batch,
        )
        row(
            f"{name}, {method}",
            paired_ratio(
                explained(loaded, batch, method, layers, "fp32"),
                explained(loaded, batch, method, layers, "bf16"),
                args.repeats,
            ),
            args.batch,
        )
    print("\n| channels_last against the default layout, resnet50 | channels_last images/s | time ÷ default |")
    print("| --- | ---: | ---: |")
    default, converted = loaded_model("resnet50"), loaded_model("resnet50")
    converted.module.to(memory_format=torch.channels_last)
    batch_last = batch.contiguous(memory_format=torch.channels_last)
    for precision in ("fp32", "bf16"):
        row(
            f"bare forward, {precision}",
            paired_ratio(bare(default, batch, precision), bare(converted, batch_last, precision), args.repeats),
            args.batch,
        )
        row(
            f"gradcam, {precision}",
            paired_ratio(
                explained(default, batch, "gradcam", ["layer4"], precision),
                explained(converted, batch_last, "gradcam", ["layer4"], precision),
                args.repeats,
            ),
            args.batch,
        )


if __name__ == "__main__":
    main()
