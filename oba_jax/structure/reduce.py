"""One score per group index (channel, feature, head) from per-parameter scores.

`group_scores` turns a score pytree like the parameters (from `oba_jax.scores`)
into a vector per group of a `Structure`, which `oba_jax.plan.select` ranks.
Two reductions:

- "sum": index c of a group gets the signed sum of the scores of every
  parameter entry that removing c removes (the union of its slices in every
  parameter member; an entry owned along two axes, like the diagonal of a
  square kernel whose rows and columns are both the group, counts once). The
  scores split a Taylor prediction among the parameters, so this is index c's
  signed share of the predicted loss change; for scores computed with a delta
  that removes only c's entries, it is the prediction for removing c. Not
  normalised: groups compare in units of loss.
- "paper": the official OBA code's reduction (method doc §1.4, normalizer
  "max", multivariable, group reduction "mean"). The prunable members (conv and
  dense kernels and their biases, `oba_jax.delta.default_prunable`, or the
  leaves that `prunable=` selects: pass the same one the scores used) form
  *layer slices*: the members of one module that share an axis counted from the
  end (a kernel's output axis with its bias, or a kernel's input axis). Each
  layer slice gives the signed sum of its scores per index, then its absolute
  value; the group's vector is the mean over the layer slices with any non-zero
  entry, divided by its maximum plus 1e-6. Normalisation, BatchNorm and other
  non-prunable members contribute nothing. The normalisation makes scores of
  different groups comparable for one global ranking.

Scores are reduced where they live (`jnp.sum` over the other axes), so only
per-axis vectors come back to the host. This module owns reductions only; it
knows nothing of targets, plans or masks.
"""

import collections
import itertools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oba_jax.delta import Prunable, path_str, prunable_mask
from oba_jax.structure.groups import Group, Member, Structure
from oba_jax.validate import check_choice, check_finite

PyTree = Any

REDUCTIONS = ("paper", "sum")
NORMALISER_EPS = 1e-6  # the official "max" normaliser's v / (max(v) + 1e-6)


def group_scores(structure: Structure, scores: PyTree, *, reduction: str = "paper",
                 prunable: Prunable | None = None) -> dict[str, np.ndarray]:
  """One float64 score per index of every group, reduced from per-parameter scores.

  Args:
    structure: the groups, e.g. from `oba_jax.structure.trace`.
    scores: one (already batch-averaged) score pytree like the parameters.
    reduction: "paper" (the official normalised reduction, comparable across
      groups) or "sum" (each index's signed share of the predicted loss
      change). See the module docstring for the exact definitions.
    prunable: which leaves were scored, as for the scores (`oba_jax.delta`): None
      (the kernel/bias naming rule), a predicate `(path, leaf) -> bool` or a mask
      tree. "paper" forms its layer slices from the leaves with any prunable entry.

  Returns:
    {group name: array of shape (group.size,)}.

  Raises:
    ValueError: every group score is zero although the groups' per-parameter
      scores are not (e.g. no scored leaf matches the naming rule: pass
      `prunable=`).
  """
  check_choice("reduction", reduction, REDUCTIONS)
  leaves = member_leaves(structure, scores, "scores")
  check_finite(scores, "scores")
  if reduction == "sum":
    reduced = {g.name: _owned_sum(g, leaves) for g in structure.groups}
  else:
    layer_leaves = {path_str(p): bool(np.any(flag)) for p, flag in
                    jax.tree_util.tree_flatten_with_path(prunable_mask(scores, prunable))[0]}
    reduced = {g.name: _paper_score(g, leaves, layer_leaves) for g in structure.groups}
  _check_not_silently_zero(structure, leaves, reduced, reduction)
  return reduced


def _check_not_silently_zero(structure: Structure, leaves: Mapping[str, Any],
                             reduced: Mapping[str, np.ndarray], reduction: str) -> None:
  """Raises when every group score is 0 but some member's per-parameter scores are not."""
  if any(np.any(v) for v in reduced.values()):
    return
  scored = sorted({m.path for g in structure.groups for m in param_members(g)
                   if bool(jnp.any(leaves[m.path] != 0))})
  if scored:
    raise ValueError(
        f"group_scores(reduction={reduction!r}) gives 0 for every group, but the scores of "
        f"{scored[:3]} are not 0: no scored leaf counts as a layer slice (the default "
        "naming rule takes leaves named kernel/weight/w with a bias/b beside them). Pass "
        "prunable= the predicate or mask the scores were computed with.")


