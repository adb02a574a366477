"""Pruning plans: which indices of which groups to remove to meet a cost target.

`select` ranks the indices of every group by their scores
(`oba_jax.structure.group_scores`) and removes the lowest first, as few as
needed for the structure's exact cost model (`Structure.cost`) to meet the
target. A `Plan` records the removals in each group's original index space, so
`oba_jax.masks.from_plan` and surgery can apply it, a later step of a schedule
can extend it, and it can be saved as JSON.

Targets are fractions of the dense network kept: `KeptFlops` (MACs) and
`KeptParams` for structured plans, `Density` for unstructured masks
(`oba_jax.masks`). Schedules give the intermediate targets of iterative pruning.

This module makes decisions on the host from small vectors; it touches no
parameters and must not import the masks or surgery that apply its plans.
"""

import dataclasses
import hashlib
import json
import math
import numbers
import types
from collections.abc import Collection, Mapping, Sequence
from typing import ClassVar

import numpy as np

from oba_jax.structure.groups import Cost, Structure
from oba_jax.validate import check_choice, check_decreasing, check_finite, non_empty

SCOPES = ("global", "local", "uniform")


def _check_fraction(value, name: str) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= 1:
    raise ValueError(f"{name}={value!r} is not a number in (0, 1].")


@dataclasses.dataclass(frozen=True)
class _KeptCost:
  """Keep at most `ratio` of the dense network's `measure` (a field of `Cost`)."""

  ratio: float
  measure: ClassVar[str]

  def __post_init__(self):
    _check_fraction(self.ratio, f"{type(self).__name__}.ratio")


@dataclasses.dataclass(frozen=True)
class KeptFlops(_KeptCost):
  """Kept MACs <= ratio * dense MACs: the paper's FLOPs target (e.g. 0.14 for VGG19)."""

  measure: ClassVar[str] = "macs"


@dataclasses.dataclass(frozen=True)
class KeptParams(_KeptCost):
  """Kept parameters <= ratio * dense parameters."""

  measure: ClassVar[str] = "params"


@dataclasses.dataclass(frozen=True)
class Density:
  """Keep `density` of the prunable entries: unstructured masks (`masks.global_density`)."""

  density: float

  def __post_init__(self):
    _check_fraction(self.density, "Density.density")


def _kept_target(value, name: str) -> "KeptFlops | KeptParams":
  """`value` as a `KeptFlops` or `KeptParams`; a number is a kept-MACs fraction."""
  if isinstance(value, (KeptFlops, KeptParams)):
    return value
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= 1:
    raise ValueError(
        f"{name}: {value!r} is not a kept-MACs fraction in (0, 1], a plan.KeptFlops or a "
        "plan.KeptParams (densities are for `unstructured`)."
    )
  return KeptFlops(float(value))


def structured_targets(targets) -> tuple["KeptFlops | KeptParams", ...]:
  """Decreasing targets of one kind (one value is one target), or a clear error naming them."""
  if isinstance(targets, (numbers.Real, KeptFlops, KeptParams, Density)):
    targets = (targets,)
  kept = tuple(_kept_target(t, "targets") for t in non_empty(targets, "targets"))
  kinds = sorted({type(t).__name__ for t in kept})
  if len(kinds) > 1:
    raise ValueError(f"targets={targets!r} mix {kinds}; give one kind.")
  check_decreasing(tuple(t.ratio for t in kept), "targets")
  return kept


