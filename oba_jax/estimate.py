"""Scores averaged over many batches, data-parallel over every device.

`accumulate` runs one jitted step per batch from a Python loop (on XLA:CPU,
convolution gradients inside `lax.scan` run 30-60x slower). Each batch is
sharded along its leading axis over a device `Mesh` (jit over a mesh is pmap's
modern form), so the step computes the score of the *whole* batch, with exactly
the single-device semantics. Parameters are replicated, unless they already
live on the mesh, in which case their sharding is kept and the scores are
sharded the same way.

A model too large to replicate is held the way a pod job holds it: `pod_mesh`
gives a 2-D (data x model) mesh and `shard_params` splits every parameter over
its 'model' axis (FSDP-style: each leaf along one dimension, gathered by XLA
where a layer needs it); `accumulate` keeps that sharding, splits each batch
over 'data', and returns scores sharded like the parameters, equal to the
single-device scores.

Multi-host: after `jax.distributed.initialize()`, every process calls
`accumulate` with its own shard of each batch (the same number of batches on
every process); the global batch is assembled with
`jax.make_array_from_process_local_data` and every process gets the same result.
"""

import functools
import itertools
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from oba_jax import runtime
from oba_jax.delta import path_str
from oba_jax.validate import check_finite_params, warn_if_zero

PyTree = Any
DATA_AXIS = "data"
MODEL_AXIS = "model"
# Programs a host loop may queue on several CPU devices before it waits for one (`pace`).
MAX_IN_FLIGHT = 4


def data_mesh(devices=None) -> Mesh:
  """A 1-D mesh over `devices` (default: all devices of all processes), axis 'data'."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), (DATA_AXIS,))


def pod_mesh(data: int, model: int, devices=None) -> Mesh:
  """A 2-D mesh of `data` x `model` devices (default: all devices of all processes).

  Batches are split over 'data'; `shard_params` splits parameters over 'model'.
  """
  devices = np.asarray(jax.devices() if devices is None else devices).reshape(-1)
  if data < 1 or model < 1 or data * model != devices.size:
    raise ValueError(f"a mesh of data={data} x model={model} devices needs {data * model} "
                     f"devices; there are {devices.size}. Choose sizes whose product is "
                     f"{devices.size}.")
  return Mesh(devices.reshape(data, model), (DATA_AXIS, MODEL_AXIS))


def shard_params(params: PyTree, mesh: Mesh, axis: str = MODEL_AXIS) -> PyTree:
  """`params` split FSDP-style over `axis` of `mesh`, from the same values on every process.

  Each leaf is split along its largest dimension divisible by the axis size
  (the first such, on ties), and replicated over the other mesh axes; a leaf with
  no such dimension (a scalar, a small vector) is replicated. Each device holds
  1/size of the split leaves, and only its own part is read from the host.
  """
  if axis not in mesh.axis_names:
    raise ValueError(f"axis={axis!r} is not an axis of the mesh {dict(mesh.shape)}.")
  size = mesh.shape[axis]

  def put(x):
    value = np.asarray(x)
    dims = [d for d in range(value.ndim) if value.shape[d] % size == 0 and value.shape[d] >= size]
    spec = [None] * value.ndim
    if dims and size > 1:
      spec[max(dims, key=lambda d: (value.shape[d], -d))] = axis
    sharding = NamedSharding(mesh, PartitionSpec(*spec))
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

  return jax.tree.map(put, params)


def _param_sharding(leaf, mesh: Mesh) -> NamedSharding:
  sharding = getattr(leaf, "sharding", None)
  if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
    return sharding
  return NamedSharding(mesh, PartitionSpec())


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """A copy of `tree` on every device of `mesh`, from the same values on every process.

  Leaves go through host memory: `device_put` of a jax.Array onto devices of
  several processes gives arrays that orbax cannot save (jax 0.10), and typed
  PRNG keys cannot be put there at all, only their raw data. A copy, as train
  steps donate their state.
  """
  sharding = NamedSharding(mesh, PartitionSpec())

  def put(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    return jax.device_put(np.asarray(x), sharding, may_alias=False)

  return jax.tree.map(put, tree)


def shard_batch(batch: PyTree, mesh: Mesh, axis: str = DATA_AXIS) -> PyTree:
  """This process's part of a batch -> a global array sharded over `axis`."""
  local_devices = mesh.local_mesh.shape[axis]
  sharding = NamedSharding(mesh, PartitionSpec(axis))

  def put(path, x):
    shape = np.shape(x)
    if shape and shape[0] == 0:
      raise ValueError(f"batch leaf '{path_str(path)}' has shape {shape}: the batch is empty.")
    if not shape or shape[0] % local_devices:
      raise ValueError(
          f"batch leaf '{path_str(path)}' has shape {shape}; its leading (batch) axis must "
          f"be divisible by the {local_devices} local devices of the mesh."
      )
    if isinstance(x, jax.Array) and jax.process_count() == 1:
      return jax.device_put(x, sharding)  # already on device: no host round trip
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))

  return jax.tree_util.tree_map_with_path(put, batch)


