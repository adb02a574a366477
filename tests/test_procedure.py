"""Step rules: the official procedure's schedules, threshold, cap and stop; cost-aware ranking;
every step scoring a model whose BatchNorm statistics fit its channels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from oba_jax import batchnorm, criteria, masks, model_view, plan, procedure, prune
from oba_jax.structure import Group, Member, Structure, Term
from tests.test_prune import BATCHES, KEY, X, TinyNet, params_of, resnet  # noqa: F401 (a fixture)

# --- schedules ------------------------------------------------------------------


def test_official_channel_schedules_end_at_one_minus_0_9_target():
  exponential = procedure.channel_ratios("exponential", 0.14, 50)
  assert len(exponential) == 50 and exponential[-1] == pytest.approx(1 - 0.9 * 0.14)
  # Each step keeps the same fraction of the channel budget: 0.126 ** (1/50) ~ 0.959.
  kept = 1 - np.array((0.0,) + exponential)
  np.testing.assert_allclose(kept[1:] / kept[:-1], 0.126 ** (1 / 50))
  linear = procedure.channel_ratios("linear", 0.5, 4)
  np.testing.assert_allclose(linear, [0.1375, 0.275, 0.4125, 0.55])


def test_the_criteria_carry_the_official_schedule_pairing():
  paired = {name: c.official_schedule for name, c in criteria.CRITERIA.items()}
  assert paired["oba"] == paired["oba_bilinear"] == paired["taylor3"] == "exponential"
  assert paired["magnitude"] == paired["taylor"] == paired["obd_fisher"] == "linear"
  config = prune.StructuredConfig(criterion="taylor", targets=0.5, procedure="official")
  assert config.schedule_name == "linear"
  assert prune.StructuredConfig(criterion="taylor", targets=0.5,
                                schedule="exponential").schedule_name == "exponential"


# --- one official step on a hand-made structure ---------------------------------------


def group(name, size):
  return Group(name, size, (Member(f"{name}_in/kernel", 1, 0, (size,), 0),
                            Member(f"{name}_out/kernel", 0, 0, (size,), 0)))


def structure(**sizes):
  """Independent groups; removing one index of group g saves `cost` MACs (a dict per group)."""
  groups = tuple(group(name, size) for name, size in sizes.items())
  terms = tuple(Term(name, 10 * (i + 1), (name,)) for i, name in enumerate(sizes))
  return Structure(groups, mac_terms=terms, param_terms=terms)


def test_official_step_removes_everything_at_or_below_the_nth_smallest_score():
  s = structure(a=4, b=4)
  scores = {"a": [0.1, 0.5, 0.3, 0.9], "b": [0.3, 0.8, 0.2, 0.7]}
  # n = 8 - int(8 * (1 - 0.25)) = 2: threshold 0.2, then a tie at 0.3 stays.
  p = procedure.official_step(s, scores, ratio=0.25)
  assert p.removed == {"a": (0,), "b": (2,)}
  # n = 3: threshold 0.3, which two indices share: both go (4 removed, one more than n).
  p = procedure.official_step(s, scores, ratio=0.375)
  assert p.removed == {"a": (0, 2), "b": (0, 2)}


def test_official_step_counts_from_the_initial_total_and_extends_earlier_removals():
  s = structure(a=4, b=4)
  scores = {"a": [0, 0.5, 0.3, 0.9], "b": [0.3, 0.8, 0, 0.7]}  # removed indices score 0
  p = procedure.official_step(s, scores, ratio=0.375, already_removed={"a": [0], "b": [2]})
  # kept pool of 6 scores; n = 6 - int(8 * 0.625) = 1: the lowest kept score, 0.3 (twice).
  assert p.removed == {"a": (0, 2), "b": (0, 2)}
  assert procedure.official_step(s, scores, ratio=0.25,
                                 already_removed={"a": [0], "b": [2]}).removed == {
                                     "a": (0,), "b": (2,)}


def test_official_step_never_removes_a_whole_group():
  s = structure(a=2, b=6)
  scores = {"a": [0.1, 0.1], "b": [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]}
  p = procedure.official_step(s, scores, ratio=0.25)  # n = 2: both of a: refused
  assert p.removed == {"a": (), "b": ()}


def test_official_step_skips_capped_groups_and_leaves_them_out_of_the_count():
  s = structure(a=10, b=10)
  # a keeps 1 of 10 (< 5% would be 0.5, but exactly one index is a cap too).
  removed = {"a": list(range(1, 10)), "b": []}
  assert procedure.capped(s, removed, 0.95) == {"a"}
  scores = {"a": [0.0] + [0.0] * 9, "b": np.linspace(0.1, 1.0, 10)}
  # pool: b's 10 scores; n = 10 - int(20 * (1 - 0.6)) = 2.
  p = procedure.official_step(s, scores, ratio=0.6, already_removed=removed)
  assert p.removed["a"] == tuple(range(1, 10)) and p.removed["b"] == (0, 1)
  # max_ratio 0.5: a group with fewer than half of its indices is capped.
  assert procedure.capped(s, {"a": list(range(6))}, 0.5) == {"a"}
  assert procedure.capped(s, {"a": list(range(5))}, 0.5) == set()


def test_official_step_rounds_kept_widths_down_like_the_official_round_to():
  s = structure(a=8)
  scores = {"a": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]}
  p = procedure.official_step(s, scores, ratio=0.25, round_to=4)  # 2 go, 6 -> 4 kept
  assert p.removed == {"a": (0, 1, 2, 3)}


def test_official_step_refuses_a_ratio_outside_zero_one():
  with pytest.raises(ValueError, match=r"ratio=1.5 is not a removed-channel fraction"):
    procedure.official_step(structure(a=4), {"a": [1, 2, 3, 4]}, ratio=1.5)


def test_per_cost_divides_by_what_one_index_saves():
  s = structure(a=4, b=4)  # one index saves 10 MACs of a, 20 of b
  ranked = procedure.per_cost(s, {"a": np.ones(4), "b": np.ones(4)}, {}, "macs")
  np.testing.assert_allclose(ranked["a"], 0.1)
  np.testing.assert_allclose(ranked["b"], 0.05)
  free = Structure((group("a", 2),), mac_terms=(), param_terms=(Term("a", 1, ("a",)),))
  assert procedure.per_cost(free, {"a": np.ones(2)}, {}, "macs")["a"][0] > 1e300


# --- drivers ------------------------------------------------------------------------


def test_official_one_shot_stops_at_the_first_step_that_meets_the_target(resnet):
  config = prune.StructuredConfig(criterion="magnitude", targets=0.5, steps=10,
                                  procedure="official")
  result = prune.one_shot(resnet, X, BATCHES, config, key=KEY)
  kept = [r.kept_macs for r in result.history]
  assert kept[-1] <= 0.5 < min(kept[:-1])
  ratios = procedure.channel_ratios("linear", 0.5, 10)
  assert [r.target for r in result.history] == pytest.approx(ratios[:len(kept)])
  assert result.counted.macs == result.plan.predicted.macs


def test_official_one_shot_that_cannot_reach_the_target_says_so(resnet, monkeypatch):
  # Every group refusing its removals (as when each would lose its last index) ends the
  # schedule above the target: an error, not a plan that misses it silently.
  monkeypatch.setattr(procedure, "official_step", lambda s, scores, **kw: plan.from_removed(
      s, {g.name: () for g in s.groups}))
  config = prune.StructuredConfig(criterion="magnitude", targets=0.5, steps=2,
                                  procedure="official")
  with pytest.raises(prune.UnreachableTarget,
                     match=r"procedure='official' did not reach KeptFlops"):
    prune.one_shot(resnet, X, BATCHES, config, key=KEY)


def test_official_procedure_needs_the_global_scope():
  with pytest.raises(ValueError, match=r"scope='local' needs procedure='library'"):
    prune.StructuredConfig(criterion="oba", targets=0.5, procedure="official", scope="local")
  with pytest.raises(ValueError, match=r"procedure='paper' is not supported"):
    prune.StructuredConfig(criterion="oba", targets=0.5, procedure="paper")
  with pytest.raises(ValueError, match=r"recalibration_batches=-1 is not an integer >= 0"):
    prune.StructuredConfig(criterion="oba", targets=0.5, recalibration_batches=-1)


def test_per_cost_ranking_prunes_to_the_target(resnet):
  config = prune.StructuredConfig(criterion="magnitude", targets=0.5, steps=2,
                                  ranking="per_cost")
  result = prune.one_shot(resnet, X, BATCHES, config, key=KEY)
  assert result.history[-1].kept_macs <= 0.5
  by_score = prune.one_shot(resnet, X, BATCHES, prune.StructuredConfig(
      criterion="magnitude", targets=0.5, steps=2), key=KEY)
  assert result.plan.removed != by_score.plan.removed


def scored_models(monkeypatch):
  """Replaces the drivers' `importance` by one that records the model each step scores."""
  seen = []

  def recording(criterion, model, *args, **kwargs):
    seen.append(nnx.clone(model))
    return criteria.importance(criterion, model, *args, **kwargs)

  monkeypatch.setattr(model_view, "importance", recording)
  return seen


