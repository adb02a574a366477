"""train: the optimizer, fine-tuning with masks, exact resumption after SIGKILL, evaluation."""

import dataclasses
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import grain
import jax
import numpy as np
import optax
import pytest
from flax import nnx

import oba_jax
import train_worker
from oba_jax import masks, runs, runtime, scores, train
from oba_jax.evaluation import evaluate
from oba_jax.experiments import pipeline
from oba_jax.models import ResNetCIFAR

WORKER = train_worker.__file__


def worker_env(devices: int = 1) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def tree_snapshot(directory) -> dict[str, tuple[int, int]]:
  """{path: (size, mtime)} of every file and folder under `directory`."""
  snapshot = {}
  for root, folders, files in os.walk(directory):
    for name in folders + files:
      stat = os.stat(os.path.join(root, name))
      snapshot[os.path.join(root, name)] = (stat.st_size, stat.st_mtime_ns)
  return snapshot


def without_time(records: list[dict]) -> list[dict]:
  return [{key: value for key, value in r.items() if key != "time"} for r in records]


def assert_same_params(result: dict, reference: dict) -> None:
  assert result.keys() == reference.keys()
  for name in reference:
    np.testing.assert_array_equal(result[name], reference[name], err_msg=name)


@pytest.mark.parametrize(
    "fields, named",
    [
        (dict(), "steps"),
        (dict(steps=10, epochs=2), "steps"),
        (dict(epochs=2), "steps_per_epoch"),
        (dict(steps=0), "steps=0"),
        (dict(steps=10, batch_size=-1), "batch_size=-1"),
        (dict(steps=10, learning_rate=0.0), "learning_rate=0.0"),
        (dict(steps=10, momentum=1.0), "momentum=1.0"),
        (dict(steps=10, weight_decay=-1e-4), "weight_decay"),
        (dict(steps=10, schedule="step"), "schedule='step'"),
        (dict(steps=10, milestones=(0.75, 0.5)), "milestones"),
        (dict(steps=10, milestones=(80, 120)), "milestones"),
        (dict(steps=10, gamma=0.0), "gamma=0.0"),
        (dict(steps=10, seed=-1), "seed=-1"),
        (dict(steps=10, eval_every=0), "eval_every=0"),
        (dict(steps=10, eval_at=(100, 0)), r"eval_at=\(100, 0\) must hold positive integer"),
    ],
)
def test_config_names_the_bad_value(fields, named):
  with pytest.raises(ValueError, match=named):
    train.TrainConfig(**fields)


def test_multistep_schedule_is_pytorch_multisteplr_in_fractions_of_the_run():
  # 150 epochs of 10 steps with PyTorch milestones 80 and 120 (the paper's CIFAR recipe).
  config = train.TrainConfig(
      epochs=150, steps_per_epoch=10, milestones=(80 / 150, 120 / 150), learning_rate=1e-3
  )
  schedule = train.learning_rate_schedule(config, config.total_steps)
  lr = np.array([schedule(step) for step in (0, 799, 800, 1199, 1200, 1499)])
  np.testing.assert_allclose(lr, [1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5], rtol=1e-6)


def test_cosine_schedule_decays_to_zero():
  config = train.TrainConfig(steps=100, schedule="cosine", learning_rate=0.1)
  schedule = train.learning_rate_schedule(config, config.total_steps)
  np.testing.assert_allclose(
      [schedule(0), schedule(50), schedule(100)], [0.1, 0.05, 0.0], atol=1e-7
  )


