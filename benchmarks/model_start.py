"""What `run` does before the explanation, part by part: the default layer's probe and the model build.

    python benchmarks/model_start.py [--arch resnet50] [--pairs 7]

Within one process, alternately (pairs, median of the per-pair ratios, so that a shared machine's
load cancels): the layer probe with fake tensors (how it was done before) or a real forward against
the meta-device probe; building ARCH and loading a state_dict with random initialisation and a copy
(before) against no initialisation and the file's tensors assigned (now).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch._subclasses.fake_tensor import FakeTensorMode

from attnexplain import capture
from attnexplain.loading import build_architecture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--pairs", type=int, default=7)
    args = parser.parse_args()
    model = torchvision.models.get_model(args.arch).eval()
    batch = torch.zeros(1, 3, 224, 224)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "weights.pt"
        torch.save(model.state_dict(), path)
        state_dict = torch.load(path, map_location="cpu", weights_only=True)

    def fake_probe() -> None:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            capture._probe(model, mode.from_tensor(batch))

    def meta_probe() -> None:
        capture.probe_layers(model, batch)

    def forward() -> None:
        with torch.no_grad():
            model(batch)

    def initialised_and_copied() -> None:
        build_architecture(args.arch, state_dict, {}, None).load_state_dict(state_dict)

    def assigned() -> None:
        build_architecture(args.arch, state_dict, {}, None, initialise=False).load_state_dict(state_dict, assign=True)

    def seconds(function) -> float:
        began = time.perf_counter()
        function()
        return time.perf_counter() - began

    for name, before, now in (
        ("probe: fake tensors / meta device", fake_probe, meta_probe),
        ("probe: a real forward / meta device", forward, meta_probe),
        ("build + weights: random init + copy / no init + assign", initialised_and_copied, assigned),
    ):
        pairs = [(seconds(before), seconds(now)) for _ in range(args.pairs)]
        print(
            f"{args.arch} {name}: {statistics.median(p[0] for p in pairs) * 1000:.0f} ms / "
            f"{statistics.median(p[1] for p in pairs) * 1000:.0f} ms, median ratio "
            f"{statistics.median(p[0] / p[1] for p in pairs):.1f}x"
        )


if __name__ == "__main__":
    main()
