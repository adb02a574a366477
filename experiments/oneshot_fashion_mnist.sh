#!/usr/bin/env bash
# One-shot structured pruning on Fashion-MNIST, six criteria x three kept-FLOPs targets, one seed.
# Usage: bash experiments/oneshot_fashion_mnist.sh SEED [WIDTH]
#   writes /tmp/exp5/w$WIDTH/seed$SEED. WIDTH defaults to 8 (about 21 min per seed on 2 CPU cores);
#   the paper's wide ResNet is WIDTH=64, about 16x the cost: a GPU run.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
WIDTH=${2:-8}
python -m oba_jax.experiments.resnet32_cifar --workdir=${WORKDIR:-/tmp/exp5/w$WIDTH/seed$1} \
  --config.seed=$1 --config.dataset=fashion_mnist --config.model=resnet20_cifar \
  --config.model_kwargs.width=$WIDTH --config.mode=one_shot --config.targets=0.5,0.3,0.15 \
  --config.criteria=magnitude,taylor,obd_fisher,oba,oba_residual,taylor3 \
  --config.dense.steps=1500 --config.dense.batch_size=128 \
  --config.prune.steps=5 --config.prune.importance_batches=8 --config.prune.round_to=4 \
  --config.prune.batchnorm=eval \
  --config.finetune.steps=300 --config.finetune.batch_size=128 --config.finetune.learning_rate=0.01 \
  --config.progress=False
