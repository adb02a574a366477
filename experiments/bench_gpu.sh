#!/usr/bin/env bash
# The accelerator benchmark in one command: the CNN scores and latency (experiments/bench_gpu.py
# says what it measures), then the transformers' criteria (experiments/bench_text_scores.py,
# written beside --out as <out>_text.json; skipped per model where its weights or WordNet are
# not installed). Full sizes take a few minutes on one H100/H200; --tiny runs anywhere (CI runs
# it on a CPU).
#   bash experiments/bench_gpu.sh [--tiny] [--reps N] [--budget SECONDS] [--out PATH]
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
out=experiments/results/bench_gpu.json
text_flags=()
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case ${args[i]} in
    --out) out=${args[i + 1]} ;;
    --tiny) text_flags+=(--tiny) ;;
    --reps) text_flags+=(--reps "${args[i + 1]}") ;;
  esac
done
python3 experiments/bench_gpu.py "$@"
python3 experiments/bench_text_scores.py "${text_flags[@]}" --out "${out%.json}_text.json"
