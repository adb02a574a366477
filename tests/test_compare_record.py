"""The recorded comparison of criteria: its tables come from its raw runs, paired per seed."""

import copy
import glob
import json
import os
import re

import pytest

import clis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD = os.path.join(ROOT, "experiments", "results", "compare_fashion_mnist")


def _script():
  return clis.script("summarize_compare")


def _runs_by_model() -> dict[str, list[dict]]:
  runs = {}
  for path in sorted(glob.glob(os.path.join(RECORD, "*.json"))):
    with open(path) as f:
      results = json.load(f)
    runs.setdefault(_script().model_label(results["config"]), []).append(results)
  return runs


def test_recorded_tables_are_what_the_raw_runs_give():
  script = _script()
  with open(os.path.join(RECORD, "summary.md")) as f:
    recorded = f.read()
  for label, runs in _runs_by_model().items():
    text, by_metric = script.summarize(runs, "magnitude")
    assert f"### {label}\n\n{text}" in recorded
    assert all(row["n"] == 5 for rows in by_metric.values() for row in rows)
  assert len(re.findall(r"^### ", recorded, re.M)) == 3


def test_runs_of_one_seed_from_different_dense_models_are_refused():
  runs = _runs_by_model()["vgg11_cifar(width=16)"]
  extra = copy.deepcopy(next(r for r in runs if r["config"]["seed"] == 0))
  extra["dense"]["accuracy"] += 0.01
  with pytest.raises(ValueError, match="two runs of seed 0 start from different dense models"):
    _script().summarize(runs + [extra], "magnitude")


def test_curves_against_the_fine_tuning_budget(tmp_path):
  def run(seed, shift):
    row = lambda c, d: {"criterion": c, "target": 0.5, "accuracy_after_pruning": 0.3 + d,
                        "accuracy_at_steps": {"100": 0.7 + d, "3000": 0.8 + d}}
    return {"config": {"seed": seed}, "pruned": [row("magnitude", shift),
                                                 row("oba", shift + 0.01 * (seed + 1))]}
  runs = [run(0, 0.0), run(1, 0.05), run(2, -0.02)]
  text, table = _script().summarize_curves(runs, "magnitude")
  assert "| criterion | b = 0 | b = 100 | b = 3000 |" in text
  assert "| magnitude | 0.310 | 0.710 | 0.810 |" in text
  assert {r["budget"] for r in table} == {0, 100, 3000}
  assert all(r["difference"] == pytest.approx(0.02) and r["n"] == 3 for r in table)
  _script().plot_curves("m", table, "magnitude", str(tmp_path / "curves.png"))
  assert (tmp_path / "curves.png").stat().st_size > 0
