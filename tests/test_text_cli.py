"""The text-pruning CLIs in smoke mode (tiny random models, no downloads): results, plot, resume."""

import json
import os
import subprocess
import sys

import numpy as np
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
  with pytest.raises(ValueError, match="DATAxMODEL"):
    _run(smollm2_wordnet, tmp_path / "d", mesh="2by4")
  with pytest.raises(ValueError, match="must be 1, the number of devices"):
    _run(smollm2_wordnet, tmp_path / "e", mesh="2x4")
  with pytest.raises(ValueError, match="one example at a time"):
    _run(minilm_wordnet, tmp_path / "f", criteria="obd_fisher")
  for name in "adef":
    assert not os.path.exists(tmp_path / name)


def test_smoke_run_on_a_2d_mesh_scores_like_one_device(tmp_path):
  # The pod recipe of the README: 8 devices as data 2 x model 4, parameters split over "model".
  from test_estimate import worker_env
  runs = {}
  for name, mesh, devices in (("one", "", 1), ("pod", "2x4", 8)):
    workdir = tmp_path / name
    subprocess.run(
        [sys.executable, "-m", "oba_jax.experiments.smollm2_wordnet", f"--workdir={workdir}",
         "--config.smoke=True", "--config.progress=False", f"--config.mesh={mesh}",
         "--config.criteria=taylor,obd_fisher,oba"],
        env=worker_env(devices), check=True, timeout=600, capture_output=True)
    runs[name] = {f: np.load(workdir / "scores" / f) for f in os.listdir(workdir / "scores")}
  assert runs["one"].keys() == runs["pod"].keys() and len(runs["one"]) == 3
  for f, one in runs["one"].items():
    for group in one.files:
      if group != "__seconds__":
        # float32 sums in another order: relative to the group's largest score.
        np.testing.assert_allclose(runs["pod"][f][group], one[group], rtol=1e-4,
                                   atol=1e-5 * np.abs(one[group]).max(), err_msg=f"{f} {group}")
