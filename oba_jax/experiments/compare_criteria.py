"""The paired comparison of pruning criteria on Fashion-MNIST: one model and one seed per run.

  python -m oba_jax.experiments.compare_criteria --workdir=/tmp/compare/resnet/seed0 \\
      --config.seed=0 --config.model=resnet8_cifar --config.model_kwargs.width=16

Within a run every criterion prunes the seed's one dense model to each kept-FLOPs
target in one shot, reads the same importance batches, has its BatchNorm statistics
recalibrated on the same training batches and fine-tunes on the same data order
(`pipeline`), so runs of several seeds give paired differences between criteria
(`experiments/summarize_compare.py`, `oba_jax.experiments.paired`). "oba@sum" is the
same OBA scores grouped by the signed sum (the oracle study's best reduction) instead
of the paper's normalised reduction. The budget (dense steps, importance batches,
fine-tuning steps) is what fits five seeds of three models on 2 CPU cores; every value
is a --config override.
"""

import ml_collections

from oba_jax.experiments import cli, paper_config, pipeline

CRITERIA = ("random,magnitude,taylor,obd_fisher,kron_obd,kron_obs,oba,oba_residual,oba_bilinear,"
            "oba_t12,oba@sum")


def get_config() -> ml_collections.ConfigDict:
  c = paper_config.base_config()
  c.dataset = "fashion_mnist"
  c.model = "resnet8_cifar"  # model_kwargs (width, or a ViT's sizes) on the command line
  c.criteria = CRITERIA
  c.targets = (0.5, 0.3, 0.15)
  c.dense.update(steps=600, batch_size=128)
  c.prune.steps = 3
  c.prune.importance_batches = 4
  # Inference-mode BatchNorm while scoring: the per-example criteria (Fisher, K-FAC) need
  # examples that do not share batch statistics.
  c.prune.batchnorm = "eval"
  c.prune.recalibration_batches = 10
  c.finetune.update(steps=100, learning_rate=0.01)
  c.timing_seconds = 0.1
  c.smoke_model_kwargs = ml_collections.ConfigDict(dict(width=4))
  return c


if __name__ == "__main__":
  cli.main(get_config, pipeline.run, paper_config.HELP)
