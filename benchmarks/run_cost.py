"""How much an explanation costs compared with a bare forward pass, and how fast the CLI starts.

Prints, for each model, the median time of a bare inference forward (torch.no_grad) and of the
explanation step of ``attnexplain.explain`` (forward with capture + backward to the layer + map) on
the same preprocessed image, and their ratio; for Grad-CAM also the textbook variant that
back-propagates into every parameter (what a full ``loss.backward()`` costs). Run:

    .venv/bin/python benchmarks/run_cost.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchvision

import attnexplain
from attnexplain.images import from_array
from attnexplain.preprocess import Preprocessing, prepare


def median_seconds(function, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def full_backward_gradcam(model, layer, batch):
    model.requires_grad_(True)
    store = {}
    handle = layer.register_forward_hook(lambda m, i, o: store.update(act=o) or o.retain_grad())
    output = model(batch)
    output[0, output[0].argmax()].backward()
    handle.remove()
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    cam = torch.relu((store["act"].grad.mean((2, 3), keepdim=True) * store["act"]).sum(1))
    return cam


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    from skimage import data

    image = from_array(data.chelsea())
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, CPU")
    print(f"{'model':<12} {'method':<9} {'forward ms':>10} {'method ms':>10} {'ratio':>6}")
    for name, method in (("resnet50", "gradcam"), ("vit_b_16", "rollout"),
                         ("resnet18", "gradcam")):
        torch.manual_seed(0)
        model = torchvision.models.get_model(name).eval().requires_grad_(False)
        batch = prepare(image.pixels, Preprocessing(size=(224, 224))).tensor

        def bare():
            with torch.no_grad():
                model(batch)

        def ours():
            return attnexplain.explain(model, image, method).timings["explain_s"]

        forward_s = median_seconds(bare, args.repeats)
        ours()
        method_s = statistics.median(ours() for _ in range(args.repeats))
        print(f"{name:<12} {method:<9} {forward_s * 1e3:>10.1f} {method_s * 1e3:>10.1f} "
              f"{method_s / forward_s:>6.2f}")
        if method == "gradcam":
            layer = model.layer4
            textbook_s = median_seconds(lambda: full_backward_gradcam(model, layer, batch), args.repeats)
            print(f"{name:<12} {'textbook':<9} {forward_s * 1e3:>10.1f} {textbook_s * 1e3:>10.1f} "
                  f"{textbook_s / forward_s:>6.2f}   (full backward into every parameter)")

    cli = [str(Path(sys.executable).with_name("attnexplain")), "--help"]
    help_s = median_seconds(lambda: subprocess.run(cli, capture_output=True, check=True), 10)
    print(f"`attnexplain --help`: {help_s * 1e3:.0f} ms (median of 10, whole process)")


if __name__ == "__main__":
    main()