def test_optimizer_is_torch_sgd_with_coupled_weight_decay():
  lr, momentum, decay = 0.1, 0.9, 1e-2
  config = train.TrainConfig(steps=10, learning_rate=lr, momentum=momentum, weight_decay=decay)
  optimizer = train.make_optimizer(config, config.total_steps)
  params, grads = np.array([1.0, -2.0]), [np.array([0.5, 0.25]), np.array([-1.0, 2.0])]
  state, expected, buffer = optimizer.init(params), params.copy(), 0.0
  for grad in grads:  # torch.optim.SGD: b = momentum * b + g + decay * p; p -= lr * b
    buffer = momentum * buffer + grad + decay * expected
    expected = expected - lr * buffer
    updates, state = optimizer.update(grad, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(params, expected, rtol=1e-6)


@pytest.fixture(scope="module")
def resnet():
  return ResNetCIFAR(
      8, width=4, in_channels=1, num_classes=train_worker.NUM_CLASSES, rngs=nnx.Rngs(0)
  )


RESNET_CONFIG = train.TrainConfig(
    steps=30, batch_size=16, learning_rate=0.05, schedule="cosine", log_every=10, eval_every=15
)


def test_finetune_lowers_the_loss_and_evaluates(tmp_path, resnet):
  eval_batches = train_worker.eval_problem()[1]
  before = evaluate(resnet, eval_batches)
  model, history = train.finetune(
      resnet,
      train_worker.SyntheticBatches(16),
      RESNET_CONFIG,
      workdir=tmp_path,
      eval_batches=eval_batches,
      progress=False,
  )
  losses = [r["loss"] for r in history if "loss" in r]
  evals = [r for r in history if "eval_loss" in r]
  assert [r["step"] for r in evals] == [15, 30]
  assert losses[-1] < 0.5 * losses[0]
  assert evals[-1]["eval_loss"] < 0.5 * before["loss"]
  after = evaluate(model, eval_batches)
  assert {name: evals[-1][f"eval_{name}"] for name in after} == after
  with open(tmp_path / runs.METRICS_FILE) as f:
    assert [json.loads(line) for line in f] == history


def test_finetune_keeps_masked_weights_at_exactly_zero(tmp_path, resnet):
  """Two fine-tunes with different masks: each keeps its zeros; the step compiles once."""
  _, params = oba_jax.functional(resnet)
  config = train.TrainConfig(steps=6, batch_size=16, learning_rate=0.05, weight_decay=1e-2)
  with runtime.Compilations() as compiled:
    for density in (0.5, 0.3):
      mask = masks.global_density(scores.magnitude(params), density)
      model, _ = train.finetune(resnet, train_worker.SyntheticBatches(16), config,
                                workdir=tmp_path / str(density), mask=mask, progress=False)
      _, tuned = oba_jax.functional(model)
      kept = jax.tree.map(lambda keep, p: np.broadcast_to(keep, p.shape), mask, params)
      pruned_values = jax.tree.map(lambda p, keep: np.asarray(p)[~keep], tuned, kept)
      assert all(np.all(values == 0) for values in jax.tree.leaves(pruned_values))
      assert masks.sparsity(tuned).total == pytest.approx(1 - density, abs=1e-3)
      moved = jax.tree.map(lambda new, old, keep: np.sum((new != old) & keep), tuned, params,
                           kept)
      assert sum(jax.tree.leaves(moved)) > 0.9 * sum(np.sum(k) for k in jax.tree.leaves(kept))
      assert (tmp_path / str(density) / runs.CHECKPOINT_DIR / "6" / "mask").is_dir()
  assert compiled.counts["jit(train_step)"] == 1  # the mask is an argument, not a constant


def test_config_seed_restarts_the_models_rng_streams(tmp_path):
  config = dataclasses.replace(train_worker.CONFIG, steps=2)
  fresh = train_worker.TinyNet(rngs=nnx.Rngs(0))
  used = nnx.clone(fresh)
  used.dropout(np.ones((2, 4)))  # draws from its dropout stream

  def run(model, config, name):
    model, _ = train.finetune(
        model, train_worker.SyntheticBatches(8), config, workdir=tmp_path / name, progress=False
    )
    return train_worker.flat_params(model)

  reference = run(fresh, config, "fresh")
  assert_same_params(run(used, config, "used"), reference)
  other_seed = run(fresh, dataclasses.replace(config, seed=1), "seed1")
  kernel = "['conv']['kernel']"
  assert not np.array_equal(other_seed[kernel], reference[kernel])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """An uninterrupted TinyNet run: (workdir, flat params, history)."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  model, history, _ = train_worker.finetune(str(workdir))
  return workdir, train_worker.flat_params(model), history


def finished_steps(workdir) -> list[int]:
  """The steps of the checkpoints that orbax has finished writing in `workdir`."""
  directory = workdir / runs.CHECKPOINT_DIR
  if not directory.exists():
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def read_history(workdir) -> list[dict]:
  path = workdir / runs.METRICS_FILE
  if not path.exists():
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith("\n")]


def test_run_killed_with_sigkill_resumes_bit_identically(tmp_path, uninterrupted):
  _, reference, reference_history = uninterrupted
  workdir, out = tmp_path / "run", tmp_path / "params"
  command = [sys.executable, WORKER, "finetune", str(workdir), str(out)]
  killed = subprocess.Popen(
      command + ["0.05"], env=worker_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  # Kill once a checkpoint is on disk and a record past it is written, before the next one.
  past_checkpoint = lambda: finished_steps(workdir) and any(
      r["step"] > finished_steps(workdir)[-1] for r in read_history(workdir)
  )
  deadline = time.monotonic() + 120
  while not past_checkpoint() and killed.poll() is None and time.monotonic() < deadline:
    time.sleep(0.01)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  assert killed.returncode == -signal.SIGKILL
  steps = finished_steps(workdir)
  assert steps and steps[-1] < train_worker.CONFIG.total_steps, steps  # really cut short
  assert read_history(workdir)[-1]["step"] > steps[-1]  # records for the resumed run to drop

  resumed = subprocess.run(command, env=worker_env(), capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr
  assert_same_params(dict(np.load(f"{out}.npz")), reference)
  assert without_time(read_history(workdir)) == without_time(reference_history)


def grain_batches(batch_size: int) -> grain.DatasetIterator:
  """A shuffled, repeated grain pipeline with prefetching, like `oba_jax.data.load`'s."""
  data = next(train_worker.SyntheticBatches(64, seed=2))
  examples = [{"image": image, "label": label} for image, label in zip(*data.values())]
  dataset = grain.MapDataset.source(examples).seed(0).shuffle().repeat().batch(batch_size)
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))


