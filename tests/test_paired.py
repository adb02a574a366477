"""Paired differences to a baseline: values, interval, significance, refusal of unpaired runs."""

import numpy as np
import pytest
from scipy import stats

from oba_jax.experiments import paired


def _rows(table):
  return [{"criterion": c, "target": t, "seed": s, "accuracy": v}
          for (c, t), by_seed in table.items() for s, v in by_seed.items()]


def test_paired_difference_and_its_t_interval():
  base = {0: 0.50, 1: 0.70, 2: 0.60, 3: 0.40}  # large seed-to-seed spread...
  better = {s: v + 0.02 + 0.001 * s for s, v in base.items()}  # ...but a steady +0.02
  noisy = {0: 0.55, 1: 0.62, 2: 0.64, 3: 0.38}
  rows = _rows({("magnitude", 0.5): base, ("oba", 0.5): better, ("taylor", 0.5): noisy})
  result = {r["criterion"]: r for r in paired.paired_differences(rows, "accuracy")}
  d = np.asarray([better[s] - base[s] for s in range(4)])
  half = stats.t.ppf(0.975, 3) * d.std(ddof=1) / 2
  assert result["oba"]["difference"] == pytest.approx(d.mean())
  assert (result["oba"]["low"], result["oba"]["high"]) == pytest.approx(
      (d.mean() - half, d.mean() + half))
  assert result["oba"]["significant"] and not result["taylor"]["significant"]
  assert result["oba"]["n"] == 4 and result["oba"]["baseline_mean"] == pytest.approx(0.55)
  table = paired.markdown(list(result.values()), "accuracy", "magnitude")
  assert "| oba | 0.5 | 4 |" in table and "yes, better" in table
  assert "yes, worse" in paired.markdown(list(result.values()), "loss", "magnitude",
                                         higher_is_better=False)
  wide = paired.wide_markdown(list(result.values()), "magnitude").splitlines()
  assert wide[0] == "| criterion | kept 0.5 |" and wide[2] == "| magnitude | 0.550 |"
  assert wide[3].startswith("| oba | **0.572 (+0.022 [") and wide[3].endswith("▲ |")
  assert wide[4].startswith("| taylor | 0.547 (-0.002 [") and "▲" not in wide[4]


def test_unpaired_runs_are_refused():
  rows = _rows({("magnitude", 0.5): {0: 0.5, 1: 0.6}, ("oba", 0.5): {0: 0.5, 2: 0.6}})
  with pytest.raises(ValueError, match=r"seeds \[0, 2\] and the baseline 'magnitude' on \[0, 1\]"):
    paired.paired_differences(rows, "accuracy")
  with pytest.raises(ValueError, match="baseline 'random' is not among"):
    paired.paired_differences(rows, "accuracy", baseline="random")
  with pytest.raises(ValueError, match="two rows"):
    paired.paired_differences(rows + rows[:1], "accuracy")


def test_a_criterion_missing_a_seed_is_compared_on_the_seeds_both_have_when_asked():
  """A target a step rule could not reach on one seed: that seed drops out, said aloud."""
  base = {0: 0.50, 1: 0.70, 2: 0.60}
  rows = _rows({("magnitude", 0.5): base, ("oba", 0.5): {0: 0.55, 2: 0.62},
                ("taylor", 0.5): {0: 0.4, 1: 0.6, 2: 0.5}})
  result = {r["criterion"]: r for r in paired.paired_differences(rows, "accuracy",
                                                                  missing_seeds=True)}
  assert result["oba"]["n"] == 2 and result["oba"]["difference"] == pytest.approx(0.035)
  assert result["oba"]["baseline_mean"] == pytest.approx(0.55)  # over seeds 0 and 2
  assert result["taylor"]["n"] == 3
  assert paired.missing(rows) == ["oba at 0.5: no row on seeds [1]"]
  wide = paired.wide_markdown(list(result.values()), "magnitude").splitlines()
  assert wide[2] == "| magnitude | 0.600 |"  # the baseline over all its seeds
  with pytest.raises(ValueError, match="not paired"):
    paired.paired_differences(rows, "accuracy")


def test_pipeline_rows_take_the_seed_of_each_run():
  results = [{"config": {"seed": s}, "pruned": [{"criterion": "oba", "target": 0.5,
                                                  "accuracy": 0.1 * s}]} for s in (3, 4)]
  assert [r["seed"] for r in paired.pipeline_rows(results)] == [3, 4]


def test_detectable_difference_and_budget_rows():
  base = {0: 0.50, 1: 0.70, 2: 0.60, 3: 0.40}
  other = {0: 0.52, 1: 0.69, 2: 0.63, 3: 0.40}
  rows = _rows({("magnitude", 0.5): base, ("oba", 0.5): other})
  (result,) = paired.paired_differences(rows, "accuracy")
  d = np.asarray([other[s] - base[s] for s in range(4)])
  error = d.std(ddof=1) / 2
  assert result["detectable"] == pytest.approx((stats.t.ppf(0.975, 3) + stats.t.ppf(0.8, 3))
                                               * error)
  assert result["detectable"] > result["high"] - result["difference"]  # more than the half-width
  row = {"criterion": "oba", "target": 0.5, "seed": 1, "accuracy_after_pruning": 0.3,
         "accuracy_at_steps": {"100": 0.7, "3000": 0.8}}
  assert [(r["budget"], r["accuracy"]) for r in paired.budget_rows([row])] == [
      (0, 0.3), (100, 0.7), (3000, 0.8)]
