"""ImageNet ResNets (He et al., 2016) in Flax NNX, laid out like torchvision's.

torchvision's "V1.5" variant: the bottleneck strides on its 3x3 conv, the shortcut is a 1x1 conv +
BN where the shape changes, convs are bias-free with PyTorch's explicit symmetric padding, and
BatchNorm uses eps 1e-5 and flax momentum 0.9 (PyTorch's 0.1). Attribute names are torchvision's
(`conv1`, `bn1`, `layer1`..`layer4`, `downsample`, `fc`) so that `oba_jax.weights` maps PyTorch
keys onto them by name. Inputs are NHWC. BatchNorm starts in training mode; `model.eval()` switches
it to the running statistics.

`resnet18` .. `resnet152` are `ResNet` with torchvision's depths; the other arguments (`width`,
`num_classes`, `in_channels`) stay free, so tests build tiny ones.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def _conv(in_features: int, out_features: int, size: int, stride: int, *, rngs: nnx.Rngs):
  """Bias-free `size`x`size` conv, PyTorch padding `size // 2`, torchvision's He fan-out init."""
  pad = size // 2
  return nnx.Conv(in_features, out_features, (size, size), stride,
                  padding=((pad, pad), (pad, pad)), use_bias=False,
                  kernel_init=nnx.initializers.variance_scaling(2.0, "fan_out", "normal"),
                  rngs=rngs)


def _batch_norm(features: int, *, rngs: nnx.Rngs):
  return nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, rngs=rngs)


def _downsample(in_features: int, out_features: int, stride: int, *, rngs: nnx.Rngs):
  """Strided 1x1 conv + BN where the block changes shape; None (identity shortcut) elsewhere."""
  if stride == 1 and in_features == out_features:
    return None
  return nnx.Sequential(_conv(in_features, out_features, 1, stride, rngs=rngs),
                        _batch_norm(out_features, rngs=rngs))


class BasicBlock(nnx.Module):
  """Two 3x3 conv-BNs and a shortcut (ResNet-18/34)."""

  expansion = 1

  def __init__(self, in_features: int, features: int, stride: int, *, rngs: nnx.Rngs):
    self.conv1 = _conv(in_features, features, 3, stride, rngs=rngs)
    self.bn1 = _batch_norm(features, rngs=rngs)
    self.conv2 = _conv(features, features, 3, 1, rngs=rngs)
    self.bn2 = _batch_norm(features, rngs=rngs)
    self.downsample = _downsample(in_features, features, stride, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    shortcut = x if self.downsample is None else self.downsample(x)
    y = nnx.relu(self.bn1(self.conv1(x)))
    return nnx.relu(self.bn2(self.conv2(y)) + shortcut)


class Bottleneck(nnx.Module):
  """1x1 reduce, strided 3x3, 1x1 expand to 4x `features`, and a shortcut (ResNet-50/101/152)."""

  expansion = 4

  def __init__(self, in_features: int, features: int, stride: int, *, rngs: nnx.Rngs):
    out_features = features * self.expansion
    self.conv1 = _conv(in_features, features, 1, 1, rngs=rngs)
    self.bn1 = _batch_norm(features, rngs=rngs)
    self.conv2 = _conv(features, features, 3, stride, rngs=rngs)
    self.bn2 = _batch_norm(features, rngs=rngs)
    self.conv3 = _conv(features, out_features, 1, 1, rngs=rngs)
    self.bn3 = _batch_norm(out_features, rngs=rngs)
    self.downsample = _downsample(in_features, out_features, stride, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    shortcut = x if self.downsample is None else self.downsample(x)
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = nnx.relu(self.bn2(self.conv2(y)))
    return nnx.relu(self.bn3(self.conv3(y)) + shortcut)


class ResNet(nnx.Module):
  """A torchvision-layout ResNet.

  Args:
    layers: blocks in each of the four stages, e.g. (3, 4, 6, 3) for ResNet-50.
    block: `BasicBlock` or `Bottleneck`.
    width: channels of the stem and of the first stage's blocks, doubled at every stage (64).
    num_classes: outputs of the final `fc` layer.
    in_channels: channels of the input images.
    rngs: parameter initialisation.
  """

  def __init__(self, layers: Sequence[int], block: type[BasicBlock] | type[Bottleneck], *,
               width: int = 64, num_classes: int = 1000, in_channels: int = 3,
               rngs: nnx.Rngs):
    if len(layers) != 4 or min(layers) < 1:
      raise ValueError(f"layers={layers} must be 4 positive block counts, one per stage.")
    if width < 1:
      raise ValueError(f"width must be a positive integer, got {width}.")
    self.in_channels = in_channels
    self.conv1 = _conv(in_channels, width, 7, 2, rngs=rngs)
    self.bn1 = _batch_norm(width, rngs=rngs)
    stages, features = [], width
    for stage, num_blocks in enumerate(layers):
      blocks = []
      for index in range(num_blocks):
        stride = 2 if stage > 0 and index == 0 else 1
        blocks.append(block(features, width * 2**stage, stride, rngs=rngs))
        features = width * 2**stage * block.expansion
      stages.append(nnx.Sequential(*blocks))
    self.layer1, self.layer2, self.layer3, self.layer4 = stages
    self.fc = nnx.Linear(features, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits [batch, num_classes] for images [batch, height, width, in_channels]."""
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"ResNet expects images of shape (batch, height, width, "
                       f"{self.in_channels}); got {x.shape}.")
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(jnp.mean(x, axis=(1, 2)))


resnet18 = functools.partial(ResNet, layers=(2, 2, 2, 2), block=BasicBlock)
resnet34 = functools.partial(ResNet, layers=(3, 4, 6, 3), block=BasicBlock)
resnet50 = functools.partial(ResNet, layers=(3, 4, 6, 3), block=Bottleneck)
resnet101 = functools.partial(ResNet, layers=(3, 4, 23, 3), block=Bottleneck)
resnet152 = functools.partial(ResNet, layers=(3, 8, 36, 3), block=Bottleneck)
