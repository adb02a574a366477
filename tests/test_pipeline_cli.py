"""The paper's experiment CLIs end to end in smoke mode (generated data), and their bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
import tensorflow_datasets as tfds

import clis
from oba_jax import models, prune, weights
from oba_jax.experiments import (cli, compare_criteria, pipeline, resnet32_cifar,
                                 resnet50_imagenet, unstructured, vgg19_cifar, vit_b16_imagenet)

CLIS = (vgg19_cifar, resnet32_cifar, unstructured, resnet50_imagenet, vit_b16_imagenet,
        compare_criteria)


@pytest.fixture(scope="module", autouse=True)
def mock_tfds():
  """cifar10/100 and imagenet2012 as 16 random examples of the real shapes."""
  with tfds.testing.mock_data(num_examples=16):
    yield


def run(module, workdir, **overrides) -> dict:
  results = pipeline.run(clis.smoke_config(module, **overrides), str(workdir))
  with open(os.path.join(workdir, pipeline.RESULTS_FILE)) as f:
    assert json.load(f)["pruned"] == json.loads(json.dumps(results["pruned"]))
  return results


def check_consistent(results, criteria, targets):
  """Every criterion and target has a row whose pruned model is what the results claim."""
  rows = results["pruned"]
  assert [(r["criterion"], r["target"]) for r in rows] == [(c, t) for c in criteria
                                                           for t in targets]
  for row in rows:
    if results["mode"] == "unstructured":  # the kept count is rounded up to a whole weight
      assert row["density"] == pytest.approx(row["target"], abs=1e-4)
    else:
      assert row["kept_macs"] <= row["target"]
    assert row["max_abs_pruned_weight"] == 0.0  # pruned weights stayed exactly zero
    assert row["compacted_accuracy"] == row["accuracy"]  # compaction changes nothing
    assert 0 <= row["accuracy_after_pruning"] <= 1 and row["inference_seconds"] > 0
    assert row["prune_seconds"] > 0 and row["finetune_seconds"] >= 0


@pytest.fixture(scope="module")
def resnet32_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("resnet32")
  return workdir, run(resnet32_cifar, workdir, criteria="oba", targets=(0.6, 0.4))


def test_resnet32_iterative_prunes_each_target_from_the_last(resnet32_run):
  workdir, results = resnet32_run
  check_consistent(results, ["oba"], [0.6, 0.4])
  assert results["pruned"][1]["macs"] < results["pruned"][0]["macs"] < results["dense"]["macs"]
  assert os.path.isfile(os.path.join(workdir, pipeline.PLOT_FILE))
  assert sorted(os.listdir(os.path.join(workdir, "oba"))) == ["0.4", "0.6"]  # fine-tune runs


def test_rerun_resumes_and_another_config_is_refused_untouched(resnet32_run):
  workdir, results = resnet32_run
  again = run(resnet32_cifar, workdir, criteria="oba", targets=(0.6, 0.4))  # restores each stage
  assert [r["accuracy"] for r in again["pruned"]] == [r["accuracy"] for r in results["pruned"]]
  before = {name: os.path.getmtime(os.path.join(workdir, name)) for name in os.listdir(workdir)}
  with pytest.raises(ValueError, match=r"another configuration \(differs in \['seed'\]\)"):
    pipeline.run(clis.smoke_config(resnet32_cifar, criteria="oba", targets=(0.6, 0.4), seed=1),
                 str(workdir))
  assert {n: os.path.getmtime(os.path.join(workdir, n)) for n in os.listdir(workdir)} == before


def test_finished_cells_carry_a_run_over_to_a_fresh_workdir_with_the_same_pairing(tmp_path,
                                                                                   capsys):
  """A run continued in a new workdir from its finished cells alone (another session, another
  machine) ends with the rows of a run never interrupted: a one-shot target after a reused one
  reads the same importance batches. A cell of other settings or another dense model is not
  reused."""
  criteria, targets = "magnitude,taylor", (0.5, 0.3)
  whole = run(compare_criteria, tmp_path / "whole", criteria=criteria, targets=targets)
  cells = tmp_path / "whole" / "cells"
  assert sorted(os.listdir(cells)) == ["magnitude", "taylor"]
  again = tmp_path / "again" / "cells"
  for name in ("magnitude/0.5.json", "magnitude/0.3.json", "taylor/0.5.json"):
    os.makedirs(again / os.path.dirname(name), exist_ok=True)
    with open(cells / name) as f:
      cell = json.load(f)
    if name == "magnitude/0.3.json":
      cell["key"] = "a cell of another dense model"
    with open(again / name, "w") as f:
      json.dump(cell, f)
  capsys.readouterr()
  resumed = run(compare_criteria, tmp_path / "again", criteria=criteria, targets=targets)
  assert resumed["cells_reused"] == 2 and whole["cells_reused"] == 0
  said = capsys.readouterr().out
  assert "magnitude at 0.3: the cell in" in said and "computing it again" in said
  assert "pruning taylor to kept FLOPs 0.3" in said and "taylor to kept FLOPs 0.5" not in said
  same = ("criterion", "target", "accuracy", "accuracy_after_pruning", "loss_after_pruning",
          "macs", "params", "step_kept_macs", "steps")
  assert ([{k: r[k] for k in same} for r in resumed["pruned"]]
          == [{k: r[k] for k in same} for r in whole["pruned"]])
  assert not os.path.exists(tmp_path / "again" / "taylor" / "0.5")  # reused, not fine-tuned


def test_vgg19_one_shot(tmp_path):
  results = run(vgg19_cifar, tmp_path, criteria="magnitude", targets=(0.5, 0.3))
  check_consistent(results, ["magnitude"], [0.5, 0.3])
  assert os.path.isfile(tmp_path / pipeline.PLOT_FILE)


def test_a_paper_cli_scores_as_the_official_pipeline_by_default(tmp_path):
  """OBA's own quantity, batch-statistics BatchNorm, the paper's reduction; recorded."""
  results = run(vgg19_cifar, tmp_path, targets=(0.5,))  # smoke: the first two criteria
  check_consistent(results, ["oba_bilinear", "magnitude"], [0.5])
  with open(tmp_path / pipeline.RESULTS_FILE) as f:
    recorded = json.load(f)["importance"]
  assert recorded == {"criteria": ["oba_bilinear", "magnitude"], "batchnorm": "train",
                      "recalibration_batches": 2, "batches_per_step": 2, "batch_size": 8,
                      "augment": True, "reduction": "paper", "steps": 2, "per_criterion": {},
                      "procedure": "official", "schedule": "auto", "ranking": "score",
                      "scope": "global"}
  for row in results["pruned"]:  # the official rule stops at the first step meeting the target
    assert row["steps"] == len(row["step_kept_macs"]) <= 2
    assert row["step_kept_macs"][-1] <= row["target"] < min(row["step_kept_macs"][:-1] or [1])
  config = vgg19_cifar.get_config()
  assert (config.prune.importance_batches, config.prune.importance_batch_size,
          config.prune.steps) == (200, 64, 50)  # smoke mode shrank them to 2, 8 and 2
  assert results["compilations"]["total"] > 0  # counted and recorded
  # Compiled once for the one criterion that reads data (oba_bilinear), not once per step.
  assert results["compilations"]["jit(score_step)"] == 1
  # Where the time went: every part measured, none larger than the whole.
  parts = results["breakdown"]["seconds"]
  assert set(parts) == {"dense", "score", "plan", "finetune", "evaluate", "compile"}
  assert all(0 < v for v in parts.values())
  assert sum(v for k, v in parts.items() if k != "compile") <= results["wall_seconds"]
  assert all(np.isfinite(r["loss_after_pruning"]) for r in results["pruned"])


def test_unstructured_sweep_from_an_orbax_checkpoint(tmp_path, resnet32_run):
  dense_dir = str(resnet32_run[0] / "dense")
  results = run(unstructured, tmp_path, model="resnet32_cifar", dataset="cifar100",
                criteria="magnitude", targets=(0.5, 0.2), **{"init.checkpoint": dense_dir})
  check_consistent(results, ["magnitude"], [0.5, 0.2])
  assert results["dense"]["accuracy"] == resnet32_run[1]["dense"]["accuracy"]
  assert not os.path.exists(tmp_path / "dense")  # restored, not trained
  assert all(r["macs"] == results["dense"]["macs"] for r in results["pruned"])  # masks only


def test_checkpoint_of_another_model_is_refused(tmp_path, resnet32_run):
  dense_dir = str(resnet32_run[0] / "dense")
  with pytest.raises(ValueError, match=r"does not fit the model: 'classifier/bias' has shape"):
    run(unstructured, tmp_path, model="resnet32_cifar", **{"init.checkpoint": dense_dir})


def test_vgg19_from_the_paper_codes_state_dict(tmp_path):
  """A dense model in the official code's layout (format "official", the CIFAR default)."""
  config = clis.smoke_config(vgg19_cifar, criteria="magnitude")
  model = models.create("vgg19_cifar", seed=7, in_channels=3, num_classes=10,
                        **config.smoke_model_kwargs.to_dict())
  path = str(tmp_path / "vgg19.safetensors")
  safetensors.numpy.save_file(weights.export(model, "official"), path)
  results = run(vgg19_cifar, tmp_path / "run", criteria="magnitude", targets=(0.5,),
                **{"init.weights": path})
  check_consistent(results, ["magnitude"], [0.5])
  assert not os.path.exists(tmp_path / "run" / "dense")  # loaded, not trained


