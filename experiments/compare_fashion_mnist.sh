#!/usr/bin/env bash
# The paired comparison of criteria: models x SEEDS on Fashion-MNIST, each run
# `oba_jax.experiments.compare_criteria` (its protocol: the official step rule, 32 batches of 64
# per step, 3,000 fine-tuning steps; kept FLOPs 0.5/0.3/0.15; one dense model per seed).
# Usage: bash experiments/compare_fashion_mnist.sh WORKDIR [SEEDS] [WORKERS]
#   SEEDS defaults to "0 1 2 3 4", WORKERS to 2 (each pinned to one core). Runs go seed by seed,
#   so a stopped comparison has the same seeds for every model; rerunning the command resumes it
#   (finished runs are skipped, a killed one continues from its fine-tuning checkpoints).
#   Optional: MODELS (default "vgg resnet20 vit"; "resnet" is the ResNet-8 of the superseded
#   comparison), CRITERIA (default: compare_criteria's) and CRITERIA_<model> for one model
#   (e.g. CRITERIA_vit), EXTRA (more --config flags for every run), and DENSE_FROM=DIR to start
#   each run from DIR/<model>/seed<k>/dense, or from DIR/<model>_seed<k> (RECORD's dense
#   models), the dense model of an earlier run, so that more criteria join it paired (same
#   dense model, batches and order; summarize_compare.py checks the dense accuracy agrees).
#   RECORD=DIR copies each finished run's results.json to DIR/<model>_seed<k>.json and skips the
#   runs already there; while a run goes on, its finished cells (criterion x target, see
#   oba_jax/experiments/cells.py) are copied to DIR/cells/<model>_seed<k> every few minutes and
#   back into a new WORKDIR, with the trained dense model (DIR/dense/<model>_seed<k>, kept
#   when the run is done, for criteria added later), so a comparison resumes from a commit of
#   DIR on another machine.
#   Then: python experiments/summarize_compare.py WORKDIR/*/seed*/results.json
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
WORKDIR=${1:?usage: compare_fashion_mnist.sh WORKDIR [SEEDS] [WORKERS]}
SEEDS=${2:-0 1 2 3 4}
WORKERS=${3:-2}
MODELS=${MODELS:-vgg resnet20 vit}
mkdir -p "$WORKDIR"

# The ViT keeps its patch embedding (the residual width), as the paper (§4.1); then the
# official rule's channel-ratio schedule cannot meet the FLOPs targets (seed 0, 50 steps: random
# keeps 0.68/0.58/0.33 of the FLOPs at targets 0.5/0.3/0.15, magnitude 0.64/0.45/0.22), so every
# ViT criterion takes the library rule, which meets each target exactly, in 25 re-scoring steps.
model_flags() {
  case $1 in
    resnet) echo "--config.model=resnet8_cifar --config.model_kwargs.width=16" ;;
    resnet20) echo "--config.model=resnet20_cifar --config.model_kwargs.width=16" ;;
    vgg) echo "--config.model=vgg11_cifar --config.model_kwargs.width=16" ;;
    vit) echo "--config.model=vit --config.model_kwargs.image_size=28 \
      --config.model_kwargs.patch_size=7 --config.model_kwargs.hidden_dim=64 \
      --config.model_kwargs.num_layers=4 --config.model_kwargs.num_heads=4 \
      --config.model_kwargs.mlp_dim=128 --config.dense.learning_rate=0.05 \
      --config.prune.ignore=('conv_proj',) --config.prune.procedure=library \
      --config.prune.steps=25" ;;
  esac
}

queue="$WORKDIR/queue"
: > "$queue"
for seed in $SEEDS; do
  for model in $MODELS; do
    [ -f "$WORKDIR/$model/seed$seed/results.json" ] && continue
    [ -n "${RECORD:-}" ] && [ -f "$RECORD/${model}_seed$seed.json" ] && continue
    echo "$model $seed" >> "$queue"
    if [ -n "${RECORD:-}" ] && [ -d "$RECORD/cells/${model}_seed$seed" ]; then  # resume from them
      mkdir -p "$WORKDIR/$model/seed$seed/cells"
      cp -rn "$RECORD/cells/${model}_seed$seed/." "$WORKDIR/$model/seed$seed/cells/"
    fi
    if [ -n "${RECORD:-}" ] && [ -d "$RECORD/dense/${model}_seed$seed" ] \
       && [ ! -d "$WORKDIR/$model/seed$seed/dense" ]; then  # its trained dense model
      mkdir -p "$WORKDIR/$model/seed$seed"
      cp -r "$RECORD/dense/${model}_seed$seed" "$WORKDIR/$model/seed$seed/dense"
    fi
  done
