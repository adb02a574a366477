"""Plans: exact targets on the cost model, caps, rounding, scopes, schedules, serialisation."""

import math

import numpy as np
import pytest

from oba_jax import plan
from oba_jax.plan import Density, KeptFlops, KeptParams
from oba_jax.structure import Cost, Group, Member, Structure, Term


def hidden_group(name, size, layer_in, layer_out):
  return Group(name, size, (Member(f"{layer_in}/kernel", 1, 0, (size,), 0),
                            Member(f"{layer_in}/bias", 0, 0, (size,), 0),
                            Member(f"{layer_out}/kernel", 0, 0, (size,), 0)))


def mlp(hidden=3):
  """A 4-hidden-2 MLP: MACs 4h + 2h, params 4h + h + 2h + 2."""
  return Structure(
      (hidden_group("hidden", hidden, "fc1", "fc2"),),
      mac_terms=(Term("fc1", 4, ("hidden",)), Term("fc2", 2, ("hidden",))),
      param_terms=(Term("fc1/kernel", 4, ("hidden",)), Term("fc1/bias", 1, ("hidden",)),
                   Term("fc2/kernel", 2, ("hidden",)), Term("fc2/bias", 2)))


def two_groups(size_a=4, size_b=4):
  """Two independent groups of equal cost per index (10 MACs each)."""
  return Structure(
      (hidden_group("a", size_a, "a_in", "a_out"), hidden_group("b", size_b, "b_in", "b_out")),
      mac_terms=(Term("a", 10, ("a",)), Term("b", 10, ("b",))),
      param_terms=(Term("a", 1, ("a",)), Term("b", 1, ("b",))))


HIDDEN_SCORES = {"hidden": [0.2, 0.9, 0.1]}


def test_kept_flops_removes_the_lowest_scores():
  p = plan.select(mlp(), HIDDEN_SCORES, target=KeptFlops(0.5))  # 6h <= 9: h = 1
  assert p.removed == {"hidden": (0, 2)}
  assert p.kept_widths == {"hidden": 1}
  assert p.predicted == Cost(macs=6, params=9) and p.dense == Cost(macs=18, params=23)


def test_fewest_removals_that_meet_the_target():
  p = plan.select(mlp(), HIDDEN_SCORES, target=KeptFlops(0.7))  # 6h <= 12.6: h = 2
  assert p.removed == {"hidden": (2,)}
  assert plan.select(mlp(), HIDDEN_SCORES, target=KeptFlops(1.0)).removed == {"hidden": ()}


def test_kept_params():
  p = plan.select(mlp(), HIDDEN_SCORES, target=KeptParams(0.5))  # 7h + 2 <= 11.5: h = 1
  assert p.kept_widths == {"hidden": 1} and p.predicted.params == 9


def test_target_is_met_on_a_product_cost_model():
  # 4-a-b-2 MLP: MACs 4a + a*b + 2b; product terms are not additive per index.
  structure = Structure(
      (hidden_group("a", 6, "fc1", "fc2"), hidden_group("b", 5, "fc2", "fc3")),
      mac_terms=(Term("fc1", 4, ("a",)), Term("fc2", 1, ("a", "b")), Term("fc3", 2, ("b",))),
      param_terms=())
  rng = np.random.default_rng(0)
  scores = {"a": rng.random(6), "b": rng.random(5)}
  dense = structure.cost().macs
  for ratio in (0.9, 0.6, 0.35):
    p = plan.select(structure, scores, target=KeptFlops(ratio))
    assert p.predicted.macs <= ratio * dense
    # One removal fewer (the last in the global ranking) would miss the target.
    ranking = sorted((s, n, i) for n in scores for i, s in enumerate(scores[n]))
    last = max((s, n, i) for s, n, i in ranking if i in p.removed[n])
    widths = dict(p.kept_widths, **{last[1]: p.kept_widths[last[1]] + 1})
    assert structure.cost(widths).macs > ratio * dense


