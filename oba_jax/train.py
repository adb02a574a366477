"""Fine-tuning of Flax NNX models: optax SGD or AdamW, masks kept, exact resumption.

`finetune` runs one jitted step per batch from a Python loop (on XLA:CPU,
convolution gradients inside `lax.scan` run 30-60x slower). Each batch is
sharded along its leading axis over a device mesh (`estimate.shard_batch`) and
the parameters, the other model state and the optimizer state are replicated,
so a step computes exactly the single-device update of the whole batch,
training-mode BatchNorm included. Multi-host: after `jax.distributed.initialize()`
every process feeds its own shard of each batch.

Everything a step depends on is checkpointed in `workdir` (`oba_jax.runs`):
the parameters, the model's other state (BatchNorm statistics, RNG streams),
the optimizer state (momentum, step count), the metric sums, the data
iterator's position, the mask and the run's identity. Orbax copies the arrays
to host before `save` returns (so the next step may donate them) and writes
each checkpoint atomically, so a run killed at any point and restarted resumes
from its latest checkpoint and ends with the same parameters, bit for bit on
the same devices, as a run that was never interrupted.

The loss is softmax cross-entropy of a classifier by default; `loss=Loss(fn,
metrics)` trains on any `fn(model, batch) -> (loss, {metric: per-batch value})`,
e.g. the next-token loss of a language model (`oba_jax.recovery`). Only the
model's `nnx.Param`s are trained: a module that keeps other weights in another
variable type (`oba_jax.lora.Adapted`) trains its adapters alone.

The configuration (`TrainConfig`) and the optimizer it builds live in
`oba_jax.train_config` and are importable from here.

This module owns the optimisation: the step and the loop. Evaluation is
`oba_jax.evaluation` (`evaluate` is importable from here too), the workdir's
files are `oba_jax.runs`. It does not score, plan or build masks: a mask comes
from `oba_jax.masks`, and `masks.keep_pruned` keeps it. It must not import the
pruning modules (`criteria`, `prune`, `oracle`) or the experiments package.
"""

import dataclasses
import functools
import itertools
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import grain
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from oba_jax import masks, runs, runtime
from oba_jax.delta import check_like
from oba_jax.estimate import data_mesh, pace, replicate, shard_batch
from oba_jax.evaluation import evaluate, evaluate_split
from oba_jax.functional import softmax_cross_entropy, split_pure
from oba_jax.train_config import (SCHEDULES, TrainConfig, learning_rate_schedule,  # noqa: F401
                                  make_optimizer)

PyTree = Any
__all__ = ["Loss", "TrainConfig", "TrainState", "evaluate", "finetune", "learning_rate_schedule",
           "make_optimizer", "make_train_step"]


class Loss(NamedTuple):
  """A training loss other than classification's.

  Attributes:
    fn: `fn(model, batch) -> (loss, metrics)`: the scalar loss of the model (in
      training mode) on one batch, and {name: scalar} per-batch values whose means
      over the steps since the last record are recorded next to the loss.
    metrics: the names of `fn`'s metrics, in a fixed order (the checkpointed sums
      have them from the start).
  """

  fn: Callable[[nnx.Module, PyTree], tuple[jax.Array, dict[str, jax.Array]]]
  metrics: tuple[str, ...] = ()


class TrainState(NamedTuple):
  """What a train step updates: pure dicts of arrays, replicated over the mesh.

  Attributes:
    params: the model's `nnx.Param`s.
    model_state: its other variables (BatchNorm statistics, RNG streams).
    opt_state: the optimizer state.
    sums: training loss, correct predictions and examples (classification) or the
      `Loss`'s metrics, and steps since the last record, and `first_nonfinite`: the
      first of those steps (counted from 1) whose loss or updated parameters were NaN
      or Inf, 0 if none was.
  """

  params: PyTree
  model_state: PyTree
  opt_state: optax.OptState
  sums: dict[str, jax.Array]