def fingerprint(structure: Structure) -> str:
  """A short hash of the groups' names, sizes and members: which model a plan belongs to."""
  groups = [(g.name, g.size, [dataclasses.astuple(m) for m in g.members])
            for g in structure.groups]
  return hashlib.sha256(json.dumps(groups).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Plan:
  """Which indices of every group to remove, and the costs before and after.

  Attributes:
    removed: group name -> sorted removed indices (original index space); every
      group of the structure appears, untouched ones with ().
    kept_widths: group name -> the width left.
    predicted: the structure's cost at `kept_widths`.
    dense: the cost of the unpruned structure.
    structure_fingerprint: `fingerprint` of the structure the plan was made for.
    structure: that structure, when the plan was selected in this process (not
      saved in JSON; `surgery.compact` then needs it passed explicitly).
  """

  removed: Mapping[str, tuple[int, ...]]
  kept_widths: Mapping[str, int]
  predicted: Cost
  dense: Cost
  structure_fingerprint: str
  structure: Structure | None = dataclasses.field(default=None, compare=False, repr=False)

  def __post_init__(self):
    # Read-only copies: a plan cannot change after it was made.
    removed = {name: tuple(sorted(int(i) for i in idx)) for name, idx in self.removed.items()}
    widths = {name: int(w) for name, w in self.kept_widths.items()}
    if removed.keys() != widths.keys():
      raise ValueError(f"a plan needs the same groups in removed {list(removed)[:5]} and "
                       f"kept_widths {list(widths)[:5]}.")
    object.__setattr__(self, "removed", types.MappingProxyType(removed))
    object.__setattr__(self, "kept_widths", types.MappingProxyType(widths))

  def check_matches(self, structure: Structure) -> None:
    """Raises ValueError unless the plan was made for `structure` (same groups and members)."""
    given = fingerprint(structure)
    if given == self.structure_fingerprint:
      return
    planned = {name: width + len(self.removed[name]) for name, width in self.kept_widths.items()}
    sizes = {g.name: g.size for g in structure.groups}
    differences = (
        [f"its group {n!r} is missing" for n in planned if n not in sizes]
        + [f"group {n!r} is not in the plan" for n in sizes if n not in planned]
        + [f"group {n!r} has size {sizes[n]}, the plan's {planned[n]}"
           for n in planned if n in sizes and sizes[n] != planned[n]])
    detail = "; ".join(differences[:3]) or "same group names and sizes, different members"
    raise ValueError(
        f"this plan was made for another structure (fingerprint {self.structure_fingerprint}, "
        f"given {given}): {detail}. Select a plan on this model's structure.")

  def to_json(self) -> str:
    return json.dumps({
        "structure_fingerprint": self.structure_fingerprint,
        "removed": {name: list(idx) for name, idx in self.removed.items()},
        "kept_widths": dict(self.kept_widths),
        "predicted": dataclasses.asdict(self.predicted),
        "dense": dataclasses.asdict(self.dense),
    })

  @classmethod
  def from_json(cls, text: str) -> "Plan":
    try:
      fields = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"not the JSON of a Plan ({e}): {text[:60]!r}; expected the output of "
                       "Plan.to_json().") from None
    try:
      return cls(removed=fields["removed"], kept_widths=fields["kept_widths"],
                 predicted=Cost(**fields["predicted"]), dense=Cost(**fields["dense"]),
                 structure_fingerprint=fields["structure_fingerprint"])
    except (KeyError, TypeError) as e:
      raise ValueError(f"not the JSON of a Plan ({type(e).__name__}: {e}); expected the output "
                       "of Plan.to_json().") from e


