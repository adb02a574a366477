"""The perturbation `delta` that a pruning step applies to the parameters.

Every criterion in `oba_jax.scores` predicts the loss change caused by moving the
parameters from `params` to `params + delta`. Removing parameters means
`delta = -params` on what is removed and zero elsewhere, so the default delta is
`-params` on the *prunable* leaves: the kernels of convolutions and dense layers
and the biases next to them. Normalisation scales and biases, embeddings and
other leaves get zero.

Leaves are recognised by their path, so this works for any pytree (Flax NNX
state, Flax Linen params, plain dicts): a leaf is a kernel when its name is one
of `KERNEL_NAMES` and it has at least two dimensions, and a bias when its name is
one of `BIAS_NAMES` and a kernel sits beside it. A BatchNorm `bias` has a `scale`
beside it, not a kernel, so it is not prunable.

A `Removal` is that default delta kept symbolic (the mask, not the values):
derivatives along it reuse the products the forward pass already has
(`oba_jax.removal_jvp`), so the curvature scores cost fewer operations.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any
Prunable = Callable[[str, jax.Array], bool] | PyTree

KERNEL_NAMES = frozenset({"kernel", "weight", "w"})
BIAS_NAMES = frozenset({"bias", "b"})
SCALE_NAMES = frozenset({"scale", "gamma"})  # normalisation scales (Flax, haiku)
_WRAPPER_KEYS = frozenset({"value", "raw_value"})  # NNX Variable attributes


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_names(path) -> tuple[str, ...]:
  """The names along a pytree key path, without NNX's trailing `.value`."""
  names = tuple(_key_name(k) for k in path)
  while names and names[-1] in _WRAPPER_KEYS:
    names = names[:-1]
  return names


def path_str(path) -> str:
  """A key path as 'layer/sub/kernel', the form used in messages and predicates."""
  return "/".join(path_names(path))


def default_prunable(params: PyTree) -> PyTree:
  """A pytree of Python bools like `params`: True on conv/dense kernels and their biases."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  names = [path_names(path) for path, _ in leaves]
  with_kernel = {
      n[:-1]
      for n, (_, leaf) in zip(names, leaves)
      if n and n[-1] in KERNEL_NAMES and jnp.ndim(leaf) >= 2
  }
  flags = [
      bool(n)
      and n[:-1] in with_kernel
      and (n[-1] in BIAS_NAMES or (n[-1] in KERNEL_NAMES and jnp.ndim(leaf) >= 2))
      for n, (_, leaf) in zip(names, leaves)
  ]
  return jax.tree_util.tree_unflatten(treedef, flags)


def weights_and_scales(path: str, leaf) -> bool:
  """Conv and dense kernels and normalisation scales, no biases: a predicate for `prunable`.

  The members of the official magnitude importance (Torch-Pruning's `MagnitudeImportance`
  with `bias=False`: conv and linear weights, and BatchNorm and LayerNorm weights, i.e. |γ|),
  which the official step rule scores magnitude with (`oba_jax.procedure`).
  """
  name = path.rpartition("/")[2]
  return ((name in KERNEL_NAMES and jnp.ndim(leaf) >= 2)
          or (name in SCALE_NAMES and jnp.ndim(leaf) == 1))


def check_like(tree: PyTree, params: PyTree, what: str, *, scalar_leaves_ok: bool = False) -> None:
  """Raises ValueError naming the first leaf where `tree` does not match `params`.

  With `scalar_leaves_ok`, a leaf may also be a scalar (one value for the whole leaf).
  """
  got = jax.tree_util.tree_flatten_with_path(tree)[0]
  want = jax.tree_util.tree_flatten_with_path(params)[0]
  got_paths = [path_str(p) for p, _ in got]
  want_paths = [path_str(p) for p, _ in want]
  if got_paths != want_paths:
    missing = sorted(set(want_paths) - set(got_paths))
    extra = sorted(set(got_paths) - set(want_paths))
    raise ValueError(
        f"{what} does not have the structure of params: missing leaves {missing[:5]}, "
        f"unexpected leaves {extra[:5]} ({len(got_paths)} leaves given, "
        f"{len(want_paths)} expected)."
    )
  for (path, g), (_, w) in zip(got, want):
    if jnp.shape(g) != jnp.shape(w) and not (scalar_leaves_ok and jnp.ndim(g) == 0):
      raise ValueError(
          f"{what} leaf '{path_str(path)}' has shape {jnp.shape(g)}, but the parameter "
          f"has shape {jnp.shape(w)}."
      )


def is_predicate(prunable: Prunable) -> bool:
  """True for a predicate `(path, leaf) -> bool`, False for a mask tree.

  Decided by type, not by callability: a mask is a pytree (an `eqx.Module`, a
  haiku dict, a penzai layer, an NNX state), and pytree nodes may well be
  callable. A predicate is a function, i.e. a callable that is a single pytree
  leaf (or a `jax.tree_util.Partial`).
  """
  if isinstance(prunable, jax.tree_util.Partial):
    return True
  return callable(prunable) and jax.tree_util.treedef_is_leaf(jax.tree.structure(prunable))


def prunable_mask(params: PyTree, prunable: Prunable | None = None) -> PyTree:
  """Resolves `prunable` (None, a predicate `(path, leaf) -> bool`, or a mask tree)."""
  if prunable is None:
    return default_prunable(params)
  if is_predicate(prunable):
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: bool(prunable(path_str(path), leaf)), params
    )
  check_like(prunable, params, "prunable mask", scalar_leaves_ok=True)
  return prunable


class Removal(NamedTuple):
  """δ = −θ on the entries of `mask` (a `prunable_mask` tree), 0 elsewhere, kept symbolic."""

  mask: PyTree

  def values(self, params: PyTree) -> PyTree:
    """δ as arrays like `params`."""
    return jax.tree.map(lambda p, m: jnp.where(m, -p, jnp.zeros_like(p)), params, self.mask)


def removal_direction(
    params: PyTree, delta: PyTree | None = None, prunable: Prunable | None = None
) -> "Removal | PyTree":
  """The direction to differentiate along: a `Removal` unless `delta` has explicit values."""
  if delta is None:
    return Removal(prunable_mask(params, prunable))
  if isinstance(delta, Removal) and prunable is None:
    return delta
  return removal_delta(params, delta, prunable)


def removal_delta(
    params: PyTree, delta: "PyTree | Removal | None" = None, prunable: Prunable | None = None
) -> PyTree:
  """The perturbation scored by the criteria: `-params` on prunable entries, else 0.

  Args:
    params: the parameter pytree.
    delta: an explicit perturbation with the structure and shapes of `params`, or a
      `Removal`. When given together with `prunable`, it is masked by `prunable`.
    prunable: which entries move: None (conv/dense kernels and biases), a
      predicate `(path, leaf) -> bool` with paths like 'conv1/kernel', or a pytree
      like `params` of bools or bool arrays, whatever its node types (an
      `eqx.Module` mask is a mask although it is callable; see `is_predicate`).
  """
  if isinstance(delta, Removal):
    check_like(delta.mask, params, "Removal mask", scalar_leaves_ok=True)
    delta = delta.values(params)
    if prunable is None:
      return delta
  elif delta is None:
    delta = jax.tree.map(jnp.negative, params)
  else:
    check_like(delta, params, "delta")
    if prunable is None:
      return delta
  mask = prunable_mask(params, prunable)
  return jax.tree.map(lambda d, m: jnp.where(m, d, jnp.zeros_like(d)), delta, mask)
