"""The pruning pipelines and the criteria they use: one-shot, iterative, unstructured, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import oba_jax
from oba_jax import batchnorm, criteria, masks, plan, prune
from oba_jax.models import ResNetCIFAR

KEY = jax.random.key(0)


class TinyNet(nnx.Module):
  """conv -> BatchNorm -> ReLU -> mean -> dense: one prunable group, compiles fast."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.classifier = nnx.Linear(4, 10, rngs=rngs)

  def __call__(self, x):
    return self.classifier(jnp.mean(nnx.relu(self.bn(self.conv(x))), axis=(1, 2)))


def synthetic_batches(count=2, size=8):
  images = jax.random.normal(jax.random.key(1), (count, size, 8, 8, 1))
  labels = jax.random.randint(jax.random.key(2), (count, size), 0, 10)
  return [{"image": images[i], "label": labels[i]} for i in range(count)]


BATCHES = synthetic_batches()
X = BATCHES[0]["image"][:1]


class Unreadable:
  """Batches that fail when read: an error raised with them came before any scoring."""

  def __iter__(self):
    raise AssertionError("the batches were read")


@pytest.fixture(scope="module")
def resnet():
  model = ResNetCIFAR(8, width=4, in_channels=1, rngs=nnx.Rngs(0))
  model.eval()
  return model


def params_of(model):
  return oba_jax.functional(model)[1]


def removed_sets(chosen):
  return {name: set(indices) for name, indices in chosen.removed.items()}


def assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


# --- criteria -------------------------------------------------------------------


@pytest.mark.parametrize("criterion", sorted(criteria.CRITERIA))
def test_every_criterion_scores_every_parameter(criterion):
  model = TinyNet(nnx.Rngs(0))
  model.eval()
  batches = Unreadable() if not criteria.CRITERIA[criterion].uses_data else BATCHES
  score = criteria.importance(criterion, model, batches, num_batches=2, key=KEY)
  assert jax.tree.structure(score) == jax.tree.structure(params_of(model))
  assert all(np.isfinite(s).all() for s in jax.tree.leaves(score))
  assert np.any(score["conv"]["kernel"]) and np.any(score["classifier"]["kernel"])
  assert not np.any(score["bn"]["scale"])  # BatchNorm is not prunable


@pytest.mark.parametrize("criterion", sorted(criteria.CRITERIA))
def test_entrywise_criteria_predict_a_subset_by_summing_full_removal_scores(criterion):
  """`entrywise` is true exactly when restricting the delta equals masking the scores."""
  model = TinyNet(nnx.Rngs(0))
  model.eval()
  apply_fn, params = oba_jax.functional(model)
  objective = oba_jax.classification(apply_fn)
  score = lambda delta: criteria.CRITERIA[criterion].score(objective, params, BATCHES[0], KEY,
                                                        delta=delta)
  subset = jax.tree.map(lambda p: jnp.arange(p.size).reshape(p.shape) % 3 == 0, params)
  full = jax.tree.map(jnp.negative, params)
  restricted = jax.tree.map(lambda d, s: jnp.where(s, d, 0.0), full, subset)
  total = lambda tree: sum(float(jnp.sum(x)) for x in jax.tree.leaves(tree))
  in_subset = total(jax.tree.map(lambda s, m: jnp.where(m, s, 0.0), score(full), subset))
  matches = np.isclose(total(score(restricted)), in_subset, rtol=1e-5, atol=1e-8)
  assert matches == criteria.CRITERIA[criterion].entrywise


def test_per_example_criteria_refuse_batch_statistics():
  model = TinyNet(nnx.Rngs(0))
  model.train()
  with pytest.raises(ValueError, match="'obd_fisher' runs the model one example at a time"):
    criteria.importance("obd_fisher", model, Unreadable(), num_batches=1, key=KEY)


def test_magnitude_scores_are_the_weights_magnitudes():
  model = TinyNet(nnx.Rngs(0))
  score = criteria.importance("magnitude", model, Unreadable(), num_batches=None, key=KEY)
  np.testing.assert_array_equal(score["conv"]["kernel"], jnp.abs(model.conv.kernel.get_value()))


def test_importance_scores_in_the_models_batchnorm_mode_without_updating_it():
  model = TinyNet(nnx.Rngs(0))
  statistics = jax.tree.map(jnp.copy, nnx.state(model, nnx.BatchStat))
  score = lambda: criteria.importance("oba", model, BATCHES, num_batches=1, key=KEY)
  model.train()
  in_training = score()
  model.eval()
  in_inference = score()
  assert not np.allclose(in_training["conv"]["kernel"], in_inference["conv"]["kernel"])
  assert_trees_equal(nnx.state(model, nnx.BatchStat), statistics)


