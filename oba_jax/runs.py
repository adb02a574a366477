"""Run bookkeeping: what a resumable run keeps in its workdir, and how it comes back.

A run's workdir holds orbax checkpoints (`checkpoints/<step>`, written
atomically, the last two kept) and a metrics history (`metrics.jsonl`, one JSON
record per line). Each checkpoint carries the run's *identity*: the settings
that determine the result, the shapes of what is trained, a digest of the mask
and any `extra_state` of the caller. `RunDir` refuses to resume a checkpoint of
another run and names what differs, before anything is written.

Data iterators resume exactly when they have JSON-able `get_state`/`set_state`
(a grain iterator, or any iterator wrapped by `resumable`): grain's orbax
handler saves their position with every checkpoint, one file per process.

This module owns the files; what a step computes belongs to `oba_jax.train`.
It imports nothing of oba_jax but `delta` (paths), and `train` imports it.
"""

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from oba_jax.delta import path_str

PyTree = Any
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINTS_KEPT = 2


def identity(
    settings: dict,
    params: PyTree,
    model_state: PyTree,
    mask: PyTree | None,
    extra_state: dict | None,
    batches: Iterator[PyTree],
) -> dict:
  """What a checkpoint must match to be resumed, as it reads back from JSON.

  Args:
    settings: the fields of the run's config that determine its result.
    params, model_state: the trained arrays (their paths, dtypes and shapes count).
    mask: the mask kept during the run, or None (its digest counts).
    extra_state: the caller's JSON-able dict, or None.
    batches: the data iterator (whether its position is saved counts).
  """
  if extra_state is not None and not isinstance(extra_state, dict):
    raise TypeError(f"extra_state must be a dict or None, got {type(extra_state).__name__}.")
  shapes = lambda tree: {
      path_str(path): f"{jnp.result_type(leaf)}{list(jnp.shape(leaf))}"
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }
  run = {
      "config": settings,
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


def digest(tree: PyTree) -> str:
  """A SHA-256 of a pytree's paths, dtypes, shapes and values: which model, exactly."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    leaf = np.asarray(leaf)
    digest.update(f"{path_str(path)}{leaf.dtype}{leaf.shape}".encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


def _digest(mask: PyTree) -> str:
  """A SHA-256 of the mask's paths, shapes and values."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(mask)[0]:
    leaf = np.asarray(leaf, bool)
    digest.update(f"{path_str(path)}{leaf.shape}".encode())
    digest.update(np.packbits(leaf).tobytes())
  return digest.hexdigest()


class RunDir:
  """The checkpoints and metrics of one run in `workdir`; a context manager.

  `start` is the step of the latest checkpoint (0 when there is none), checked
  to belong to the run of `run` (`identity`): a checkpoint of another run is a
  ValueError and nothing is written. `history` holds the metrics records up to
  `start`; later records (written after that checkpoint by a killed run) are
  dropped from the file.
  """

  def __init__(self, workdir: str | os.PathLike, run: dict):
    self.workdir = os.path.abspath(workdir)
    self.run = run
    self._metrics = os.path.join(self.workdir, METRICS_FILE)
    self._manager = ocp.CheckpointManager(
        os.path.join(self.workdir, CHECKPOINT_DIR),
        options=ocp.CheckpointManagerOptions(max_to_keep=CHECKPOINTS_KEPT),
    )
    try:
      self.start = self._manager.latest_step() or 0
      if self.start:
        self._check_same_run()
      self.history = _history_until(self._metrics, self.start)
    except BaseException:
      self._manager.close()
      raise

  def __enter__(self) -> "RunDir":
    return self

  def __exit__(self, *exc_info) -> None:
    self._manager.close()

  def record(self, entry: dict) -> None:
    """Appends a metrics record (written by process 0)."""
    self.history.append(entry)
    if jax.process_index() == 0:
      with open(self._metrics, "a") as f:
        f.write(json.dumps(entry) + "\n")

  def save(self, step: int, state: PyTree, *, mask: PyTree | None, config: dict,
           batches: Iterator[PyTree]) -> None:
    """Checkpoints `state` (and the mask, the config and the data position) at `step`."""
    items = {
        "state": ocp.args.StandardSave(state),
        "meta": ocp.args.JsonSave({"run": self.run, "config": config}),
    }
    if mask is not None:
      items["mask"] = ocp.args.StandardSave(mask)
    if isinstance(batches, grain.DatasetIterator):
      items["data"] = grain.checkpoint.CheckpointSave(batches)
    self._manager.save(step, args=ocp.args.Composite(**items))

  def restore(self, like: PyTree, batches: Iterator[PyTree]) -> PyTree:
    """The state saved at `start`, placed like `like`; moves a grain `batches` there too."""
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like
    )
    items = {"state": ocp.args.StandardRestore(target)}
    if isinstance(batches, grain.DatasetIterator):
      items["data"] = grain.checkpoint.CheckpointRestore(batches)
    try:
      restored = self._manager.restore(self.start, args=ocp.args.Composite(**items))["state"]
    except Exception as error:  # orbax, tensorstore and grain raise many kinds
      raise unreadable(self.workdir, self.start, error) from error
    return type(like)(*restored) if isinstance(like, tuple) else restored

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def _check_same_run(self) -> None:
    """Raises ValueError naming what differs if the latest checkpoint is of another run."""
    step = self.start
    try:
      saved = self._manager.restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except KeyError:
      raise ValueError(
          f"{self.workdir} holds a checkpoint (step {step}) that finetune did not "
          "write; nothing was changed. Use another workdir."
      ) from None
    except Exception as error:
      raise unreadable(self.workdir, step, error) from error
    differences = list(_differences(saved["run"], self.run))
    if differences:
      shown = "; ".join(differences[:5]) + (
          f"; and {len(differences) - 5} more" if len(differences) > 5 else ""
      )
      raise ValueError(
          f"{self.workdir} holds a checkpoint (step {step}) of another run; nothing was "
          f"changed. Use another workdir, or delete this one to start over. "
          f"Differences: {shown}."
      )


