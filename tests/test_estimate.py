"""accumulate: mean over batches, identical on 1 device, 8 devices and 2 processes."""

import functools
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import accumulate_worker
from oba_jax import scores

WORKER = accumulate_worker.__file__


TOLERANCE = {"eval_residual": 1e-6, "train_hessian": 1e-5, "eval_fisher": 1e-5,
             "eval_hutchinson": 1e-5}


def rel_err(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def assert_same(result, reference):
  for name, tol in TOLERANCE.items():
    assert rel_err(result[name], reference[name]) <= tol, name


def worker_env(devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_device_result():
  return accumulate_worker.run()


def test_accumulate_is_the_mean_of_per_batch_scores(one_device_result):
  objective, params, batches = accumulate_worker.problem()
  score_fn = jax.jit(functools.partial(
      scores.oba, objective.loss, curvature="residual", model_fn=objective.model,
      output_loss_fn=objective.output_loss))
  per_batch = [jax.flatten_util.ravel_pytree(score_fn(params, b))[0] for b in batches]
  assert rel_err(one_device_result["eval_residual"], np.mean(per_batch, axis=0)) <= 1e-6


@pytest.mark.parametrize("devices", [2, 8])
def test_virtual_devices_match_one(tmp_path, one_device_result, devices):
  """Every criterion kind, the per-example Fisher included (it was wrong on >1 device)."""
  out = tmp_path / f"{devices}.npz"
  subprocess.run([sys.executable, WORKER, str(out)], env=worker_env(devices), check=True,
                 timeout=300)
  assert_same(np.load(out), one_device_result)


@pytest.mark.multiprocess
def test_two_processes_match_one(tmp_path, one_device_result):
  port = free_port()
  outs = [tmp_path / f"p{i}.npz" for i in range(2)]
  procs = [subprocess.Popen([sys.executable, WORKER, str(outs[i]), str(i), "2", str(port)],
                            env=worker_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  logs = [p.communicate(timeout=300)[0].decode() for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(logs)
  for out in outs:
    assert_same(np.load(out), one_device_result)


def test_accumulate_with_key_gives_each_batch_a_fresh_key():
  params = {"layer": {"kernel": jnp.ones((2, 2))}}
  seen = []

  def score_fn(p, batch, key):
    seen.append(key)
    return jax.tree.map(lambda x: jax.random.uniform(key, x.shape), p)

  batches = [np.zeros((1,))] * 3
  mean = scores.accumulate(score_fn, params, batches, key=jax.random.key(0))
  expected = np.mean([jax.random.uniform(jax.random.fold_in(jax.random.key(0), i), (2, 2))
                      for i in range(3)], axis=0)
  np.testing.assert_allclose(mean["layer"]["kernel"], expected, rtol=1e-6)


def test_accumulate_stops_after_num_batches():
  params = {"w": jnp.zeros(())}
  endless = ({"x": np.full((2,), float(i))} for i in range(10**9))
  mean = scores.accumulate(lambda p, b: {"w": b["x"].mean()}, params, endless, num_batches=4)
  assert float(mean["w"]) == pytest.approx(1.5)


def test_accumulate_errors():
  params = {"w": jnp.zeros(())}
  with pytest.raises(ValueError, match="no batches"):
    scores.accumulate(lambda p, b: p, params, [])
  with pytest.raises(ValueError, match="num_batches"):
    scores.accumulate(lambda p, b: p, params, [np.zeros(2)], num_batches=0)
  batches = [{"x": np.ones(2)}, {"x": np.array([1.0, np.nan])}, {"x": np.ones(2)}]
  with pytest.raises(FloatingPointError, match="1 of 3 batches .*batch 1"):
    scores.accumulate(lambda p, b: {"w": b["x"].sum()}, params, batches)