# --- one-shot -------------------------------------------------------------------


def test_one_shot_meets_the_target_in_monotone_steps(resnet):
  before = jax.tree.map(jnp.copy, nnx.state(resnet))
  seen = []
  result = prune.one_shot(
      resnet,
      X,
      BATCHES,
      prune.StructuredConfig(criterion="oba", targets=0.5, steps=3, num_batches=1),
      key=KEY,
      callback=lambda record, masked, chosen: seen.append((record, chosen)),
  )
  dense = result.plan.dense
  assert result.counted.macs <= 0.5 * dense.macs
  assert (result.counted.macs, result.counted.params) == (
      result.plan.predicted.macs,
      result.plan.predicted.params,
  )

  ratios = plan.exponential_schedule(0.5, 3)
  assert [r.step for r in result.history] == [0, 1, 2]
  assert [r.target for r in result.history] == list(ratios)
  assert all(r.kept_macs <= r.target for r in result.history)
  assert [r for r, _ in seen] == list(result.history)
  steps = [removed_sets(chosen) for _, chosen in seen]
  for earlier, later in zip(steps, steps[1:]):
    assert all(earlier[name] <= later[name] for name in earlier)
  assert seen[-1][1] is result.plan

  assert_trees_equal(params_of(result.masked), params_of(masks.apply(resnet, result.plan)))
  x = BATCHES[1]["image"]
  np.testing.assert_allclose(result.compacted(x), result.masked(x), rtol=1e-5, atol=1e-5)
  assert_trees_equal(nnx.state(resnet), before)  # the dense model is left alone


def test_one_shot_kept_params_linear_schedule(resnet):
  result = prune.one_shot(
      resnet,
      X,
      BATCHES,
      prune.StructuredConfig(criterion="magnitude", targets=plan.KeptParams(0.6), steps=2,
                             schedule="linear", reduction="sum", round_to=2),
      key=KEY,
  )
  assert [r.target for r in result.history] == list(plan.linear_schedule(0.6, 2))
  assert result.counted.params == result.plan.predicted.params <= 0.6 * result.plan.dense.params
  assert all(
      width % 2 == 0 for name, width in result.plan.kept_widths.items() if result.plan.removed[name]
  )


# --- iterative ------------------------------------------------------------------


def test_iterative_finetunes_after_every_target_and_continues_from_it(resnet):
  calls = []

  def finetune(masked, chosen):
    """Scales every weight (pruned zeros stay zero) and records what it was given."""
    calls.append((params_of(masked), chosen))
    graphdef, params, rest = nnx.split(masked, nnx.Param, ...)
    return nnx.merge(graphdef, jax.tree.map(lambda p: 1.5 * p, params), rest)

  results = prune.iterative(
      resnet,
      X,
      BATCHES,
      prune.StructuredConfig(criterion="magnitude", targets=(0.8, 0.6), steps=2,
                              schedule="exponential"),
      finetune=finetune,
      key=KEY,
  )

  # The schedule to 0.6 has the ratios 0.77 and 0.6: target 0.8 takes one step, 0.6 two.
  assert [[r.target for r in result.history] for result in results] == [
      [0.8],
      [pytest.approx(0.6**0.5), 0.6],
  ]
  assert [r.step for r in results[1].history] == [1, 2]
  assert [chosen for _, chosen in calls] == [result.plan for result in results]
  first, second = map(removed_sets, (results[0].plan, results[1].plan))
  assert all(first[name] <= second[name] for name in first)
  # Each fine-tuning gets the model it continues from, masked with the target's plan: first
  # the dense model, then the first fine-tuning's result.
  structure = results[0].plan.structure
  starts = [params_of(resnet), params_of(results[0].masked)]
  for (given, chosen), start, result in zip(calls, starts, results):
    assert_trees_equal(given, masks.apply_plan(start, structure, chosen))
    assert_trees_equal(params_of(result.masked), jax.tree.map(lambda p: 1.5 * p, given))
    assert result.counted.macs <= result.history[-1].target * result.plan.dense.macs


# --- unstructured ---------------------------------------------------------------


