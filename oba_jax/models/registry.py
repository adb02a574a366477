"""Models by name, for configuration files and command lines.

This table serves the experiment CLIs; the pruning engine never looks at it.
"""

import functools
from collections.abc import Callable

from flax import nnx

from oba_jax.models.resnet import resnet50
from oba_jax.models.resnet_cifar import ResNetCIFAR
from oba_jax.models.vgg import VGG
from oba_jax.models.vit import VisionTransformer, vit_b16

MODELS: dict[str, Callable[..., nnx.Module]] = {
    "vgg11_cifar": functools.partial(VGG, 11),
    "vgg19_cifar": functools.partial(VGG, 19),
    "resnet20_cifar": functools.partial(ResNetCIFAR, 20),
    "resnet32_cifar": functools.partial(ResNetCIFAR, 32),
    "resnet56_cifar": functools.partial(ResNetCIFAR, 56),
    "resnet8_cifar": functools.partial(ResNetCIFAR, 8),
    "resnet50": resnet50,
    "vit_b16": vit_b16,
    "vit": VisionTransformer,
}


def create(name: str, *, seed: int = 0, **kwargs) -> nnx.Module:
  """`MODELS[name](**kwargs, rngs=nnx.Rngs(seed))`, with a clear error for unknown names."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; accepted: {sorted(MODELS)}.")
  return MODELS[name](**kwargs, rngs=nnx.Rngs(seed))
