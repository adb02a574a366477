"""Models by name, for configuration files and command lines.

This table serves the experiment CLIs; the pruning engine never looks at it.
"""

import functools
import inspect
from collections.abc import Callable

from flax import nnx

from oba_jax.models.bert import Bert, minilm_l6
from oba_jax.models.llama import Llama, smollm2_135m
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
    "llama": Llama,
    "smollm2_135m": smollm2_135m,
    "bert": Bert,
    "minilm_l6": minilm_l6,
}


def create(name: str, *, seed: int = 0, **kwargs) -> nnx.Module:
  """`MODELS[name](**kwargs, rngs=nnx.Rngs(seed))`, with a clear error for unknown names."""
  _check_arguments(name, kwargs)
  return MODELS[name](**kwargs, rngs=nnx.Rngs(seed))


def arguments(name: str) -> frozenset[str]:
  """The keyword arguments `create(name, ...)` takes (a model's sizes and options)."""
  _check_arguments(name, {})
  factory, bound, given = MODELS[name], (), {}
  if isinstance(factory, functools.partial):
    factory, bound, given = factory.func, factory.args, factory.keywords
  if isinstance(factory, type):  # a Module class: its __init__, less `self`
    factory, bound = factory.__init__, (None, *bound)
  parameters = inspect.signature(functools.partial(factory, *bound, **given)).parameters
  return frozenset(parameters) - {"rngs"}


def check(name: str, **kwargs) -> None:
  """Raises ValueError unless `create(name, **kwargs)` would build a model; builds nothing."""
  _check_arguments(name, kwargs)
  try:
    nnx.eval_shape(lambda: MODELS[name](**kwargs, rngs=nnx.Rngs(0)))
  except TypeError as error:
    raise ValueError(f"model {name!r} does not take these arguments {kwargs}: {error}") from None


def _check_arguments(name: str, kwargs: dict) -> None:
  """The name, and sizes given as integers (width, num_classes, ...) positive: a model of
  width 0 would only fail later, deep in training."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; accepted: {sorted(MODELS)}.")
  for key, value in kwargs.items():
    if isinstance(value, int) and not isinstance(value, bool) and value < 1:
      raise ValueError(f"model {name!r}: {key}={value} must be a positive integer.")