def select(
    structure: Structure,
    group_scores: Mapping[str, Sequence[float] | np.ndarray],
    *,
    target: KeptFlops | KeptParams,
    scope: str = "global",
    max_ratio: float = 0.95,
    round_to: int | None = None,
    min_channels: int = 1,
    already_removed: Mapping[str, Sequence[int]] | None = None,
    frozen: Collection[str] = (),
) -> Plan:
  """The fewest lowest-scored removals that meet `target` on the structure's cost model.

  The candidates are ranked once and the plan removes the shortest prefix of
  the ranking whose kept cost (`structure.cost(kept_widths)`) is at most
  `target.ratio` times the dense cost. Costs only fall as widths fall, so the
  prefix length is found by bisection. Ties in the ranking are broken by group
  order, then index, so the prefix can stop inside a tie (the official code
  removes every channel scoring <= the threshold).

  Args:
    structure: the groups and cost model, e.g. from `oba_jax.structure.trace`.
    group_scores: {group name: scores of its indices} for every group, as from
      `group_scores`; higher means more important.
    target: `KeptFlops` or `KeptParams`; a `Density` belongs to `oba_jax.masks`.
    scope: "global": one ranking of all indices of all groups by score (the
      paper; needs scores comparable across groups, such as the "paper"
      reduction's). "local": the same fraction of every group goes: index j
      (1-based, lowest score first) of a group of size n ranks at (j + already
      removed) / n, and the plan stops only between distinct fractions.
      "uniform": the groups of one `family` (the same name in every layer) lose
      the same number of indices, each its own lowest-scored, so every layer
      keeps the same widths (what a Hugging Face config or llama.cpp's `llama`
      architecture can hold). A family's k-th removal takes the k-th lowest
      index of each of its groups and ranks at their mean score (Minitron
      sums the scores over layers; within a family the order is the same).
    max_ratio: at most this fraction of a group's original size is removed.
    round_to: kept widths of pruned groups are multiples of it (an untouched
      group keeps its size); widths are rounded up, so fewer indices go.
    min_channels: every group keeps at least this many indices.
    already_removed: {group name: original indices} removed by an earlier plan
      (e.g. the previous step's `plan.removed`). They stay removed, are not
      ranked again, and count towards the caps; the new plan extends them.

  Raises:
    ValueError: bad arguments (named), or a target the caps make unreachable
      (the message gives the smallest reachable ratio).
  """
  if isinstance(target, Density):
    raise ValueError("Density targets are for unstructured masks (masks.global_density, "
                     "masks.layerwise_density); select needs KeptFlops or KeptParams.")
  if not isinstance(target, _KeptCost):
    raise TypeError(f"target={target!r} is not a KeptFlops or KeptParams.")
  check_choice("scope", scope, SCOPES)
  if not structure.groups:
    raise ValueError("the structure has no groups to prune.")
  _check_caps(max_ratio, round_to, min_channels)
  scores = checked_group_scores(structure, group_scores)
  before = checked_removed(structure, already_removed or {})
  dense = structure.cost()
  budget = target.ratio * getattr(dense, target.measure)
  if not budget:
    raise ValueError(f"the structure has no {target.measure} terms to meet {target} on.")

  names = [g.name for g in structure.groups]
  current = np.array([g.size - len(before[g.name]) for g in structure.groups])
  frozen = _checked_frozen(structure, frozen)
  floors = [current[i] if g.name in frozen else _min_width(g.size, max_ratio, min_channels,
                                                           round_to)
            for i, g in enumerate(structure.groups)]
  orders, ranked_groups, cuts = _ranking(structure, scores, before, floors, scope)

  def widths_after(prefix: int) -> np.ndarray:
    widths = current - np.bincount(ranked_groups[:prefix], minlength=len(names))
    return np.minimum(_round_up(widths, round_to), current) if round_to else widths

  def kept(prefix: int) -> int:
    return getattr(structure.cost(dict(zip(names, widths_after(prefix).tolist()))), target.measure)

  smallest = kept(cuts[-1])
  if smallest > budget:
    raise ValueError(
        f"{target} cannot be reached: the smallest kept {target.measure} ratio within "
        f"max_ratio={max_ratio}, min_channels={min_channels}, round_to={round_to} "
        f"(scope={scope!r}) is {smallest / getattr(dense, target.measure):.4g}.")
  lo, hi = 0, len(cuts) - 1
  while lo < hi:
    mid = (lo + hi) // 2
    if kept(cuts[mid]) <= budget:
      hi = mid
    else:
      lo = mid + 1
  widths = widths_after(cuts[lo])
  removed = {name: np.union1d(before[name], order[:width_now - width])
             for name, order, width_now, width in zip(names, orders, current, widths)}
  return from_removed(structure, removed)


def from_removed(structure: Structure, removed: Mapping[str, Sequence[int]]) -> Plan:
  """The plan removing `removed` ({group name: indices}, every group named) from `structure`."""
  kept_widths = {g.name: g.size - len(removed[g.name]) for g in structure.groups}
  return Plan(removed=removed, kept_widths=kept_widths, predicted=structure.cost(kept_widths),
              dense=structure.cost(), structure_fingerprint=fingerprint(structure),
              structure=structure)