def kept_counts(mask, model, scope):
  """Kept prunable entries: in all, or per leaf."""
  flags = jax.tree.leaves(oba_jax.delta.default_prunable(params_of(model)))
  counts = [int(np.sum(m)) for m, f in zip(jax.tree.leaves(mask), flags) if f]
  return counts if scope == "layerwise" else [sum(counts)]


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_unstructured_densities_are_exact_and_masks_shrink(scope):
  # Random scores are not zero on pruned entries: only the pipeline keeps the masks nested.
  model = TinyNet(nnx.Rngs(0))
  densities = (0.8, 0.5, 0.3)
  results = prune.unstructured(
      model,
      BATCHES,
      prune.UnstructuredConfig(criterion="random", densities=densities, steps_per_density=2,
                               scope=scope),
      key=KEY,
  )
  assert [r.density for r in results] == list(densities)
  assert [s.step for s in results[1].history] == [2, 3]
  assert [s.density for s in results[1].history] == [pytest.approx(0.8 * (0.5 / 0.8) ** 0.5), 0.5]
  sizes = kept_counts(jax.tree.map(np.ones_like, params_of(model)), model, scope)
  for result in results:
    expected = [int(np.floor(result.density * n + 0.5)) for n in sizes]
    assert kept_counts(result.mask, model, scope) == expected
    assert_trees_equal(params_of(result.masked), masks.apply(params_of(model), result.mask))
  for earlier, later in zip(results, results[1:]):
    assert all(
        np.all(e | ~l) for e, l in zip(jax.tree.leaves(earlier.mask), jax.tree.leaves(later.mask))
    )


def test_unstructured_rescores_the_masked_model(resnet):
  seen = []
  results = prune.unstructured(
      resnet,
      BATCHES,
      prune.UnstructuredConfig(criterion="taylor", densities=(0.7, 0.4), num_batches=1),
      key=KEY,
      callback=lambda record, masked, mask: seen.append(record),
  )
  assert [(s.step, s.density) for s in seen] == [(0, 0.7), (1, 0.4)]
  score = lambda model: criteria.importance("taylor", model, BATCHES, num_batches=1, key=KEY)
  first = masks.global_density(score(resnet), 0.7)
  assert_trees_equal(results[0].mask, first)
  # Step 2 scores the masked model with BatchNorm statistics of its own (the list starts again).
  second = batchnorm.recalibrate(masks.apply(resnet, first), BATCHES, num_batches=20)
  assert seen[1].recalibration_batches == 20
  assert_trees_equal(results[1].mask, masks.global_density(score(second), 0.4))


# --- bad input ------------------------------------------------------------------


def one_shot_with(**changes):
  settings = dict(criterion="oba", targets=0.5, steps=2, num_batches=1) | changes
  return prune.one_shot(TinyNet(nnx.Rngs(0)), X, Unreadable(),
                        prune.StructuredConfig(**settings), key=KEY)


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            dict(criterion="hessian"),
            r"criterion='hessian' is not supported; accepted: "
            r"\['activation_norm', 'kron_obd', 'kron_obs', 'magnitude'",
        ),
        (dict(targets=1.5), r"targets: 1.5 is not a kept-MACs fraction in \(0, 1\]"),
        (dict(targets=plan.Density(0.5)), r"densities are for `unstructured`"),
        (dict(steps=0), r"steps=0 is not an integer >= 1"),
        (dict(schedule="cosine"), r"schedule='cosine' is not supported; accepted: \['exponential'"),
        (dict(reduction="max"), r"reduction='max' is not supported; accepted: \['paper', 'sum'\]"),
        (dict(scope="layerwise"), r"scope='layerwise' is not supported; accepted: \['global'"),
        (dict(max_ratio=1.5), r"max_ratio=1.5 is not a number in \[0, 1\]"),
        (dict(max_ratio=0.1), r"KeptFlops\(ratio=0.5\) cannot be reached"),
        (dict(num_batches=0), r"num_batches=0 is not an integer >= 1"),
    ],
)
def test_one_shot_bad_input_fails_before_scoring(changes, message):
  with pytest.raises(ValueError, match=message):
    one_shot_with(**changes)


@pytest.mark.parametrize(
    "targets, message",
    [
        ((0.5, 0.6), r"targets=\(0.5, 0.6\) is not strictly decreasing"),
        ((0.5, 0.5), r"targets=\(0.5, 0.5\) is not strictly decreasing"),
        ((0.6, 0.0), r"targets: 0.0 is not a kept-MACs fraction in \(0, 1\]"),
        ((), r"targets=\(\) is not a non-empty sequence"),
        ((0.6, plan.KeptParams(0.5)), r"mix \['KeptFlops', 'KeptParams'\]"),
    ],
)
def test_iterative_bad_targets(targets, message):
  with pytest.raises(ValueError, match=message):
    prune.iterative(
        TinyNet(nnx.Rngs(0)),
        X,
        Unreadable(),
        prune.StructuredConfig(criterion="oba", targets=targets),
        finetune=lambda m, p: m,
        key=KEY,
    )


