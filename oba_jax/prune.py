"""Pruning pipelines over NNX models: one-shot, iterative and unstructured.

Each pipeline repeats one step: score the current model (`importance`, with a
criterion named in `CRITERIA`), turn the scores into a decision and zero what
it removes. A removed slice stays in the model as zeros, so every step scores a
model of the original shapes and the next decision extends the last one.

- `one_shot`: S steps along a kept-cost schedule to one target, with scores
  re-estimated before every step and no fine-tuning in between (the paper's
  one-shot pruning, method notes §4.3); the caller fine-tunes the result once.
- `iterative`: the same steps toward decreasing targets, fine-tuning with an
  injected function after each target and continuing from the fine-tuned model
  (method notes §4.4).
- `unstructured`: masks of individual weights along a density sweep (§4.5).

Section numbers refer to the method notes, `../shared/docs/oba_method.md` in the
project workspace.

The decisions are the library's own: `structure.group_scores` and `plan.select`
for structured steps, `masks.global_density` or `masks.layerwise_density` for
unstructured ones; `surgery.compact` builds the smaller model at the end.
Models passed in are never modified.
"""

import dataclasses
import functools
import numbers
import time
import types
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from oba_jax import flops, masks, plan, scores, structure, surgery
from oba_jax.functional import classification, functional
from oba_jax.validate import check_choice

PyTree = Any
StructuredTarget = plan.KeptFlops | plan.KeptParams


@dataclasses.dataclass(frozen=True)
class Criterion:
  """How a named criterion scores the parameters of a classifier.

  Attributes:
    score: `score(objective, params, batch, key, delta=None) -> pytree like
      params`; `delta` is the removal it predicts (default: every prunable entry,
      `oba_jax.delta.removal_delta`).
    uses_data: False when the score ignores the batch (magnitude, random): it
      is computed once, reading no batches.
    entrywise: True when entry i of the score depends on δᵢ alone (magnitude,
      first-order Taylor, OBD's diagonal), so the prediction for removing any
      subset is the sum of its entries under the full-removal delta. Scores with
      a full curvature (OBA) or higher Taylor orders couple the entries.
    per_example: True when the score runs the model one example at a time (the
      Fisher diagonal), which needs inference-mode normalisation: with batch
      statistics each example would be normalised by its own.
  """

  score: Callable[..., PyTree]
  uses_data: bool = True
  entrywise: bool = False
  per_example: bool = False


def _magnitude(objective, params, batch, key, delta=None):
  del objective, batch, key  # scores the weights alone
  return scores.magnitude(params, delta=delta)


def _random(objective, params, batch, key, delta=None):
  del objective, batch  # scores at random, on the entries that `delta` moves
  moved = None if delta is None else jax.tree.map(lambda d: d != 0, delta)
  return scores.random(key, params, prunable=moved)


def _taylor(objective, params, batch, key, delta=None, *, order):
  del key  # deterministic
  return scores.taylor(objective.loss, params, batch, order=order, delta=delta)


def _obd(objective, params, batch, key, delta=None, *, diag):
  return scores.obd(objective.loss, params, batch, key=key, diag=diag, delta=delta,
                    model_fn=objective.model)


def _oba(objective, params, batch, key, delta=None, *, curvature):
  del key  # deterministic
  return scores.oba(
      objective.loss,
      params,
      batch,
      delta=delta,
      curvature=curvature,
      model_fn=objective.model,
      output_loss_fn=objective.output_loss,
  )


# Criteria by name. "taylor" is the first-order term gᵢδᵢ (the paper's Taylor
# baseline, |θ·g| per channel after the reduction), "oba" the exact-Hessian OBA
# score, "oba_residual" what the official OBA code computes, "taylor3" and
# "taylor4" the third and fourth Taylor terms; `oba_jax.scores` defines each.
CRITERIA = types.MappingProxyType(
    dict(
        magnitude=Criterion(_magnitude, uses_data=False, entrywise=True),
        random=Criterion(_random, uses_data=False, entrywise=True),
        taylor=Criterion(functools.partial(_taylor, order=1), entrywise=True),
        obd_fisher=Criterion(functools.partial(_obd, diag="fisher"), entrywise=True,
                             per_example=True),
        obd_hutchinson=Criterion(functools.partial(_obd, diag="hutchinson"), entrywise=True),
        oba=Criterion(functools.partial(_oba, curvature="hessian")),
        oba_residual=Criterion(functools.partial(_oba, curvature="residual")),
        oba_ggn=Criterion(functools.partial(_oba, curvature="ggn")),
        taylor3=Criterion(functools.partial(_taylor, order=3)),
        taylor4=Criterion(functools.partial(_taylor, order=4)),
    )
)

