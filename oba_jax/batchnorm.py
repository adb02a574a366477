"""BatchNorm recalibration: running statistics re-estimated for a pruned or compacted model.

Pruning changes what every BatchNorm sees, so the running statistics of the dense model are
stale afterwards, and a model evaluated with them (inference mode) can look broken although
its weights are fine. `recalibrate` replaces them by the average of the batch statistics of a
few training batches, the cumulative average PyTorch computes with `momentum=None`, and
touches nothing else: parameters, other state and RNG streams stay as they were.

Each batch is sharded over a device mesh like `evaluation.evaluate` shards it, so a batch's
statistics are those of the whole (global) batch on any number of devices. This module
imports nothing above `estimate` and `functional`.
"""

import functools
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from oba_jax import runtime
from oba_jax.estimate import data_mesh, pace, replicate, shard_batch, tree_add

PyTree = Any


def has_batchnorm(model: nnx.Module) -> bool:
  """Whether `model` holds an `nnx.BatchNorm`, whose running statistics can go stale."""
  return any(isinstance(m, nnx.BatchNorm) for _, m in nnx.iter_modules(model))


def recalibrate(model: nnx.Module, batches: Iterable[PyTree], *, num_batches: int | None = None,
                mesh: Mesh | None = None) -> nnx.Module:
  """A copy of `model` whose BatchNorm running mean and variance are the batches' averages.

  Args:
    model: any NNX model; one without BatchNorm comes back as an unchanged copy.
    batches: `{"image", ...}` dicts (this process's shard of each batch), or arrays of
      inputs; an iterator is consumed.
    num_batches: read at most this many batches (None: all of them).
    mesh: a device mesh with a 'data' axis; default all devices along it.

  Returns:
    The recalibrated copy, in `model`'s mode.
  """
  norms = [path for path, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]
  copy = nnx.clone(model)
  if not norms:
    return copy
  if num_batches is not None and (isinstance(num_batches, bool) or num_batches < 1):
    raise ValueError(f"num_batches={num_batches!r} must be None or an integer >= 1.")
  mesh = data_mesh() if mesh is None else mesh
  probe = nnx.clone(model)
  probe.train()
  for path in norms:  # momentum 0: after a forward pass the running values are that batch's
    _module_at(probe, path).momentum = 0.0
  graphdef, params, state = nnx.split(probe, nnx.Param, ...)
  params, state = replicate((nnx.to_pure_dict(params), nnx.to_pure_dict(state)), mesh)
  totals, count = None, 0
  for count, batch in enumerate(batches, start=1):
    images = batch["image"] if isinstance(batch, dict) else batch
    stats = _batch_statistics(graphdef, params, state, shard_batch(images, mesh))
    totals = stats if totals is None else tree_add(totals, stats)
    pace(count, totals)
    if count == num_batches:
      break
  if not count:
    raise ValueError("recalibrate got no batches: the iterable was empty.")
  averages = jax.device_get(jax.tree.map(lambda t: t / count, totals))
  for path in norms:
    module = _module_at(copy, path)
    mean, var = averages[_name(path)]
    module.mean.set_value(jnp.asarray(mean, module.mean.get_value().dtype))
    module.var.set_value(jnp.asarray(var, module.var.get_value().dtype))
  return copy


@functools.partial(runtime.jit, static_argnums=0)
def _batch_statistics(graphdef: nnx.GraphDef, params: PyTree, state: PyTree,
                      images: jax.Array) -> dict:
  """{BatchNorm path: (batch mean, batch variance)} of one forward pass in training mode."""
  model = nnx.merge(graphdef, nnx.State(params), nnx.State(state), copy=True)
  model(images)
  return {_name(path): (m.mean.get_value(), m.var.get_value())
          for path, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)}


def _name(path: tuple) -> str:
  return "/".join(map(str, path))


def _module_at(model: nnx.Module, path: tuple) -> nnx.Module:
  for key in path:
    model = model[key] if isinstance(key, int) else getattr(model, key)
  return model