def batch_list(batch_size: int) -> list[dict]:
  """Batches without a state: resuming skips the ones already used."""
  steps = train_worker.CONFIG.total_steps
  return list(itertools.islice(train_worker.SyntheticBatches(batch_size, seed=3), steps))


@pytest.mark.parametrize("make_batches", [grain_batches, batch_list])
def test_resumes_exactly_from_the_last_checkpoint(tmp_path, make_batches):
  config = train_worker.CONFIG

  def run():
    model, history = train.finetune(
        train_worker.TinyNet(rngs=nnx.Rngs(0)),
        make_batches(config.batch_size),
        config,
        workdir=tmp_path,
        progress=False,
    )
    return train_worker.flat_params(model), without_time(history)

  reference_params, reference_history = run()
  last = finished_steps(tmp_path)[-1]
  shutil.rmtree(tmp_path / runs.CHECKPOINT_DIR / str(last))  # as if killed before writing it
  params, history = run()
  assert finished_steps(tmp_path)[-1] == last
  assert_same_params(params, reference_params)
  assert history == reference_history


def test_finished_run_returns_at_once_with_the_same_params(uninterrupted):
  workdir, reference, reference_history = uninterrupted
  before = tree_snapshot(workdir)
  model, history, batches = train_worker.finetune(str(workdir))
  assert tree_snapshot(workdir) == before  # nothing trained, saved or logged
  assert batches.index == train_worker.CONFIG.total_steps  # moved to where the run ended
  assert_same_params(train_worker.flat_params(model), reference)
  assert history == reference_history


