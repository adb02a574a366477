"""Pruning pipelines over NNX models: one-shot, iterative and unstructured.

Each pipeline repeats one step: score the current model
(`criteria.importance`, with a criterion named in `criteria.CRITERIA`), turn
the scores into a decision and zero what it removes. A removed slice stays in
the model as zeros, so every step scores a model of the original shapes and the
next decision extends the last one.

- `one_shot`: S steps along a kept-cost schedule to one target, with scores
  re-estimated before every step and no fine-tuning in between (the paper's
  one-shot pruning, method notes §4.3); the caller fine-tunes the result once.
- `iterative`: the same steps toward decreasing targets, fine-tuning with an
  injected function after each target and continuing from the fine-tuned model
  (method notes §4.4).
- `unstructured`: masks of individual weights along a density sweep (§4.5).

What to do is data: a frozen `StructuredConfig` (criterion, targets, schedule,
steps, batches per step, reduction, selection caps) or `UnstructuredConfig`,
checked when it is built, so a bad setting fails before any work. What to run
it on (model, batches, PRNG key, mesh, callback) are the drivers' arguments:

  config = prune.StructuredConfig(criterion="oba", targets=0.5, steps=5)
  result = prune.one_shot(model, example_input, batches, config, key=key)

Section numbers refer to the method notes, `../shared/docs/oba_method.md` in the
project workspace.

The decisions are the library's own: `structure.group_scores` and `plan.select`
for structured steps, `masks.global_density` or `masks.layerwise_density` for
unstructured ones; `surgery.compact` builds the smaller model at the end.
Models passed in are never modified. This module must not import the
experiments package.
"""

import dataclasses
import time
import types
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from oba_jax import flops, masks, plan, structure, surgery
from oba_jax.criteria import BATCHNORM_MODES, CRITERIA, importance
from oba_jax.validate import check_choice, check_count, check_decreasing

PyTree = Any
StructuredTarget = plan.KeptFlops | plan.KeptParams

# Kept-cost schedules by name: the OBA runs use "exponential", the baselines "linear".
SCHEDULES = types.MappingProxyType(
    dict(exponential=plan.exponential_schedule, linear=plan.linear_schedule)
)

# Unstructured rankings by name: one over all weights (the paper's), or one per leaf.
DENSITY_SCOPES = types.MappingProxyType(
    {"global": masks.global_density, "layerwise": masks.layerwise_density}
)


@dataclasses.dataclass(frozen=True)
class StructuredConfig:
  """How to prune channels, heads and features: checked when built.

  Attributes:
    criterion: a name in `criteria.CRITERIA`.
    targets: kept fractions of the dense MACs (floats, the paper's targets), or
      `plan.KeptFlops` / `plan.KeptParams` of one kind, strictly decreasing,
      each in (0, 1]; one value (not in a tuple) is one target. `one_shot`
      takes one target, `iterative` any number.
    steps: the schedule's scoring and selection steps, S (to the last target).
    schedule: a name in `SCHEDULES`.
    reduction: the group score reduction, a name in `structure.REDUCTIONS`.
    scope, max_ratio, round_to: as in `plan.select`.
    ignore: parameter path prefixes never pruned, as in `structure.trace`.
    num_batches: batches averaged per step (None: all of `batches`).
    batchnorm: the BatchNorm mode of scoring, "train" (batch statistics, as the
      official pipeline scores) or "eval"; None: the model's own mode.
  """

  criterion: str
  targets: tuple[StructuredTarget, ...]
  steps: int = 50
  schedule: str = "exponential"
  reduction: str = "paper"
  scope: str = "global"
  max_ratio: float = 0.95
  round_to: int | None = None
  ignore: tuple[str, ...] = ()
  num_batches: int | None = 200
  batchnorm: str | None = None

  def __post_init__(self):
    _check_scoring(self.criterion, self.batchnorm)
    object.__setattr__(self, "targets", plan.structured_targets(self.targets))
    check_count(self.steps, "steps")
    check_choice("schedule", self.schedule, SCHEDULES)
    check_choice("reduction", self.reduction, structure.REDUCTIONS)
    check_choice("scope", self.scope, plan.SCOPES)
    object.__setattr__(self, "ignore", tuple(self.ignore))
    _check_num_batches(self.num_batches)

  @property
  def selection(self) -> dict:
    """`plan.select`'s keyword arguments."""
    return dict(scope=self.scope, max_ratio=self.max_ratio, round_to=self.round_to)


