"""A newcomer's first hour: every CLI runs in smoke mode with no data at all; --help lists every
setting; missing data and misspelt keys are short errors; the output says what runs;
scores.accumulate says when the batches run out.

The smoke runs are subprocesses, as a user starts them, with no TFDS data and no
Fashion-MNIST files. They share the persistent compilation cache of the test session. How
long they take is a benchmark's business, not a test's (`experiments/bench_smoke.py`: CPU
and wall seconds of each against the one-minute budget).
"""

import os
import subprocess
import sys
import warnings

import jax.numpy as jnp
import pytest

from oba_jax import estimate
from oba_jax.experiments import cli

CLIS = ("quickstart", "vgg19_cifar", "resnet32_cifar", "unstructured", "resnet50_imagenet",
        "vit_b16_imagenet", "oracle")


@pytest.fixture(scope="module")
def no_data(tmp_path_factory):
  """Environment of a machine without any dataset: empty TFDS and Fashion-MNIST dirs."""
  empty = tmp_path_factory.mktemp("no_data")
  return dict(os.environ, TFDS_DATA_DIR=str(empty), OBA_FASHION_MNIST_DIR=str(empty),
              JAX_PLATFORMS="cpu")


def run_cli(name, *args, env=None, timeout=600):
  """The finished process of `python -m oba_jax.experiments.<name> args`."""
  return subprocess.run([sys.executable, "-m", f"oba_jax.experiments.{name}", *args],
                        capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("name", CLIS)
def test_smoke_runs_without_data(name, no_data, tmp_path):
  out = run_cli(name, f"--workdir={tmp_path}", "--config.smoke=True", "--config.progress=False",
                env=no_data)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "data_format='synthetic'" in out.stdout  # said aloud by smoke mode
  assert os.path.isfile(tmp_path / "results.json")
  if name == "quickstart":  # a line per stage
    for line in ("dense training of resnet8_cifar (width 4): 10 steps", "scoring oba, step 2/2",
                 "fine-tuning magnitude: 5 steps", "evaluating taylor"):
      assert line in out.stdout
    again = run_cli(name, f"--workdir={tmp_path}", "--config.smoke=True",
                       "--config.progress=False", env=no_data)
    assert "dense training of resnet8_cifar (width 4): finished earlier (step 10), restored " \
           "from step 10" in again.stdout


@pytest.mark.parametrize("name", CLIS)
def test_help_lists_every_setting_with_its_default_and_meaning(name):
  out = run_cli(name, "--help", timeout=120)
  assert out.returncode == 0
  assert "--workdir" in out.stdout and "(no description)" not in out.stdout
  assert "--flagfile" not in out.stdout and "--logtostderr" not in out.stdout  # absl's
  module = __import__(f"oba_jax.experiments.{name}", fromlist=["get_config"])
  for key, _ in cli._flat_items(module.get_config().to_dict()):  # pylint: disable=protected-access
    assert f"--config.{key}=" in out.stdout, key


def test_quickstart_help_describes_criteria_and_target():
  out = run_cli("quickstart", "--help", timeout=120)
  lines = out.stdout.splitlines()
  for key, words in (("criteria", "oba_jax.criteria.CRITERIA"), ("target", "kept FLOPs")):
    index = next(i for i, line in enumerate(lines) if line.strip().startswith(f"--config.{key}="))
    assert words in lines[index + 1]


@pytest.mark.parametrize("name, layout", [("vgg19_cifar", "cifar-10-batches-py"),
                                          ("resnet32_cifar", "cifar-100-python"),
                                          ("resnet50_imagenet", "train/<class>/*.JPEG")])
def test_a_real_run_without_data_fails_in_two_lines(name, layout, no_data, tmp_path):
  weights = (tmp_path / "w.safetensors")
  weights.write_bytes(b"")  # the ImageNet jobs need weights; the data check comes first
  extra = [f"--config.init.weights={weights}"] if "imagenet" in name else []
  out = run_cli(name, f"--workdir={tmp_path / 'run'}", *extra, env=no_data, timeout=120)
  assert out.returncode == 2
  assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) <= 2
  for words in ("--config.data_dir", "--config.data_format", layout, "--config.smoke=True"):
    assert words in out.stderr
  assert not os.path.exists(tmp_path / "run" / cli.CONFIG_FILE)


def test_a_misspelt_key_names_the_closest_in_under_five_lines(tmp_path):
  out = run_cli("vgg19_cifar", f"--workdir={tmp_path}", "--config.prune.stepz=3", timeout=120)
  assert out.returncode == 2 and len(out.stderr.strip().splitlines()) < 5
  assert "Did you mean --config.prune.steps?" in out.stderr


def test_resumed_training_says_where_it_restarts(tmp_path, capsys):
  (tmp_path / "checkpoints" / "40").mkdir(parents=True)
  (tmp_path / "checkpoints" / "20").mkdir()
  cli.say_training("fine-tuning oba", str(tmp_path), 100)
  cli.say_training("dense training", str(tmp_path / "new"), 100)
  assert capsys.readouterr().out.splitlines() == [
      "fine-tuning oba: restored from step 40, 60 of 100 steps to go",
      "dense training: 100 steps"]


def test_accumulate_warns_when_the_batches_run_out():
  score = lambda params, batch: {"w": params["w"] * batch}
  params, batches = {"w": jnp.ones(2)}, [jnp.ones(2), 3 * jnp.ones(2)]
  with pytest.warns(RuntimeWarning, match=r"ran out after 2 of num_batches=5; .* mean over 2"):
    mean = estimate.accumulate(score, params, batches, num_batches=5)
  assert mean["w"].tolist() == [2.0, 2.0]
  with pytest.raises(ValueError, match="ran out after 2 of num_batches=5"):
    estimate.accumulate(score, params, batches, num_batches=5, strict=True)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    estimate.accumulate(score, params, batches, num_batches=2)  # exactly enough: silent
