"""Folding inference-mode BatchNorm into the layer before it (`surgery.fold_batchnorm`)."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from oba_jax import flops, plan, surgery
from oba_jax.models import VGG, ResNetCIFAR
from oba_jax.structure import trace

X = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))


def randomized(model: nnx.Module, seed: int = 1) -> nnx.Module:
  """`model` in inference mode with random BatchNorm statistics, scales, shifts and biases."""
  key = jax.random.key(seed)
  for _, module in nnx.iter_graph(model):
    if isinstance(module, nnx.BatchNorm):
      key, *k = jax.random.split(key, 5)
      shape = module.mean.shape
      module.mean.set_value(jax.random.normal(k[0], shape))
      module.var.set_value(jax.random.uniform(k[1], shape, minval=0.1, maxval=3.0))
      if module.scale is not None:
        module.scale.set_value(jax.random.normal(k[2], shape))
      if module.bias is not None:
        module.bias.set_value(jax.random.normal(k[3], shape))
  model.eval()
  return model


def assert_same_outputs(folded, model, x):
  """Float32 agreement: rtol 1e-5 and atol 1e-5 x the largest output (the docstring's promise)."""
  want = np.asarray(model(x))
  np.testing.assert_allclose(np.asarray(folded(x)), want, rtol=1e-5,
                             atol=1e-5 * np.abs(want).max())


def rsqrt_count(model, x) -> int:
  """How many rsqrt (one per BatchNorm left) the jaxpr of a forward pass holds."""
  return str(jax.make_jaxpr(lambda x: model(x))(x)).count("rsqrt")


def batchnorm_paths(model) -> list[str]:
  return ["/".join(map(str, p)) for p, m in nnx.iter_graph(model)
          if isinstance(m, nnx.BatchNorm)]


def test_folds_every_batchnorm_of_a_cifar_resnet_and_keeps_its_outputs():
  model = randomized(ResNetCIFAR(8, width=4, rngs=nnx.Rngs(0)))
  before = jax.tree.map(jnp.copy, nnx.state(model))
  paths = batchnorm_paths(model)
  assert rsqrt_count(model, X) == len(paths) == 9
  assert surgery.foldable_batchnorms(model, X[:1]) == {p: p[:-2] + "conv" for p in paths}
  folded, pairs = surgery.fold_batchnorm(model, X[:1])
  assert sorted(pairs) == sorted(paths)
  assert rsqrt_count(folded, X) == 0 and batchnorm_paths(folded) == []
  assert isinstance(folded.stem.bn, surgery.Identity)
  assert folded.stem.conv.use_bias and folded.stem.conv.bias.shape == (4,)
  assert_same_outputs(folded, model, X)
  assert flops.count(folded, X[:1]).macs == flops.count(model, X[:1]).macs
  assert all(jnp.array_equal(a, b) for a, b in  # the input model is left alone
             zip(jax.tree.leaves(before), jax.tree.leaves(nnx.state(model))))
  assert rsqrt_count(model, X) == 9


def test_folds_a_vgg():
  model = randomized(VGG(11, width=8, rngs=nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
  folded, pairs = surgery.fold_batchnorm(model, x)
  assert len(pairs) == 8 and rsqrt_count(folded, x) == 0
  assert_same_outputs(folded, model, x)


class Mixed(nnx.Module):
  """BatchNorms after: the input, a ReLU, a conv whose output is also used elsewhere, a shared
  conv (called twice), a conv with a bias, a grouped conv, a depthwise conv."""

  def __init__(self, rngs: nnx.Rngs):
    conv = lambda i, o, **kw: nnx.Conv(i, o, (3, 3), rngs=rngs, **kw)
    self.bn_input = nnx.BatchNorm(3, rngs=rngs)
    self.conv_relu, self.bn_relu = conv(3, 8, use_bias=False), nnx.BatchNorm(8, rngs=rngs)
    self.conv_bias, self.bn_bias = conv(8, 8), nnx.BatchNorm(8, rngs=rngs)
    self.conv_used_twice, self.bn_used_twice = conv(8, 8), nnx.BatchNorm(8, rngs=rngs)
    self.shared, self.bn_shared = conv(8, 8, use_bias=False), nnx.BatchNorm(8, rngs=rngs)
    self.grouped = conv(8, 16, feature_group_count=4, use_bias=False)
    self.bn_grouped = nnx.BatchNorm(16, use_scale=False, rngs=rngs)
    self.depthwise = conv(16, 16, feature_group_count=16, use_bias=False)
    self.bn_depthwise = nnx.BatchNorm(16, use_bias=False, rngs=rngs)

  def __call__(self, x):
    y = self.bn_relu(nnx.relu(self.conv_relu(self.bn_input(x))))
    y = self.bn_bias(self.conv_bias(y))
    z = self.conv_used_twice(y)
    y = self.bn_used_twice(z) + z
    y = self.bn_shared(self.shared(y)) + self.shared(y)
    return self.bn_depthwise(self.depthwise(self.bn_grouped(self.grouped(y))))


def test_folds_only_what_is_exactly_a_layer_output_used_once():
  model = randomized(Mixed(nnx.Rngs(0)))
  folded, pairs = surgery.fold_batchnorm(model, X)
  assert pairs == {"bn_bias": "conv_bias", "bn_grouped": "grouped",
                   "bn_depthwise": "depthwise"}
  assert batchnorm_paths(folded) == ["bn_input", "bn_relu", "bn_shared", "bn_used_twice"]
  assert rsqrt_count(model, X) == 7 and rsqrt_count(folded, X) == 4
  assert_same_outputs(folded, model, X)


class DenseBN(nnx.Module):
  """Linear -> BatchNorm -> ReLU -> Linear (no bias) -> BatchNorm, on (batch, tokens, features)."""

  def __init__(self, rngs: nnx.Rngs):
    self.fc1, self.bn1 = nnx.Linear(6, 16, rngs=rngs), nnx.BatchNorm(16, rngs=rngs)
    self.fc2 = nnx.Linear(16, 4, use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(4, rngs=rngs)

  def __call__(self, x):
    return self.bn2(self.fc2(nnx.relu(self.bn1(self.fc1(x)))))


def test_folds_batchnorm_after_a_dense_layer():
  model = randomized(DenseBN(nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(3), (4, 5, 6))
  folded, pairs = surgery.fold_batchnorm(model, x)
  assert pairs == {"bn1": "fc1", "bn2": "fc2"} and rsqrt_count(folded, x) == 0
  assert folded.fc2.use_bias and folded.fc2.bias.shape == (4,)
  assert_same_outputs(folded, model, x)


def test_folds_a_compacted_model():
  model = randomized(ResNetCIFAR(8, width=8, rngs=nnx.Rngs(0)))
  structure = trace(model, X[:1])
  rng = np.random.default_rng(0)
  scores = {g.name: rng.random(g.size) for g in structure.groups}
  small = surgery.compact(model, plan.select(structure, scores, target=plan.KeptFlops(0.5)))
  folded, pairs = surgery.fold_batchnorm(small, X[:1])
  assert len(pairs) == 9 and rsqrt_count(folded, X) == 0
  assert folded.stem.conv.bias.shape == (small.stem.conv.out_features,) != (8,)
  assert_same_outputs(folded, small, X)


def test_compacted_folded_model_saves_and_restores(tmp_path):
  model = randomized(ResNetCIFAR(8, width=8, rngs=nnx.Rngs(0)))
  structure = trace(model, X[:1])
  scores = {g.name: np.random.default_rng(0).random(g.size) for g in structure.groups}
  chosen = plan.select(structure, scores, target=plan.KeptFlops(0.5))
  folded, pairs = surgery.fold_batchnorm(surgery.compact(model, chosen), X[:1])
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "folded", nnx.state(folded))
  checkpointer.wait_until_finished()

  # A new process knows the architecture and the plan: compact and fold the abstract model.
  abstract = nnx.eval_shape(lambda: ResNetCIFAR(8, width=8, rngs=nnx.Rngs(1)))
  abstract.eval()
  saved = plan.Plan.from_json(chosen.to_json())
  rebuilt, rebuilt_pairs = surgery.fold_batchnorm(
      surgery.compact(abstract, saved, trace(abstract, X[:1])), X[:1])
  assert rebuilt_pairs == pairs
  graphdef, state = nnx.split(rebuilt)
  restored = nnx.merge(graphdef, checkpointer.restore(tmp_path / "folded", state))
  np.testing.assert_array_equal(restored(X), folded(X))


def test_refuses_training_mode_and_missing_inputs():
  model = ResNetCIFAR(8, width=4, rngs=nnx.Rngs(0))
  training = r"9 BatchNorm\(s\) \['blocks/0/conv1/bn', .*\.\.\. not in inference mode"
  with pytest.raises(ValueError, match=training + r".*call model.eval\(\) first"):
    surgery.fold_batchnorm(model, X[:1])
  model.eval()
  with pytest.raises(ValueError, match="needs example inputs"):
    surgery.fold_batchnorm(model)
  model.blocks[0].conv1.bn.use_running_average = False
  with pytest.raises(ValueError, match=r"1 BatchNorm\(s\) \['blocks/0/conv1/bn'\] not in"):
    surgery.fold_batchnorm(model, X[:1])


class ReadElsewhere(nnx.Module):
  """Conv -> BatchNorm pairs whose BatchNorm parameters are also read outside the BatchNorm
  (alone or with another's), and one pair that folds."""

  def __init__(self, rngs: nnx.Rngs):
    for name in "abcd":
      setattr(self, f"conv_{name}", nnx.Conv(3, 4, (3, 3), rngs=rngs))
      setattr(self, f"bn_{name}", nnx.BatchNorm(4, rngs=rngs))

  def __call__(self, x):
    a, b = self.bn_a(self.conv_a(x)), self.bn_b(self.conv_b(x))
    c = self.bn_c(self.conv_c(x)) + self.bn_c.bias[...]  # one more add after bn_c's own
    return a + b * (self.bn_a.scale[...] + self.bn_b.scale[...]) + c + self.bn_d(self.conv_d(x))


def test_batchnorm_whose_parameters_are_read_elsewhere_is_not_folded():
  model = randomized(ReadElsewhere(nnx.Rngs(0)))
  folded, pairs = surgery.fold_batchnorm(model, X)
  assert pairs == {"bn_d": "conv_d"}
  assert_same_outputs(folded, model, X)


def test_batchnorm_called_with_batch_statistics_is_not_folded():
  """A BatchNorm in inference mode that its caller runs on batch statistics stays."""

  class Override(nnx.Module):
    def __init__(self, rngs):
      self.conv, self.bn = nnx.Conv(3, 4, (3, 3), rngs=rngs), nnx.BatchNorm(4, rngs=rngs)

    def __call__(self, x):
      return self.bn(self.conv(x), use_running_average=False)

  model = randomized(Override(nnx.Rngs(0)))
  folded, pairs = surgery.fold_batchnorm(model, X)
  assert pairs == {}
  assert_same_outputs(folded, model, X)
