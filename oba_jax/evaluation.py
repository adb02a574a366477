"""Evaluation of Flax NNX classifiers: accuracy and loss over every example, on any mesh.

Each batch is sharded along its leading axis over a device mesh
(`estimate.shard_batch`) with the model replicated; batches whose size does not
divide over the devices are padded and the padding is left out, so the result
is exact whatever the device and process counts. This module reads models and
data; it never trains or writes anything, and imports nothing above `estimate` and
`functional`.
"""

import functools
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from oba_jax import runtime
from oba_jax.estimate import DATA_AXIS, data_mesh, pace, replicate, shard_batch
from oba_jax.functional import split_pure

PyTree = Any


def evaluate(
    model: nnx.Module, batches: Iterable[PyTree], *, mesh: Mesh | None = None
) -> dict[str, float]:
  """Accuracy and mean softmax cross-entropy of `model` in inference mode over `batches`.

  Exact over every example: a batch whose size is not a multiple of the local
  devices (a final partial batch) is padded, and the padding is left out of
  the sums. Multi-host: every process passes its own shard of the data; the
  processes may hold different numbers of examples and batches.

  Args:
    model: the classifier, left as it is (a copy is put in inference mode).
    batches: this process's batches `{"image", "label"}`, read once.
    mesh: a device mesh with a 'data' axis; default all devices along it.

  Returns:
    {"accuracy", "loss", "count"}: over all examples of all processes.
  """
  mesh = data_mesh() if mesh is None else mesh
  graphdef, params, model_state = split_pure(model, training=False)
  params, model_state = replicate((params, model_state), mesh)
  return evaluate_split(graphdef, params, model_state, batches, mesh)


@functools.partial(runtime.jit, static_argnums=0)
def _eval_sums(
    graphdef: nnx.GraphDef, params: PyTree, model_state: PyTree, batch: PyTree
) -> dict[str, jax.Array]:
  """Summed loss and correct predictions over the batch entries marked `valid`."""
  logits = nnx.merge(graphdef, nnx.State(params), nnx.State(model_state), copy=True)(batch["image"])
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  correct = jnp.argmax(logits, -1) == batch["label"]
  return {
      "loss": jnp.sum(jnp.where(batch["valid"], losses, 0.0)),
      "correct": jnp.sum(correct & batch["valid"], dtype=jnp.int32),
  }


def evaluate_split(
    graphdef: nnx.GraphDef,
    params: PyTree,
    model_state: PyTree,
    batches: Iterable[PyTree],
    mesh: Mesh,
) -> dict[str, float]:
  """`evaluate` of a model already split (`functional.split_pure`) and placed on `mesh`.

  What `train.finetune` calls between steps, with the state it trains.
  """
  sums, count = [], 0
  for batch, batch_count in _aligned_batches(batches, mesh.local_mesh.shape[DATA_AXIS]):
    sums.append(_eval_sums(graphdef, params, model_state, shard_batch(batch, mesh)))
    pace(len(sums), sums[-1])
    count += batch_count
  if not count:
    raise ValueError("evaluate got no examples: the batches were empty.")
  sums = jax.device_get(sums)
  return {
      "accuracy": sum(int(s["correct"]) for s in sums) / count,
      "loss": sum(float(s["loss"]) for s in sums) / count,
      "count": count,
  }


def _aligned_batches(batches: Iterable[PyTree], local_devices: int) -> Iterator[tuple[dict, int]]:
  """Pads every process's batches to one common size, a multiple of `local_devices`.

  Yields `({"image", "label", "valid"}, examples in this step over all
  processes)`. Processes agree on each step's size, and a process whose
  batches ran out feeds padding while the others still have data.
  """
  multihost = jax.process_count() > 1
  template = None
  for batch in _then_none(batches):
    size = 0 if batch is None else len(batch["label"])
    sizes = multihost_utils.process_allgather(np.int32(size)) if multihost else [size]
    padded = -(-max(sizes) // local_devices) * local_devices
    if not padded:
      return
    if batch is None and template is None:
      raise ValueError("this process got no evaluation batches while other processes did.")
    if batch is None:
      batch = jax.tree.map(lambda x: x[:0], template)  # only padding
    template = batch = {"image": np.asarray(batch["image"]), "label": np.asarray(batch["label"])}
    pad = lambda x: np.pad(x, [(0, padded - size)] + [(0, 0)] * (x.ndim - 1))
    yield {**jax.tree.map(pad, batch), "valid": np.arange(padded) < size}, int(sum(sizes))


def _then_none(batches: Iterable[PyTree]) -> Iterator[PyTree | None]:
  """The batches, then None forever."""
  yield from batches
  while True:
    yield None
