#!/usr/bin/env bash
# The issue-23 evaluation of SmolLM2-135M, resumable across machines and sessions.
# Usage: bash experiments/smollm2_issue23.sh WORKDIR [--config.KEY=VALUE ...]
#   Runs `oba_jax.experiments.smollm2_wordnet --config.preset=issue23` (128 x 128 calibration
#   tokens, >= 20k held-out tokens of WordNet and of the Python docs, seeds 1,2,3, kept
#   parameters 0.9/0.8/0.7, LoRA recovery) on the seven criteria of the issue, layer-uniform
#   with the head size kept, so that every run can be written as GGUF and as a Hugging Face
#   directory (oba's runs of seed 1 are, with the dense model: sizes, logits in llama.cpp and
#   transformers, tokens/s). More flags go to the CLI.
#   RECORD=DIR (default experiments/results/smollm2_issue23/workdir) keeps the run's stage
#   results, everything but model files and recovery checkpoints (config, inputs, dense and
#   pruned evaluations, group scores, recovered and export records, results.json): they are
#   copied there every 5 minutes and at the end, and into a new WORKDIR before the run starts,
#   so that a commit of DIR lets a later session go on where it stopped (a recovery under way
#   then starts again; the inputs are compared by content, so another checkout's wheel is the
#   same input).
#   The exported files are checked in llama.cpp and transformers, and those records are cached
#   with the rest, so the clients must be installed first (pip install -e '.[export]'
#   torch==2.13.0): the script refuses to start without them (CLIENTS=optional skips the check,
#   for a smoke run: --config.smoke=True).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
if [ "${CLIENTS:-required}" != optional ] && ! python -c "import llama_cpp, torch, transformers" 2>/dev/null; then
  echo "smollm2_issue23.sh: llama-cpp-python, torch or transformers is not installed; the run" \
    "records the exported files' logits and tokens/s in them. Install them with" \
    "pip install -e '.[export]' torch==2.13.0 (or CLIENTS=optional for a smoke run)." >&2
  exit 2
fi
WORKDIR=${1:?usage: smollm2_issue23.sh WORKDIR [--config.KEY=VALUE ...]}
shift
RECORD=$(realpath -m "${RECORD:-experiments/results/smollm2_issue23/workdir}")
WORKDIR=$(realpath -m "$WORKDIR")
mkdir -p "$WORKDIR" "$RECORD"
cp -rn "$RECORD/." "$WORKDIR/"

record() {  # the stage results of WORKDIR to RECORD (atomic writes: no file is half there)
  (cd "$WORKDIR" && find . -type f \( -name '*.json' -o -name '*.npz' -o -name '*.png' \) \
     -not -path './recovery/*' -not -path './export/*/*' -print0 \
     | xargs -0 -r cp --parents -t "$RECORD")
}

( while sleep 300; do record; done ) &
recorder=$!
trap 'kill "$recorder" 2>/dev/null; record' EXIT
python -m oba_jax.experiments.smollm2_wordnet --workdir="$WORKDIR" --config.preset=issue23 \
  --config.criteria=oba,oba_bilinear,obd_fisher,taylor,activation_norm,magnitude,random \
  --config.keep_head_size=True --config.scope=uniform --config.export.formats=gguf,hf \
  --config.export.criterion=oba --config.progress=False "$@"
