"""Equinox, haiku and penzai models through the public API, float64, exact.

For each framework: OBA's scores equal δ ⊙ Hδ / 2 with the dense Hessian; a mask
tree built of the framework's own node types (an `eqx.Module` is callable) is a
mask, not a predicate; trace → paper group scores → select → `compact_fn`
computes what the masked model computes, and `flops.count` of the result is the
plan's prediction; the pruning drivers run on the function with a regression
loss (not a classification).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from frameworks import FRAMEWORKS, IN_FEATURES, OUT_FEATURES, equinox_mlp, penzai_mlp
import oba_jax
from numerics import rel_err, x64  # noqa: F401 - x64 is an autouse fixture
from oba_jax import flops, masks, plan, prune, scores, structure, surgery
from oba_jax.delta import prunable_mask, removal_delta
from oba_jax.model_view import Compacted


def regression_batch(seed=0, n=5):
  kx, ky = jax.random.split(jax.random.key(seed))
  return {"x": jax.random.normal(kx, (n, IN_FEATURES)),
          "y": jax.random.normal(ky, (n, OUT_FEATURES))}


def squared_error(apply_fn):
  return lambda p, b: jnp.mean((apply_fn(p, b["x"]) - b["y"]) ** 2)


@pytest.mark.parametrize("name", sorted(FRAMEWORKS))
def test_oba_equals_the_dense_hessian_reference(name):
  apply_fn, params, prunable = FRAMEWORKS[name]()
  loss, batch = squared_error(apply_fn), regression_batch()
  got = scores.oba(loss, params, batch, prunable=prunable)
  flat, unravel = ravel_pytree(params)
  delta = ravel_pytree(removal_delta(params, prunable=prunable))[0]
  hessian = jax.hessian(lambda f: loss(unravel(f), batch))(flat)
  want = delta * (hessian @ delta) / 2
  assert np.count_nonzero(want) > 0
  assert rel_err(ravel_pytree(got)[0], want) < 1e-12


@pytest.mark.parametrize("name", sorted(FRAMEWORKS))
def test_a_mask_tree_of_the_frameworks_nodes_is_a_mask(name):
  apply_fn, params, prunable = FRAMEWORKS[name]()
  loss, batch = squared_error(apply_fn), regression_batch()
  mask = prunable_mask(params, prunable)
  assert jax.tree.structure(mask) == jax.tree.structure(params)
  for criterion in (lambda **kw: scores.oba(loss, params, batch, **kw),
                    lambda **kw: scores.magnitude(params, **kw),
                    lambda **kw: scores.random(jax.random.key(0), params, **kw)):
    assert rel_err(criterion(prunable=mask), criterion(prunable=prunable)) == 0
  s = scores.magnitude(params, prunable=mask)
  kept = masks.global_density(s, 0.5, prunable=mask)
  assert masks.sparsity(kept, prunable=mask).total == pytest.approx(0.5, abs=0.05)


def test_an_equinox_mask_is_not_called_as_a_predicate():
  eqx = pytest.importorskip("equinox")
  apply_fn, params, _ = equinox_mlp()
  mask = prunable_mask(params)
  assert isinstance(mask, eqx.Module) and callable(mask)  # what made it look like a predicate
  loss = squared_error(apply_fn)
  np.testing.assert_array_equal(
      ravel_pytree(scores.obd(loss, params, regression_batch(), key=jax.random.key(1)))[0],
      ravel_pytree(scores.obd(loss, params, regression_batch(), key=jax.random.key(1),
                              prunable=mask))[0])


@pytest.mark.parametrize("name", sorted(FRAMEWORKS))
def test_structured_chain_compacts_exactly(name):
  apply_fn, params, prunable = FRAMEWORKS[name]()
  loss, batch = squared_error(apply_fn), regression_batch()
  x = batch["x"]
  traced = structure.trace(apply_fn, x, params=params)
  assert traced.groups
  grouped = structure.group_scores(traced, scores.oba(loss, params, batch, prunable=prunable),
                                   reduction="paper", prunable=prunable)
  chosen = plan.select(traced, grouped, target=plan.KeptFlops(0.5))
  assert any(len(r) for r in chosen.removed.values())
  small_fn, small_params = surgery.compact_fn(apply_fn, params, chosen)
  masked = masks.apply_plan(params, traced, chosen)
  np.testing.assert_allclose(small_fn(small_params, x), apply_fn(masked, x), rtol=1e-12,
                             atol=1e-12)
  counted = flops.count(small_fn, x, params=small_params)
  assert (counted.macs, counted.params) == (chosen.predicted.macs, chosen.predicted.params)


def test_paper_reduction_refuses_silent_zeros_when_the_naming_rule_misses():
  apply_fn, params, prunable = penzai_mlp()
  loss, batch = squared_error(apply_fn), regression_batch()
  traced = structure.trace(apply_fn, batch["x"], params=params)
  per_parameter = scores.oba(loss, params, batch, prunable=prunable)
  with pytest.raises(ValueError, match=r"prunable=.*predicate or mask"):
    structure.group_scores(traced, per_parameter, reduction="paper")
  grouped = structure.group_scores(traced, per_parameter, reduction="paper", prunable=prunable)
  assert all(np.any(v) for v in grouped.values())


# --- the drivers, on a function and a regression loss ------------------------------


def regression_batches(count=2):
  return [regression_batch(seed) for seed in range(count)]


def regression_objective(apply_fn):
  """Not a classification: the mean squared error of `batch["x"]` against `batch["y"]`."""
  return squared_error(apply_fn)


@pytest.mark.parametrize("name", sorted(FRAMEWORKS))
def test_one_shot_prunes_a_function_with_a_regression_loss(name):
  apply_fn, params, prunable = FRAMEWORKS[name]()
  x = regression_batch()["x"]
  config = prune.StructuredConfig(criterion="oba", targets=0.5, steps=2, num_batches=2)
  result = prune.one_shot(apply_fn, x, regression_batches(), config, key=jax.random.key(0),
                          params=params, objective=regression_objective, prunable=prunable)
  assert isinstance(result.compacted, Compacted) and len(result.history) == 2
  assert result.plan.predicted.macs <= 0.5 * result.plan.dense.macs
  np.testing.assert_allclose(result.compacted.apply_fn(result.compacted.params, x),
                             apply_fn(result.masked, x), rtol=1e-12, atol=1e-12)
  assert result.counted.macs == result.plan.predicted.macs
  # The masked parameters are the plan's mask applied to the dense ones.
  want = masks.apply_plan(params, result.plan.structure, result.plan)
  assert rel_err(result.masked, want) == 0


@pytest.mark.parametrize("name", sorted(FRAMEWORKS))
def test_unstructured_prunes_a_function_with_a_regression_loss(name):
  apply_fn, params, prunable = FRAMEWORKS[name]()
  config = prune.UnstructuredConfig("taylor", densities=(0.5,), num_batches=2)
  (result,) = prune.unstructured(apply_fn, regression_batches(), config, key=jax.random.key(0),
                                 params=params, objective=regression_objective,
                                 prunable=prunable)
  assert masks.sparsity(result.mask, prunable=prunable).total == pytest.approx(0.5, abs=0.02)
  assert rel_err(result.masked, masks.apply(params, result.mask)) == 0


def test_drivers_refuse_bad_functional_input_before_work():
  apply_fn, params, _ = penzai_mlp()
  x = regression_batch()["x"]
  config = prune.StructuredConfig(criterion="oba", targets=0.5, steps=1, num_batches=1)
  never = iter(())  # scoring would fail on an empty iterator: the checks come first
  with pytest.raises(ValueError, match="no parameter is prunable.*prunable=lambda"):
    prune.one_shot(apply_fn, x, never, config, key=jax.random.key(0), params=params,
                   objective=regression_objective)
  with pytest.raises(TypeError, match="with params="):
    prune.one_shot(apply_fn, x, never, config, key=jax.random.key(0))
  ggn = dataclasses.replace(config, criterion="oba_ggn")
  with pytest.raises(ValueError, match="'oba_ggn' needs the objective's model"):
    prune.one_shot(apply_fn, x, never, ggn, key=jax.random.key(0), params=params,
                   objective=regression_objective, prunable=lambda path, leaf: True)


def test_one_shot_prunes_an_nnx_language_model_with_the_next_token_loss():
  from flax import nnx  # pylint: disable=import-outside-toplevel

  import engine_models as em  # pylint: disable=import-outside-toplevel
  surgery.register_resizer(em.CausalAttention, em.resize_causal_attention)
  try:
    model = em.TinyLM(nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (4, 5), 0, 11)
    batches = [{"tokens": tokens, "mask": jnp.ones_like(tokens)}]
    config = prune.StructuredConfig(criterion="oba", targets=plan.KeptParams(0.7), steps=2,
                                    num_batches=1)
    result = prune.one_shot(model, tokens[:1], batches, config, key=jax.random.key(0),
                            objective=oba_jax.next_token)
    np.testing.assert_allclose(result.compacted(tokens), result.masked(tokens), rtol=1e-5,
                               atol=1e-5)
    assert result.counted.params == result.plan.predicted.params
    assert result.plan.predicted.params <= 0.7 * result.plan.dense.params
  finally:
    surgery._RESIZERS.pop(em.CausalAttention, None)


def test_iterative_fine_tunes_a_functions_parameters_between_targets():
  apply_fn, params, prunable = equinox_mlp()
  x = regression_batch()["x"]
  tuned = []

  def finetune(masked, chosen):  # a function's driver hands over and takes back parameters
    tuned.append(chosen)
    return jax.tree.map(lambda p: 1.5 * p, masked)

  config = prune.StructuredConfig(criterion="taylor", targets=(0.7, 0.5), steps=2,
                                  num_batches=1)
  results = prune.iterative(apply_fn, x, regression_batches(1), config, finetune=finetune,
                            key=jax.random.key(0), params=params,
                            objective=regression_objective, prunable=prunable)
  assert len(results) == len(tuned) == 2
  for result in results:
    assert rel_err(result.masked, masks.apply_plan(result.masked, result.plan.structure,
                                                   result.plan)) == 0
    np.testing.assert_allclose(result.compacted.apply_fn(result.compacted.params, x),
                               apply_fn(result.masked, x), rtol=1e-12, atol=1e-12)
  # The second target continued from the first one's fine-tuned parameters (tuned twice).
  assert results[1].plan.predicted.macs <= 0.5 * results[1].plan.dense.macs
  want = masks.apply_plan(jax.tree.map(lambda p: 2.25 * p, params), results[1].plan.structure,
                          results[1].plan)
  assert rel_err(results[1].masked, want) < 1e-15
  for name, removed in results[0].plan.removed.items():
    assert set(removed) <= set(results[1].plan.removed[name])
