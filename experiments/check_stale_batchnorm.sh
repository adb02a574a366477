#!/usr/bin/env bash
# The stale-BatchNorm fix of issue 22, paired: one dense VGG-11 (width 16, Fashion-MNIST, 600
# steps) per seed, pruned to kept FLOPs 0.15 in 10 re-scoring steps (library rule, exponential
# schedule, 4 importance batches of 64, inference-mode BatchNorm, no fine-tuning) by this code,
# which recalibrates BatchNorm (10 batches) before every step, and by the commit before the fix
# (62f683d), which scored steps 2-10 with the dense model's statistics. Both recalibrate at the
# end, so "accuracy right after pruning" differs only in what each step scored.
# Usage: bash experiments/check_stale_batchnorm.sh WORKDIR [SEEDS]   (SEEDS default "0 1 2")
#   RECALIBRATION=N recalibrates with N batches instead of 10 (its runs go to fixed_rN/).
# Then: python experiments/check_stale_batchnorm.py WORKDIR
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR=$(realpath -m "${1:?usage: check_stale_batchnorm.sh WORKDIR [SEEDS]}")
SEEDS=${2:-0 1 2}
RECALIBRATION=${RECALIBRATION:-10}
FIXED=fixed
[ "$RECALIBRATION" = 10 ] || FIXED=fixed_r$RECALIBRATION
BEFORE=62f683d
mkdir -p "$WORKDIR"
[ -d "$WORKDIR/before" ] || git worktree add -q --detach "$WORKDIR/before" "$BEFORE"
PYTHON=$PWD/.venv/bin/python  # not realpath: that resolves the venv away
COMMON=(--config.model=vgg11_cifar --config.model_kwargs.width=16
        --config.criteria=magnitude,taylor,oba --config.targets=0.15 --config.prune.steps=10
        --config.finetune.enabled=False --config.progress=False)
for seed in $SEEDS; do
  fixed="$WORKDIR/$FIXED/seed$seed" stale="$WORKDIR/stale/seed$seed"
  [ -f "$fixed/results.json" ] || "$PYTHON" -m oba_jax.experiments.compare_criteria \
    --workdir="$fixed" --config.seed="$seed" "${COMMON[@]}" --config.dense.steps=600 \
    --config.dense.batch_size=128 --config.prune.procedure=library \
    --config.prune.schedule=exponential --config.prune.batchnorm=eval \
    --config.prune.importance_batches=4 --config.prune.recalibration_batches="$RECALIBRATION"
  # The code before the fix, on the same dense model (its defaults are the settings above).
  [ -f "$stale/results.json" ] || (cd "$WORKDIR/before" && PYTHONPATH=. "$PYTHON" -m \
    oba_jax.experiments.compare_criteria --workdir="$stale" --config.seed="$seed" \
    "${COMMON[@]}" --config.init.checkpoint="$fixed/dense")
done
