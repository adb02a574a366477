#!/usr/bin/env bash
# The accelerator benchmark in one command (experiments/bench_gpu.py says what it measures).
# Full sizes take a few minutes on one H100/H200; --tiny runs anywhere (CI runs it on a CPU).
#   bash experiments/bench_gpu.sh [--tiny] [--reps N] [--budget SECONDS] [--out PATH]
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec python3 experiments/bench_gpu.py "$@"
