"""benchmarks/gpu_check.py, the one-call device check, runs on the CPU (--quick) and writes one results
file whose figures are all there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "benchmarks" / "gpu_check.py"
ROWS = ("gradcam (the five gradient CAMs together)", "rollout, ViT-B/16", "chefer, ViT-B/16", "integrated_gradients")


def run_check(tmp_path: Path, *arguments: str) -> tuple[str, dict]:
    out = tmp_path / "check.md"
    done = subprocess.run(
        [sys.executable, str(CHECK), "--device", "cpu", "--quick", "--out", str(out), *arguments],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    return text, json.loads(text.split("```json\n", 1)[1].split("\n```", 1)[0])


def test_quick_check_on_the_cpu_writes_device_and_method_figures(tmp_path):
    text, results = run_check(tmp_path, "--sections", "methods")
    device = results["device"]
    assert device["device"] == "cpu" and device["precision_auto"] == "fp32"
    assert device["auto_picks"] == ("cuda" if torch.cuda.is_available() else "cpu")
    rows = {(row["what"], row["precision"]): row for row in results["methods"]}
    for what in ROWS + ("scorecam (layer1)",):
        for precision in ("fp32", "bf16"):
            row = rows[(what, precision)]
            assert row["ratio"] > 0 and row["images_per_s"] > 0 and row["bare_images_per_s"] > 0, row
            assert (
                f"| {what} | {precision} | {row['images']} | {row['images_per_s']:.1f} | {row['ratio']:.2f}× |" in text
            )
        assert rows[(what, "fp16")]["skipped"].startswith("--precision fp16 is for CUDA GPUs")
    assert results["channels_last"] == [] and results["batch"] == {"skipped": "not asked"}


@pytest.mark.heavy  # about 15 s on a quiet 2-core CPU
def test_quick_check_channels_last_and_batch(tmp_path):
    _, results = run_check(tmp_path, "--sections", "channels_last,batch")
    last = {(row["what"], row["precision"]): row for row in results["channels_last"]}
    assert last[("bare forward", "fp32")]["channels_last_time_ratio"] > 0
    assert last[("gradcam", "bf16")]["channels_last_time_ratio"] > 0
    batch = results["batch"]
    assert batch["ok"] == batch["photos"] == 16
    for phase in batch["phases"].values():
        assert phase["images_per_s"] > 0 and len(phase["memory_gib_samples"]) >= 2
    assert batch["ratio_batch_to_bare"] > 0
    assert results["evaluate"] == {"skipped": "not asked"}


def test_an_exhausted_budget_skips_sections_and_still_writes_the_file(tmp_path):
    _, results = run_check(tmp_path, "--budget-s", "0", "--sections", "methods,batch")
    assert all(row["skipped"] == "time budget spent" for row in results["methods"])
    assert results["batch"] == {"skipped": "time budget spent"}


@pytest.mark.heavy
def test_quick_check_with_evaluate(tmp_path):
    _, results = run_check(tmp_path, "--sections", "evaluate")
    evaluation = results["evaluate"]
    assert evaluation["ok"] == evaluation["images"] == 2
    assert "gradcam" in evaluation["methods"] and "deletion" in evaluation["metrics"]
    assert evaluation["images_per_min"] > 0
