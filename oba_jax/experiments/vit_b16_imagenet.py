"""One-shot structured pruning of the torchvision ViT-B/16 on ImageNet (method notes §4.6).

As `resnet50_imagenet`, with the patch embedding (`conv_proj`) never pruned, as in the paper.
timm weights load with --config.init.format=timm.

  python -m oba_jax.experiments.vit_b16_imagenet --workdir=/tmp/vit \
      --config.init.weights=/path/vit_b_16-c867db91.pth
  python -m oba_jax.experiments.vit_b16_imagenet --workdir=/tmp/vit_smoke --config.smoke=True
"""

import ml_collections

from oba_jax.experiments import cli, paper_config, pipeline


def get_config() -> ml_collections.ConfigDict:
  c = paper_config.imagenet_config()
  c.model = "vit_b16"
  c.prune.ignore = ("conv_proj",)  # the patch embedding is an ignored layer (§4.1)
  c.smoke_model_kwargs = ml_collections.ConfigDict(
      dict(patch_size=16, hidden_dim=8, num_layers=1, num_heads=2, mlp_dim=2048))
  return c


if __name__ == "__main__":
  cli.main(get_config, pipeline.run, paper_config.HELP)
