"""Pruning pipelines over any JAX model and objective: one-shot, iterative and unstructured.

Each pipeline repeats one step: score the current model
(`criteria.importance`, with a criterion named in `criteria.CRITERIA`), turn
the scores into a decision and zero what it removes. A removed slice stays in
the model as zeros, so every step scores a model of the original shapes and the
next decision extends the last one.

- `one_shot`: S steps toward one target, with scores re-estimated before
  every step and no fine-tuning in between (the paper's one-shot pruning,
  method notes §4.3); the caller fine-tunes the result once.
- `iterative`: the same steps toward decreasing targets, fine-tuning with an
  injected function after each target and continuing from the fine-tuned model
  (method notes §4.4).
- `unstructured`: masks of individual weights along a density sweep (§4.5).

Every step scores the network the earlier steps left: with running-statistics
BatchNorm, the masked model's statistics are re-estimated first
(`StructuredConfig.recalibration_batches`), since the dense model's would
normalise it to near chance.

What to do is data: a frozen `StructuredConfig` (criterion, targets, step rule,
schedule, steps, batches per step, reduction, ranking, selection caps) or
`UnstructuredConfig` (`oba_jax.pruning_config`, re-exported here), checked when
it is built, so a bad setting fails before any work. What to run it on (model,
batches, PRNG key, objective, mesh, callback) are the drivers' arguments. The
model is an NNX module, or any function `apply_fn(params, *inputs)` with
`params=` (equinox, haiku, penzai, Linen, plain JAX; `oba_jax.model_view`), and
the objective any loss built from its apply function (default: classification):

  config = prune.StructuredConfig(criterion="oba", targets=0.5, steps=5)
  result = prune.one_shot(model, example_input, batches, config, key=key)
  result = prune.one_shot(apply_fn, x, batches, config, key=key, params=params,
                          objective=lambda apply_fn: my_loss, prunable=...)

Section numbers refer to the method notes, `../shared/docs/oba_method.md` in the
project workspace.

The decisions are the library's own: `structure.group_scores`, then
`plan.select` or the official rule (`oba_jax.procedure`) for structured steps,
`masks.global_density` or `masks.layerwise_density` for unstructured ones;
`surgery.compact` builds the smaller model at the end.
Models passed in are never modified. This module must not import the
experiments package.
"""

import dataclasses
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from oba_jax import flops, masks, plan, procedure, structure
from oba_jax.criteria import CRITERIA
from oba_jax.delta import Prunable
from oba_jax.functional import ObjectiveFn, classification
from oba_jax.model_view import Compacted, ModelView
from oba_jax.pruning_config import (DENSITY_SCOPES, SCHEDULES, StructuredConfig,
                                    UnstructuredConfig)

PyTree = Any
# What a step produces and callbacks receive: the NNX module, or a function's parameters.
Pruned = nnx.Module | PyTree


class UnreachableTarget(ValueError):
  """The official step rule ended its channel schedule without meeting the target: the
  criterion removed cheap channels (R = 1 - 0.9 * target of them), a finding about the rule
  and the criterion, not bad input. The official code loops forever in this case."""


@dataclasses.dataclass(frozen=True)
class StepRecord:
  """One structured pruning step.

  Attributes:
    step: the step's index in the run, from 0.
    target: the "library" procedure: the kept fraction of the dense cost
      (MACs or parameters) the step met; "official": the removed-channel
      ratio r_s of the step.
    kept_macs: the plan's kept MACs over the dense MACs.
    kept_params: the plan's kept parameters over the dense parameters.
    seconds: wall time of recalibration, scoring, selection and masking.
    score_seconds: the part of it spent scoring (compilation included).
    recalibration_batches: batches that re-estimated the BatchNorm statistics
      of the scored model before this step (0: it scored them as they were).
  """

  step: int
  target: float
  kept_macs: float
  kept_params: float
  seconds: float
  score_seconds: float
  recalibration_batches: int = 0


@dataclasses.dataclass(frozen=True)
class PruneResult:
  """A structured pruning result.

  Attributes:
    plan: the final plan; `plan.predicted` and `plan.dense` are the cost model's
      MACs and parameters after and before pruning.
    masked: the pruned model in the original shapes, removed slices zeroed: a
      module, or for a function `apply_fn` its parameters.
    compacted: the smaller model, `surgery.compact(masked, plan)`, or for a
      function `Compacted(*surgery.compact_fn(apply_fn, masked, plan))`.
    counted: `flops.count` of `compacted` on `example_input`, equal to `plan.predicted`.
    history: one record per step.
  """

  plan: plan.Plan
  masked: Pruned
  compacted: nnx.Module | Compacted
  counted: flops.Count
  history: tuple[StepRecord, ...]


