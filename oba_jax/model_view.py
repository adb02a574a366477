"""What the pruning drivers see of a model: an NNX module, or `apply_fn(params, *inputs)` and params.

The drivers (`oba_jax.prune`) step a *value*: an NNX module (masked,
recalibrated, fine-tuned) or, for a function, its parameter pytree. `ModelView`
does the few things that differ between the two: trace, score with the
objective, re-estimate BatchNorm statistics, compact and count. A module
compacts to a smaller module (`surgery.compact`), a function to
`Compacted(apply_fn, params)` (`surgery.compact_fn`). BatchNorm recalibration
applies to NNX modules holding `nnx.BatchNorm`; a function's normalisation is
its own. Masking needs no view: `masks.apply` takes a module or a pytree. This
module must not import `prune` or the experiments package.
"""

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from oba_jax import batchnorm, flops, structure, surgery
from oba_jax.criteria import checked_objective, importance, uses_batch_statistics
from oba_jax.delta import Prunable, path_str, prunable_mask
from oba_jax.functional import ObjectiveFn, functional

PyTree = Any


class Compacted(NamedTuple):
  """A function's compaction: `apply_fn(params, *inputs)` at the smaller shapes."""

  apply_fn: Callable[..., Any]
  params: PyTree


@dataclasses.dataclass(frozen=True)
class ModelView:
  """How to trace, score, recalibrate and compact the values of one model.

  Attributes:
    apply_fn: the function for a functional model; None for an NNX module (the
      value is the module itself).
    objective: `objective(apply_fn) -> Objective or loss_fn(params, batch)`.
    prunable: which entries are scored (`oba_jax.delta`); None: the naming rule.
  """

  apply_fn: Callable[..., Any] | None
  objective: ObjectiveFn
  prunable: Prunable | None = None

  @classmethod
  def of(cls, model: nnx.Module | Callable[..., Any], params: PyTree | None,
         objective: ObjectiveFn, criterion: str,
         prunable: Prunable | None = None) -> tuple["ModelView", Any]:
    """The view of `model` and its first value.

    Raises, before any work, when `objective` does not suit `criterion` or when
    no parameter entry is prunable (a naming the default rule misses).
    """
    if isinstance(model, nnx.Module):
      if params is not None:
        raise ValueError("params= goes with a function apply_fn(params, *inputs); an NNX model "
                         "holds its own parameters.")
      apply_fn, params = functional(model)
      view, value = cls(None, objective, prunable), model
    elif callable(model) and params is not None:
      view, value, apply_fn = cls(model, objective, prunable), params, model
    else:
      raise TypeError("the drivers prune an nnx.Module, or a function apply_fn(params, *inputs) "
                      f"with params=; got {type(model).__name__} and params="
                      f"{type(params).__name__}.")
    checked_objective(criterion, objective, apply_fn)
    if not any(bool(np.any(m)) for m in jax.tree.leaves(prunable_mask(params, prunable))):
      raise ValueError(
          f"no parameter is prunable with prunable={prunable!r}: the default rule takes leaves "
          "named kernel/weight/w (and bias/b beside them), and the parameters' paths look like "
          f"{[path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0][:3]]}. "
          "Pass prunable=lambda path, leaf: ... selecting the weights to prune.")
    return view, value

  def trace(self, value: Any, example_input: Any, ignore=()) -> structure.Structure:
    if self.apply_fn is None:
      return structure.trace(value, example_input, ignore=ignore)
    return structure.trace(self.apply_fn, example_input, params=value, ignore=ignore)

  def importance(self, criterion: str, value: Any, batches: Iterable[PyTree], **kwargs) -> PyTree:
    """`criteria.importance` of the value under the objective."""
    if self.apply_fn is None:
      return importance(criterion, value, batches, objective=self.objective,
                        prunable=self.prunable, **kwargs)
    return importance(criterion, self.apply_fn, batches, params=value,
                      objective=self.objective, prunable=self.prunable, **kwargs)

  def compact(self, value: Any, plan) -> nnx.Module | Compacted:
    if self.apply_fn is None:
      return surgery.compact(value, plan)
    return Compacted(*surgery.compact_fn(self.apply_fn, value, plan))

  def count(self, compacted: nnx.Module | Compacted, example_input: Any) -> flops.Count:
    if self.apply_fn is None:
      return flops.count(compacted, example_input)
    return flops.count(compacted.apply_fn, example_input, params=compacted.params)

  def recalibration(self, value: Any, config, calibration: Iterable[PyTree],
                    mesh: Mesh | None) -> Callable[..., tuple[Any, int]]:
    """`recalibrate(masked, first) -> (value to score, batches read)` for a run of `config`.

    Before every step but the first, a module scored with running-statistics
    BatchNorm gets statistics of its own (`batchnorm.recalibrate`): the dense
    model's statistics do not fit a network with channels removed, which then
    computes something close to chance. Batch statistics (`batchnorm="train"`,
    or a model in training mode) follow the pruned network by themselves.
    """
    count = config.recalibration_batches
    if self.apply_fn is not None or not count or not batchnorm.has_batchnorm(value):
      return lambda masked, first: (masked, 0)
    mode = config.batchnorm or ("train" if uses_batch_statistics(value) else "eval")
    if mode == "train":
      return lambda masked, first: (masked, 0)

    def recalibrate(masked, first):
      if first:
        return masked, 0
      return batchnorm.recalibrate(masked, calibration, num_batches=count, mesh=mesh), count

    return recalibrate