def unreadable(workdir: str, step: int, error: Exception) -> ValueError:
  """The error for a checkpoint that cannot be read: which one, and how to go on."""
  reason = (str(error).strip().splitlines() or [""])[0][:200]
  step_dir = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR, str(step))
  return ValueError(
      f"checkpoint step {step} in {step_dir} cannot be read ({type(error).__name__}: "
      f"{reason}). It is damaged (e.g. a disk filled up or a copy was cut short) or was "
      f"written by another version of oba_jax. Delete {step_dir} to resume from the previous "
      "checkpoint, or the whole workdir to start over.")


def _differences(saved: Any, current: Any, path: str = "") -> Iterator[str]:
  """'path is <saved> in the checkpoint, <current> now' for every leaf where they differ."""
  if isinstance(saved, dict) and isinstance(current, dict):
    for key in dict.fromkeys([*current, *saved]):  # in the order of the current run
      yield from _differences(
          saved.get(key, "absent"), current.get(key, "absent"), f"{path}.{key}" if path else key
      )
  elif saved != current:
    yield f"{path} is {saved!r} in the checkpoint, {current!r} now"


def latest_step(workdir: str | os.PathLike) -> int | None:
  """The step of the latest checkpoint in `workdir`, or None if it holds none."""
  directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return None
  with ocp.CheckpointManager(directory) as manager:
    return manager.latest_step()


def read_extra_state(workdir: str | os.PathLike) -> dict | None:
  """The `extra_state` saved with the latest checkpoint in `workdir`, or None if there is none.

  E.g. the pruning plan and widths needed to rebuild a compacted model before resuming.
  """
  step = latest_step(workdir)
  if step is None:
    return None
  with ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)) as manager:
    try:
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      return meta["run"]["extra_state"]
    except Exception as error:
      raise unreadable(workdir, step, error) from error


def read_state(workdir: str | os.PathLike) -> tuple[int, dict] | None:
  """(step, state) of the latest checkpoint in `workdir`, or None if it holds none.

  The state is the saved `TrainState` as a dict ("params", "model_state",
  "opt_state", "sums") of arrays on this process's first device, whatever
  number of devices wrote it.
  """
  step = latest_step(workdir)
  if step is None:
    return None
  path = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR, str(step), "state")
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      metadata = checkpointer.metadata(path).item_metadata
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            metadata)
      return step, checkpointer.restore(path, target)
  except Exception as error:
    raise unreadable(workdir, step, error) from error


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


# --- data iterators that resume ----------------------------------------------------


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


def resumable(batches: Iterable[PyTree]) -> Iterator[PyTree]:
  """An iterator over `batches` that grain can checkpoint, when `batches` has a state."""
  iterator = iter(batches)
  if isinstance(iterator, grain.DatasetIterator) or not _has_state(iterator):
    return iterator
  return _Resumable(iterator)


def _has_state(iterator: Any) -> bool:
  return hasattr(iterator, "get_state") and hasattr(iterator, "set_state")


def replayable(batches: Iterable[PyTree]) -> Callable[[], Iterable[PyTree]]:
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
