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


def _fused_instructions(hlo: str) -> int:
  """Instructions inside the entry computation's fusions (duplicated ones counted each time)."""
  import re
  bodies = {m.group(1).lstrip("%"): m.group(2).count("\n") + 1
            for m in re.finditer(r"^(%?[\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S | re.M)}
  entry = re.search(r"^ENTRY [^\n]*\{\n(.*?)\n\}", hlo, re.S | re.M).group(1)
  return sum(bodies[m.group(1)] for m in re.finditer(r"fusion\(.*calls=%?([\w.\-]+)", entry))


def test_block_outputs_pass_an_optimization_barrier():
  model = ResNetCIFAR(14, width=2, rngs=nnx.Rngs(0))
  apply_fn, params = oba_jax.functional(model)
  jaxpr = str(jax.make_jaxpr(apply_fn)(params, jnp.ones((1, 8, 8, 3))))
  assert jaxpr.count("optimization_barrier") == len(model.blocks) == 6


def test_gradient_program_grows_linearly_with_depth_when_barriers_are_kept():
  """XLA:CPU without the barriers fuses the residual chain of every earlier block into each
  block's consumers (quadratic in depth); with them kept, the program is linear in depth
  and the loss and gradient are the same up to float32 reordering (the fusion and its order of
  summation differ, so the last bit may too, depending on the machine's vector width)."""
  from oba_jax.runtime import BARRIER_EXPANDER
  keep = {"xla_disable_hlo_passes": BARRIER_EXPANDER}
  sizes = {}
  for depth in (14, 26, 38):  # 2, 4 and 6 blocks per stage
    model = ResNetCIFAR(depth, width=2, rngs=nnx.Rngs(0))
    model.train()
    apply_fn, params = oba_jax.functional(model)
    loss = oba_jax.classification(apply_fn).loss
    batch = {"image": jax.random.normal(jax.random.key(1), (4, 8, 8, 3)),
             "label": jnp.arange(4) % 10}
    lowered = jax.jit(jax.value_and_grad(loss)).lower(params, batch)
    kept = lowered.compile(keep)
    assert "opt-barrier" in kept.as_text()
    default, barriers = lowered.compile()(params, batch), kept(params, batch)
    assert jnp.abs(default[0] - barriers[0]) <= 1e-6 * jnp.abs(default[0])
    for a, b in zip(jax.tree.leaves(default[1]), jax.tree.leaves(barriers[1])):
      assert jnp.max(jnp.abs(a - b)) <= 1e-4 * jnp.max(jnp.abs(a))
    sizes[depth] = _fused_instructions(kept.as_text())
  # Each 6 more blocks add as much fused code (1.00 with the barriers; 1.21 without).
  assert sizes[38] - sizes[26] <= 1.05 * (sizes[26] - sizes[14])