def batch_stats(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))


def test_every_eval_mode_step_scores_a_recalibrated_masked_model(resnet, monkeypatch):
  seen = scored_models(monkeypatch)
  plans = []
  config = prune.StructuredConfig(criterion="taylor", targets=0.4, steps=3, num_batches=1,
                                  batchnorm="eval", recalibration_batches=2)
  result = prune.one_shot(resnet, X, BATCHES, config, key=KEY,
                          callback=lambda record, masked, chosen: plans.append(chosen))
  assert [r.recalibration_batches for r in result.history] == [0, 2, 2]
  stale = masks.apply(resnet, plans[0])
  fitted = batchnorm.recalibrate(stale, BATCHES, num_batches=2)
  jax.tree.map(np.testing.assert_allclose, batch_stats(seen[1]), batch_stats(fitted))
  score = lambda model: criteria.importance("taylor", model, BATCHES, num_batches=1,
                                            key=jax.random.fold_in(KEY, 1), batchnorm="eval")
  jax.tree.map(np.testing.assert_array_equal, score(seen[1]), score(fitted))
  differs = jax.tree.map(lambda a, b: not np.allclose(a, b), score(fitted), score(stale))
  assert any(jax.tree.leaves(differs))  # the stale model would have scored otherwise


def test_batch_statistics_scoring_needs_no_recalibration(resnet, monkeypatch):
  seen = scored_models(monkeypatch)
  config = prune.StructuredConfig(criterion="taylor", targets=0.5, steps=2, num_batches=1,
                                  batchnorm="train")
  result = prune.one_shot(resnet, X, BATCHES, config, key=KEY)
  assert [r.recalibration_batches for r in result.history] == [0, 0]
  jax.tree.map(np.testing.assert_array_equal, batch_stats(seen[1]), batch_stats(resnet))


