"""Runs `scores.accumulate` on a fixed problem; used by test_estimate.py in subprocesses.

python accumulate_worker.py OUT.npz [PROCESS_ID NUM_PROCESSES PORT]
Each process feeds its own contiguous part of every batch. Set XLA_FLAGS
(--xla_force_host_platform_device_count=N) before starting for N local devices.
"""

import functools
import sys

import jax
import numpy as np

BATCH, NUM_BATCHES = 16, 3


def problem(train: bool = False):
  from flax import nnx
  import oba_jax
  from oba_jax.models import ResNetCIFAR

  model = ResNetCIFAR(8, width=4, in_channels=1, num_classes=5, rngs=nnx.Rngs(0))
  # Training mode: batch-statistics BN, so the sharded batch must act as one batch.
  model.train() if train else model.eval()
  apply_fn, params = oba_jax.functional(model)
  rng = np.random.default_rng(0)
  batches = [{"image": rng.normal(size=(BATCH, 8, 8, 1)).astype(np.float32),
              "label": rng.integers(0, 5, size=(BATCH,)).astype(np.int32)}
             for _ in range(NUM_BATCHES)]
  return oba_jax.classification(apply_fn), params, batches


# name -> (BN mode, score, its options). With training-mode BN the residual scores
# of convs cancel to ~1e-6 (BN's scale invariance), below float32 resolution, so
# that mode is checked on the full Hessian. The Fisher diagonal runs the model one
# example at a time (per-example conv gradients over a sharded batch), Hutchinson
# two probes under vmap.
CASES = {
    "eval_residual": (False, "oba", dict(curvature="residual")),
    "train_hessian": (True, "oba", dict(curvature="hessian")),
    "eval_fisher": (False, "obd", dict(diag="fisher", num_probes=2)),
    "eval_hutchinson": (False, "obd", dict(diag="hutchinson", num_probes=2, probe_batch=2)),
}


def run(process_id: int = 0, num_processes: int = 1) -> dict[str, np.ndarray]:
  from jax.flatten_util import ravel_pytree
  from oba_jax import scores

  results = {}
  for name, (train, score, options) in CASES.items():
    objective, params, batches = problem(train)
    part = BATCH // num_processes
    local = [jax.tree.map(lambda a: a[process_id * part:(process_id + 1) * part], b)
             for b in batches]
    if score == "oba":
      score_fn = functools.partial(scores.oba, objective.loss, model_fn=objective.model,
                                   output_loss_fn=objective.output_loss, **options)
      result = scores.accumulate(score_fn, params, local)
    else:
      score_fn = functools.partial(scores.obd, objective.loss, model_fn=objective.model,
                                   **options)
      result = scores.accumulate(score_fn, params, local, key=jax.random.key(3))
    results[name] = np.asarray(ravel_pytree(jax.device_get(result))[0])
  return results


if __name__ == "__main__":
  out = sys.argv[1]
  if len(sys.argv) > 2:
    pid, count, port = map(int, sys.argv[2:5])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=count, process_id=pid)
    np.savez(out, **run(pid, count))
  else:
    np.savez(out, **run())