# Kept-cost schedules by name: the OBA runs use "exponential", the baselines "linear".
SCHEDULES = types.MappingProxyType(
    dict(exponential=plan.exponential_schedule, linear=plan.linear_schedule)
)

# Unstructured rankings by name: one over all weights (the paper's), or one per leaf.
DENSITY_SCOPES = types.MappingProxyType(
    {"global": masks.global_density, "layerwise": masks.layerwise_density}
)


def importance(
    criterion: str,
    model: nnx.Module,
    batches: Iterable[PyTree],
    *,
    num_batches: int | None,
    key: jax.Array,
    mesh: Mesh | None = None,
    progress: bool = False,
) -> dict:
  """The mean score of `criterion` over `num_batches` batches, per parameter.

  The batches are `{"image", "label"}` dicts and the loss is the softmax
  cross-entropy (`oba_jax.classification`), averaged data-parallel over `mesh`
  by `scores.accumulate`. "magnitude" and "random" read no batches.

  BatchNorm is used in the model's current mode, and its running statistics are
  never updated. The paper scores in training mode (`model.train()`: batch
  statistics). There BatchNorm is scale invariant, so a conv's own scores over
  an output channel cancel to rounding noise and the channel's importance comes
  from its consumers' input channels (method notes §2.8). `model.eval()` keeps
  those terms (README, "BatchNorm mode").

  Args:
    criterion: a name in `CRITERIA`.
    model: the NNX model to score.
    batches: an iterable of batches; an iterator is consumed as it is read.
    num_batches: how many batches to average (None: all of them).
    key: PRNG key for the random criteria ("random", "obd_*").
    mesh: the device mesh of `scores.accumulate` (default: all devices).
    progress: show a progress bar.

  Returns:
    A nested dict like `oba_jax.functional(model)[1]`, the model's parameters.
  """
  check_choice("criterion", criterion, CRITERIA)
  _check_num_batches(num_batches)
  scorer = CRITERIA[criterion]
  if scorer.per_example and uses_batch_statistics(model):
    raise ValueError(
        f"criterion {criterion!r} runs the model one example at a time, and this model has "
        "BatchNorm in training mode (batch statistics), which would normalise each example by "
        "itself. Call model.eval() before scoring with it.")
  apply_fn, params = functional(model)
  objective = classification(apply_fn)
  if not scorer.uses_data:
    return scorer.score(objective, params, None, key)
  return scores.accumulate(
      functools.partial(scorer.score, objective),
      params,
      batches,
      key=key,
      num_batches=num_batches,
      mesh=mesh,
      progress=progress,
  )


def uses_batch_statistics(model: nnx.Module) -> bool:
  """Whether a BatchNorm of `model` normalises with batch statistics (training mode)."""
  return any(isinstance(m, nnx.BatchNorm) and not m.use_running_average
             for _, m in nnx.iter_modules(model))


@dataclasses.dataclass(frozen=True)
class StepRecord:
  """One structured pruning step.

  Attributes:
    step: the step's index in the run, from 0.
    target: the kept fraction of the dense cost (MACs or parameters) it met.
    kept_macs: the plan's kept MACs over the dense MACs.
    kept_params: the plan's kept parameters over the dense parameters.
    seconds: wall time of scoring, selection and masking.
  """

  step: int
  target: float
  kept_macs: float
  kept_params: float
  seconds: float


@dataclasses.dataclass(frozen=True)
class PruneResult:
  """A structured pruning result.

  Attributes:
    plan: the final plan; `plan.predicted` and `plan.dense` are the cost model's
      MACs and parameters after and before pruning.
    masked: the pruned model in the original shapes, removed slices zeroed.
    compacted: the smaller model, `surgery.compact(masked, plan)`.
    counted: `flops.count(compacted, example_input)`, equal to `plan.predicted`.
    history: one record per step.
  """

  plan: plan.Plan
  masked: nnx.Module
  compacted: nnx.Module
  counted: flops.Count
  history: tuple[StepRecord, ...]