def _zero_sums(loss: Loss | None = None) -> dict[str, jax.Array]:
  metrics = ({"correct": jnp.zeros((), jnp.int32), "examples": jnp.zeros((), jnp.int32)}
             if loss is None else {name: jnp.zeros((), jnp.float32) for name in loss.metrics})
  return {
      "loss": jnp.zeros((), jnp.float32),
      **metrics,
      "steps": jnp.zeros((), jnp.int32),
      "first_nonfinite": jnp.zeros((), jnp.int32),
  }


def _classification(model: nnx.Module, batch: PyTree) -> tuple[jax.Array, dict]:
  """Softmax cross-entropy, correct predictions and examples (the default loss)."""
  logits = model(batch["image"])
  correct = jnp.sum(jnp.argmax(logits, -1) == batch["label"], dtype=jnp.int32)
  return (softmax_cross_entropy(logits, batch["label"]),
          {"correct": correct, "examples": batch["label"].shape[0]})


def _summary(sums: dict, loss: Loss | None) -> dict[str, float]:
  """The record of `sums`: mean loss, and accuracy or each metric's mean over the steps."""
  steps = int(sums["steps"])
  out = {"loss": float(sums["loss"] / steps)}
  if loss is None:
    out["accuracy"] = float(sums["correct"] / sums["examples"])
  else:
    out.update({name: float(sums[name] / steps) for name in loss.metrics})
  return out


