"""Unstructured pruning along a density sweep, without fine-tuning (method notes §4.5).

Scores single weights and keeps the highest-scoring fraction of all conv and dense weights
and biases (one global ranking), re-scoring between the densities 0.9 ... 0.1.

  python -m oba_jax.experiments.unstructured --workdir=/tmp/unstructured
  python -m oba_jax.experiments.unstructured --workdir=/tmp/u_smoke --config.smoke=True
"""

import ml_collections

from oba_jax.experiments import cli, paper_config, pipeline


def get_config() -> ml_collections.ConfigDict:
  c = paper_config.base_config()
  c.dataset = "cifar10"
  c.model = "resnet20_cifar"  # the README example (§4.5)
  c.model_kwargs.width = 64  # the paper's (EigenDamage) widths: 64, 128, 256 / 64 ... 512
  c.seed = 5  # §4.2
  c.mode = "unstructured"
  c.targets = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)  # evaluated densities (§4.5)
  # 49 exponential steps from 1 to 0.1 (§4.5): about 5 steps per density.
  c.prune.steps_per_density = 5
  c.prune.importance_batches = 201  # §4.5
  c.prune.importance_batch_size = 32  # script default (§4.5)
  c.prune.augment = False  # CIFAR scores on test-time transforms (§4.5)
  c.finetune.enabled = False  # no fine-tuning at all (§4.5)
  c.smoke_model_kwargs = ml_collections.ConfigDict(dict(width=4))
  return c


if __name__ == "__main__":
  cli.main(get_config, pipeline.run, paper_config.HELP)