def test_bisection_evaluates_few_costs():
  evaluated = []

  class CountingStructure(Structure):
    def cost(self, kept=None):
      evaluated.append(kept)
      return super().cost(kept)

  dense = two_groups(1000, 1000)
  structure = CountingStructure(dense.groups, dense.mac_terms, dense.param_terms)
  rng = np.random.default_rng(0)
  p = plan.select(structure, {"a": rng.random(1000), "b": rng.random(1000)},
                  target=KeptFlops(0.3))
  assert sum(p.kept_widths.values()) == 600
  assert len(evaluated) < 20  # log2(1900 candidates) + a few, not one per channel


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, math.nan, True, "0.5"])
@pytest.mark.parametrize("target, field", [(KeptFlops, "ratio"), (KeptParams, "ratio"),
                                           (Density, "density")])
def test_targets_outside_zero_one(target, field, bad):
  message = rf"{target.__name__}\.{field}={bad!r} is not a number in \(0, 1\]"
  with pytest.raises(ValueError, match=message):
    target(bad)


def test_density_is_not_a_structured_target():
  with pytest.raises(ValueError, match="Density targets are for unstructured masks"):
    plan.select(mlp(), HIDDEN_SCORES, target=Density(0.5))
  with pytest.raises(TypeError, match="target=0.5 is not a KeptFlops or KeptParams"):
    plan.select(mlp(), HIDDEN_SCORES, target=0.5)


@pytest.mark.parametrize("kwargs, message", [
    ({"scope": "layer"}, r"scope='layer' is not supported; accepted: \['global', 'local', 'uniform'\]"),
    ({"max_ratio": 1.5}, r"max_ratio=1.5 is not a number in \[0, 1\]"),
    ({"round_to": 0}, "round_to=0 is not None or an integer >= 1"),
    ({"min_channels": 0}, "min_channels=0 is not an integer >= 1"),
    ({"already_removed": {"hidden": [3]}},
     r"already_removed\['hidden'\] holds indices outside \[0, 3\): \[3\]"),
    ({"already_removed": {"other": [0]}}, r"already_removed names groups \['other'\]"),
    ({"already_removed": {"hidden": [0, 1, 2]}}, "removes the whole group"),
])
def test_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    plan.select(mlp(), HIDDEN_SCORES, target=KeptFlops(0.5), **kwargs)


def test_bad_group_scores():
  with pytest.raises(ValueError, match=r"missing groups \['hidden'\], unknown groups \['hiden'\]"):
    plan.select(mlp(), {"hiden": [1, 2, 3]}, target=KeptFlops(0.5))
  with pytest.raises(ValueError, match=r"group_scores\['hidden'\] has shape \(2,\); the group has"):
    plan.select(mlp(), {"hidden": [1, 2]}, target=KeptFlops(0.5))
  with pytest.raises(FloatingPointError, match="group_scores: 1 of 3 values of 'hidden'"):
    plan.select(mlp(), {"hidden": [1, np.nan, 2]}, target=KeptFlops(0.5))


def test_max_ratio_caps_every_group():
  scores = {"a": np.arange(20) * 1e-3, "b": 1 + np.arange(20) * 1e-3}  # every a below every b
  p = plan.select(two_groups(20, 20), scores, target=KeptFlops(0.65), max_ratio=0.4)
  assert p.kept_widths == {"a": 12, "b": 14}  # a stops at 40% removed; b takes the rest
  assert p.removed["a"] == tuple(range(8))


def test_never_a_whole_group():
  scores = {"a": [0.0, 0.0, 0.0, 0.0], "b": [1.0, 2.0, 3.0, 4.0]}
  p = plan.select(two_groups(), scores, target=KeptFlops(0.25), max_ratio=1.0)
  assert p.kept_widths == {"a": 1, "b": 1}
  p = plan.select(two_groups(), scores, target=KeptFlops(0.5), max_ratio=1.0, min_channels=2)
  assert p.kept_widths == {"a": 2, "b": 2}


def test_unreachable_target_names_the_best_ratio():
  with pytest.raises(ValueError, match=r"KeptFlops\(ratio=0.1\) cannot be reached.*is 0.25"):
    plan.select(two_groups(), {"a": [1] * 4, "b": [1] * 4}, target=KeptFlops(0.1), max_ratio=0.75)