# `callback(record, masked, plan)`, called after every structured step, e.g. to evaluate.
StepCallback = Callable[[StepRecord, Pruned, plan.Plan], None]



def one_shot(
    model: nnx.Module | Callable[..., Any],
    example_input: Any,
    batches: Iterable[PyTree],
    config: StructuredConfig,
    *,
    key: jax.Array,
    params: PyTree | None = None,
    objective: ObjectiveFn = classification,
    prunable: Prunable | None = None,
    mesh: Mesh | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
    calibration: Iterable[PyTree] | None = None,
) -> PruneResult:
  """Prunes channels to the target of `config`, re-scoring before each step.

  The paper's one-shot pruning: step s scores the current masked model, reduces
  the scores per group and removes more indices, extending the previous
  removals. There is no fine-tuning between steps. With the "library"
  procedure the s-th of `config.steps` steps meets the schedule's s-th kept-cost
  ratio (`plan.exponential_schedule`, `plan.linear_schedule`) and the last meets
  the target; with "official" the steps follow the official removed-channel
  schedule and stop once the cost meets the target (`oba_jax.procedure`).

  Args:
    model: the dense NNX model (left unchanged), or a function
      `apply_fn(params, *inputs)` with `params=`.
    example_input: an input for tracing and counting, e.g. a batch of one.
    batches: the scoring batches; every step reads `config.num_batches` of them
      (an iterator continues, a list starts again).
    config: what to prune and how, with exactly one target.
    key: PRNG key; step s uses `jax.random.fold_in(key, s)`.
    params: the dense parameters, when `model` is a function.
    objective: the loss scored: `objective(apply_fn) -> Objective or
      loss_fn(params, batch)`; default softmax cross-entropy of `{"image",
      "label"}` batches (`oba_jax.classification`); `oba_jax.next_token`, a
      contrastive loss or `lambda apply_fn: my_loss` work the same.
    prunable: which parameter entries are scored and may go, as in `oba_jax.delta`
      (None: the kernel/bias naming rule; a predicate `(path, leaf) -> bool` for
      parameters named otherwise).
    mesh: the device mesh for scoring.
    callback: called after every step with its record, masked model and plan.
    progress: show a progress bar while scoring.
    calibration: the batches that recalibrate BatchNorm before each step
      (`config.recalibration_batches` of them per step; None: read them from
      `batches`).
  """
  _check_config(config, StructuredConfig)
  if len(config.targets) != 1:
    raise ValueError(
        f"one_shot prunes to one target, got targets={config.targets}: use `iterative`, or "
        "one_shot once per target (dataclasses.replace(config, targets=t)).")
  (result,) = _structured(model, example_input, batches, config, None, key=key, mesh=mesh,
                          callback=callback, progress=progress, calibration=calibration,
                          params=params, objective=objective, prunable=prunable)
  return result


def iterative(
    model: nnx.Module | Callable[..., Any],
    example_input: Any,
    batches: Iterable[PyTree],
    config: StructuredConfig,
    *,
    finetune: Callable[[Pruned, plan.Plan], Pruned],
    key: jax.Array,
    params: PyTree | None = None,
    objective: ObjectiveFn = classification,
    prunable: Prunable | None = None,
    mesh: Mesh | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
    calibration: Iterable[PyTree] | None = None,
) -> tuple[PruneResult, ...]:
  """Prunes to each of the decreasing `config.targets` in turn, fine-tuning after each.

  The paper's iterative pruning (its targets: 0.6, 0.5, 0.4, 0.3, 0.2, 0.1,
  0.05): one schedule of `config.steps` steps runs to the last target (as the
  official run's one pruner does, R = 0.955 for 0.05), and every target cuts
  it. The steps whose ratios lie above a target run as in `one_shot`, one more
  step meets the target exactly (none if it falls on the schedule), then
  `finetune(masked_model, plan)` trains the pruned model, and pruning toward the
  next target continues from the model it returns. That model is masked with
  the plan again, which changes nothing when fine-tuning keeps pruned weights at
  zero (`masks.keep_pruned`). The other arguments are those of `one_shot`.

  Args:
    finetune: `finetune(masked_model, plan) -> fine-tuned model` of the same
      shapes (for a function: its masked parameters in, parameters out);
      called after every target, the last included.

  Returns:
    One result per target, holding the fine-tuned model (`masked`) and its
    compaction; each history lists that target's steps.
  """
  _check_config(config, StructuredConfig)
  if not callable(finetune):
    raise TypeError(f"finetune={finetune!r} is not a callable(masked_model, plan) -> model.")
  return _structured(model, example_input, batches, config, finetune, key=key, mesh=mesh,
                     callback=callback, progress=progress, calibration=calibration,
                     params=params, objective=objective, prunable=prunable)


