"""One-shot structured pruning of VGG19 on CIFAR (the paper's Table 1; method notes §4.3).

Trains the dense VGG19 (or reads it from --config.init.*), prunes it to each kept-FLOPs
target with S=50 re-scored exponential steps of 200 batches of 64, fine-tunes 150 epochs.

  python -m oba_jax.experiments.vgg19_cifar --workdir=/tmp/vgg19 --config.targets=0.14,0.1
  python -m oba_jax.experiments.vgg19_cifar --workdir=/tmp/vgg19_smoke --config.smoke=True
"""

import ml_collections

from oba_jax.experiments import cli, paper_config, pipeline


def get_config() -> ml_collections.ConfigDict:
  c = paper_config.base_config()
  c.dataset = "cifar10"  # or "cifar100" (§4.3 runs both)
  c.model = "vgg19_cifar"
  c.model_kwargs.width = 64  # the paper's (EigenDamage) widths: 64, 128, 256 / 64 ... 512
  c.mode = "one_shot"
  c.targets = (0.14,)  # --ops_ratios default: kept FLOPs (§4.3)
  c.smoke_model_kwargs = ml_collections.ConfigDict(dict(width=4))
  return c


if __name__ == "__main__":
  cli.main(get_config, pipeline.run, paper_config.HELP)