def make_train_step(
    graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, mesh: Mesh,
    loss: Loss | None = None,
) -> Callable[..., TrainState]:
  """A jitted `step(state, batch, mask=None) -> state` on softmax cross-entropy or `loss`.

  `graphdef` is the model's in training mode, so BatchNorm normalises with the
  batch statistics and updates its running averages, which the new state
  carries. `batch` is `{"image", "label"}` (or what `loss` reads), sharded over
  `mesh` (`estimate.shard_batch`); the state is donated and comes back replicated.
  A `mask` (True = kept, replicated) wraps `optimizer` in `masks.keep_pruned`
  inside the step: as an argument rather than a constant, so one compilation
  serves every mask of the same shapes (every fine-tune of a pruning run).
  """

  objective = _classification if loss is None else loss.fn

  def train_step(state: TrainState, batch: PyTree, mask: PyTree | None = None) -> TrainState:
    def loss_fn(params):
      model = nnx.merge(graphdef, nnx.State(params), nnx.State(state.model_state), copy=True)
      value, metrics = objective(model, batch)
      model_state = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
      return value, (metrics, model_state)

    (value, (metrics, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    tx = optimizer if mask is None else masks.keep_pruned(optimizer, mask)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if loss is not None and sorted(metrics) != sorted(loss.metrics):
      raise ValueError(f"the loss returned metrics {sorted(metrics)}, but Loss.metrics names "
                       f"{sorted(loss.metrics)}.")
    batch_sums = {"loss": value, **metrics, "steps": 1}
    sums = {name: state.sums[name] + jnp.asarray(v, state.sums[name].dtype)
            for name, v in batch_sums.items()}
    finite = jnp.isfinite(value) & jnp.all(
        jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
    first = state.sums["first_nonfinite"]
    sums["first_nonfinite"] = jnp.where((first == 0) & ~finite, sums["steps"], first)
    return TrainState(params, model_state, opt_state, sums)

  return runtime.jit(train_step, out_shardings=NamedSharding(mesh, PartitionSpec()),
                     donate_argnums=0)


@functools.lru_cache(maxsize=8)
def _optimizer_and_step(graphdef: nnx.GraphDef, config: TrainConfig, mesh: Mesh,
                        loss: Loss | None = None):
  """`config`'s optimizer and its `make_train_step`, built once per (model structure, recipe,
  mesh, loss): the fine-tunes of a pruning run differ only in their masks, arguments of the
  step."""
  optimizer = make_optimizer(config, config.total_steps)
  return optimizer, make_train_step(graphdef, optimizer, mesh, loss)


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
    desc: str = "finetune",
    loss: Loss | None = None,
) -> tuple[nnx.Module, list[dict]]:
  """Fine-tunes `model` with softmax cross-entropy or `loss`, resuming from `workdir` if it
  holds a run.

  Each step is `make_train_step` on one batch; `config` says how many, with
  which optimizer (`make_optimizer`). With a mask, the masked entries are set
  to 0 at the start and stay exactly 0. Records are appended to
  `workdir/metrics.jsonl`: `{"step", "loss", "accuracy", "lr", "time"}` (with
  `loss`: its metrics instead of the accuracy) every `config.log_every` steps
  (means since the previous record), and
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
    model: the classifier (or the model `loss` trains); left as it is (the result is
      a new module).
    train_batches: this process's shard of each batch `{"image", "label"}` (or the
      dict of arrays `loss` reads, all with the batch as leading axis), at
      least as many as the run's steps. A grain iterator (`oba_jax.data.load`)
      or any iterator with JSON-able `get_state()`/`set_state(state)` resumes
      exactly.
    config: the optimizer, schedule, length and bookkeeping of the run.
    workdir: the run's directory, created if needed.
    eval_batches: evaluated every `config.eval_every` steps, at `config.eval_at`
      and at the end; a collection (read again for each evaluation) or an
      iterator with `get_state`/`set_state` (rewound).
    mask: True where an entry is kept, like the params (see `oba_jax.masks`).
    mesh: a device mesh with a 'data' axis; default all devices along it.
    extra_state: a JSON-able dict saved with every checkpoint (e.g. the pruning
      plan and widths that rebuild the model); see `read_extra_state`.
    progress: show a progress bar with rate and ETA (on process 0).
    desc: the progress bar's label, e.g. the stage and criterion.
    loss: what to minimise instead of softmax cross-entropy (no `eval_batches` then:
      those are evaluated as a classifier's).

  Returns:
    The fine-tuned model in inference mode, and all records of the run.
  """
  if not isinstance(config, TrainConfig):
    raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}.")
  if not isinstance(model, nnx.Module):
    raise TypeError(f"model must be an nnx.Module, got {type(model).__name__}.")
  if loss is not None and not isinstance(loss, Loss):
    raise TypeError(f"loss must be a train.Loss(fn, metrics), got {type(loss).__name__}.")
  reserved = {"loss", "steps", "first_nonfinite"} & set(loss.metrics if loss else ())
  if reserved:
    raise ValueError(f"Loss.metrics may not be named {sorted(reserved)} (the loop's own sums).")
  if loss is not None and eval_batches is not None:
    raise ValueError("eval_batches are evaluated as a classifier's; with a loss, evaluate "
                     "the returned model instead.")
  replay_eval = None if eval_batches is None else runs.replayable(eval_batches)
  if (config.eval_every is not None or config.eval_at) and eval_batches is None:
    raise ValueError(f"config.eval_every={config.eval_every} and config.eval_at="
                     f"{config.eval_at} need eval_batches.")
  batches = runs.resumable(train_batches)
  graphdef, params, model_state = split_pure(_reseeded(model, config.seed), training=True)
  eval_graphdef = split_pure(model, training=False)[0]
  if mask is not None:
    check_like(mask, params, "mask", scalar_leaves_ok=True)
  run = runs.identity(config.identity(), params, model_state, mask, extra_state, batches)

  mesh = data_mesh() if mesh is None else mesh
  with runs.RunDir(workdir, run) as rundir:
    if mask is not None:
      mask = replicate(jax.tree.map(jnp.asarray, mask), mesh)
      params = masks.apply(params, mask)
    optimizer, train_step = _optimizer_and_step(graphdef, config, mesh, loss)  # the step masks
    state = replicate(
        TrainState(params, model_state, optimizer.init(params), _zero_sums(loss)), mesh)
    if rundir.start:
      state = rundir.restore(state, batches)
    if not isinstance(batches, grain.DatasetIterator):  # yields the same batches again: skip
      batches = itertools.islice(batches, rundir.start, None)

    def evaluate_state(state: TrainState) -> dict[str, float]:
      return evaluate_split(eval_graphdef, state.params, state.model_state, replay_eval(), mesh)

    def checkpoint(step: int, state: TrainState) -> None:
      rundir.save(step, state, mask=mask, config=dataclasses.asdict(config), batches=batches)

    state = _train(
        state,
        batches,
        config,
        start=rundir.start,
        train_step=functools.partial(train_step, mask=mask),
        evaluate_state=None if replay_eval is None else evaluate_state,
        checkpoint=checkpoint,
        record=rundir.record,
        mesh=mesh,
        progress=progress,
        workdir=rundir.workdir,
        desc=desc,
        loss=loss,
    )
    rundir.wait_until_finished()
  trained = nnx.merge(eval_graphdef, nnx.State(state.params), nnx.State(state.model_state))
  return trained, rundir.history


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
    workdir: str,
    desc: str = "finetune",
    loss: Loss | None = None,
) -> TrainState:
  """The loop from step `start` to the end: steps, records, evaluations and checkpoints.

  The loop stops with an error naming the step where the loss or the parameters
  turn non-finite, checked before every record and checkpoint.
  """
  total = config.total_steps
  schedule = learning_rate_schedule(config, total)
  with tqdm(total=total, initial=start, unit="step", desc=desc,
            disable=not progress or jax.process_index() != 0) as bar:
    for step in range(start + 1, total + 1):
      batch = next(batches, None)
      if batch is None:
        raise ValueError(f"train_batches ran out after {step - 1} of the run's {total} steps.")
      _check_batch(batch, config.batch_size, loss)
      if loss is None:
        batch = {"image": batch["image"], "label": batch["label"]}
      state = train_step(state, shard_batch(batch, mesh))
      pace(step - start, state)
      bar.update()
      logs = step % config.log_every == 0 or step == total
      saves = step % config.checkpoint_every == 0 or step == total
      if logs or saves:
        sums = jax.device_get(state.sums)
        _check_finite(sums, step, config, schedule, workdir)
      if logs:
        state = state._replace(sums=replicate(_zero_sums(loss), mesh))
        summary = _summary(sums, loss)
        record({"step": step, **summary, "lr": float(schedule(step - 1)), "time": time.time()})
        bar.set_postfix(loss=f"{summary['loss']:.4f}")
      if evaluate_state is not None and (
          step == total or step in config.eval_at
          or (config.eval_every and step % config.eval_every == 0)):
        result = evaluate_state(state)
        record({"step": step, **{f"eval_{name}": value for name, value in result.items()},
                "time": time.time()})
      if saves:
        checkpoint(step, state)
  return state


