"""Fine-tuning and evaluation of Flax NNX classifiers: optax SGD, masks kept, exact resumption.

`finetune` runs one jitted step per batch from a Python loop (on XLA:CPU,
convolution gradients inside `lax.scan` run 30-60x slower). Each batch is
sharded along its leading axis over a device mesh (`estimate.shard_batch`) and
the parameters, the other model state and the optimizer state are replicated,
so a step computes exactly the single-device update of the whole batch,
training-mode BatchNorm included. Multi-host: after `jax.distributed.initialize()`
every process feeds its own shard of each batch.

Everything a step depends on is checkpointed with orbax in `workdir`: the
parameters, the model's other state (BatchNorm statistics, RNG streams), the
optimizer state (momentum, step count), the metric sums, the data iterator's
position, the mask and the run's fingerprint. Orbax copies the arrays to host
before `save` returns (so the next step may donate them) and writes each
checkpoint atomically, so a run killed at any point and restarted resumes from
its latest checkpoint and ends with the same parameters, bit for bit on the
same devices, as a run that was never interrupted.

The configuration is a frozen dataclass, `TrainConfig`; an ml_collections
ConfigDict converts with `TrainConfig(**config_dict)`.

This module trains and evaluates. It does not score, plan or build masks: a
mask comes from `oba_jax.masks`, and `masks.keep_pruned` keeps it.
"""

import collections
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from oba_jax import masks
from oba_jax.delta import check_like, path_str
from oba_jax.estimate import DATA_AXIS, data_mesh, shard_batch
from oba_jax.functional import softmax_cross_entropy
from oba_jax.validate import check_choice

PyTree = Any
SCHEDULES = ("multistep", "cosine")
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
_CHECKPOINTS_KEPT = 2