@pytest.mark.slow
def test_resnet50_from_torchvision_weights(tmp_path):
  config = clis.smoke_config(resnet50_imagenet, criteria="magnitude")
  model = models.create("resnet50", num_classes=1000, **config.smoke_model_kwargs.to_dict())
  path = str(tmp_path / "resnet50.safetensors")
  safetensors.numpy.save_file(weights.export(model), path)
  results = run(resnet50_imagenet, tmp_path / "run", criteria="magnitude",
                **{"init.weights": path})
  check_consistent(results, ["magnitude"], [0.51])


@pytest.mark.slow
def test_vit_b16_keeps_the_patch_embedding(tmp_path):
  results = run(vit_b16_imagenet, tmp_path, criteria="magnitude")
  check_consistent(results, ["magnitude"], [0.51])
  assert results["pruned"][0]["macs"] < results["dense"]["macs"]


def test_a_target_the_official_rule_cannot_reach_is_recorded_and_the_run_goes_on(
    tmp_path, monkeypatch):
  one_shot = prune.one_shot

  def unreachable_for_taylor(model, example, batches, config, **kw):
    if config.criterion == "taylor":
      raise prune.UnreachableTarget("procedure='official' did not reach KeptFlops(0.5)")
    return one_shot(model, example, batches, config, **kw)

  monkeypatch.setattr(prune, "one_shot", unreachable_for_taylor)
  results = run(compare_criteria, tmp_path, criteria="magnitude,taylor", targets=(0.5,))
  check_consistent(results, ["magnitude"], [0.5])
  assert results["unreachable"] == [{"criterion": "taylor", "target": 0.5,
                                     "reason": "procedure='official' did not reach "
                                               "KeptFlops(0.5)"}]