def pace(count: int, value: PyTree) -> None:
  """Waits for `value` on every `MAX_IN_FLIGHT`-th call (`count` from 1) of a dispatch loop.

  A Python loop over jitted steps runs ahead of the devices, queueing programs.
  With several CPU devices (`--xla_force_host_platform_device_count`), XLA:CPU
  aborts the process when about a hundred programs with collectives are queued
  ("Expected 8 threads to join the rendezvous, but only 4 of them arrived"), so
  there every loop that dispatches such programs bounds how far it runs ahead.
  Elsewhere (one device, GPUs, TPUs) it never waits. `value` must be an output of
  the latest dispatch that is not donated to the next one.
  """
  if count % MAX_IN_FLIGHT == 0 and _cpu_collectives():
    jax.block_until_ready(value)


@functools.cache
def _cpu_collectives() -> bool:
  """Whether this process runs collectives between several XLA:CPU devices."""
  return jax.default_backend() == "cpu" and jax.device_count() > 1


def accumulate(
    score_fn: Callable[..., PyTree],
    params: PyTree,
    batches: Iterable[PyTree],
    *,
    key: jax.Array | None = None,
    num_batches: int | None = None,
    mesh: Mesh | None = None,
    progress: bool = False,
    constants: PyTree | None = None,
    strict: bool = False,
) -> PyTree:
  """The mean of `score_fn(params, batch)` over `batches`.

  Args:
    score_fn: `score_fn(params, batch) -> pytree`, e.g.
      `functools.partial(scores.oba, loss_fn)`. With `key`, it is called as
      `score_fn(params, batch, key=k)` with a fresh key per batch (for `obd`).
    params: the parameters (replicated over the mesh unless already on it).
    batches: an iterable of batch pytrees (this process's shard of each batch).
    key: optional PRNG key, folded with the batch index.
    num_batches: stop after this many batches (for endless iterators).
    mesh: the device mesh; default all devices along one 'data' axis.
    progress: show a progress bar with rate and ETA.
    constants: arrays the score needs besides `params` (e.g. a model's BatchNorm
      statistics), passed as `score_fn(params, batch, constants=...)` and
      replicated over the mesh.
    strict: when `batches` ends before `num_batches`, raise a ValueError instead
      of warning (the mean is then over the batches there were).

  Returns:
    The mean score over the batches, sharded like `params`. Half-precision
    (float16, bfloat16) scores are summed and returned in float32: a running sum of
    hundreds of batches in bfloat16 loses a tenth of its value to rounding.
    Non-finite parameters are refused by name before any batch, and scores that are
    all zero warn with the likely reason (`validate.warn_if_zero`).

  Compiles once: the jitted step is kept for a hashable `score_fn` (a frozen
  dataclass, a module-level function; not a fresh `functools.partial` or
  lambda), so every later call with the same function, shapes and shardings,
  e.g. each step of a pruning schedule and each criterion of a comparison,
  reuses it. Pass what changes from call to call through `params` and
  `constants`, never as values captured by `score_fn`.
  """
  if num_batches is not None and num_batches < 1:
    raise ValueError(f"num_batches must be >= 1 or None, got {num_batches}.")
  check_finite_params(params)
  mesh = data_mesh() if mesh is None else mesh
  param_shardings = jax.tree.map(lambda x: _param_sharding(x, mesh), params)
  params = jax.device_put(params, param_shardings)
  constants = None if constants is None else replicate(constants, mesh)
  signature = (score_fn, key is not None, constants is not None)
  try:
    step = _cached_step(*signature)
  except TypeError:  # an unhashable score_fn: a step of its own
    step = _make_step(*signature)

  batches = itertools.islice(batches, num_batches)
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    batches = tqdm(batches, total=num_batches, desc="scores", unit="batch")
  total, flags, count, first = None, [], 0, None
  for count, batch in enumerate(batches, start=1):
    first = batch if first is None else first
    batch = shard_batch(batch, mesh)
    batch_key = None if key is None else jax.random.fold_in(key, count - 1)
    if total is None:
      shapes = jax.eval_shape(_call(*signature), params, batch, batch_key, constants)
      total = _zeros_like(shapes, params, param_shardings, mesh)
    with jax.set_mesh(mesh):  # per-example work maps over each device's own examples
      total, finite = step(total, params, batch, batch_key, constants)
    flags.append(finite)
    pace(count, finite)
  if total is None:
    raise ValueError("accumulate got no batches: the iterable was empty.")
  if num_batches is not None and count < num_batches:
    message = (f"accumulate: the batches ran out after {count} of num_batches={num_batches}; "
               f"the scores are the mean over {count}.")
    if strict:
      raise ValueError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=2)
  bad = [i for i, ok in enumerate(jax.device_get(flags)) if not ok]
  if bad:
    raise FloatingPointError(
        f"scores are NaN or Inf in {len(bad)} of {count} batches (first: batch {bad[0]}). "
        "Check the loss on those batches."
    )
  mean = _divided(total, count)  # one program, not one per leaf (see `pace`)
  warn_if_zero(mean, f"accumulate over {count} batches", first)
  return mean