def _bookkeeping(default):
  """A config field that does not change the result, so a resumed run may change it."""
  return dataclasses.field(default=default, metadata={"bookkeeping": True})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How to fine-tune: the optimizer, its schedule, the run's length and its bookkeeping.

  The defaults are the paper code's fine-tuning recipe: SGD with learning rate
  1e-3, momentum 0.9, weight decay 1e-4 on all parameters, the learning rate
  times 0.1 at 50% and 75% of the run, batches of 64.

  Attributes:
    steps: the run's length in steps; or give `epochs` and `steps_per_epoch`.
    epochs: the run's length in epochs of `steps_per_epoch` steps.
    steps_per_epoch: batches per epoch (with `epochs` only).
    batch_size: examples per step, over all processes.
    learning_rate: the initial learning rate.
    momentum: SGD momentum, in [0, 1).
    weight_decay: L2 coefficient added to every gradient, as torch.optim.SGD does.
    schedule: "multistep" (PyTorch's MultiStepLR) or "cosine" (decay to 0 at the end).
    milestones: with "multistep", where the learning rate is multiplied by
      `gamma`, as fractions of the run in (0, 1), increasing. PyTorch's epoch
      milestones m of an E-epoch run are m / E here.
    gamma: the multistep factor, in (0, 1].
    seed: seeds the model's RNG streams (dropout) at the start of the run.
    log_every: steps between records of the training loss, accuracy and learning rate.
    eval_every: steps between evaluations (None: only at the end).
    checkpoint_every: steps between checkpoints (one is also written at the end).
  """

  steps: int | None = None
  epochs: int | None = None
  steps_per_epoch: int | None = None
  batch_size: int = 64
  learning_rate: float = 1e-3
  momentum: float = 0.9
  weight_decay: float = 1e-4
  schedule: str = "multistep"
  milestones: tuple[float, ...] = (0.5, 0.75)
  gamma: float = 0.1
  seed: int = 0
  log_every: int = _bookkeeping(50)
  eval_every: int | None = _bookkeeping(None)
  checkpoint_every: int = _bookkeeping(500)

  def __post_init__(self):
    object.__setattr__(self, "milestones", tuple(self.milestones))
    _check_config(self)

  @property
  def total_steps(self) -> int:
    return self.steps if self.steps is not None else self.epochs * self.steps_per_epoch

  def identity(self) -> dict[str, Any]:
    """The fields that determine the trained parameters (all but the bookkeeping)."""
    return {
        f.name: getattr(self, f.name)
        for f in dataclasses.fields(self)
        if not f.metadata.get("bookkeeping")
    }


def _check_config(config: TrainConfig) -> None:
  """Raises ValueError naming the first field out of its accepted range."""
  if (config.steps is None) == (config.epochs is None):
    raise ValueError(
        f"give exactly one of steps and epochs, got steps={config.steps}, "
        f"epochs={config.epochs}."
    )
  if (config.epochs is None) != (config.steps_per_epoch is None):
    raise ValueError(
        f"steps_per_epoch={config.steps_per_epoch} goes with epochs (and only "
        f"with it), got epochs={config.epochs}."
    )
  for name in (
      "steps",
      "epochs",
      "steps_per_epoch",
      "batch_size",
      "log_every",
      "eval_every",
      "checkpoint_every",
  ):
    value = getattr(config, name)
    if value is not None and (not isinstance(value, int) or value < 1):
      raise ValueError(f"{name}={value!r} must be a positive integer.")
  if not config.learning_rate > 0:
    raise ValueError(f"learning_rate={config.learning_rate} must be > 0.")
  if not 0 <= config.momentum < 1:
    raise ValueError(f"momentum={config.momentum} must be in [0, 1).")
  if not config.weight_decay >= 0:
    raise ValueError(f"weight_decay={config.weight_decay} must be >= 0.")
  check_choice("schedule", config.schedule, SCHEDULES)
  fractions = config.milestones
  if not all(0 < f < 1 for f in fractions) or any(a >= b for a, b in zip(fractions, fractions[1:])):
    raise ValueError(f"milestones={fractions} must be increasing fractions of the run, in (0, 1).")
  if not 0 < config.gamma <= 1:
    raise ValueError(f"gamma={config.gamma} must be in (0, 1].")
  if not isinstance(config.seed, int) or not 0 <= config.seed < 2**32:
    raise ValueError(f"seed={config.seed!r} must be an integer in [0, 2**32).")


def learning_rate_schedule(config: TrainConfig, total_steps: int) -> optax.Schedule:
  """The learning rate at each step (counted from 0) of a `total_steps` run."""
  if total_steps < 1:
    raise ValueError(f"total_steps={total_steps} must be a positive integer.")
  if config.schedule == "cosine":
    return optax.cosine_decay_schedule(config.learning_rate, total_steps)
  scales = collections.defaultdict(lambda: 1.0)  # two milestones may round to one step
  for fraction in config.milestones:
    scales[round(fraction * total_steps)] *= config.gamma
  return optax.piecewise_constant_schedule(config.learning_rate, dict(scales))


def make_optimizer(
    config: TrainConfig, total_steps: int, mask: PyTree | None = None
) -> optax.GradientTransformation:
  """SGD with momentum and weight decay as in torch.optim.SGD; masked entries never move.

  Adding `weight_decay * params` to the gradient before the momentum gives
  PyTorch's update: b = momentum * b + g + weight_decay * p; p -= lr * b.
  With a mask (True = kept), the optimizer is wrapped in `masks.keep_pruned`.
  """
  tx = optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(learning_rate_schedule(config, total_steps), momentum=config.momentum),
  )
  return tx if mask is None else masks.keep_pruned(tx, mask)


class TrainState(NamedTuple):
  """What a train step updates: pure dicts of arrays, replicated over the mesh.

  Attributes:
    params: the model's `nnx.Param`s.
    model_state: its other variables (BatchNorm statistics, RNG streams).
    opt_state: the optimizer state.
    sums: training loss, correct predictions, examples and steps since the last record.
  """

  params: PyTree
  model_state: PyTree
  opt_state: optax.OptState
  sums: dict[str, jax.Array]


def _zero_sums() -> dict[str, jax.Array]:
  return {
      "loss": jnp.zeros((), jnp.float32),
      "correct": jnp.zeros((), jnp.int32),
      "examples": jnp.zeros((), jnp.int32),
      "steps": jnp.zeros((), jnp.int32),
  }


def make_train_step(
    graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, mesh: Mesh
) -> Callable[[TrainState, PyTree], TrainState]:
  """A jitted `step(state, batch) -> state` on softmax cross-entropy.

  `graphdef` is the model's in training mode, so BatchNorm normalises with the
  batch statistics and updates its running averages, which the new state
  carries. `batch` is `{"image", "label"}`, sharded over `mesh`
  (`estimate.shard_batch`); the state is donated and comes back replicated.
  """

  def step(state: TrainState, batch: PyTree) -> TrainState:
    def loss_fn(params):
      model = nnx.merge(graphdef, nnx.State(params), nnx.State(state.model_state), copy=True)
      logits = model(batch["image"])
      model_state = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
      return softmax_cross_entropy(logits, batch["label"]), (logits, model_state)

    (loss, (logits, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    correct = jnp.sum(jnp.argmax(logits, -1) == batch["label"], dtype=jnp.int32)
    batch_sums = {"loss": loss, "correct": correct, "examples": batch["label"].shape[0], "steps": 1}
    sums = {name: state.sums[name] + value for name, value in batch_sums.items()}
    return TrainState(optax.apply_updates(state.params, updates), model_state, opt_state, sums)

  return jax.jit(step, out_shardings=NamedSharding(mesh, PartitionSpec()), donate_argnums=0)


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
  graphdef, params, model_state = _split_pure(model, training=False)
  params, model_state = _replicated((params, model_state), mesh)
  return _evaluate(graphdef, params, model_state, batches, mesh)


def _replicated(tree: PyTree, mesh: Mesh) -> PyTree:
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


def _split_pure(model: nnx.Module, *, training: bool) -> tuple[nnx.GraphDef, dict, dict]:
  """A copy of `model` in training or inference mode, split into graphdef, params, other state."""
  model = nnx.clone(model)
  model.train() if training else model.eval()
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(model_state)


@functools.partial(jax.jit, static_argnums=0)
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


def _evaluate(
    graphdef: nnx.GraphDef,
    params: PyTree,
    model_state: PyTree,
    batches: Iterable[PyTree],
    mesh: Mesh,
) -> dict[str, float]:
  sums, count = [], 0
  for batch, batch_count in _aligned_batches(batches, mesh.local_mesh.shape[DATA_AXIS]):
    sums.append(_eval_sums(graphdef, params, model_state, shard_batch(batch, mesh)))
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


def finetune(
    model: nnx.Module,
    train_batches: Iterable[PyTree],
    config: TrainConfig,
    *,
    workdir: str | os.PathLike,
    eval_batches: Iterable[PyTree] | None = None,
    mask: PyTree | None = None,
    mesh: Mesh | None = None,
    extra_state: dict | None = None,
    progress: bool = True,
) -> tuple[nnx.Module, list[dict]]:
  """Fine-tunes `model` with softmax cross-entropy, resuming from `workdir` if it holds a run.

  Each step is `make_train_step` on one batch; `config` says how many, with
  which optimizer (`make_optimizer`). With a mask, the masked entries are set
  to 0 at the start and stay exactly 0. Records are appended to
  `workdir/metrics.jsonl`: `{"step", "loss", "accuracy", "lr", "time"}` every
  `config.log_every` steps (means since the previous record), and
  `{"step", "eval_accuracy", "eval_loss", "eval_count", "time"}` after each
  evaluation.

  Checkpoints go to `workdir/checkpoints` every `config.checkpoint_every`
  steps and at the end. If `workdir` holds one, the run resumes from the
  latest: `train_batches` is moved to the saved position with its
  `set_state` (an iterator without `get_state`/`set_state` must yield the
  same batches again; the ones already used are skipped), and records written
  after that checkpoint are dropped. A finished run returns at once. A
  checkpoint of another run (another config, model shapes, mask or
  `extra_state`) is an error, and nothing is written.

  Args:
    model: the classifier; left as it is (the result is a new module).
    train_batches: this process's shard of each batch `{"image", "label"}`, at
      least as many as the run's steps. A grain iterator (`oba_jax.data.load`)
      or any iterator with JSON-able `get_state()`/`set_state(state)` resumes
      exactly.
    config: the optimizer, schedule, length and bookkeeping of the run.
    workdir: the run's directory, created if needed.
    eval_batches: evaluated every `config.eval_every` steps and at the end; a
      collection (read again for each evaluation) or an iterator with
      `get_state`/`set_state` (rewound).
    mask: True where an entry is kept, like the params (see `oba_jax.masks`).
    mesh: a device mesh with a 'data' axis; default all devices along it.
    extra_state: a JSON-able dict saved with every checkpoint (e.g. the pruning
      plan and widths that rebuild the model); see `read_extra_state`.
    progress: show a progress bar with rate and ETA (on process 0).

  Returns:
    The fine-tuned model in inference mode, and all records of the run.
  """
  if not isinstance(config, TrainConfig):
    raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}.")
  if not isinstance(model, nnx.Module):
    raise TypeError(f"model must be an nnx.Module, got {type(model).__name__}.")
  replay_eval = None if eval_batches is None else _replayable(eval_batches)
  if config.eval_every is not None and eval_batches is None:
    raise ValueError(f"config.eval_every={config.eval_every} needs eval_batches.")
  batches = _resumable(train_batches)
  graphdef, params, model_state = _split_pure(_reseeded(model, config.seed), training=True)
  eval_graphdef = _split_pure(model, training=False)[0]
  if mask is not None:
    check_like(mask, params, "mask", scalar_leaves_ok=True)
  run = _run_identity(config, params, model_state, mask, extra_state, batches)

  mesh = data_mesh() if mesh is None else mesh
  workdir = os.path.abspath(workdir)
  metrics_path = os.path.join(workdir, METRICS_FILE)
  manager = ocp.CheckpointManager(
      os.path.join(workdir, CHECKPOINT_DIR),
      options=ocp.CheckpointManagerOptions(max_to_keep=_CHECKPOINTS_KEPT),
  )
  try:
    start = manager.latest_step() or 0
    if start:
      _check_same_run(manager, start, run, workdir)
    if mask is not None:
      mask = _replicated(jax.tree.map(jnp.asarray, mask), mesh)
      params = masks.apply(params, mask)
    optimizer = make_optimizer(config, config.total_steps, mask)
    state = _replicated(TrainState(params, model_state, optimizer.init(params), _zero_sums()), mesh)
    if start:
      state = _restore(manager, start, state, batches)
    if not isinstance(batches, grain.DatasetIterator):  # yields the same batches again: skip
      batches = itertools.islice(batches, start, None)
    history = _history_until(metrics_path, start)

    def record(entry: dict) -> None:
      _append(metrics_path, history, entry)

    def checkpoint(step: int, state: TrainState) -> None:
      manager.save(step, args=_save_args(state, mask, run, config, batches))

    def evaluate_state(state: TrainState) -> dict[str, float]:
      return _evaluate(eval_graphdef, state.params, state.model_state, replay_eval(), mesh)

    state = _train(
        state,
        batches,
        config,
        start=start,
        train_step=make_train_step(graphdef, optimizer, mesh),
        evaluate_state=None if replay_eval is None else evaluate_state,
        checkpoint=checkpoint,
        record=record,
        mesh=mesh,
        progress=progress,
    )
    manager.wait_until_finished()
  finally:
    manager.close()
  trained = nnx.merge(eval_graphdef, nnx.State(state.params), nnx.State(state.model_state))
  return trained, history


def _train(
    state: TrainState,
    batches: Iterator[PyTree],
    config: TrainConfig,
    *,
    start: int,
    train_step: Callable[[TrainState, PyTree], TrainState],
    evaluate_state: Callable[[TrainState], dict] | None,
    checkpoint: Callable[[int, TrainState], None],
    record: Callable[[dict], None],
    mesh: Mesh,
    progress: bool,
) -> TrainState:
  """The loop from step `start` to the end: steps, records, evaluations and checkpoints."""
  total = config.total_steps
  schedule = learning_rate_schedule(config, total)
  with tqdm(
      total=total,
      initial=start,
      unit="step",
      desc="finetune",
      disable=not progress or jax.process_index() != 0,
  ) as bar:
    for step in range(start + 1, total + 1):
      batch = next(batches, None)
      if batch is None:
        raise ValueError(f"train_batches ran out after {step - 1} of the run's {total} steps.")
      _check_batch(batch, config.batch_size)
      state = train_step(
          state, shard_batch({"image": batch["image"], "label": batch["label"]}, mesh)
      )
      bar.update()
      if step % config.log_every == 0 or step == total:
        sums = jax.device_get(state.sums)
        state = state._replace(sums=_replicated(_zero_sums(), mesh))
        loss = float(sums["loss"] / sums["steps"])
        record(
            {
                "step": step,
                "loss": loss,
                "accuracy": float(sums["correct"] / sums["examples"]),
                "lr": float(schedule(step - 1)),
                "time": time.time(),
            }
        )
        bar.set_postfix(loss=f"{loss:.4f}")
      if evaluate_state is not None and (
          step == total or (config.eval_every and step % config.eval_every == 0)
      ):
        result = evaluate_state(state)
        record(
            {
                "step": step,
                **{f"eval_{name}": value for name, value in result.items()},
                "time": time.time(),
            }
        )
      if step % config.checkpoint_every == 0 or step == total:
        checkpoint(step, state)
  return state


def _check_batch(batch: PyTree, batch_size: int) -> None:
  """Raises ValueError unless `batch` is this process's share of a `batch_size` batch."""
  if not isinstance(batch, Mapping) or not {"image", "label"} <= batch.keys():
    keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
    raise ValueError(f"a training batch must be a dict with 'image' and 'label', got {keys}.")
  size = len(batch["label"]) * jax.process_count()
  if size != batch_size:
    raise ValueError(
        f"a batch of {len(batch['label'])} examples on each of "
        f"{jax.process_count()} processes is {size}, not config.batch_size="
        f"{batch_size}."
    )


def _reseeded(model: nnx.Module, seed: int) -> nnx.Module:
  """A copy of `model` whose RNG streams (dropout, ...) restart from `seed`."""
  model = nnx.clone(model)
  streams = sorted(
      {node.tag for _, node in nnx.iter_graph(model) if isinstance(node, nnx.RngStream)}
  )
  if streams:
    key = jax.random.key(seed)
    nnx.reseed(model, **{tag: jax.random.fold_in(key, i) for i, tag in enumerate(streams)})
  return model


class _Resumable(grain.DatasetIterator):
  """Any iterator with JSON-able `get_state`/`set_state`, as grain's orbax handler takes it.

  grain saves one state file per process, so every host resumes its own shard.
  """

  def __init__(self, iterator: Iterator[PyTree]):
    super().__init__()
    self._iterator = iterator

  def __next__(self) -> PyTree:
    return next(self._iterator)

  def get_state(self) -> dict:
    return self._iterator.get_state()

  def set_state(self, state: dict) -> None:
    self._iterator.set_state(state)


def _resumable(batches: Iterable[PyTree]) -> Iterator[PyTree]:
  """An iterator over `batches` that grain can checkpoint, when `batches` has a state."""
  iterator = iter(batches)
  if isinstance(iterator, grain.DatasetIterator) or not _has_state(iterator):
    return iterator
  return _Resumable(iterator)


def _has_state(iterator: Any) -> bool:
  return hasattr(iterator, "get_state") and hasattr(iterator, "set_state")


def _replayable(batches: Iterable[PyTree]) -> Callable[[], Iterable[PyTree]]:
  """A function giving the batches again from the start, or TypeError if they cannot be."""
  if iter(batches) is not batches:  # a collection or dataset: each iter() starts over
    return lambda: batches
  if not _has_state(batches):
    raise TypeError(
        f"eval_batches is a one-shot {type(batches).__name__}; evaluations need "
        "a collection (e.g. a list) or an iterator with get_state/set_state."
    )
  start = batches.get_state()

  def rewound():
    batches.set_state(start)
    return batches

  return rewound


def _run_identity(
    config: TrainConfig,
    params: PyTree,
    model_state: PyTree,
    mask: PyTree | None,
    extra_state: dict | None,
    batches: Iterator[PyTree],
) -> dict:
  """What a checkpoint must match to be resumed, as it reads back from JSON."""
  if extra_state is not None and not isinstance(extra_state, dict):
    raise TypeError(f"extra_state must be a dict or None, got {type(extra_state).__name__}.")
  shapes = lambda tree: {
      path_str(path): f"{jnp.result_type(leaf)}{list(jnp.shape(leaf))}"
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }
  run = {
      "config": config.identity(),
      "params": shapes(params),
      "model_state": shapes(model_state),
      "mask": None if mask is None else _digest(mask),
      "extra_state": extra_state,
      "data_iterator_state": isinstance(batches, grain.DatasetIterator),
  }
  try:
    return json.loads(json.dumps(run))
  except TypeError as error:
    raise ValueError(
        f"extra_state must be JSON-able (dicts, lists, strings, numbers, bools, None): {error}"
    ) from None


def _digest(mask: PyTree) -> str:
  """A SHA-256 of the mask's paths, shapes and values."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(mask)[0]:
    leaf = np.asarray(leaf, bool)
    digest.update(f"{path_str(path)}{leaf.shape}".encode())
    digest.update(np.packbits(leaf).tobytes())
  return digest.hexdigest()


def _check_same_run(manager: ocp.CheckpointManager, step: int, run: dict, workdir: str) -> None:
  """Raises ValueError naming what differs if the checkpoint at `step` is of another run."""
  try:
    saved = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except KeyError:
    raise ValueError(
        f"{workdir} holds a checkpoint (step {step}) that finetune did not "
        "write; nothing was changed. Use another workdir."
    ) from None
  differences = list(_differences(saved["run"], run))
  if differences:
    shown = "; ".join(differences[:5]) + (
        f"; and {len(differences) - 5} more" if len(differences) > 5 else ""
    )
    raise ValueError(
        f"{workdir} holds a checkpoint (step {step}) of another run; nothing was "
        f"changed. Use another workdir, or delete this one to start over. "
        f"Differences: {shown}."
    )


def _differences(saved: Any, current: Any, path: str = "") -> Iterator[str]:
  """'path is <saved> in the checkpoint, <current> now' for every leaf where they differ."""
  if isinstance(saved, dict) and isinstance(current, dict):
    for key in dict.fromkeys([*current, *saved]):  # in the order of the current run
      yield from _differences(
          saved.get(key, "absent"), current.get(key, "absent"), f"{path}.{key}" if path else key
      )
  elif saved != current:
    yield f"{path} is {saved!r} in the checkpoint, {current!r} now"


def _save_args(
    state: TrainState,
    mask: PyTree | None,
    run: dict,
    config: TrainConfig,
    batches: Iterator[PyTree],
) -> ocp.args.Composite:
  items = {
      "state": ocp.args.StandardSave(state),
      "meta": ocp.args.JsonSave({"run": run, "config": dataclasses.asdict(config)}),
  }
  if mask is not None:
    items["mask"] = ocp.args.StandardSave(mask)
  if isinstance(batches, grain.DatasetIterator):
    items["data"] = grain.checkpoint.CheckpointSave(batches)
  return ocp.args.Composite(**items)


def _restore(
    manager: ocp.CheckpointManager, step: int, state: TrainState, batches: Iterator[PyTree]
) -> TrainState:
  """The train state saved at `step`, placed like `state`; moves a grain `batches` there too."""
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
  )
  items = {"state": ocp.args.StandardRestore(target)}
  if isinstance(batches, grain.DatasetIterator):
    items["data"] = grain.checkpoint.CheckpointRestore(batches)
  return TrainState(*manager.restore(step, args=ocp.args.Composite(**items))["state"])


def read_extra_state(workdir: str | os.PathLike) -> dict | None:
  """The `extra_state` saved with the latest checkpoint in `workdir`, or None if there is none.

  E.g. the pruning plan and widths needed to rebuild a compacted model before resuming.
  """
  directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return None
  with ocp.CheckpointManager(directory) as manager:
    step = manager.latest_step()
    if step is None:
      return None
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  return meta["run"]["extra_state"]


def _history_until(path: str, step: int) -> list[dict]:
  """The records in `path` up to `step`; process 0 drops later ones from the file."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = f.read().splitlines()
  records = []
  for index, line in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if index != len(lines) - 1:  # only the last line may be cut short by a kill
        raise ValueError(f"{path} line {index + 1} is not JSON: {line[:80]!r}") from None
  kept = [r for r in records if r["step"] <= step]
  if len(kept) != len(lines) and jax.process_index() == 0:
    with open(path + ".tmp", "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(path + ".tmp", path)
  return kept


def _append(path: str, history: list[dict], record: dict) -> None:
  history.append(record)
  if jax.process_index() == 0:
    with open(path, "a") as f:
      f.write(json.dumps(record) + "\n")
