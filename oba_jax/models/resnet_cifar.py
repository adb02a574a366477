"""The wide CIFAR ResNet of the paper (EigenDamage-style), in Flax NNX.

Depth 6n+2: a 3x3 stem, three stages of n BasicBlocks with widths
(width, 2·width, 4·width) = (64, 128, 256) in the paper (4x the usual
16/32/64), stride 2 at the start of stages 2 and 3 with a 1x1 conv + BN
projection shortcut, global average pooling and one dense classifier. Wide
ResNet-32 has 7.43 M parameters and ResNet-20 4.33 M (10 classes).

Each block's output passes through `jax.lax.optimization_barrier`. Without it,
XLA:CPU's fusion pass duplicates the elementwise residual chain (BatchNorm, add,
ReLU of every earlier block of the stage) into each consumer of a block output
(the next block's add, the transposed input of its weight-gradient conv, the
ReLU masks of the backward pass), so the gradient's cost grows quadratically
with depth (experiments/RESULTS.md, "Gradient cost against depth on XLA:CPU").
XLA:CPU drops optimization barriers by default; `oba_jax.runtime.
keep_optimization_barriers()` (called by the command-line tools) keeps them.
Values are unchanged: the barrier is an identity.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from oba_jax.models.vgg import ConvBN


class BasicBlock(nnx.Module):
  """Two 3x3 ConvBN layers and a shortcut (identity, or 1x1 ConvBN on a shape change)."""

  def __init__(self, in_features: int, out_features: int, stride: int, *, rngs: nnx.Rngs):
    self.conv1 = ConvBN(in_features, out_features, stride=stride, rngs=rngs)
    self.conv2 = ConvBN(out_features, out_features, relu=False, rngs=rngs)
    projects = stride != 1 or in_features != out_features
    self.shortcut = ConvBN(in_features, out_features, kernel_size=1, stride=stride,
                           relu=False, rngs=rngs) if projects else None

  def __call__(self, x: jax.Array) -> jax.Array:
    shortcut = x if self.shortcut is None else self.shortcut(x)
    return nnx.relu(self.conv2(self.conv1(x)) + shortcut)


class ResNetCIFAR(nnx.Module):
  """ResNet-(6n+2) for small images; `width` is the first stage's width (64 = paper)."""

  def __init__(self, depth: int = 32, *, num_classes: int = 10, in_channels: int = 3,
               width: int = 64, rngs: nnx.Rngs):
    if depth < 8 or (depth - 2) % 6:
      raise ValueError(f"ResNet depth={depth} must be 6n+2 with n >= 1 (8, 14, 20, 32, 56, ...).")
    if width < 1:
      raise ValueError(f"width must be a positive integer, got {width}.")
    blocks_per_stage = (depth - 2) // 6
    self.stem = ConvBN(in_channels, width, rngs=rngs)
    blocks, features = [], width
    for stage, stage_width in enumerate((width, 2 * width, 4 * width)):
      for index in range(blocks_per_stage):
        stride = 2 if stage > 0 and index == 0 else 1
        blocks.append(BasicBlock(features, stage_width, stride, rngs=rngs))
        features = stage_width
    self.blocks = nnx.List(blocks)
    self.classifier = nnx.Linear(features, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.stem(x)
    for block in self.blocks:
      x = jax.lax.optimization_barrier(block(x))  # no fusion across blocks (see module doc)
    return self.classifier(jnp.mean(x, axis=(1, 2)))