def test_round_to_keeps_multiples():
  structure = two_groups(8, 6)
  scores = {"a": np.arange(8.0), "b": 10 + np.arange(6.0)}
  p = plan.select(structure, scores, target=KeptFlops(0.8), round_to=4)  # 10(a + b) <= 112
  assert p.kept_widths == {"a": 4, "b": 6}  # a rounds to 4, untouched b keeps 6
  assert p.removed["a"] == (0, 1, 2, 3)
  p = plan.select(structure, scores, target=KeptFlops(0.6), round_to=4)  # a + b <= 8.4
  assert p.kept_widths == {"a": 4, "b": 4} and p.removed["b"] == (0, 1)
  with pytest.raises(ValueError, match="round_to=4.*is 0.5714"):  # 4 + 4 of 14
    plan.select(structure, scores, target=KeptFlops(0.5), round_to=4)


def test_global_versus_local():
  scores = {"a": [0.1, 0.2, 0.3, 0.4], "b": [0.5, 0.6, 0.7, 0.8]}
  global_plan = plan.select(two_groups(), scores, target=KeptFlops(0.75))
  assert global_plan.removed == {"a": (0, 1), "b": ()}
  local_plan = plan.select(two_groups(), scores, target=KeptFlops(0.75), scope="local")
  assert local_plan.removed == {"a": (0,), "b": (0,)}


def test_local_removes_the_same_fraction_everywhere():
  # Sizes 4 and 8: at a fraction f every group removes floor(f * size) of its indices.
  structure = two_groups(4, 8)
  scores = {"a": np.arange(4.0), "b": np.arange(8.0)}
  for ratio, fraction in ((0.9, 2 / 8), (0.7, 3 / 8), (0.5, 4 / 8)):
    p = plan.select(structure, scores, target=KeptFlops(ratio), scope="local")
    assert p.removed == {"a": tuple(range(int(fraction * 4))), "b": tuple(range(int(fraction * 8)))}
    assert p.predicted.macs <= ratio * 120


def test_schedules():
  assert plan.exponential_schedule(0.25, 2) == pytest.approx((0.5, 0.25))
  assert plan.exponential_schedule(0.14, 50)[-1] == 0.14
  assert plan.linear_schedule(0.4, 3) == pytest.approx((0.8, 0.6, 0.4))
  assert plan.linear_schedule(0.14, 50)[-1] == 0.14
  with pytest.raises(ValueError, match=r"target_ratio=0 is not a number in \(0, 1\]"):
    plan.exponential_schedule(0, 5)
  with pytest.raises(ValueError, match="steps=0 is not an integer >= 1"):
    plan.linear_schedule(0.5, 0)


@pytest.mark.parametrize("scope", plan.SCOPES)
def test_schedule_steps_extend_earlier_removals(scope):
  structure = two_groups(10, 10)
  rng = np.random.default_rng(0)
  removed, dense = None, structure.cost().macs
  for ratio in plan.exponential_schedule(0.2, 4):
    scores = {"a": rng.random(10), "b": rng.random(10)}
    if removed:  # already removed channels now score highest: they must stay removed anyway
      for name, idx in removed.items():
        scores[name][list(idx)] = 10.0
    p = plan.select(structure, scores, target=KeptFlops(ratio), scope=scope,
                    already_removed=removed)
    assert p.predicted.macs <= ratio * dense
    if removed:
      assert all(set(removed[n]) <= set(p.removed[n]) for n in removed)
    removed = p.removed
  assert sum(map(len, removed.values())) == 16


def test_plan_for_another_structure():
  p = plan.select(mlp(), HIDDEN_SCORES, target=KeptFlops(0.5))
  p.check_matches(mlp())
  with pytest.raises(ValueError, match="group 'hidden' has size 4, the plan's 3"):
    p.check_matches(mlp(hidden=4))
  with pytest.raises(ValueError, match=r"its group 'hidden' is missing; group 'a' is not in"):
    p.check_matches(two_groups())
  renamed = Structure((hidden_group("hidden", 3, "dense1", "dense2"),), (), ())
  with pytest.raises(ValueError, match="same group names and sizes, different members"):
    p.check_matches(renamed)


def test_json_round_trip():
  p = plan.select(two_groups(), {"a": [0.1, 0.2, 0.3, 0.4], "b": [0.5] * 4},
                  target=KeptParams(0.6))
  again = plan.Plan.from_json(p.to_json())
  assert again == p and again.removed == {"a": (0, 1, 2), "b": (0,)}  # a keeps min_channels
  with pytest.raises(ValueError, match="not the JSON of a Plan"):
    plan.Plan.from_json('{"removed": {}}')