def _ranking(structure: Structure, scores: Mapping[str, np.ndarray],
             before: Mapping[str, np.ndarray], floors: Sequence[int], scope: str):
  """The order in which indices go: per group, and one ranking over all groups.

  Returns (orders, ranked_groups, cuts): `orders[i]` holds the indices group i
  may still lose, lowest score first (ties: lower index); `ranked_groups[k]` is
  the group of the k-th index to go; `cuts` are the prefix lengths a plan may
  stop at.
  """
  orders, keys = [], []
  for g, floor in zip(structure.groups, floors):
    remaining = np.setdiff1d(np.arange(g.size), before[g.name])
    order = remaining[np.argsort(scores[g.name][remaining], kind="stable")]
    order = order[:max(0, len(remaining) - floor)]
    orders.append(order)
    keys.append(scores[g.name][order] if scope == "global"
                else (len(before[g.name]) + np.arange(1, len(order) + 1)) / g.size)
  if scope == "uniform":
    return _uniform_ranking(structure, scores, orders)
  group_of = np.concatenate([np.full(len(o), i) for i, o in enumerate(orders)])
  position = np.concatenate([np.arange(len(o)) for o in orders])
  key = np.concatenate(keys)
  ranking = np.lexsort((position, group_of, key))
  if scope == "global":
    cuts = np.arange(len(ranking) + 1)
  else:  # stop only where the fraction changes
    steps = np.flatnonzero(np.diff(key[ranking])) + 1
    cuts = np.unique(np.concatenate([[0], steps, [len(ranking)]]))
  return orders, group_of[ranking], cuts


def family(group_name: str) -> str:
  """The name shared by a group's copies in every layer: each all-digit path component
  becomes '*' ('layers/3/mlp/gate_proj/kernel@1' -> 'layers/*/mlp/gate_proj/kernel@1')."""
  path, _, suffix = group_name.partition("@")
  parts = ["*" if part.isdigit() else part for part in path.split("/")]
  return "/".join(parts) + ("@" + suffix if suffix else "")


def _uniform_ranking(structure: Structure, scores: Mapping[str, np.ndarray],
                     orders: list[np.ndarray]):
  """`_ranking` for scope "uniform": whole slices (the k-th lowest index of every group of a
  family of equal-sized groups) ranked by their mean score; plans stop between slices."""
  families: dict[tuple[str, int], list[int]] = {}
  for i, g in enumerate(structure.groups):
    families.setdefault((family(g.name), g.size), []).append(i)
  slice_groups, slice_keys, slice_ks = [], [], []
  for members in families.values():
    depth = min(len(orders[i]) for i in members)  # the slices every group can still give
    for k in range(depth):
      slice_groups.append(members)
      slice_keys.append(np.mean([scores[structure.groups[i].name][orders[i][k]]
                                 for i in members]))
      slice_ks.append(k)
  first = [members[0] for members in slice_groups]
  order = np.lexsort((np.asarray(slice_ks, np.int64), np.asarray(first, np.int64),
                      np.asarray(slice_keys, np.float64))) if slice_groups else []
  ranked = [slice_groups[s] for s in order]
  ranked_groups = np.asarray([i for members in ranked for i in members], np.int64)
  cuts = np.concatenate([[0], np.cumsum([len(members) for members in ranked], dtype=np.int64)])
  # A group gives up its indices in its own score order, so the k-th slice of a family removes
  # orders[i][k] from each group i: a prefix of the ranking is a prefix of every group's order.
  return orders, ranked_groups, cuts


def _checked_frozen(structure: Structure, frozen: Collection[str]) -> frozenset[str]:
  if isinstance(frozen, str):
    raise TypeError(f"frozen={frozen!r} must be a collection of group names, not one string.")
  names = {g.name for g in structure.groups}
  unknown = sorted(set(frozen) - names)
  if unknown:
    raise ValueError(f"frozen names {unknown[:3]} are not groups of this structure; groups: "
                     f"{sorted(names)[:4]} ...")
  return frozenset(frozen)