def test_one_run_compares_a_criterion_under_other_settings(tmp_path):
  """"oba@sum" and "oba_bilinear@train" are criteria of their own in the paired run."""
  entries = ["magnitude", "oba", "oba@sum", "oba_bilinear@eval"]
  results = run(compare_criteria, tmp_path, criteria=",".join(entries), targets=(0.5,))
  check_consistent(results, entries, [0.5])
  assert results["importance"]["criteria"] == entries
  assert results["importance"]["per_criterion"] == {
      "oba@sum": {"reduction": "sum", "batchnorm": "train", "procedure": "official",
                  "ranking": "score"},
      "oba_bilinear@eval": {"reduction": "paper", "batchnorm": "eval",
                            "procedure": "official", "ranking": "score"}}
  assert os.path.isdir(tmp_path / "oba@sum" / "0.5")


def test_fine_tuning_is_evaluated_at_the_budgets_asked_for(tmp_path):
  results = run(compare_criteria, tmp_path, criteria="magnitude,taylor@per_cost@library",
                targets=(0.5,), **{"finetune.eval_at": (1, 2)})
  check_consistent(results, ["magnitude", "taylor@per_cost@library"], [0.5])
  for row in results["pruned"]:  # smoke fine-tuning takes 3 steps: evaluated at 1, 2 and 3
    assert list(row["accuracy_at_steps"]) == ["1", "2", "3"]
    assert row["accuracy_at_steps"]["3"] == row["accuracy"]  # the end is the tuned model's
  assert results["importance"]["per_criterion"]["taylor@per_cost@library"] == {
      "reduction": "paper", "batchnorm": "train", "procedure": "library", "ranking": "per_cost"}