def test_plans_are_read_only():
  p = plan.select(mlp(), HIDDEN_SCORES, target=KeptFlops(0.5))
  with pytest.raises(TypeError):
    p.removed["hidden"] = ()


def layered(sizes=(4, 4), prefix="layers"):
  """One 10-MAC-per-index group per layer, named like a model's layers ('layers/0/mlp@1')."""
  groups = tuple(hidden_group(f"{prefix}/{i}/mlp@1", size, f"{prefix}/{i}/in", f"{prefix}/{i}/out")
                 for i, size in enumerate(sizes))
  terms = tuple(Term(g.name, 10, (g.name,)) for g in groups)
  return Structure(groups, mac_terms=terms, param_terms=terms)


def test_family_names_a_group_in_every_layer():
  assert plan.family("layers/3/mlp/gate_proj/kernel@1") == "layers/*/mlp/gate_proj/kernel@1"
  assert plan.family("blocks/10/attn/q_proj/kernel@1.1") == "blocks/*/attn/q_proj/kernel@1.1"
  assert plan.family("conv1/kernel@3") == "conv1/kernel@3"


def test_uniform_removes_the_same_count_from_every_layer():
  # Global would take all four lowest scores from layer 0; uniform takes two from each layer,
  # each layer its own lowest, ranked by the mean of the k-th lowest scores.
  structure = layered()
  scores = {"layers/0/mlp@1": [0.1, 0.2, 0.3, 0.4], "layers/1/mlp@1": [0.9, 0.5, 0.8, 0.7]}
  global_plan = plan.select(structure, scores, target=KeptFlops(0.5))
  assert global_plan.kept_widths == {"layers/0/mlp@1": 1, "layers/1/mlp@1": 3}
  p = plan.select(structure, scores, target=KeptFlops(0.5), scope="uniform")
  assert p.removed == {"layers/0/mlp@1": (0, 1), "layers/1/mlp@1": (1, 3)}
  # Whole slices only: 0.7 needs 2.4 removals, so 2 slices (4 indices) go.
  p = plan.select(structure, scores, target=KeptFlops(0.7), scope="uniform")
  assert p.kept_widths == {"layers/0/mlp@1": 2, "layers/1/mlp@1": 2}


def test_uniform_ranks_families_by_their_mean_score():
  structure = Structure(layered().groups + layered(prefix="heads").groups,
                        mac_terms=layered().mac_terms + layered(prefix="heads").mac_terms,
                        param_terms=layered().param_terms + layered(prefix="heads").param_terms)
  scores = {"layers/0/mlp@1": [1.0, 2, 3, 4], "layers/1/mlp@1": [1.0, 2, 3, 4],
            "heads/0/mlp@1": [0.0, 5, 6, 7], "heads/1/mlp@1": [3.0, 5, 6, 7]}
  p = plan.select(structure, scores, target=KeptFlops(0.625), scope="uniform")
  # Three slices of two indices: layers (mean 1), heads (mean 1.5), layers (mean 2).
  assert p.kept_widths == {"layers/0/mlp@1": 2, "layers/1/mlp@1": 2, "heads/0/mlp@1": 3,
                           "heads/1/mlp@1": 3}


def test_frozen_groups_lose_nothing():
  scores = {"a": [0.1, 0.2, 0.3, 0.4], "b": [0.5, 0.6, 0.7, 0.8]}
  p = plan.select(two_groups(), scores, target=KeptFlops(0.75), frozen=("a",))
  assert p.removed == {"a": (), "b": (0, 1)}
  with pytest.raises(ValueError, match=r"frozen names \['c'\] are not groups"):
    plan.select(two_groups(), scores, target=KeptFlops(0.75), frozen=("c",))
  with pytest.raises(TypeError, match="collection of group names"):
    plan.select(two_groups(), scores, target=KeptFlops(0.75), frozen="a")
  with pytest.raises(ValueError, match="cannot be reached"):
    plan.select(two_groups(), scores, target=KeptFlops(0.4), frozen=("a",))
