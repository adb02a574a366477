"""The paper's CIFAR networks: sizes, shapes and the layout the pruning engine relies on."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import oba_jax
from oba_jax.models import VGG, ResNetCIFAR


def num_params(ctor):
  model = nnx.eval_shape(ctor)
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("ctor, expected", [
    (lambda: VGG(19, rngs=nnx.Rngs(0)), 20_035_018),          # paper: 20.04 M
    (lambda: ResNetCIFAR(32, rngs=nnx.Rngs(0)), 7_427_914),   # paper: 7.43 M
    (lambda: ResNetCIFAR(20, rngs=nnx.Rngs(0)), 4_327_754),   # paper: 4.33 M
])
def test_full_size_parameter_counts(ctor, expected):
  assert num_params(ctor) == expected


@pytest.mark.parametrize("ctor", [
    lambda: VGG(11, width=4, in_channels=1, num_classes=7, rngs=nnx.Rngs(0)),
    lambda: ResNetCIFAR(14, width=4, in_channels=1, num_classes=7, rngs=nnx.Rngs(0)),
])
@pytest.mark.parametrize("size, channels", [(28, 1), (32, 1)])
def test_logits_shape_on_fashion_mnist_and_cifar_sizes(ctor, size, channels):
  model = ctor()
  model.eval()
  assert model(jnp.ones((3, size, size, channels))).shape == (3, 7)


def test_wide_resnet_layout():
  model = ResNetCIFAR(20, width=8, rngs=nnx.Rngs(0))
  assert len(model.blocks) == 9
  widths = [block.conv2.conv.kernel.shape[-1] for block in model.blocks]
  assert widths == [8] * 3 + [16] * 3 + [32] * 3
  projections = [i for i, block in enumerate(model.blocks) if block.shortcut is not None]
  assert projections == [3, 6]
  assert model.blocks[3].shortcut.conv.kernel.shape == (1, 1, 8, 16)
  assert not any("bias" in str(path) for path, _ in nnx.iter_graph(model)
                 if isinstance(_, nnx.Conv) and _.use_bias)


def test_functional_train_mode_is_pure():
  model = ResNetCIFAR(8, width=2, in_channels=1, rngs=nnx.Rngs(0))
  model.train()
  before = jax.tree.map(jnp.copy, nnx.state(model, nnx.BatchStat))
  apply_fn, params = oba_jax.functional(model)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  jax.grad(lambda p: apply_fn(p, x).sum())(params)
  after = nnx.state(model, nnx.BatchStat)
  assert all(jnp.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_models_by_name():
  from oba_jax import models
  model = models.create("resnet8_cifar", width=2, in_channels=1, num_classes=3)
  assert isinstance(model, ResNetCIFAR)
  with pytest.raises(ValueError, match=r"unknown model 'resnet18'; accepted: \["):
    models.create("resnet18")
