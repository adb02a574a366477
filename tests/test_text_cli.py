"""The text-pruning CLIs in smoke mode (tiny random models, no downloads): results, plot, resume."""

import json
import os

import pytest

from oba_jax.experiments import minilm_wordnet, smollm2_wordnet


def _run(module, workdir, **overrides):
  config = module.get_config()
  config.smoke = True
  config.progress = False
  config.criteria = "random,activation_norm,oba"
  for key, value in overrides.items():
    config[key] = value
  return module.run(config, str(workdir))


@pytest.mark.parametrize("module,metric", [(smollm2_wordnet, "perplexity"),
                                           (minilm_wordnet, "recall_at_1")])
def test_smoke_run_writes_results_and_resumes(tmp_path, module, metric):
  results = _run(module, tmp_path)
  assert results["metric"] == metric
  assert {r["criterion"] for r in results["runs"]} == {"random", "activation_norm", "oba"}
  for r in results["runs"]:
    assert r["kept_params"] <= r["target"] + 1e-9
    assert r["max_abs_compact_minus_masked"] < 1e-4  # the compacted model is the masked one
  assert os.path.exists(tmp_path / f"{metric}.png")
  with open(tmp_path / "results.json") as f:
    assert json.load(f)["dense"][metric] == results["dense"][metric]
  stamps = {p: os.path.getmtime(tmp_path / "runs" / p) for p in os.listdir(tmp_path / "runs")}
  again = _run(module, tmp_path)  # resumes: nothing recomputed
  assert {p: os.path.getmtime(tmp_path / "runs" / p) for p in stamps} == stamps
  assert [r[metric] for r in again["runs"]] == [r[metric] for r in results["runs"]]


def test_bad_settings_fail_before_work(tmp_path):
  with pytest.raises(ValueError, match="unknown"):
    _run(smollm2_wordnet, tmp_path / "a", criteria="oba,nonsense")
  with pytest.raises(ValueError, match="targets"):
    _run(minilm_wordnet, tmp_path / "b", targets="0.9,1.5")
  with pytest.raises(ValueError, match="prune"):
    _run(smollm2_wordnet, tmp_path / "c", prune="embeddings")
  assert not os.path.exists(tmp_path / "a")