@dataclasses.dataclass(frozen=True)
class DensityStep:
  """One unstructured pruning step: the kept fraction of the prunable entries, the wall time,
  and the batches that recalibrated BatchNorm before it (as in `StepRecord`)."""

  step: int
  density: float
  seconds: float
  recalibration_batches: int = 0


@dataclasses.dataclass(frozen=True)
class SparseResult:
  """The model pruned to one density of an unstructured sweep.

  Attributes:
    density: the kept fraction of the prunable entries (conv and dense kernels
      and biases), met exactly: over all of them, or in every leaf with scope
      "layerwise".
    mask: bools like the parameters (`oba_jax.functional(model)[1]` for a module),
      True where an entry is kept.
    masked: the model (for a function: its parameters) with the other entries zeroed.
    history: the steps from the previous density to this one.
  """

  density: float
  mask: PyTree
  masked: Pruned
  history: tuple[DensityStep, ...]


# `callback(record, masked, mask)`, called after every unstructured step.
DensityCallback = Callable[[DensityStep, Pruned, PyTree], None]




def unstructured(
    model: nnx.Module | Callable[..., Any],
    batches: Iterable[PyTree],
    config: UnstructuredConfig,
    *,
    key: jax.Array,
    params: PyTree | None = None,
    objective: ObjectiveFn = classification,
    prunable: Prunable | None = None,
    mesh: Mesh | None = None,
    callback: DensityCallback | None = None,
    progress: bool = False,
    calibration: Iterable[PyTree] | None = None,
) -> tuple[SparseResult, ...]:
  """Masks single weights along the decreasing `config.densities`, re-scoring at every step.

  From one density to the next, `config.steps_per_density` steps follow an
  exponential schedule (the paper's run takes 49 steps from 1 to 0.1). Each
  step scores the current masked model and keeps the highest-|score| entries.
  Pruned entries rank below every kept one, so each mask keeps a subset of the
  previous one. Unlike the official code, scores are not accumulated across
  steps and |θ| is not added to them (method notes §4.5). No fine-tuning.

  Args:
    model: the dense NNX model (left unchanged), or a function with `params=`.
    batches: the scoring batches, as in `one_shot`.
    config: what to prune and how.
    key, params, objective, prunable, mesh, progress, calibration: as in `one_shot`.
    callback: called after every step with its record, masked model and mask.

  Returns:
    One result per density.
  """
  _check_config(config, UnstructuredConfig)
  keep_largest = DENSITY_SCOPES[config.scope]
  view, model = ModelView.of(model, params, objective, config.criterion, prunable)
  recalibrate = view.recalibration(model, config,
                                   batches if calibration is None else calibration, mesh)
  results, mask, masked, above, step = [], None, model, 1.0, 0
  for density in config.densities:
    ratios = plan.exponential_schedule(density / above, config.steps_per_density)
    history = []
    for step_density in [above * r for r in ratios[:-1]] + [density]:
      start = time.perf_counter()
      masked, recalibrated = recalibrate(masked, first=step == 0)
      score = view.importance(config.criterion, masked, batches,
                              num_batches=config.num_batches, key=jax.random.fold_in(key, step),
                              mesh=mesh, progress=progress, batchnorm=config.batchnorm)
      mask = jax.block_until_ready(keep_largest(_below_kept(score, mask), step_density,
                                                prunable=prunable))
      masked = masks.apply(model, mask)
      history.append(DensityStep(step, step_density, time.perf_counter() - start, recalibrated))
      if callback is not None:
        callback(history[-1], masked, mask)
      step += 1
    results.append(SparseResult(density, mask, masked, tuple(history)))
    above = density
  return tuple(results)


