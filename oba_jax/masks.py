"""Masks: which parameter entries a pruned model keeps, and training that keeps the rest at zero.

A mask is a pytree like the parameters whose leaves are bool arrays, True where
the entry is kept. Structured masks come from a `Plan` (`from_plan`),
unstructured ones from per-parameter scores at a density (`global_density`,
`layerwise_density`). `apply` zeroes the pruned entries, and `keep_pruned` wraps
an optax optimizer so that they stay zero through fine-tuning.

Masks are built by `jnp` ops on whole leaves (no Python loops over entries),
so they can live sharded like the parameters. This module applies decisions;
it does not make structured ones (`oba_jax.plan`) or compute scores.
"""

import collections
import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from oba_jax.delta import Prunable, check_like, path_str, prunable_mask
from oba_jax.plan import Density, Plan
from oba_jax.structure.groups import Structure
from oba_jax.structure.reduce import member_leaves, param_members
from oba_jax.validate import check_finite

PyTree = Any


def from_plan(structure: Structure, plan: Plan, params: PyTree) -> PyTree:
  """The structured mask of `plan`: False on every entry that a removed index owns.

  Every parameter member of a group is masked at the removed indices (a conv's
  output channels, its BatchNorm scale and bias, the consumers' input
  channels), so a removed channel contributes nothing. State members (BatchNorm
  statistics) are not parameters and get no mask.

  Args:
    structure: the structure the plan was selected on.
    plan: from `oba_jax.plan.select`.
    params: the parameters (or anything with their structure and shapes).
  """
  plan.check_matches(structure)
  return from_removed(structure, plan.removed, params)


def from_removed(structure: Structure, removed: Mapping[str, Any], params: PyTree) -> PyTree:
  """The structured mask that removes `removed[group name]` (indices) of each named group.

  Groups not named keep everything. `from_plan` is this with a plan's
  decisions; a single entry `{name: [c]}` is the removal of one channel or head.
  """
  unknown = sorted(set(removed) - {g.name for g in structure.groups})
  if unknown:
    raise ValueError(f"{unknown[:3]} are not groups of this structure; groups: "
                   f"{[g.name for g in structure.groups][:8]} ...")
  leaves = member_leaves(structure, params, "params")
  keep = collections.defaultdict(dict)  # path -> {axis: bool vector of kept indices}
  for group in structure.groups:
    indices = removed.get(group.name, ())
    if not len(indices):
      continue
    for m in param_members(group):
      size = jnp.shape(leaves[m.path])[m.axis]
      keep[m.path].setdefault(m.axis, np.ones(size, bool))[m.indices(indices)] = False

  def leaf_mask(path, leaf):  # built on the host: no compilation per leaf shape
    shape = jnp.shape(leaf)
    mask = np.ones(shape, bool)
    for axis, kept in keep.get(path_str(path), {}).items():
      mask &= kept.reshape([-1 if a == axis else 1 for a in range(len(shape))])
    return jax.device_put(mask)

  return jax.tree_util.tree_map_with_path(leaf_mask, params)


def apply(params_or_model: PyTree | nnx.Module, mask_or_plan: PyTree | Plan) -> Any:
  """Zeroes what a mask (False entries) or a plan removes; shapes stay the same.

  `params_or_model` is a parameter pytree, or an NNX module, for which a new
  masked module is returned (the original is left alone). A plan must carry its
  structure (`plan.select` attaches it); otherwise use `apply_plan`.
  """
  if isinstance(params_or_model, nnx.Module):
    graphdef, params, rest = nnx.split(params_or_model, nnx.Param, ...)
    masked = apply(nnx.to_pure_dict(params), mask_or_plan)
    return nnx.merge(graphdef, nnx.State(masked), rest, copy=True)
  if isinstance(mask_or_plan, Plan):
    if mask_or_plan.structure is None:
      raise ValueError("this plan carries no structure (it was read from JSON); use "
                       "masks.apply_plan(params, structure, plan).")
    return apply_plan(params_or_model, mask_or_plan.structure, mask_or_plan)
  check_like(mask_or_plan, params_or_model, "mask", scalar_leaves_ok=True)
  return _zero_pruned(params_or_model, mask_or_plan)


def apply_plan(params: PyTree, structure: Structure, plan: Plan) -> PyTree:
  """`params` with everything `plan` removes set to 0."""
  return apply(params, from_plan(structure, plan, params))


@jax.jit  # one program per model shape, not one per leaf
def _zero_pruned(tree: PyTree, mask: PyTree) -> PyTree:
  return jax.tree.map(lambda x, keep: jnp.where(keep, x, jnp.zeros_like(x)), tree, mask)


