"""Structured pruning of ResNet32 on CIFAR100, iterative by default (method notes §4.4).

mode "iterative": prunes toward the kept-FLOPs targets 0.6 ... 0.05 in turn (one S=50
exponential schedule to the last), fine-tuning 100 epochs after each target and going on
from the fine-tuned model. mode "one_shot": every target from the dense model (§4.3).

  python -m oba_jax.experiments.resnet32_cifar --workdir=/tmp/resnet32
  python -m oba_jax.experiments.resnet32_cifar --workdir=/tmp/r32 --config.mode=one_shot \
      --config.targets=0.3 --config.finetune.epochs=150
  python -m oba_jax.experiments.resnet32_cifar --workdir=/tmp/r32_smoke --config.smoke=True
"""

import ml_collections

from oba_jax.experiments import cli, paper_config, pipeline


def get_config() -> ml_collections.ConfigDict:
  c = paper_config.base_config()
  c.dataset = "cifar100"  # iterative_prune.py default (§4.4)
  c.model = "resnet32_cifar"
  c.model_kwargs.width = 64  # the paper's (EigenDamage) widths: 64, 128, 256 / 64 ... 512
  c.mode = "iterative"  # or "one_shot"
  c.targets = (0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05)  # --ops_ratios default (§4.4)
  # 100 epochs, lr 1e-3, wd 1e-4, x0.1 at epochs 50/75 between targets (§4.4).
  c.finetune.update(epochs=100, milestones=(0.5, 0.75))
  c.smoke_model_kwargs = ml_collections.ConfigDict(dict(width=4))
  return c


if __name__ == "__main__":
  cli.main(get_config, pipeline.run, paper_config.HELP)
