"""The paired comparison of pruning criteria on Fashion-MNIST: one model and one seed per run.

  python -m oba_jax.experiments.compare_criteria --workdir=/tmp/compare/vgg/seed0 \\
      --config.seed=0 --config.model=vgg11_cifar --config.model_kwargs.width=16

Within a run every criterion prunes the seed's one dense model to each kept-FLOPs
target in one shot, reads the same importance batches, has its BatchNorm statistics
recalibrated on the same training batches and fine-tunes on the same data order
(`pipeline`), so runs of several seeds give paired differences between criteria
(`experiments/summarize_compare.py`, `oba_jax.experiments.paired`).

The protocol is the paper's one-shot procedure (method notes §4.3) at the size two CPU
cores allow: the official step rule (S = 50, stopping once the FLOPs meet the target:
16-33 re-scoring steps on the VGG-11), 32 batches of 64 per step, BatchNorm in training
mode while scoring (the Fisher diagonal, which runs one example at a time, in inference mode with
statistics recalibrated before every step), a dense model trained to a plateau, and
3,000 fine-tuning steps with test accuracy at 100, 300 and 1,000 too: the answer is a
curve against the fine-tuning budget. "name@library" and "name@per_cost" add the
library's step rule and the cost-aware ranking for one criterion. Every value is a
--config override.
"""

import ml_collections

from oba_jax.experiments import cli, paper_config, pipeline

CRITERIA = "random,magnitude,taylor,obd_fisher@eval,oba,oba_bilinear,oba_t12"


def get_config() -> ml_collections.ConfigDict:
  c = paper_config.base_config()
  c.dataset = "fashion_mnist"
  c.model = "vgg11_cifar"  # model_kwargs (width, or a ViT's sizes) on the command line
  c.criteria = CRITERIA
  c.targets = (0.5, 0.3, 0.15)
  # 15 epochs of 128 (SGD lr 0.1, x0.1 at 30/50/75 %): the test accuracy's plateau.
  c.dense.update(steps=7000, batch_size=128)
  c.prune.steps = 50
  c.prune.importance_batches = 32
  c.prune.importance_batch_size = 64
  c.prune.batchnorm = "train"  # as the paper scores (§2.2)
  c.prune.recalibration_batches = 20
  c.finetune.update(steps=3000, batch_size=64, learning_rate=0.01, eval_at=(100, 300, 1000))
  c.timing_seconds = 0.1
  c.smoke_model_kwargs = ml_collections.ConfigDict(dict(width=4))
  return c


if __name__ == "__main__":
  cli.main(get_config, pipeline.run, paper_config.HELP)
