"""What a pruning run does, as data: `StructuredConfig` and `UnstructuredConfig`.

Frozen dataclasses checked when they are built, so a bad setting fails before
any work; `oba_jax.prune` runs them (and re-exports them). Section numbers
refer to the method notes, `../shared/docs/oba_method.md` in the project
workspace. This module must not import `oba_jax.prune`.
"""

import dataclasses
import types
from typing import Any

from oba_jax import masks, plan, procedure, structure
from oba_jax.criteria import BATCHNORM_MODES, CRITERIA
from oba_jax.validate import check_choice, check_count, check_decreasing

PyTree = Any
StructuredTarget = plan.KeptFlops | plan.KeptParams

# Kept-cost schedules of the library's step rule, by name.
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
    schedule: "exponential" or "linear", or None for the one the official code
      pairs with the criterion (`Criterion.official_schedule`: exponential for
      OBA, linear for the baselines). With the "library" procedure it shapes
      the kept cost, with "official" the removed-channel ratio.
    procedure: the step rule, a name in `procedure.PROCEDURES`: "library"
      (each step meets its kept-cost ratio exactly, the last one the target) or
      "official" (the official `prune_global`: a channel-ratio schedule to
      R = 1 - 0.9 * target, stopping once the cost meets the target).
    ranking: "score" (the paper's) or "per_cost" (score per MAC, or parameter,
      that removing one index of its group saves; `procedure.per_cost`).
    reduction: the group score reduction, a name in `structure.REDUCTIONS`.
    scope, max_ratio, round_to: as in `plan.select`; "official" needs the
      global scope.
    ignore: parameter path prefixes never pruned, as in `structure.trace`.
    num_batches: batches averaged per step (None: all of `batches`).
    batchnorm: the BatchNorm mode of scoring, "train" (batch statistics, as the
      official pipeline scores) or "eval"; None: the model's own mode.
    recalibration_batches: with running-statistics BatchNorm, the masked model's
      statistics are re-estimated from this many batches before every step but
      the first, so each step scores the network its removals left, not one
      normalised with the dense model's statistics (0: never). Batch statistics
      need none: they follow the pruned model by themselves.
  """

  criterion: str
  targets: tuple[StructuredTarget, ...]
  steps: int = 50
  schedule: str | None = None
  procedure: str = "library"
  ranking: str = "score"
  reduction: str = "paper"
  scope: str = "global"
  max_ratio: float = 0.95
  round_to: int | None = None
  ignore: tuple[str, ...] = ()
  num_batches: int | None = 200
  batchnorm: str | None = None
  recalibration_batches: int = 20

  def __post_init__(self):
    check_scoring(self.criterion, self.batchnorm)
    object.__setattr__(self, "targets", plan.structured_targets(self.targets))
    check_count(self.steps, "steps")
    if self.schedule is not None:
      check_choice("schedule", self.schedule, SCHEDULES)
    check_choice("procedure", self.procedure, procedure.PROCEDURES)
    check_choice("ranking", self.ranking, procedure.RANKINGS)
    check_choice("reduction", self.reduction, structure.REDUCTIONS)
    check_choice("scope", self.scope, plan.SCOPES)
    if self.procedure == "official" and self.scope != "global":
      raise ValueError(f"procedure='official' ranks globally (the official pruner's "
                       f"global_pruning=True); scope={self.scope!r} needs procedure='library'.")
    object.__setattr__(self, "ignore", tuple(self.ignore))
    check_num_batches(self.num_batches)
    check_recalibration(self.recalibration_batches)

  @property
  def schedule_name(self) -> str:
    """The schedule in force: `schedule`, or the criterion's official pairing."""
    return self.schedule or CRITERIA[self.criterion].official_schedule

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
    recalibration_batches: as in `StructuredConfig`.
  """

  criterion: str
  densities: tuple[float, ...] = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
  steps_per_density: int = 1
  scope: str = "global"
  num_batches: int | None = 200
  batchnorm: str | None = None
  recalibration_batches: int = 20

  def __post_init__(self):
    check_scoring(self.criterion, self.batchnorm)
    check_decreasing(self.densities, "densities")
    object.__setattr__(self, "densities", tuple(self.densities))
    check_count(self.steps_per_density, "steps_per_density")
    check_choice("scope", self.scope, DENSITY_SCOPES)
    check_num_batches(self.num_batches)
    check_recalibration(self.recalibration_batches)


def check_scoring(criterion: str, batchnorm: str | None) -> None:
  check_choice("criterion", criterion, CRITERIA)
  if batchnorm is not None:
    check_choice("batchnorm", batchnorm, BATCHNORM_MODES)
  if batchnorm == "train" and CRITERIA[criterion].per_example:
    raise ValueError(f"criterion {criterion!r} runs the model one example at a time, which "
                     "batch-statistics BatchNorm cannot do: use batchnorm='eval' with it.")


def check_num_batches(num_batches) -> None:
  if num_batches is not None:
    check_count(num_batches, "num_batches")


def check_recalibration(count) -> None:
  if isinstance(count, bool) or not isinstance(count, int) or count < 0:
    raise ValueError(f"recalibration_batches={count!r} is not an integer >= 0 (0: never).")