# `callback(record, masked, plan)`, called after every structured step, e.g. to evaluate.
StepCallback = Callable[[StepRecord, nnx.Module, plan.Plan], None]


def one_shot(
    model: nnx.Module,
    example_input: jax.Array,
    batches: Iterable[PyTree],
    *,
    criterion: str,
    target: float | StructuredTarget,
    steps: int = 50,
    schedule: str = "exponential",
    reduction: str = "paper",
    scope: str = "global",
    max_ratio: float = 0.95,
    round_to: int | None = None,
    ignore: Sequence[str] = (),
    num_batches: int | None = 200,
    key: jax.Array,
    mesh: Mesh | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> PruneResult:
  """Prunes channels to `target` in `steps` steps, re-scoring before each.

  The paper's one-shot pruning: step s scores the current masked model, reduces
  the scores per group and selects the removals that meet the schedule's s-th
  kept-cost ratio, extending the previous removals. There is no fine-tuning
  between steps; step `steps` meets `target`.

  The official code schedules the removed *channel* ratio (exponentially to
  R = 1 - 0.9 * target) and stops once the FLOPs reach the target. Here the
  schedule (`plan.exponential_schedule`, `plan.linear_schedule`) is on the kept
  cost itself, which the exact cost model meets at every step.

  Args:
    model: the dense NNX model (left unchanged).
    example_input: an input for tracing and counting, e.g. a batch of one.
    batches: the scoring batches; every step reads `num_batches` of them (an
      iterator continues, a list starts again).
    criterion: a name in `CRITERIA`.
    target: the kept fraction of the dense MACs (a float, the paper's target),
      or a `plan.KeptFlops` / `plan.KeptParams`.
    steps: the number of scoring and selection steps, S.
    schedule: a name in `SCHEDULES`.
    reduction: the group score reduction, a name in `structure.REDUCTIONS`.
    scope, max_ratio, round_to: as in `plan.select`.
    ignore: parameter path prefixes never pruned, as in `structure.trace`.
    num_batches: batches averaged per step (None: all of `batches`).
    key: PRNG key; step s uses `jax.random.fold_in(key, s)`.
    mesh: the device mesh for scoring.
    callback: called after every step with its record, masked model and plan.
    progress: show a progress bar while scoring.
  """
  target = _kept_target(target, "target")
  ratios = _schedule(schedule, target.ratio, steps)
  (result,) = _structured(
      model,
      example_input,
      batches,
      ratios,
      (target,),
      None,
      criterion=criterion,
      reduction=reduction,
      selection=dict(scope=scope, max_ratio=max_ratio, round_to=round_to),
      ignore=ignore,
      num_batches=num_batches,
      key=key,
      mesh=mesh,
      callback=callback,
      progress=progress,
  )
  return result


def iterative(
    model: nnx.Module,
    example_input: jax.Array,
    batches: Iterable[PyTree],
    *,
    targets: Sequence[float | StructuredTarget] = (0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05),
    finetune: Callable[[nnx.Module, plan.Plan], nnx.Module],
    criterion: str,
    steps: int = 50,
    schedule: str = "exponential",
    reduction: str = "paper",
    scope: str = "global",
    max_ratio: float = 0.95,
    round_to: int | None = None,
    ignore: Sequence[str] = (),
    num_batches: int | None = 200,
    key: jax.Array,
    mesh: Mesh | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> tuple[PruneResult, ...]:
  """Prunes to each of the decreasing `targets` in turn, fine-tuning after each.

  The paper's iterative pruning: one schedule of `steps` steps runs to the last
  target (as the official run's one pruner does, R = 0.955 for 0.05), and every
  target cuts it. The steps whose ratios lie above a target run as in
  `one_shot`, one more step meets the target exactly, then
  `finetune(masked_model, plan)` trains the pruned model, and pruning toward the
  next target continues from the model it returns. That model is masked with
  the plan again, which changes nothing when fine-tuning keeps pruned weights at
  zero (`masks.keep_pruned`). The other arguments are those of `one_shot`.

  Args:
    targets: kept fractions of the dense MACs (floats), or `plan.KeptFlops` or
      `plan.KeptParams` of one kind, strictly decreasing, each in (0, 1].
    finetune: `finetune(masked_model, plan) -> fine-tuned model` of the same
      shapes; called after every target, the last included.
    steps: the schedule's steps to the last target; each earlier target adds
      one step (none if it falls on the schedule).

  Returns:
    One result per target, holding the fine-tuned model (`masked`) and its
    compaction; each history lists that target's steps.
  """
  targets = _checked_targets(targets)
  ratios = _schedule(schedule, targets[-1].ratio, steps)
  if not callable(finetune):
    raise TypeError(f"finetune={finetune!r} is not a callable(masked_model, plan) -> model.")
  return _structured(
      model,
      example_input,
      batches,
      ratios,
      targets,
      finetune,
      criterion=criterion,
      reduction=reduction,
      selection=dict(scope=scope, max_ratio=max_ratio, round_to=round_to),
      ignore=ignore,
      num_batches=num_batches,
      key=key,
      mesh=mesh,
      callback=callback,
      progress=progress,
  )


@dataclasses.dataclass(frozen=True)
class DensityStep:
  """One unstructured pruning step: the kept fraction of the prunable entries, the wall time."""

  step: int
  density: float
  seconds: float


@dataclasses.dataclass(frozen=True)
class SparseResult:
  """The model pruned to one density of an unstructured sweep.

  Attributes:
    density: the kept fraction of the prunable entries (conv and dense kernels
      and biases), met exactly: over all of them, or in every leaf with scope
      "layerwise".
    mask: bools like `oba_jax.functional(model)[1]`, True where an entry is kept.
    masked: the model with the other entries zeroed.
    history: the steps from the previous density to this one.
  """

  density: float
  mask: PyTree
  masked: nnx.Module
  history: tuple[DensityStep, ...]


# `callback(record, masked, mask)`, called after every unstructured step.
DensityCallback = Callable[[DensityStep, nnx.Module, PyTree], None]


def unstructured(
    model: nnx.Module,
    batches: Iterable[PyTree],
    *,
    criterion: str,
    densities: Sequence[float] = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1),
    steps_per_density: int = 1,
    scope: str = "global",
    num_batches: int | None = 200,
    key: jax.Array,
    mesh: Mesh | None = None,
    callback: DensityCallback | None = None,
    progress: bool = False,
) -> tuple[SparseResult, ...]:
  """Masks single weights along a decreasing density sweep, re-scoring at every step.

  From one density to the next, `steps_per_density` steps follow an
  exponential schedule (the paper's run takes 49 steps from 1 to 0.1). Each
  step scores the current masked model and keeps the highest-|score| entries.
  Pruned entries rank below every kept one, so each mask keeps a subset of the
  previous one. Unlike the official code, scores are not accumulated across
  steps and |θ| is not added to them (method notes §4.5). No fine-tuning.

  Args:
    model: the dense NNX model (left unchanged).
    batches: the scoring batches, as in `one_shot`.
    criterion: a name in `CRITERIA`.
    densities: kept fractions of the prunable entries, strictly decreasing,
      each in (0, 1].
    steps_per_density: steps from one density to the next.
    scope: a name in `DENSITY_SCOPES`.
    num_batches, key, mesh, progress: as in `one_shot`.
    callback: called after every step with its record, masked model and mask.

  Returns:
    One result per density.
  """
  check_choice("criterion", criterion, CRITERIA)
  _check_decreasing(densities, "densities")
  _check_count(steps_per_density, "steps_per_density")
  check_choice("scope", scope, DENSITY_SCOPES)
  _check_num_batches(num_batches)
  keep_largest = DENSITY_SCOPES[scope]
  results, mask, masked, above, step = [], None, model, 1.0, 0
  for density in densities:
    ratios = plan.exponential_schedule(density / above, steps_per_density)
    history = []
    for step_density in [above * r for r in ratios[:-1]] + [density]:
      start = time.perf_counter()
      score = importance(
          criterion,
          masked,
          batches,
          num_batches=num_batches,
          key=jax.random.fold_in(key, step),
          mesh=mesh,
          progress=progress,
      )
      mask = jax.block_until_ready(keep_largest(_below_kept(score, mask), step_density))
      masked = masks.apply(model, mask)
      history.append(DensityStep(step, step_density, time.perf_counter() - start))
      if callback is not None:
        callback(history[-1], masked, mask)
      step += 1
    results.append(SparseResult(density, mask, masked, tuple(history)))
    above = density
  return tuple(results)


def _structured(
    model: nnx.Module,
    example_input: jax.Array,
    batches: Iterable[PyTree],
    ratios: Sequence[float],
    targets: Sequence[StructuredTarget],
    finetune: Callable[[nnx.Module, plan.Plan], nnx.Module] | None,
    *,
    criterion: str,
    reduction: str,
    selection: dict,
    ignore: Sequence[str],
    num_batches: int | None,
    key: jax.Array,
    mesh: Mesh | None,
    callback: StepCallback | None,
    progress: bool,
) -> tuple[PruneResult, ...]:
  """Structured steps along the kept ratios `ratios`, stopping at every target.

  The steps toward a target take the ratios between it and the previous target
  and end at the target itself; `finetune` (if any) runs at every target.
  `selection` holds `plan.select`'s scope, max_ratio and round_to.
  """
  check_choice("criterion", criterion, CRITERIA)
  check_choice("reduction", reduction, structure.REDUCTIONS)
  _check_num_batches(num_batches)
  traced = structure.trace(model, example_input, ignore=ignore)
  # Whether the caps allow the last target does not depend on the scores: check it
  # (and the selection settings) before scoring anything.
  zeros = {g.name: np.zeros(g.size) for g in traced.groups}
  plan.select(traced, zeros, target=targets[-1], **selection)

  results, chosen, masked, above, step = [], None, model, 1.0, 0
  for target in targets:
    history = []
    for ratio in [r for r in ratios if target.ratio < r < above] + [target.ratio]:
      start = time.perf_counter()
      score = importance(
          criterion,
          masked,
          batches,
          num_batches=num_batches,
          key=jax.random.fold_in(key, step),
          mesh=mesh,
          progress=progress,
      )
      chosen = plan.select(
          traced,
          structure.group_scores(traced, score, reduction=reduction),
          target=type(target)(ratio),
          already_removed=None if chosen is None else chosen.removed,
          **selection,
      )
      masked = masks.apply(model, chosen)
      kept, dense = chosen.predicted, chosen.dense
      seconds = time.perf_counter() - start
      history.append(
          StepRecord(step, ratio, kept.macs / dense.macs, kept.params / dense.params, seconds)
      )
      if callback is not None:
        callback(history[-1], masked, chosen)
      step += 1
    if finetune is not None:
      model = masked = masks.apply(finetune(masked, chosen), chosen)
    compacted = surgery.compact(masked, chosen)
    counted = flops.count(compacted, example_input)
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


def _schedule(schedule: str, ratio: float, steps: int) -> tuple[float, ...]:
  check_choice("schedule", schedule, SCHEDULES)
  return SCHEDULES[schedule](ratio, steps)


def _kept_target(value, name: str) -> StructuredTarget:
  """`value` as a `KeptFlops` or `KeptParams`; a number is a kept-MACs fraction."""
  if isinstance(value, (plan.KeptFlops, plan.KeptParams)):
    return value
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= 1:
    raise ValueError(
        f"{name}: {value!r} is not a kept-MACs fraction in (0, 1], a plan.KeptFlops or a "
        "plan.KeptParams (densities are for `unstructured`)."
    )
  return plan.KeptFlops(float(value))


def _checked_targets(targets) -> tuple[StructuredTarget, ...]:
  """Decreasing targets of one kind, or a clear error naming them."""
  kept = tuple(_kept_target(t, "targets") for t in _non_empty(targets, "targets"))
  kinds = sorted({type(t).__name__ for t in kept})
  if len(kinds) > 1:
    raise ValueError(f"targets={targets!r} mix {kinds}; give one kind.")
  _check_decreasing(tuple(t.ratio for t in kept), "targets")
  return kept


def _non_empty(values, name: str) -> tuple:
  if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
    raise ValueError(f"{name}={values!r} is not a non-empty sequence.")
  return tuple(values)


def _check_decreasing(values, name: str) -> None:
  values = _non_empty(values, name)
  for value in values:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= 1:
      raise ValueError(f"{name}={values!r}: {value!r} is not a fraction in (0, 1].")
  if any(later >= earlier for earlier, later in zip(values, values[1:])):
    raise ValueError(f"{name}={values!r} is not strictly decreasing.")


def _check_count(value, name: str) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"{name}={value!r} is not an integer >= 1.")


def _check_num_batches(num_batches) -> None:
  if num_batches is not None:
    _check_count(num_batches, "num_batches")
