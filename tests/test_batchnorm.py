"""BatchNorm recalibration: running statistics from batches, nothing else touched."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from oba_jax import batchnorm, plan, structure, surgery


class TwoConvs(nnx.Module):
  """conv -> BN -> ReLU -> conv -> BN -> mean -> dense, with a dropout stream."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 6, (3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(6, rngs=rngs)
    self.conv2 = nnx.Conv(6, 5, (3, 3), rngs=rngs)
    self.bn2 = nnx.BatchNorm(5, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.head = nnx.Linear(5, 3, rngs=rngs)

  def __call__(self, x):
    y = self.bn2(self.conv2(nnx.relu(self.bn1(self.conv1(x)))))
    return self.head(self.drop(jnp.mean(nnx.relu(y), axis=(1, 2))))


def batches(count=3, size=8, seed=0):
  rng = np.random.default_rng(seed)
  return [{"image": rng.normal(size=(size, 6, 6, 1)).astype(np.float32),
           "label": rng.integers(0, 3, size).astype(np.int32)} for _ in range(count)]


def reference_statistics(model, data):
  """Each BatchNorm's running values, computed by hand: the average over batches of the
  batch mean and (biased) variance, the second layer seeing the first normalised by its
  batch statistics, as in training mode."""
  def norm(x, bn):
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    y = (x - mean) / jnp.sqrt(var + bn.epsilon)
    return y * bn.scale.get_value() + bn.bias.get_value(), (mean, var)

  stats = []
  for batch in data:
    h, first = norm(model.conv1(jnp.asarray(batch["image"])), model.bn1)
    _, second = norm(model.conv2(nnx.relu(h)), model.bn2)
    stats.append((first, second))
  return [tuple(np.mean([s[layer][k] for s in stats], axis=0) for k in (0, 1))
          for layer in (0, 1)]


def snapshot(model):
  """Everything but the running statistics, as numpy (PRNG keys as their raw data)."""
  as_numpy = lambda x: np.asarray(
      jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
  return jax.tree.map(as_numpy, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.BatchStat))))


def test_running_statistics_are_the_batch_averages_and_nothing_else_changes():
  model = TwoConvs(nnx.Rngs(0))
  model.eval()
  data = batches()
  before = snapshot(model)
  fresh = batchnorm.recalibrate(model, data)
  for bn, (mean, var) in zip((fresh.bn1, fresh.bn2), reference_statistics(model, data)):
    np.testing.assert_allclose(bn.mean.get_value(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.var.get_value(), var, rtol=1e-5, atol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, snapshot(fresh), before)
  jax.tree.map(np.testing.assert_array_equal, snapshot(model), before)
  assert fresh.bn1.use_running_average and not np.allclose(
      model.bn1.mean.get_value(), fresh.bn1.mean.get_value())  # the original is untouched


def test_a_compacted_model_is_recalibrated_on_its_own_shapes():
  model = TwoConvs(nnx.Rngs(1))
  model.eval()
  data = batches(seed=1)
  traced = structure.trace(model, jnp.asarray(data[0]["image"][:1]))
  scores = {g.name: np.random.default_rng(0).random(g.size) for g in traced.groups}
  chosen = plan.select(traced, scores, target=plan.KeptFlops(0.5))
  compacted = batchnorm.recalibrate(surgery.compact(model, chosen), data, num_batches=2)
  expected = reference_statistics(surgery.compact(model, chosen), data[:2])
  for bn, (mean, var) in zip((compacted.bn1, compacted.bn2), expected):
    np.testing.assert_allclose(bn.mean.get_value(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.var.get_value(), var, rtol=1e-5, atol=1e-6)


def test_bad_input():
  with pytest.raises(ValueError, match="got no batches"):
    batchnorm.recalibrate(TwoConvs(nnx.Rngs(0)), [])
  with pytest.raises(ValueError, match=r"num_batches=0 must be None or an integer >= 1"):
    batchnorm.recalibrate(TwoConvs(nnx.Rngs(0)), batches(), num_batches=0)