def _check_finite(sums: dict, step: int, config: TrainConfig, schedule: optax.Schedule,
                  workdir: str) -> None:
  """Raises FloatingPointError if a step since the last record diverged (nothing is saved)."""
  if not sums["first_nonfinite"]:
    return
  bad = step - int(sums["steps"]) + int(sums["first_nonfinite"])
  raise FloatingPointError(
      f"training in {workdir} diverged: the loss or the parameters became NaN or Inf at step "
      f"{bad} of {config.total_steps} (learning rate {float(schedule(bad - 1)):g} there). "
      f"Nothing from that step on was saved. Lower learning_rate (now {config.learning_rate:g}) "
      "or check the data; a rerun resumes from the last checkpoint.")


def _check_batch(batch: PyTree, batch_size: int, loss: Loss | None = None) -> None:
  """Raises ValueError unless `batch` is this process's share of a `batch_size` batch."""
  needed = {"image", "label"} if loss is None else set()
  if not isinstance(batch, Mapping) or not needed <= batch.keys() or not batch:
    keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
    wanted = "'image' and 'label'" if loss is None else "arrays"
    raise ValueError(f"a training batch must be a dict with {wanted}, got {keys}.")
  leaves = [batch["label"]] if loss is None else jax.tree.leaves(batch)
  rows = {len(x) for x in leaves}
  if len(rows) != 1:
    raise ValueError(f"the arrays of a training batch have {sorted(rows)} rows; one number "
                     "expected (the batch).")
  local = rows.pop()
  size = local * jax.process_count()
  if size != batch_size:
    raise ValueError(
        f"a batch of {local} examples on each of "
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