@pytest.mark.parametrize("overrides, error, message", [
    (dict(model="vgg7"), ValueError, r"model='vgg7' is not supported; accepted: \["),
    (dict(criteria="oba,hessian"), ValueError, r"unknown \['hessian'\]; accepted: \["),
    (dict(criteria="oba@max"), ValueError,
     r"'oba@max' has option 'max'; accepted: a batchnorm \['train', 'eval'\], a reduction"),
    (dict(criteria="oba,oba"), ValueError, r"names a criterion twice"),
    (dict(mode="unstructured", criteria="oba@sum", targets=(0.5,)), ValueError,
     r"'oba@sum' has option 'sum'.* \(all but the BatchNorm mode in structured modes only; "
     r"mode='unstructured'\)"),
    (dict(mode="greedy"), ValueError, r"mode='greedy' is not supported"),
    (dict(targets=(1.5,)), ValueError, r"target=1.5 .* must be a kept-FLOPs ratio in \(0, 1\]"),
    (dict(targets=(0.0,)), ValueError, r"target=0.0 .* in \(0, 1\]"),
    (dict(mode="iterative", targets=(0.3, 0.5)), ValueError, r"strictly decreasing"),
    (dict(data_dir="/no/such/dir"), FileNotFoundError, r"data_dir '/no/such/dir' is not a"),
    ({"init.weights": "/no/such.pth"}, FileNotFoundError, r"init.weights '/no/such.pth'"),
])
def test_bad_config_fails_before_any_work(tmp_path, overrides, error, message):
  with pytest.raises(error, match=message):
    pipeline.run(clis.smoke_config(vgg19_cifar, **overrides), str(tmp_path))
  assert os.listdir(tmp_path) == []


def test_unstructured_targets_are_densities(tmp_path):
  with pytest.raises(ValueError, match=r"target=2 .* must be a density in \(0, 1\]"):
    pipeline.run(clis.smoke_config(unstructured, targets=(0.5, 2)), str(tmp_path))


def test_imagenet_needs_the_dense_weights(tmp_path):
  config = resnet50_imagenet.get_config()
  with pytest.raises(ValueError, match=r"dense.epochs=0: give the dense model as init.weights"):
    pipeline.run(config, str(tmp_path))
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("module", CLIS, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_cli_reports_bad_input_and_writes_nothing(tmp_path, module):
  out = subprocess.run(
      [sys.executable, "-m", module.__name__, f"--workdir={tmp_path}", "--config.criteria=obs"],
      capture_output=True, text=True, timeout=120)
  assert out.returncode != 0 and "unknown ['obs']" in out.stderr
  assert os.listdir(tmp_path) == []
  assert not os.path.exists(os.path.join(tmp_path, cli.CONFIG_FILE))


def _cli_results(workdir, devices: int) -> dict:
  """Runs the resnet32_cifar smoke on real Fashion-MNIST in a subprocess with `devices` CPUs."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  subprocess.run(
      [sys.executable, "-m", "oba_jax.experiments.resnet32_cifar", f"--workdir={workdir}",
       "--config.smoke=True", "--config.progress=False", "--config.dataset=fashion_mnist",
       "--config.mode=one_shot", "--config.targets=0.5,0.3", "--config.criteria=magnitude",
       "--config.data_format=tfds"],  # the real data, not smoke mode's generated data
      env=env, check=True, timeout=600, capture_output=True)
  with open(os.path.join(workdir, pipeline.RESULTS_FILE)) as f:
    return json.load(f)


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist")
                    and "OBA_FASHION_MNIST_DIR" not in os.environ,
                    reason="Fashion-MNIST IDX files absent: apt-get install dataset-fashion-mnist")
def test_eight_devices_give_the_same_metrics(tmp_path):
  """The smoke run data-parallel over 8 virtual devices matches 1 device.

  Tolerance: accuracies within one test example (1/32), losses within 1e-3
  relative, counts exact. The smoke recipe's 4 dense steps at learning rate 0.1
  from random weights amplify float32 summation-order differences to ~4e-4 in
  the dense loss (the pruned rows agree to ~2e-5). Magnitude scores do not depend
  on summation order; see tests/test_experiments.py for why second-order plans
  are not compared.
  """
  one, eight = _cli_results(tmp_path / "one", 1), _cli_results(tmp_path / "eight", 8)
  for a, b in zip([one["dense"], *one["pruned"]], [eight["dense"], *eight["pruned"]]):
    assert (a["macs"], a["params"]) == (b["macs"], b["params"])
    for key in ("accuracy", "accuracy_after_pruning", "compacted_accuracy"):
      if key in a:
        assert abs(a[key] - b[key]) <= 1 / 32, key
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)


def test_smoke_mode_sets_only_the_model_arguments_the_model_takes():
  """compare_criteria's smoke width serves its CNNs; a ViT keeps its own sizes and builds."""
  from oba_jax.experiments import paper_config
  vit = dict(image_size=28, patch_size=7, hidden_dim=16, num_layers=1, num_heads=2, mlp_dim=32)
  config = clis.smoke_config(compare_criteria, model="vit")
  config.model_kwargs.update(vit)
  smoked = paper_config.smoke_config(config)
  assert smoked.model_kwargs.to_dict() == vit
  models.check("vit", **smoked.model_kwargs.to_dict())
  cnn = paper_config.smoke_config(clis.smoke_config(compare_criteria, model="vgg11_cifar"))
  assert cnn.model_kwargs.width == 4