done

record_dense() {  # RUN NAME: the run's trained dense model to RECORD/dense/NAME, once
  if [ -d "$1/dense" ] && [ ! -d "$RECORD/dense/$2" ]; then  # none with DENSE_FROM
    mkdir -p "$RECORD/dense"
    cp -r "$1/dense" "$RECORD/dense/$2"
    # Its last checkpoint alone restores the trained model: the earlier ones are not recorded.
    local checkpoints="$RECORD/dense/$2/checkpoints" step last
    last=$(ls "$checkpoints" | grep -E '^[0-9]+$' | sort -n | tail -n 1)
    for step in $(ls "$checkpoints" | grep -E '^[0-9]+$'); do
      [ "$step" = "$last" ] || rm -rf "${checkpoints:?}/$step"
    done
  fi
}

record_cells() {  # the finished cells of the runs under way, and their dense models, to RECORD
  [ -n "${RECORD:-}" ] || return 0
  local cells run name
  for cells in "$WORKDIR"/*/seed*/cells; do
    [ -d "$cells" ] || continue  # cells come after the dense model: it is trained by then
    run=$(dirname "$cells")
    [ -f "$run/results.json" ] && continue
    name=$(basename "$(dirname "$run")")_$(basename "$run")
    mkdir -p "$RECORD/cells/$name"
    cp -r "$cells/." "$RECORD/cells/$name/"
    record_dense "$run" "$name"
  done
}

worker() {  # pops "model seed" lines off the queue until it is empty
  local core=$1 job model seed
  while true; do
    job=$(flock "$queue" sh -c 'head -n 1 "$1"; sed -i 1d "$1"' _ "$queue")
    [ -n "$job" ] || return 0
    read -r model seed <<< "$job"
    echo "$(date -u +%H:%M:%S) core $core: $model seed $seed"
    extra=()
    criteria_of_model="CRITERIA_$model"
    criteria=${!criteria_of_model:-${CRITERIA:-}}
    [ -z "$criteria" ] || extra+=("--config.criteria=$criteria")
    if [ -n "${DENSE_FROM:-}" ]; then
      dense="$DENSE_FROM/$model/seed$seed/dense"
      [ -d "$dense" ] || dense="$DENSE_FROM/${model}_seed$seed"
      extra+=("--config.init.checkpoint=$dense")
    fi
    # shellcheck disable=SC2206
    [ -z "${EXTRA:-}" ] || extra+=($EXTRA)
    # shellcheck disable=SC2046
    taskset -c "$core" python -m oba_jax.experiments.compare_criteria \
      --workdir="$WORKDIR/$model/seed$seed" --config.seed="$seed" $(model_flags "$model") \
      "${extra[@]}" --config.progress=False > "$WORKDIR/$model-seed$seed.log" 2>&1 \
      || echo "$model seed $seed failed: see $WORKDIR/$model-seed$seed.log"
    if [ -n "${RECORD:-}" ] && [ -f "$WORKDIR/$model/seed$seed/results.json" ]; then
      mkdir -p "$RECORD" && cp "$WORKDIR/$model/seed$seed/results.json" "$RECORD/${model}_seed$seed.json"
      rm -rf "$RECORD/cells/${model}_seed$seed"  # done; its dense model stays
      record_dense "$WORKDIR/$model/seed$seed" "${model}_seed$seed"
    fi
  done
}

# The dataset is prepared once, before the workers (two preparing at once collide).
python -c "from oba_jax import data; next(data.load('fashion_mnist', 'test', batch_size=1, train=False))"
( while sleep 300; do record_cells; done ) &
recorder=$!
pids=()
for ((w = 0; w < WORKERS; w++)); do
  worker $((w % $(nproc))) &
  pids+=($!)
done
wait "${pids[@]}"
kill "$recorder"
record_cells
echo "$(date -u +%H:%M:%S) done"