@pytest.mark.parametrize(
    "change, named",
    [
        (
            dict(config=train.TrainConfig(steps=24, batch_size=8, learning_rate=0.2)),
            "config.learning_rate is 0.1 in the checkpoint, 0.2 now",
        ),
        (
            dict(model=train_worker.TinyNet(5, rngs=nnx.Rngs(0))),
            "params.conv/kernel is 'float32[3, 3, 1, 4]' in the checkpoint, "
            "'float32[3, 3, 1, 5]' now",
        ),
        (dict(extra_state={"widths": [3]}), "extra_state is None in the checkpoint"),
    ],
)
def test_checkpoint_of_another_run_is_an_error_and_nothing_changes(uninterrupted, change, named):
  workdir = uninterrupted[0]
  before = tree_snapshot(workdir)
  arguments = dict(model=train_worker.TinyNet(rngs=nnx.Rngs(0)), config=train_worker.CONFIG)
  arguments |= change
  batches = train_worker.SyntheticBatches(8)
  with pytest.raises(ValueError, match=f"another run; nothing was changed.*{re.escape(named)}"):
    train.finetune(
        arguments.pop("model"),
        batches,
        arguments.pop("config"),
        workdir=workdir,
        progress=False,
        **arguments,
    )
  assert tree_snapshot(workdir) == before


def test_extra_state_is_saved_with_the_checkpoints(tmp_path):
  assert runs.read_extra_state(tmp_path) is None
  plan = {"plan": {"removed": {"stem": [0, 2]}}, "widths": [2, 4]}
  config = train.TrainConfig(steps=2, batch_size=8)
  train.finetune(
      train_worker.TinyNet(rngs=nnx.Rngs(0)),
      train_worker.SyntheticBatches(8),
      config,
      workdir=tmp_path,
      extra_state=plan,
      progress=False,
  )
  assert runs.read_extra_state(tmp_path) == plan


def test_evaluate_is_exact_over_a_partial_last_batch(resnet):
  _, batches, data = train_worker.eval_problem()
  result = evaluate(resnet, batches)
  model = nnx.clone(resnet)
  model.eval()
  logits = model(data["image"])
  assert result["count"] == 29
  assert result["accuracy"] == np.mean(np.argmax(logits, -1) == data["label"])
  np.testing.assert_allclose(
      result["loss"], oba_jax.softmax_cross_entropy(logits, data["label"]), rtol=1e-6
  )


@pytest.fixture(scope="module")
def one_device_evaluation():
  return evaluate(*train_worker.eval_problem()[:2])


def assert_same_evaluation(result: dict, reference: dict) -> None:
  """Counts exact; the loss within rtol 1e-6, as sums run in another order."""
  assert result["count"] == reference["count"] == 29
  assert result["accuracy"] == reference["accuracy"]
  np.testing.assert_allclose(result["loss"], reference["loss"], rtol=1e-6)


def test_evaluate_on_eight_devices_matches_one(tmp_path, one_device_evaluation):
  out = tmp_path / "eight"
  subprocess.run(
      [sys.executable, WORKER, "evaluate", str(out)], env=worker_env(8), check=True, timeout=300
  )
  with open(f"{out}.json") as f:
    eight = json.load(f)
  assert eight["devices"] == 8
  assert_same_evaluation(eight, one_device_evaluation)


def test_a_checkpoint_written_on_two_devices_restores_on_one(tmp_path):
  """`init.checkpoint` of a run made on another device count (it failed: topology mismatch)."""
  workdir, out = tmp_path / "run", tmp_path / "two"
  subprocess.run([sys.executable, WORKER, "finetune", str(workdir), str(out)],
                 env=worker_env(2), check=True, timeout=300)
  step, state = runs.read_state(workdir)
  assert step == train_worker.CONFIG.total_steps and set(state) >= {"params", "model_state"}
  restored = pipeline.restore(train_worker.TinyNet(rngs=nnx.Rngs(0)), str(workdir))
  assert_same_params(train_worker.flat_params(restored), dict(np.load(f"{out}.npz")))


