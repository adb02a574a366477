"""Step rules of structured pruning: what one step removes, and when a run stops.

A structured run repeats: score the current model, reduce the scores per group
(`oba_jax.structure.group_scores`), remove some more indices. Two rules decide
how many and when to stop (`PROCEDURES`):

- "library": every step meets one ratio of a kept-*cost* schedule exactly with
  the fewest lowest-ranked removals (`plan.select`); the last step meets the
  target, whatever the number of steps.
- "official": the official OBA code's `prune_global` (method notes §1.5, §4.3).
  A *channel*-ratio schedule runs to R = 1 - 0.9 * (last target) in S steps:
  exponential r_s = 1 - (1 - R)^(s/S) for the OBA family, linear r_s = R s / S
  for the baselines. At step s, every group still above its cap contributes the
  scores of its kept indices to one list; with N the indices in all groups at
  the start, n = len(list) - int(N (1 - r_s)) go: every index scoring at most
  the n-th smallest score, except in a group where that would remove every kept
  index (that group loses nothing this step). A group is capped once it has
  fewer than (1 - max_ratio) of its indices or exactly one. The run stops at the
  first step whose kept cost is at most the target.

Differences from the official code that do not change which channels go: the
model keeps its shapes (removed indices are zero and stay out of the list),
and the cost is this library's exact MAC count (thop also counts BatchNorm and
pooling). The cap is checked per group, which is per layer when no layer's axis
is split among groups (true of VGG and ResNet).

Cost-aware ranking (beyond the paper, `RANKINGS`): both rules rank indices by
score alone, so cheap late layers are cut first. "per_cost" divides every
index's score by what removing one index of its group saves at the current
widths (the structure's exact cost polynomial), so indices are compared by
score per saved MAC (or parameter, for a `KeptParams` target).

This module decides on the host from small vectors, like `oba_jax.plan`.
"""

import types
from collections.abc import Mapping, Sequence

import numpy as np

from oba_jax import plan
from oba_jax.structure.groups import Structure
from oba_jax.validate import check_choice

PROCEDURES = ("library", "official")
RANKINGS = ("score", "per_cost")

# The official channel-ratio schedules r_s for s = 0..S (`scheduler.py`).
CHANNEL_SCHEDULES = types.MappingProxyType(dict(
    exponential=lambda removed, steps: tuple(1 - (1 - removed) ** (s / steps)
                                             for s in range(steps + 1)),
    linear=lambda removed, steps: tuple(removed * s / steps for s in range(steps + 1)),
))


def official_removed_ratio(target_ratio: float) -> float:
  """R = 1 - 0.9 * target: the channel ratio the official schedule ends at (§4.3)."""
  return 1 - 0.9 * target_ratio


def channel_ratios(schedule: str, target_ratio: float, steps: int) -> tuple[float, ...]:
  """The official removed-channel ratios r_1..r_S toward the kept-cost `target_ratio`."""
  check_choice("schedule", schedule, CHANNEL_SCHEDULES)
  return CHANNEL_SCHEDULES[schedule](official_removed_ratio(target_ratio), steps)[1:]


def capped(structure: Structure, removed: Mapping[str, Sequence[int]],
           max_ratio: float) -> set[str]:
  """The groups the official rule skips: fewer than (1 - max_ratio) of their indices kept,
  or exactly one (`metapruner._check_pruning_ratio`)."""
  out = set()
  for g in structure.groups:
    width = g.size - len(removed.get(g.name, ()))
    if width < g.size * (1 - max_ratio) or width == 1:
      out.add(g.name)
  return out


def official_step(
    structure: Structure,
    group_scores: Mapping[str, Sequence[float] | np.ndarray],
    *,
    ratio: float,
    max_ratio: float = 0.95,
    round_to: int | None = None,
    already_removed: Mapping[str, Sequence[int]] | None = None,
) -> plan.Plan:
  """One step of the official `prune_global` at removed-channel ratio `ratio`.

  Args:
    structure: the groups and cost model.
    group_scores: {group name: score per index}, higher is more important.
    ratio: r_s, the fraction of all groups' indices removed after this step.
    max_ratio: the official `max_pruning_ratio` cap (see `capped`).
    round_to: as the official `_round_to`: a group's kept width after the step
      is rounded down to a multiple, by removing its next-lowest indices.
    already_removed: {group name: indices} removed by earlier steps.

  Returns:
    The plan extending `already_removed` (possibly removing nothing more).
  """
  if not 0 <= ratio <= 1:
    raise ValueError(f"ratio={ratio!r} is not a removed-channel fraction in [0, 1].")
  scores = plan.checked_group_scores(structure, group_scores)
  removed = plan.checked_removed(structure, already_removed or {})
  skip = capped(structure, removed, max_ratio)
  kept = {g.name: np.setdiff1d(np.arange(g.size), removed[g.name])
          for g in structure.groups if g.name not in skip}
  pool = np.concatenate([scores[name][idx] for name, idx in kept.items()] or [np.zeros(0)])
  total = sum(g.size for g in structure.groups)
  count = len(pool) - int(total * (1 - ratio))
  new = {}
  if count > 0:
    threshold = np.sort(pool)[count - 1]
    for name, idx in kept.items():
      low = idx[scores[name][idx] <= threshold]
      if len(low) and round_to:
        order = idx[np.argsort(scores[name][idx], kind="stable")]
        low = order[:_rounded_count(len(low), len(idx), round_to)]
      if 0 < len(low) < len(idx):  # never a whole group (`check_pruning_group`)
        new[name] = low
  return plan.from_removed(structure, {
      name: np.union1d(removed[name], new.get(name, ())) for name in removed})


def _rounded_count(count: int, width: int, round_to: int) -> int:
  kept = width - count
  return max(width - (kept - kept % round_to), 0)


def per_cost(structure: Structure, group_scores: Mapping[str, np.ndarray],
             removed: Mapping[str, Sequence[int]], measure: str) -> dict[str, np.ndarray]:
  """Scores divided by what removing one index of each group saves at the current widths.

  `measure` is a field of `Cost` ("macs" or "params"). A group whose removal
  saves nothing of it is never worth removing: its scores become the largest float.
  """
  widths = {g.name: g.size - len(removed.get(g.name, ())) for g in structure.groups}
  now = getattr(structure.cost(widths), measure)
  out = {}
  for g in structure.groups:
    fewer = dict(widths, **{g.name: max(widths[g.name] - 1, 0)})
    saved = now - getattr(structure.cost(fewer), measure)
    values = np.asarray(group_scores[g.name], np.float64)
    out[g.name] = values / saved if saved > 0 else np.full_like(values, np.finfo(np.float64).max)
  return out