def global_density(scores: PyTree, density: float | Density, *,
                   prunable: Prunable | None = None) -> PyTree:
  """Keeps the `density` fraction of all prunable entries with the largest |score|.

  One ranking over every prunable entry of every leaf; exactly
  round(density * #prunable) entries are kept (halves round up), ties going to
  the entry earlier in leaf order, then row-major order. Entries that are not
  prunable are kept and not counted. The threshold comes from sorting the
  concatenated scores, which gathers them on one device; a bisection on the
  threshold with sharded counts would avoid that.

  Args:
    scores: per-parameter scores (e.g. from `oba_jax.scores`).
    density: the kept fraction, in (0, 1], or a `Density`.
    prunable: which entries compete: None (conv/dense kernels and biases), a
      predicate `(path, leaf) -> bool`, or a pytree of bools (see `oba_jax.delta`).
  """
  density = _density(density)
  flags = _prunable_flags(scores, prunable)
  check_finite(scores, "scores")
  leaves, treedef = jax.tree.flatten(scores)
  kept = _keep_largest(jnp.concatenate([jnp.ravel(s) for s in leaves]),
                       jnp.concatenate([jnp.ravel(f) for f in flags]), density)
  pieces = jnp.split(kept, np.cumsum([np.size(s) for s in leaves])[:-1])
  return treedef.unflatten([p.reshape(jnp.shape(s)) for p, s in zip(pieces, leaves)])


def layerwise_density(scores: PyTree, density: float | Density, *,
                      prunable: Prunable | None = None) -> PyTree:
  """Keeps the `density` fraction of every leaf's prunable entries with the largest |score|.

  The same rule as `global_density` (exact counts, deterministic ties), applied
  to each leaf on its own.
  """
  density = _density(density)
  flags = _prunable_flags(scores, prunable)
  check_finite(scores, "scores")
  leaves, treedef = jax.tree.flatten(scores)
  return treedef.unflatten([
      _keep_largest(jnp.ravel(s), jnp.ravel(f), density).reshape(jnp.shape(s))
      for s, f in zip(leaves, flags)])


def _density(density: float | Density) -> float:
  return (density if isinstance(density, Density) else Density(density)).density


def _prunable_flags(tree: PyTree, prunable: Prunable | None) -> list[jax.Array]:
  """Per leaf of `tree`, a bool array of its shape: True on the prunable entries."""
  flags = jax.tree.leaves(prunable_mask(tree, prunable))
  return [jnp.broadcast_to(jnp.asarray(f, bool), jnp.shape(x))
          for x, f in zip(jax.tree.leaves(tree), flags)]


def _keep_largest(scores: jax.Array, prunable: jax.Array, density: float) -> jax.Array:
  """A flat mask keeping round(density * n) of the n prunable entries by |score|, and the rest."""
  kept = math.floor(density * int(jnp.sum(prunable)) + 0.5)
  priority = jnp.where(prunable, jnp.abs(scores), -1)  # scores >= 0 rank before the others
  order = jnp.argsort(priority, descending=True, stable=True)
  return jnp.zeros(scores.shape, bool).at[order[:kept]].set(True) | ~prunable


def keep_pruned(tx: optax.GradientTransformation,
                mask: PyTree) -> optax.GradientTransformationExtraArgs:
  """Wraps `tx` so that entries where `mask` is False never move.

  Gradients are zeroed at pruned entries before `tx` (so momentum and other
  statistics stay zero there) and updates after it (so weight decay or any other
  term cannot move them). With params masked by `apply`, pruned entries stay
  exactly 0 through training. The state is `tx`'s own.
  """
  tx = optax.with_extra_args_support(tx)

  def init_fn(params):
    check_like(mask, params, "mask", scalar_leaves_ok=True)
    return tx.init(params)

  def update_fn(updates, state, params=None, **extra_args):
    updates, state = tx.update(_zero_pruned(updates, mask), state, params, **extra_args)
    return _zero_pruned(updates, mask), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@dataclasses.dataclass(frozen=True)
class Sparsity:
  """Fractions of zero (for masks: False) entries among the prunable entries."""

  total: float
  per_leaf: Mapping[str, float]  # leaves with prunable entries only


def sparsity(tree: PyTree, *, prunable: Prunable | None = None) -> Sparsity:
  """How much of `tree` (parameters or a mask) is pruned, overall and per leaf.

  `prunable` selects the entries counted, as in `global_density`.
  """
  per_leaf, zeros, count = {}, 0, 0
  flags = _prunable_flags(tree, prunable)
  for (path, leaf), flag in zip(jax.tree_util.tree_flatten_with_path(tree)[0], flags):
    n = int(jnp.sum(flag))
    if n:
      z = int(jnp.sum((jnp.asarray(leaf) == 0) & flag))
      per_leaf[path_str(path)] = z / n
      zeros, count = zeros + z, count + n
  return Sparsity(total=zeros / count if count else 0.0, per_leaf=per_leaf)
