#!/usr/bin/env bash
# The device check in one call (issue #29): on a machine with a CUDA GPU, under 8 minutes, one
# results file (Markdown table + JSON). Usage: bash benchmarks/gpu_check.sh [OUT.md] [more options]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/gpu_check-results.md}"
shift || true
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" timeout 470 "$python" benchmarks/gpu_check.py --out "$out" "$@"