def _round_up(width, multiple: int):
  return -(-width // multiple) * multiple


def _min_width(size: int, max_ratio: float, min_channels: int, round_to: int | None) -> int:
  """The narrowest a group may get: >= min_channels, >= (1 - max_ratio) * size, round_to."""
  width = max(min_channels, math.ceil(round((1 - max_ratio) * size, 9)))
  return min(_round_up(width, round_to) if round_to else width, size)


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_caps(max_ratio, round_to, min_channels) -> None:
  if isinstance(max_ratio, bool) or not isinstance(max_ratio, numbers.Real) or not (
      0 <= max_ratio <= 1):
    raise ValueError(f"max_ratio={max_ratio!r} is not a number in [0, 1].")
  if round_to is not None and not (_is_int(round_to) and round_to >= 1):
    raise ValueError(f"round_to={round_to!r} is not None or an integer >= 1.")
  if not (_is_int(min_channels) and min_channels >= 1):
    raise ValueError(f"min_channels={min_channels!r} is not an integer >= 1 (a group is never "
                     "removed whole).")


def checked_group_scores(structure: Structure, group_scores) -> dict[str, np.ndarray]:
  """`group_scores` as float64 vectors, one per group of `structure`, or a ValueError."""
  names = [g.name for g in structure.groups]
  missing = [n for n in names if n not in group_scores]
  unknown = [n for n in group_scores if n not in set(names)]
  if missing or unknown:
    raise ValueError(f"group_scores does not match the structure: missing groups {missing[:5]}, "
                     f"unknown groups {unknown[:5]}.")
  scores = {g.name: np.asarray(group_scores[g.name], np.float64) for g in structure.groups}
  for g in structure.groups:
    if scores[g.name].shape != (g.size,):
      raise ValueError(f"group_scores[{g.name!r}] has shape {scores[g.name].shape}; the group "
                       f"has size {g.size}.")
  return check_finite(scores, "group_scores")


def checked_removed(structure: Structure, already_removed) -> dict[str, np.ndarray]:
  """{group name: unique removed indices} for every group, checked against the sizes."""
  sizes = {g.name: g.size for g in structure.groups}
  unknown = [n for n in already_removed if n not in sizes]
  if unknown:
    raise ValueError(f"already_removed names groups {unknown[:5]} that the structure lacks.")
  removed = {}
  for name, size in sizes.items():
    idx = np.unique(np.asarray(already_removed.get(name, ()), np.int64))
    if idx.size and (idx[0] < 0 or idx[-1] >= size):
      raise ValueError(f"already_removed[{name!r}] holds indices outside [0, {size}): "
                       f"{idx[(idx < 0) | (idx >= size)][:5].tolist()}.")
    if idx.size == size:
      raise ValueError(f"already_removed[{name!r}] removes the whole group (size {size}).")
    removed[name] = idx
  return removed


def _check_schedule(target_ratio, steps) -> None:
  _check_fraction(target_ratio, "target_ratio")
  if not (_is_int(steps) and steps >= 1):
    raise ValueError(f"steps={steps!r} is not an integer >= 1.")


def exponential_schedule(target_ratio: float, steps: int) -> tuple[float, ...]:
  """Kept-cost ratios target_ratio ** (s / steps) for s = 1..steps (the OBA schedule).

  Every step keeps the same fraction of the previous step's cost. The official
  code schedules removed *channels* instead: r_s = 1 - (1 - R) ** (s / S), with
  R = 1 - 0.9 * target, and prunes until the FLOPs reach the target. Here the
  same geometric form applies to the kept cost itself, each step's plan meets
  its ratio exactly, and step `steps` is the target.
  """
  _check_schedule(target_ratio, steps)
  return tuple(target_ratio ** (s / steps) for s in range(1, steps + 1))


def linear_schedule(target_ratio: float, steps: int) -> tuple[float, ...]:
  """Kept-cost ratios 1 - (1 - target_ratio) * s / steps for s = 1..steps (the baselines').

  The counterpart of the official linear channel schedule r_s = R * s / S used
  for every baseline; step `steps` is the target.
  """
  _check_schedule(target_ratio, steps)
  return tuple(target_ratio + (1 - target_ratio) * (steps - s) / steps
               for s in range(1, steps + 1))