@dataclasses.dataclass(frozen=True)
class UnstructuredConfig:
  """How to prune single weights along a density sweep: checked when built.

  Attributes:
    criterion: a name in `criteria.CRITERIA`.
    densities: kept fractions of the prunable entries, strictly decreasing,
      each in (0, 1].
    steps_per_density: steps from one density to the next.
    scope: a name in `DENSITY_SCOPES`.
    num_batches: batches averaged per step (None: all of `batches`).
    batchnorm: the BatchNorm mode of scoring, as in `StructuredConfig`.
  """

  criterion: str
  densities: tuple[float, ...] = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
  steps_per_density: int = 1
  scope: str = "global"
  num_batches: int | None = 200
  batchnorm: str | None = None

  def __post_init__(self):
    _check_scoring(self.criterion, self.batchnorm)
    check_decreasing(self.densities, "densities")
    object.__setattr__(self, "densities", tuple(self.densities))
    check_count(self.steps_per_density, "steps_per_density")
    check_choice("scope", self.scope, DENSITY_SCOPES)
    _check_num_batches(self.num_batches)


@dataclasses.dataclass(frozen=True)
class StepRecord:
  """One structured pruning step.

  Attributes:
    step: the step's index in the run, from 0.
    target: the kept fraction of the dense cost (MACs or parameters) it met.
    kept_macs: the plan's kept MACs over the dense MACs.
    kept_params: the plan's kept parameters over the dense parameters.
    seconds: wall time of scoring, selection and masking.
    score_seconds: the part of it spent scoring (compilation included).
  """

  step: int
  target: float
  kept_macs: float
  kept_params: float
  seconds: float
  score_seconds: float


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
    config: StructuredConfig,
    *,
    key: jax.Array,
    mesh: Mesh | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> PruneResult:
  """Prunes channels to the target of `config` in `config.steps` steps, re-scoring before each.

  The paper's one-shot pruning: step s scores the current masked model, reduces
  the scores per group and selects the removals that meet the schedule's s-th
  kept-cost ratio, extending the previous removals. There is no fine-tuning
  between steps; the last step meets the target.

  The official code schedules the removed *channel* ratio (exponentially to
  R = 1 - 0.9 * target) and stops once the FLOPs reach the target. Here the
  schedule (`plan.exponential_schedule`, `plan.linear_schedule`) is on the kept
  cost itself, which the exact cost model meets at every step.

  Args:
    model: the dense NNX model (left unchanged).
    example_input: an input for tracing and counting, e.g. a batch of one.
    batches: the scoring batches; every step reads `config.num_batches` of them
      (an iterator continues, a list starts again).
    config: what to prune and how, with exactly one target.
    key: PRNG key; step s uses `jax.random.fold_in(key, s)`.
    mesh: the device mesh for scoring.
    callback: called after every step with its record, masked model and plan.
    progress: show a progress bar while scoring.
  """
  _check_config(config, StructuredConfig)
  if len(config.targets) != 1:
    raise ValueError(
        f"one_shot prunes to one target, got targets={config.targets}: use `iterative`, or "
        "one_shot once per target (dataclasses.replace(config, targets=t)).")
  (result,) = _structured(model, example_input, batches, config, None, key=key, mesh=mesh,
                          callback=callback, progress=progress)
  return result


