"""`attnexplain run` on one photo, as a user runs it: a whole process, start to finish.

    python benchmarks/one_image.py [--arch resnet50] [--side 4000] [--repeats 5] [--in-process]
                                   [--overlay-size full] [--before /path/to/an/older/tree]

Saves a torchvision ARCH with random weights as a state_dict and a 4:3 JPEG photo SIDE pixels
wide (scikit-image's astronaut upscaled and cropped; 4000: 4000×3000, 12 MP), then runs `python -m
attnexplain run STATE_DICT PHOTO --arch ARCH` in a fresh process REPEATS times. Each run is paired with a
"bare" process that imports torch and torchvision, loads the same state_dict into the architecture and
runs one forward on a 224×224 input: the least any tool can do. Prints per pair the wall times, their
ratio and difference (what `run` costs besides importing torch, loading the model and one forward), the
medians, and the median of each part the report's `timings` records. With --before, each pair also runs
the same command with another checkout of attnexplain on PYTHONPATH (e.g. a `git worktree` of an
earlier commit), and the "before ÷ now" ratio is printed.

Pairs alternate on purpose: on a shared machine single timings spread, ratios within a pair much
less.

``--in-process`` instead measures the CPU time (``time.process_time``: every thread of the process)
of each part of `run` besides the model, in one process, REPEATS times after a warm-up: decoding
the photo, the overlay, encoding it, the heatmap file, the report's previews and pages. A busy
machine changes wall times much more than CPU times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stage_timing import StageClock

REPO = Path(__file__).resolve().parents[1]

BARE = """
import sys, torch, torchvision
model = torchvision.models.get_model(sys.argv[2])
model.load_state_dict(torch.load(sys.argv[1], map_location="cpu", weights_only=True))
with torch.no_grad():
    model.eval()(torch.zeros(1, 3, 224, 224))
"""


def make_inputs(folder: Path, arch: str, side: int) -> tuple[Path, Path]:
    import torch
    import torchvision
    from PIL import Image
    from skimage import data

    model = folder / f"{arch}.pt"
    torch.manual_seed(0)
    torch.save(torchvision.models.get_model(arch).state_dict(), model)
    photo = Image.fromarray(data.astronaut()).resize((side, side), Image.Resampling.BICUBIC)
    photo = photo.crop((0, 0, side, side * 3 // 4))
    path = folder / f"photo-{side}.jpg"
    photo.save(path, quality=90)
    return model, path


#: What ``--in-process`` times: (label, module, attribute) of each part of `run` besides the model.
PARTS = (
    ("decode the photo", "attnexplain.images", "load_image"),
    ("explain (the model's part)", "attnexplain.explanation", "explain"),
    ("overlay", "attnexplain.explanation", "Explanation.overlay"),
    ("encode the overlay", "attnexplain.report", "encode_image"),
    ("heatmap .npy", "attnexplain.report", "write_npy"),
    ("shrink the previews", "attnexplain.report", "downscale"),
    ("report.html: the model's view", "attnexplain.report", "render_model_view"),
    ("report.html, whole", "attnexplain.report", "render_html"),
    ("save every output, whole", "attnexplain.report", "save_explanation"),
)


def in_process(model: Path, photo: Path, arch: str, overlay_size: str, repeats: int, out: Path) -> None:
    """`attnexplain run` called in this process, each part's CPU time summed by a wrapper."""
    from click.testing import CliRunner

    from attnexplain.cli import main as cli

    spent: dict[str, list[float]] = {label: [] for label, _, _ in PARTS}
    parts = StageClock(PARTS, time.process_time)
    command = [
        "run",
        str(model),
        str(photo),
        "--arch",
        arch,
        "--device",
        "cpu",
        "--overlay-size",
        overlay_size,
        "--json",
        "--out",
        str(out),
    ]
    totals = []
    for repeat in range(repeats + 1):  # the first pays for imports and lazy initialisation
        parts.reset()
        began = time.process_time()
        result = CliRunner().invoke(cli, command, catch_exceptions=False)
        if result.exit_code != 0:
            raise SystemExit(result.output)
        if repeat:
            totals.append(time.process_time() - began)
            for label in spent:
                spent[label].append(parts.spent[label])
    model_s = spent["explain (the model's part)"]
    print(f"CPU seconds per run, median of {repeats} (nested parts are inside the later 'whole' lines):")
    for label, values in spent.items():
        print(f"  {label:36s} {statistics.median(values):7.3f}")
    print(f"  {'whole run command (model loading too)':36s} {statistics.median(totals):7.3f}")
    besides = [total - explained for total, explained in zip(totals, model_s)]
    print(f"  {'whole run besides explain':36s} {statistics.median(besides):7.3f}")


def timed(command: list[str], tree: Path | None = None) -> tuple[float, str]:
    env = dict(os.environ, ATTNEXPLAIN_OFFLINE="1")
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    began = time.perf_counter()
    # Run from a neutral folder: `python -m` puts the working folder first on the path.
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    return wall, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--side", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--overlay-size", default="full")
    parser.add_argument("--before", type=Path, help="another checkout to compare with")
    parser.add_argument(
        "--in-process", action="store_true", help="CPU time of each part of `run` in this process (see above)."
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        model, photo = make_inputs(folder, args.arch, args.side)
        if args.in_process:
            in_process(model, photo, args.arch, args.overlay_size, args.repeats, folder / "out")
            return
        run = [
            sys.executable,
            "-m",
            "attnexplain",
            "run",
            str(model),
            str(photo),
            "--arch",
            args.arch,
            "--device",
            "cpu",
            "--overlay-size",
            args.overlay_size,
            "--json",
            "--out",
            str(folder / "out"),
        ]
        bare = [sys.executable, "-c", BARE, str(model), args.arch]
        ratios, extra, before_ratios, parts, before_parts = [], [], [], {}, {}
        print(f"{args.arch}, {photo.name} ({args.side}x{args.side * 3 // 4}), --overlay-size {args.overlay_size}")
        for _ in range(args.repeats):
            bare_s, _ = timed(bare)
            now_s, output = timed(run, REPO)
            line = f"bare {bare_s:.2f} s, run {now_s:.2f} s ({now_s / bare_s:.2f}x bare, {now_s - bare_s:+.2f} s)"
            ratios.append(now_s / bare_s)
            extra.append(now_s - bare_s)
            for key, value in json.loads(output)["timings"].items():
                parts.setdefault(key, []).append(value)
            if args.before is not None:
                before_command = [part for part in run if part not in ("--overlay-size", args.overlay_size)]
                before_s, before_output = timed(before_command, args.before)
                before_ratios.append(before_s / now_s)
                for key, value in json.loads(before_output)["timings"].items():
                    before_parts.setdefault(key, []).append(value)
                line += f", before {before_s:.2f} s ({before_s / now_s:.2f}x now)"
            print(line, flush=True)
        print(
            f"median: run {statistics.median(ratios):.2f}x the bare process, "
            f"{statistics.median(extra):+.2f} s besides what it does"
            + (f"; before {statistics.median(before_ratios):.2f}x now" if before_ratios else "")
        )
        for name, recorded in (("now", parts), ("before", before_parts)):
            if recorded:
                print(
                    f"report timings, {name} (median): "
                    + ", ".join(f"{key} {statistics.median(values):.3f} s" for key, values in recorded.items())
                )


if __name__ == "__main__":
    main()
