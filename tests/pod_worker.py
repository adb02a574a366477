"""Scores a tiny Llama with parameters sharded over a 2-D data x model mesh; used by
test_pod.py in a subprocess with 8 virtual devices.

python pod_worker.py OUT.npz DATA MODEL
Writes, per criterion, the scores on a 1-device mesh and on the DATA x MODEL mesh
with `estimate.shard_params`, whether every split leaf stayed split, and the
number of score-step compilations of the sharded run.
"""

import functools
import sys

import jax
import numpy as np
from flax import nnx
from jax.flatten_util import ravel_pytree

CRITERIA = ("taylor", "obd_fisher", "oba", "oba_residual", "oba_bilinear", "oba_t12",
            "activation_norm")
BATCH, LENGTH, NUM_BATCHES = 8, 6, 3


def problem():
  import oba_jax
  from oba_jax.models import Llama

  model = Llama(vocab_size=32, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2,
                ffn_dim=24, rngs=nnx.Rngs(0))
  apply_fn, params = oba_jax.functional(model)
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(NUM_BATCHES):
    mask = np.ones((BATCH, LENGTH), np.int32)
    mask[::3, LENGTH - 2:] = 0  # padded examples
    batches.append({"tokens": rng.integers(0, 32, (BATCH, LENGTH)).astype(np.int32),
                    "mask": mask})
  return oba_jax.next_token(apply_fn), params, batches


def run(data: int, model: int) -> dict[str, np.ndarray]:
  from oba_jax import criteria, estimate, runtime

  objective, params, batches = problem()
  one = estimate.data_mesh(jax.devices()[:1])
  pod = estimate.pod_mesh(data, model)
  sharded = estimate.shard_params(params, pod)
  out = {}
  for name in CRITERIA:
    score_fn = functools.partial(criteria.CRITERIA[name].score, objective)
    key = jax.random.key(1)
    out[f"{name}/one"] = ravel_pytree(estimate.accumulate(
        score_fn, params, batches, key=key, mesh=one))[0]
    with runtime.Compilations() as compiles:
      result = estimate.accumulate(score_fn, sharded, batches, key=key, mesh=pod)
    out[f"{name}/pod"] = ravel_pytree(result)[0]
    out[f"{name}/compilations"] = np.asarray(compiles.counts["jit(score_step)"])
    out[f"{name}/kept_sharding"] = np.asarray(all(
        r.sharding.is_equivalent_to(p.sharding, p.ndim)
        for r, p in zip(jax.tree.leaves(result), jax.tree.leaves(sharded))))
  out["split_leaves"] = np.asarray(sum(
      not p.sharding.is_fully_replicated for p in jax.tree.leaves(sharded)))
  out["devices"] = np.asarray(jax.device_count())
  examples = {"wide": np.ones((16, 24)), "square": np.ones((8, 8)), "odd": np.ones((3,))}
  for name, leaf in estimate.shard_params(examples, pod).items():
    out[f"spec/{name}"] = np.asarray(str(leaf.sharding.spec))
  return out


if __name__ == "__main__":
  np.savez(sys.argv[1], **run(int(sys.argv[2]), int(sys.argv[3])))