def _structured(
    model: nnx.Module | Callable[..., Any],
    example_input: Any,
    batches: Iterable[PyTree],
    config: StructuredConfig,
    finetune: Callable[[Pruned, plan.Plan], Pruned] | None,
    *,
    key: jax.Array,
    mesh: Mesh | None,
    callback: StepCallback | None,
    progress: bool,
    calibration: Iterable[PyTree] | None,
    params: PyTree | None,
    objective: ObjectiveFn,
    prunable: Prunable | None,
) -> tuple[PruneResult, ...]:
  """Structured steps along the schedule to the last target, stopping at every target.

  With the "library" procedure the steps toward a target take the schedule's
  kept-cost ratios between it and the previous target and end at the target
  itself; with "official" they take the next channel ratios of one schedule
  until the cost meets the target. `finetune` (if any) runs at every target.
  """
  targets = config.targets
  official = config.procedure == "official"
  if official and prunable is None:  # what the official code scores the criterion on
    prunable = CRITERIA[config.criterion].official_prunable
  view, model = ModelView.of(model, params, objective, config.criterion, prunable)
  traced = view.trace(model, example_input, ignore=config.ignore)
  # Whether the caps allow the last target does not depend on the scores: check it
  # (and the selection settings) before scoring anything.
  zeros = {g.name: np.zeros(g.size) for g in traced.groups}
  plan.select(traced, zeros, target=targets[-1], **config.selection)
  if official:
    ratios = iter(procedure.channel_ratios(config.schedule_name, targets[-1].ratio, config.steps))
  else:
    ratios = SCHEDULES[config.schedule_name](targets[-1].ratio, config.steps)
  recalibrate = view.recalibration(model, config,
                                   batches if calibration is None else calibration, mesh)

  results, chosen, masked, above, step = [], None, model, 1.0, 0
  for target in targets:
    history, measure = [], target.measure
    steps = ratios if official else [r for r in ratios if target.ratio < r < above] + [
        target.ratio]
    for ratio in steps:
      start = time.perf_counter()
      masked, recalibrated = recalibrate(masked, first=step == 0)
      scored = time.perf_counter()
      score = view.importance(config.criterion, masked, batches,
                              num_batches=config.num_batches, key=jax.random.fold_in(key, step),
                              mesh=mesh, progress=progress, batchnorm=config.batchnorm)
      jax.block_until_ready(score)
      score_seconds = time.perf_counter() - scored
      removed = {} if chosen is None else chosen.removed
      ranked = structure.group_scores(traced, score, reduction=config.reduction,
                                      prunable=prunable)
      if config.ranking == "per_cost":
        ranked = procedure.per_cost(traced, ranked, removed, measure)
      if official:
        chosen = procedure.official_step(traced, ranked, ratio=ratio, max_ratio=config.max_ratio,
                                         round_to=config.round_to, already_removed=removed)
      else:
        chosen = plan.select(traced, ranked, target=type(target)(ratio),
                             already_removed=removed, **config.selection)
      masked = masks.apply(model, chosen)
      kept, dense = chosen.predicted, chosen.dense
      history.append(StepRecord(step, ratio, kept.macs / dense.macs, kept.params / dense.params,
                                time.perf_counter() - start, score_seconds, recalibrated))
      if callback is not None:
        callback(history[-1], masked, chosen)
      step += 1
      if official and getattr(kept, measure) <= target.ratio * getattr(dense, measure):
        break
    else:
      if official:
        raise UnreachableTarget(
            f"procedure='official' did not reach {target} in steps={config.steps}: the last "
            f"step keeps {getattr(kept, measure) / getattr(dense, measure):.4g} of the "
            f"{measure} (its channel ratio ends at R = 1 - 0.9 * {targets[-1].ratio}). Use "
            "more steps, a higher max_ratio or procedure='library'.")
    if finetune is not None:
      model = masked = masks.apply(finetune(masked, chosen), chosen)
    compacted = view.compact(masked, chosen)
    counted = view.count(compacted, example_input)
    results.append(PruneResult(chosen, masked, compacted, counted, tuple(history)))
    above = target.ratio
  return tuple(results)


def _below_kept(score: PyTree, mask: PyTree | None) -> PyTree:
  """|score| on kept entries, floored at the smallest normal float, and 0 on pruned ones.

  Every kept entry then outranks every pruned one in `masks.global_density`
  and `masks.layerwise_density`, so a lower density removes a superset.
  """
  if mask is None:
    return score
  return jax.tree.map(
      lambda s, keep: jnp.where(keep, jnp.maximum(jnp.abs(s), jnp.finfo(s.dtype).tiny), 0),
      score,
      mask,
  )


def _check_config(config, kind: type) -> None:
  if not isinstance(config, kind):
    raise TypeError(f"config must be a prune.{kind.__name__}, got {type(config).__name__}.")