def test_training_that_diverges_stops_at_the_step_and_saves_nothing(tmp_path):
  config = dataclasses.replace(train_worker.CONFIG, steps=6, learning_rate=1e30, log_every=3,
                               checkpoint_every=3)
  with pytest.raises(FloatingPointError, match=r"diverged: .* at step [12] of 6 .*learning_rate"):
    train.finetune(train_worker.TinyNet(rngs=nnx.Rngs(0)), train_worker.SyntheticBatches(8),
                   config, workdir=tmp_path, progress=False)
  assert runs.read_state(tmp_path) is None  # no checkpoint of the non-finite model


def test_a_damaged_checkpoint_names_its_step_and_deleting_it_resumes(tmp_path):
  config = dataclasses.replace(train_worker.CONFIG, steps=8)
  run = lambda: train_worker.finetune(str(tmp_path), config=config)
  run()
  state_dir = tmp_path / runs.CHECKPOINT_DIR / "8" / "state"
  for path in state_dir.rglob("*"):  # cut every data file short, as a full disk would
    if path.is_file() and path.stat().st_size > 64:
      path.write_bytes(path.read_bytes()[:64])
  with pytest.raises(ValueError, match=r"checkpoint step 8 in .*/8 cannot be read .*Delete"):
    run()
  shutil.rmtree(state_dir.parent)
  model, history, _ = run()  # resumes from step 4 and finishes
  assert history[-1]["step"] == 8


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_match_one(tmp_path, uninterrupted, one_device_evaluation):
  """Each process feeds half of every batch (evaluation: uneven halves, one batch more on one).

  Fine-tuned params within rtol 1e-5 of one process's: the gradient sums run in another order.
  """
  port, workdir = free_port(), tmp_path / "run"
  outs = [tmp_path / f"process{i}" for i in range(2)]
  procs = [
      subprocess.Popen(
          [sys.executable, WORKER, "distributed", *map(str, (workdir, outs[i], i, 2, port))],
          env=worker_env(1),
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
      )
      for i in range(2)
  ]
  logs = [p.communicate(timeout=300)[0].decode() for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(logs)
  results = [dict(np.load(f"{out}.npz")) for out in outs]
  assert_same_params(results[1], results[0])
  for name, value in uninterrupted[1].items():
    np.testing.assert_allclose(results[0][name], value, rtol=1e-5, atol=1e-6, err_msg=name)
  for out in outs:
    with open(f"{out}.json") as f:
      assert_same_evaluation(json.load(f), one_device_evaluation)


def test_finetune_input_errors(tmp_path):
  model = train_worker.TinyNet(rngs=nnx.Rngs(0))
  config = train.TrainConfig(steps=2, batch_size=8)
  batches = train_worker.SyntheticBatches(8)
  with pytest.raises(ValueError, match="config.batch_size=16"):
    train.finetune(
        model, batches, train.TrainConfig(steps=2, batch_size=16), workdir=tmp_path, progress=False
    )
  with pytest.raises(TypeError, match="one-shot generator"):
    train.finetune(
        model, batches, config, workdir=tmp_path, eval_batches=(b for b in []), progress=False
    )
  with pytest.raises(ValueError, match="JSON-able"):
    train.finetune(
        model, batches, config, workdir=tmp_path, extra_state={"a": np.zeros(2)}, progress=False
    )
  with pytest.raises(ValueError, match="mask"):
    train.finetune(
        model, batches, config, workdir=tmp_path, mask={"conv": {"kernel": True}}, progress=False
    )
  with pytest.raises(ValueError, match="ran out after 1 of the run's 2 steps"):
    train.finetune(model, [next(batches)], config, workdir=tmp_path / "short", progress=False)
