"""One-shot structured pruning of the torchvision ResNet-50 on ImageNet (method notes §4.6).

Needs the torchvision weights (e.g. resnet50-0676ba61.pth, or the same as .safetensors) and
imagenet2012 prepared for tfds (or --config.data_dir). Prunes to 51% of the FLOPs in S=50
steps of 350 batches of 2, then fine-tunes 100 epochs.

  python -m oba_jax.experiments.resnet50_imagenet --workdir=/tmp/r50 \
      --config.init.weights=/path/resnet50-0676ba61.pth
  python -m oba_jax.experiments.resnet50_imagenet --workdir=/tmp/r50_smoke --config.smoke=True
"""

import ml_collections

from oba_jax.experiments import cli, paper_config, pipeline


def get_config() -> ml_collections.ConfigDict:
  c = paper_config.imagenet_config()
  c.model = "resnet50"
  c.smoke_model_kwargs = ml_collections.ConfigDict(dict(layers=(1, 1, 1, 1), width=8))
  return c


if __name__ == "__main__":
  cli.main(get_config, pipeline.run, paper_config.HELP)