def test_official_magnitude_averages_the_conv_slices_with_batchnorm_gamma(monkeypatch):
  """The official Weight baseline: per channel the mean of the conv's output-slice L1 norm, the
  classifier's input-slice L1 norm and |γ| (no biases), over its maximum."""
  model = TinyNet(nnx.Rngs(0))
  model.eval()
  model.bn.scale.set_value(jnp.linspace(0.5, 2.0, 4))
  seen = []
  real = procedure.official_step
  monkeypatch.setattr(procedure, "official_step",
                      lambda s, scores, **kw: seen.append(scores) or real(s, scores, **kw))
  config = prune.StructuredConfig(criterion="magnitude", targets=0.7, steps=4,
                                  procedure="official", max_ratio=1.0)
  prune.one_shot(model, X, BATCHES, config, key=KEY)
  params = params_of(model)
  conv = np.abs(np.asarray(params["conv"]["kernel"])).sum(axis=(0, 1, 2))
  dense = np.abs(np.asarray(params["classifier"]["kernel"])).sum(axis=1)
  gamma = np.abs(np.asarray(params["bn"]["scale"]))
  mean = (conv + dense + gamma) / 3
  (scores,) = seen[0].values()
  np.testing.assert_allclose(scores, mean / (mean.max() + 1e-6), rtol=1e-6)