def test_iterative_needs_a_callable_finetune():
  with pytest.raises(TypeError, match="finetune=None is not a callable"):
    prune.iterative(TinyNet(nnx.Rngs(0)), X, Unreadable(),
                    prune.StructuredConfig(criterion="oba", targets=0.5), finetune=None, key=KEY)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(criterion="l1"), r"criterion='l1' is not supported; accepted: \["),
        (dict(densities=(0.5, 0.7)), r"densities=\(0.5, 0.7\) is not strictly decreasing"),
        (dict(densities=(1.2,)), r"densities=\(1.2,\): 1.2 is not a fraction in \(0, 1\]"),
        (dict(steps_per_density=0), r"steps_per_density=0 is not an integer >= 1"),
        (
            dict(scope="local"),
            r"scope='local' is not supported; accepted: \['global', 'layerwise'\]",
        ),
    ],
)
def test_unstructured_bad_input(changes, message):
  settings = dict(criterion="oba") | changes
  with pytest.raises(ValueError, match=message):
    prune.unstructured(TinyNet(nnx.Rngs(0)), Unreadable(), prune.UnstructuredConfig(**settings),
                       key=KEY)


def test_importance_unknown_criterion():
  with pytest.raises(ValueError, match=r"criterion='OBA' is not supported; accepted: .*'oba'"):
    criteria.importance("OBA", TinyNet(nnx.Rngs(0)), Unreadable(), num_batches=1, key=KEY)


def test_one_shot_takes_one_target():
  config = prune.StructuredConfig(criterion="oba", targets=(0.6, 0.5))
  with pytest.raises(ValueError, match=r"one_shot prunes to one target, got targets=\(KeptFlops"):
    prune.one_shot(TinyNet(nnx.Rngs(0)), X, Unreadable(), config, key=KEY)


def test_drivers_take_their_config_class():
  with pytest.raises(TypeError, match="config must be a prune.StructuredConfig, got dict"):
    prune.one_shot(TinyNet(nnx.Rngs(0)), X, Unreadable(), {"criterion": "oba"}, key=KEY)
  with pytest.raises(TypeError, match="config must be a prune.UnstructuredConfig, got Struct"):
    prune.unstructured(TinyNet(nnx.Rngs(0)), Unreadable(),
                       prune.StructuredConfig(criterion="oba", targets=0.5), key=KEY)


def test_configs_are_frozen_and_normalised():
  config = prune.StructuredConfig(criterion="taylor", targets=[0.5, 0.25], ignore=["classifier"])
  assert config.targets == (plan.KeptFlops(0.5), plan.KeptFlops(0.25))
  assert config.ignore == ("classifier",)
  with pytest.raises(AttributeError):
    config.steps = 3


def test_scoring_batchnorm_mode_is_a_setting():
  model = TinyNet(nnx.Rngs(0))
  model.eval()
  in_train_mode = criteria.importance("oba", model, BATCHES, num_batches=1, key=KEY,
                                      batchnorm="train")
  trained = nnx.clone(model)
  trained.train()
  assert_trees_equal(in_train_mode,
                     criteria.importance("oba", trained, BATCHES, num_batches=1, key=KEY))
  assert not criteria.uses_batch_statistics(model)  # scored a copy
  with pytest.raises(ValueError, match=r"batchnorm='running' is not supported; accepted: \["):
    prune.StructuredConfig(criterion="oba", targets=0.5, batchnorm="running")
  with pytest.raises(ValueError, match=r"'obd_fisher' runs the model one example at a time"):
    prune.UnstructuredConfig(criterion="obd_fisher", batchnorm="train")


def test_one_shot_compiles_its_score_step_once():
  """Five pruning steps, masked models of the same shapes: one compilation of the score step."""
  from oba_jax import runtime
  model = ResNetCIFAR(8, width=3, in_channels=1, rngs=nnx.Rngs(0))  # shapes no other test uses
  model.eval()
  config = prune.StructuredConfig(criterion="oba", targets=0.5, steps=5, num_batches=1)
  with runtime.Compilations() as compiled:
    result = prune.one_shot(model, X, BATCHES, config, key=KEY)
  assert len(result.history) == 5
  assert compiled.counts["jit(score_step)"] == 1
