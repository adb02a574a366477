"""The EigenDamage-style VGG of the paper's CIFAR experiments, in Flax NNX.

Bias-free 3x3 convolutions, each followed by BatchNorm and ReLU; 2x2 max-pools
between stages; global average pooling; one dense classifier. VGG19 on 32x32
CIFAR has 20.04 M parameters (10 classes). The original ends with a 2x2
average pool over the 2x2 map left after four max-pools; global average pooling
is the same there and also accepts smaller inputs (Fashion-MNIST's 28x28).
"""

import jax
import jax.numpy as jnp
from flax import nnx

POOL = "M"
CONFIGS = {
    11: (64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512),
    13: (64, 64, POOL, 128, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512),
    16: (64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512),
    19: (64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL, 512, 512, 512, 512, POOL,
         512, 512, 512, 512),
}


class ConvBN(nnx.Module):
  """Bias-free convolution, BatchNorm, ReLU."""

  def __init__(self, in_features: int, out_features: int, *, kernel_size: int = 3,
               stride: int = 1, relu: bool = True, rngs: nnx.Rngs):
    pad = kernel_size // 2
    self.conv = nnx.Conv(in_features, out_features, (kernel_size, kernel_size),
                         strides=stride, padding=((pad, pad), (pad, pad)), use_bias=False,
                         kernel_init=nnx.initializers.he_normal(), rngs=rngs)
    self.bn = nnx.BatchNorm(out_features, momentum=0.9, epsilon=1e-5, rngs=rngs)
    self.relu = relu

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.bn(self.conv(x))
    return nnx.relu(y) if self.relu else y


class VGG(nnx.Module):
  """VGG-{11,13,16,19} for small images; `width` scales every stage (64 = paper)."""

  def __init__(self, depth: int = 19, *, num_classes: int = 10, in_channels: int = 3,
               width: int = 64, rngs: nnx.Rngs):
    if depth not in CONFIGS:
      raise ValueError(f"VGG depth={depth} is not supported; accepted: {sorted(CONFIGS)}.")
    if width < 1:
      raise ValueError(f"width must be a positive integer, got {width}.")
    layers, features = [], in_channels
    for item in CONFIGS[depth]:
      if item == POOL:
        layers.append(POOL)
      else:
        out = max(1, item * width // 64)
        layers.append(ConvBN(features, out, rngs=rngs))
        features = out
    self.layers = nnx.List(layers)
    self.classifier = nnx.Linear(features, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self.layers:
      x = nnx.max_pool(x, (2, 2), strides=(2, 2)) if layer == POOL else layer(x)
    return self.classifier(jnp.mean(x, axis=(1, 2)))
