"""Small NNX models exercising each coupling rule of the structure tracer (test-only)."""

import jax
import jax.numpy as jnp
from flax import nnx

from oba_jax.models import ConvBN


class DenseBlock(nnx.Module):
  """DenseNet-style: every layer sees the concatenation of all earlier outputs."""

  def __init__(self, rngs: nnx.Rngs, in_features=3, growth=4, layers=3, num_classes=5):
    self.stem = ConvBN(in_features, 6, rngs=rngs)
    features, convs = 6, []
    for _ in range(layers):
      convs.append(ConvBN(features, growth, rngs=rngs))
      features += growth
    self.convs = nnx.List(convs)
    self.classifier = nnx.Linear(features, num_classes, rngs=rngs)

  def __call__(self, x):
    x = self.stem(x)
    for conv in self.convs:
      x = jnp.concatenate([x, conv(x)], axis=-1)
    return self.classifier(x.mean(axis=(1, 2)))


class InvertedResidual(nnx.Module):
  """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project, residual add."""

  def __init__(self, rngs: nnx.Rngs, features=4, expansion=3, num_classes=5):
    hidden = features * expansion
    self.stem = ConvBN(3, features, rngs=rngs)
    self.expand = ConvBN(features, hidden, kernel_size=1, rngs=rngs)
    self.depthwise = nnx.Conv(hidden, hidden, (3, 3), padding=1, feature_group_count=hidden,
                              use_bias=False, rngs=rngs)
    self.depthwise_bn = nnx.BatchNorm(hidden, rngs=rngs)
    self.project = ConvBN(hidden, features, kernel_size=1, relu=False, rngs=rngs)
    self.classifier = nnx.Linear(features, num_classes, rngs=rngs)

  def __call__(self, x):
    x = self.stem(x)
    h = nnx.relu6(self.depthwise_bn(self.depthwise(self.expand(x))))
    return self.classifier((x + self.project(h)).mean(axis=(1, 2)))


class ConvFlattenDense(nnx.Module):
  """A conv whose output is flattened into a dense layer: channel c owns H*W features."""

  def __init__(self, rngs: nnx.Rngs, size=6):
    self.conv = nnx.Conv(3, 4, (3, 3), padding=1, rngs=rngs)
    self.dense = nnx.Linear(size * size * 4, 7, rngs=rngs)
    self.out = nnx.Linear(7, 2, rngs=rngs)

  def __call__(self, x):
    y = nnx.relu(self.conv(x))
    return self.out(nnx.relu(self.dense(y.reshape(y.shape[0], -1))))


class SortsFeatures(nnx.Module):
  """Sorts along the hidden features: a primitive the tracer cannot follow."""

  def __init__(self, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(3, 5, rngs=rngs)
    self.fc2 = nnx.Linear(5, 2, rngs=rngs)

  def __call__(self, x):
    return self.fc2(jax.lax.sort(self.fc1(x), dimension=1))