def param_members(group: Group) -> tuple[Member, ...]:
  """The members that slice parameters (not state such as BatchNorm statistics)."""
  return tuple(m for m in group.members if m.collection == "params")


def member_leaves(structure: Structure, tree: PyTree, what: str) -> dict[str, Any]:
  """The leaves of `tree` (a pytree like the parameters) by path.

  Raises ValueError naming the first parameter member whose path is not in
  `tree`, or whose slice does not fit its leaf.
  """
  leaves = {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
  for group in structure.groups:
    for m in param_members(group):
      if m.path not in leaves:
        raise ValueError(
            f"{what} has no leaf '{m.path}' (a member of group {group.name!r}); its leaves are "
            f"{list(leaves)[:5]} ... Pass a tree like the parameters the structure was traced "
            "from.")
      shape = jnp.shape(leaves[m.path])
      fits = (0 <= m.axis < len(shape) and m.offset + math.prod(m.factors) <= shape[m.axis]
              and m.factors[m.position] == group.size)
      if not fits:
        raise ValueError(
            f"member '{m.path}' of group {group.name!r} (size {group.size}; axis {m.axis}, "
            f"offset {m.offset}, factors {m.factors}, position {m.position}) does not fit the "
            f"{what} leaf of shape {shape}.")
  return leaves


def _channel_slices(member: Member) -> np.ndarray:
  """[group size, span]: row c holds the indices along `member.axis` that index c owns."""
  grid = np.arange(math.prod(member.factors)).reshape(member.factors)
  rows = np.moveaxis(grid, member.position, 0).reshape(member.factors[member.position], -1)
  return rows + member.offset


def _union_sums(leaf, slices: Mapping[int, np.ndarray]) -> np.ndarray:
  """Per index c, the sum of `leaf` over the entries c owns along any of the given axes.

  `slices[axis]` is [size, span] as from `_channel_slices`. Owned entries are a
  union of slabs, summed by inclusion-exclusion over the axes; with one axis
  this is the plain sum over c's slab.
  """
  axes = sorted(slices)
  others = tuple(a for a in range(jnp.ndim(leaf)) if a not in slices)
  reduced = np.asarray(jnp.sum(leaf, axis=others), np.float64)  # one dimension per axis
  size = slices[axes[0]].shape[0]
  total = np.zeros(size)
  for count in range(1, len(axes) + 1):
    for subset in itertools.combinations(range(len(axes)), count):
      part = reduced.sum(axis=tuple(i for i in range(len(axes)) if i not in subset))
      index = tuple(
          slices[axes[i]].reshape((size,) + (1,) * j + (-1,) + (1,) * (count - 1 - j))
          for j, i in enumerate(subset))
      total += (-1) ** (count + 1) * part[index].reshape(size, -1).sum(axis=1)
  return total


def _owned_sum(group: Group, leaves: Mapping[str, Any]) -> np.ndarray:
  """The "sum" reduction: per index, the scores of every parameter entry it owns."""
  by_leaf = collections.defaultdict(lambda: collections.defaultdict(list))
  for m in param_members(group):
    by_leaf[m.path][m.axis].append(_channel_slices(m))
  total = np.zeros(group.size)
  for path, per_axis in by_leaf.items():
    total += _union_sums(leaves[path], {a: np.concatenate(s, axis=1) for a, s in per_axis.items()})
  return total


def _paper_score(group: Group, leaves: Mapping[str, Any],
                 prunable: Mapping[str, bool]) -> np.ndarray:
  """The "paper" reduction: mean of |signed layer-slice sums|, over the group maximum."""
  layer_sums = collections.defaultdict(lambda: np.zeros(group.size))
  for m in param_members(group):
    if prunable[m.path]:
      leaf = leaves[m.path]
      layer = (m.path.rpartition("/")[0], m.axis - jnp.ndim(leaf))
      layer_sums[layer] += _union_sums(leaf, {m.axis: _channel_slices(m)})
  magnitudes = [np.abs(v) for v in layer_sums.values() if np.any(v)]
  if not magnitudes:
    return np.zeros(group.size)
  mean = np.mean(magnitudes, axis=0)
  return mean / (mean.max() + NORMALISER_EPS)