def iterative(
    model: nnx.Module,
    example_input: jax.Array,
    batches: Iterable[PyTree],
    config: StructuredConfig,
    *,
    finetune: Callable[[nnx.Module, plan.Plan], nnx.Module],
    key: jax.Array,
    mesh: Mesh | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
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
      shapes; called after every target, the last included.

  Returns:
    One result per target, holding the fine-tuned model (`masked`) and its
    compaction; each history lists that target's steps.
  """
  _check_config(config, StructuredConfig)
  if not callable(finetune):
    raise TypeError(f"finetune={finetune!r} is not a callable(masked_model, plan) -> model.")
  return _structured(model, example_input, batches, config, finetune, key=key, mesh=mesh,
                     callback=callback, progress=progress)


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
    config: UnstructuredConfig,
    *,
    key: jax.Array,
    mesh: Mesh | None = None,
    callback: DensityCallback | None = None,
    progress: bool = False,
) -> tuple[SparseResult, ...]:
  """Masks single weights along the decreasing `config.densities`, re-scoring at every step.

  From one density to the next, `config.steps_per_density` steps follow an
  exponential schedule (the paper's run takes 49 steps from 1 to 0.1). Each
  step scores the current masked model and keeps the highest-|score| entries.
  Pruned entries rank below every kept one, so each mask keeps a subset of the
  previous one. Unlike the official code, scores are not accumulated across
  steps and |θ| is not added to them (method notes §4.5). No fine-tuning.

  Args:
    model: the dense NNX model (left unchanged).
    batches: the scoring batches, as in `one_shot`.
    config: what to prune and how.
    key, mesh, progress: as in `one_shot`.
    callback: called after every step with its record, masked model and mask.

  Returns:
    One result per density.
  """
  _check_config(config, UnstructuredConfig)
  keep_largest = DENSITY_SCOPES[config.scope]
  results, mask, masked, above, step = [], None, model, 1.0, 0
  for density in config.densities:
    ratios = plan.exponential_schedule(density / above, config.steps_per_density)
    history = []
    for step_density in [above * r for r in ratios[:-1]] + [density]:
      start = time.perf_counter()
      score = importance(config.criterion, masked, batches, num_batches=config.num_batches,
                         key=jax.random.fold_in(key, step), mesh=mesh, progress=progress,
                         batchnorm=config.batchnorm)
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
    config: StructuredConfig,
    finetune: Callable[[nnx.Module, plan.Plan], nnx.Module] | None,
    *,
    key: jax.Array,
    mesh: Mesh | None,
    callback: StepCallback | None,
    progress: bool,
) -> tuple[PruneResult, ...]:
  """Structured steps along the schedule to the last target, stopping at every target.

  The steps toward a target take the schedule's ratios between it and the
  previous target and end at the target itself; `finetune` (if any) runs at
  every target.
  """
  targets = config.targets
  ratios = SCHEDULES[config.schedule](targets[-1].ratio, config.steps)
  traced = structure.trace(model, example_input, ignore=config.ignore)
  # Whether the caps allow the last target does not depend on the scores: check it
  # (and the selection settings) before scoring anything.
  zeros = {g.name: np.zeros(g.size) for g in traced.groups}
  plan.select(traced, zeros, target=targets[-1], **config.selection)

  results, chosen, masked, above, step = [], None, model, 1.0, 0
  for target in targets:
    history = []
    for ratio in [r for r in ratios if target.ratio < r < above] + [target.ratio]:
      start = time.perf_counter()
      score = importance(config.criterion, masked, batches, num_batches=config.num_batches,
                         key=jax.random.fold_in(key, step), mesh=mesh, progress=progress,
                         batchnorm=config.batchnorm)
      jax.block_until_ready(score)
      score_seconds = time.perf_counter() - start
      chosen = plan.select(
          traced,
          structure.group_scores(traced, score, reduction=config.reduction),
          target=type(target)(ratio),
          already_removed=None if chosen is None else chosen.removed,
          **config.selection,
      )
      masked = masks.apply(model, chosen)
      kept, dense = chosen.predicted, chosen.dense
      seconds = time.perf_counter() - start
      history.append(
          StepRecord(step, ratio, kept.macs / dense.macs, kept.params / dense.params, seconds,
                     score_seconds)
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


def _check_config(config, kind: type) -> None:
  if not isinstance(config, kind):
    raise TypeError(f"config must be a prune.{kind.__name__}, got {type(config).__name__}.")


def _check_scoring(criterion: str, batchnorm: str | None) -> None:
  check_choice("criterion", criterion, CRITERIA)
  if batchnorm is not None:
    check_choice("batchnorm", batchnorm, BATCHNORM_MODES)
  if batchnorm == "train" and CRITERIA[criterion].per_example:
    raise ValueError(f"criterion {criterion!r} runs the model one example at a time, which "
                     "batch-statistics BatchNorm cannot do: use batchnorm='eval' with it.")


def _check_num_batches(num_batches) -> None:
  if num_batches is not None:
    check_count(num_batches, "num_batches")