def _call(score_fn: Callable[..., PyTree], with_key: bool, with_constants: bool) -> Callable:
  """`call(params, batch, key, constants)`: `score_fn` with the keywords it takes."""

  def call(p, b, k, c):
    keywords = {**({"key": k} if with_key else {}), **({"constants": c} if with_constants else {})}
    return score_fn(p, b, **keywords)

  return call


def _make_step(score_fn: Callable[..., PyTree], with_key: bool, with_constants: bool) -> Callable:
  """The jitted `step(total, params, batch, key, constants) -> (total + score, finite)`."""
  call = _call(score_fn, with_key, with_constants)

  @functools.partial(runtime.jit, donate_argnums=0)
  def score_step(total, p, b, k, c):
    s = call(p, b, k, c)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(s)]))
    return jax.tree.map(lambda t, x: t + x.astype(t.dtype), total, s), finite

  return score_step


# Steps of hashable score functions, kept for reuse (a few: they hold their compiled code).
_cached_step = functools.lru_cache(maxsize=16)(_make_step)


@jax.jit
def _divided(tree: PyTree, count) -> PyTree:
  return jax.tree.map(lambda t: t / count, tree)


@jax.jit
def tree_add(a: PyTree, b: PyTree) -> PyTree:
  """a + b leaf by leaf, as one program (a running sum in a dispatch loop; see `pace`)."""
  return jax.tree.map(jnp.add, a, b)


def _zeros_like(shapes: PyTree, params: PyTree, param_shardings: PyTree, mesh: Mesh) -> PyTree:
  """Zeros for the running sum, sharded like params when scores mirror params (no compile)."""
  if jax.tree.structure(shapes) == jax.tree.structure(params):
    shardings = param_shardings
  else:
    shardings = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), shapes)
  return jax.tree.map(
      lambda s, sharding: jax.make_array_from_callback(
          s.shape, sharding, lambda index: np.zeros(s.shape, sum_dtype(s.dtype))[index]),
      shapes, shardings)


def sum_dtype(dtype) -> np.dtype:
  """The dtype a running sum of `dtype` values is kept in: float32 for half precision."""
  return np.dtype(jnp.float32) if dtype in (jnp.float16, jnp.bfloat16) else np.dtype(dtype)
