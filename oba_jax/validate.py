"""Checks that turn bad input into clear errors before any work is done."""

import numbers
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oba_jax.delta import path_str

PyTree = Any


def is_traced(tree: PyTree) -> bool:
  """True inside jit/grad/vmap tracing, where values cannot be inspected."""
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def check_scalar_loss(loss_fn, params: PyTree, batch: PyTree, name: str = "loss_fn") -> None:
  """Raises TypeError unless `loss_fn(params, batch)` is a real scalar (checked abstractly)."""
  out = jax.eval_shape(loss_fn, params, batch)
  shape = getattr(out, "shape", None)
  dtype = getattr(out, "dtype", None)
  if shape != () or not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f"{name}(params, batch) must return a real scalar, got shape={shape} dtype={dtype}; "
        "take the mean over the batch (e.g. optax.softmax_cross_entropy_with_integer_labels(...).mean())."
    )


def check_score_inputs(loss_fn, params: PyTree, batch: PyTree) -> None:
  """Raises unless params are floating and finite, the batch holds examples and the loss is
  a scalar.

  Integer parameters have no derivatives (JAX would fail deep inside with a
  `float0` error), a non-finite one would make every score NaN (and the blame fall on
  another leaf), and an empty batch would give scores of zero, so all are refused here,
  before any work.
  """
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      raise TypeError(
          f"parameter '{path_str(path)}' has dtype {jnp.result_type(leaf)}; scores "
          "differentiate the loss, so parameters must be floating (cast them, e.g. "
          "jax.tree.map(lambda x: x.astype(jnp.float32), params), or leave integer "
          "state out of params).")
  check_finite_params(params)
  for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
    shape = jnp.shape(leaf)
    if shape and shape[0] == 0:
      raise ValueError(f"batch leaf '{path_str(path)}' has shape {shape}: the batch is "
                       "empty, and scores of no examples would all be zero.")
  check_scalar_loss(loss_fn, params, batch)


def check_choice(name: str, value, accepted) -> None:
  if value not in accepted:
    raise ValueError(f"{name}={value!r} is not supported; accepted: {sorted(accepted)}.")


def check_finite(tree: PyTree, what: str = "scores") -> PyTree:
  """Returns `tree`, or raises FloatingPointError naming the first leaf with NaN/Inf.

  Skipped while tracing (values are unknown then); `scores.accumulate` checks
  every batch itself.
  """
  if is_traced(tree):
    return tree
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    bad = int(np.size(leaf) - np.count_nonzero(np.isfinite(np.asarray(leaf))))
    if bad:
      raise FloatingPointError(
          f"{what}: {bad} of {np.size(leaf)} values of '{path_str(path)}' are NaN or Inf. "
          "Check the loss at these parameters (divergent model, log(0), or too large a delta)."
      )
  return tree


def check_finite_params(params: PyTree) -> None:
  """Raises FloatingPointError naming the first parameter leaf with NaN/Inf (not traced).

  A non-finite weight makes every score downstream of it NaN, so checking the scores would
  blame whichever leaf comes first (a BatchNorm scale before the conv kernel at fault).
  """
  if is_traced(params) or _all_finite(params):  # one program; the leaf is looked for after
    return
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if not getattr(leaf, "is_fully_addressable", True):  # other processes hold parts of it
      continue
    value = np.asarray(leaf)
    if np.issubdtype(value.dtype, np.inexact) and not np.isfinite(value).all():
      bad = int(value.size - np.count_nonzero(np.isfinite(value)))
      raise FloatingPointError(
          f"parameter '{path_str(path)}' holds {bad} NaN or Inf of its {value.size} values, so "
          "every score computed from it would be NaN. The model diverged or its weights were "
          "loaded from a damaged file.")


@jax.jit
def _all_finite(tree: PyTree) -> jax.Array:
  """Whether every inexact leaf of `tree` is finite, as one program (any sharding)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
                            if jnp.issubdtype(x.dtype, jnp.inexact)] or [jnp.array(True)]))


@jax.jit
def _any_nonzero(tree: PyTree) -> jax.Array:
  return jnp.any(jnp.stack([jnp.any(x != 0) for x in jax.tree.leaves(tree)]))


def check_scores(tree: PyTree, what: str, batch: PyTree = None) -> PyTree:
  """`check_finite(tree, what)`, warning when every score is zero (see `warn_if_zero`)."""
  check_finite(tree, what)
  warn_if_zero(tree, what, batch)
  return tree


def warn_if_zero(tree: PyTree, what: str, batch: PyTree = None) -> None:
  """Warns, with the likely reason, when every value of the scores `tree` is exactly zero.

  Then the loss does not change with the parameters on that input: a batch of one example
  through BatchNorm with batch statistics (one example on a 1x1 map normalises to zero), a
  constant output, or a loss that is zero (self-distillation at the dense weights).
  """
  if is_traced(tree) or not jax.tree.leaves(tree) or _any_nonzero(tree):
    return
  rows = {np.shape(x)[0] for x in jax.tree.leaves(batch) if np.ndim(x)}
  one = (" This batch holds one example: BatchNorm with batch statistics (training mode) "
         "normalises a single example on a 1x1 feature map to zero, so nothing after it "
         "depends on the weights before it; use batches of several examples or eval mode."
         if rows == {1} else "")
  warnings.warn(
      f"{what}: every score is zero, so the loss does not change with the parameters on this "
      f"input and the scores rank nothing.{one} Other causes: a constant model output, or a "
      "loss that is zero (e.g. self-distillation at the dense weights).",
      RuntimeWarning, stacklevel=3)


def check_count(value, name: str) -> None:
  """Raises ValueError unless `value` is an integer >= 1 (a bool is not)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"{name}={value!r} is not an integer >= 1.")


def non_empty(values, name: str) -> tuple:
  """`values` as a tuple, or ValueError unless it is a non-empty sequence (not a string)."""
  if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
    raise ValueError(f"{name}={values!r} is not a non-empty sequence.")
  return tuple(values)


def check_decreasing(values, name: str) -> None:
  """Raises ValueError unless `values` are fractions in (0, 1], strictly decreasing."""
  values = non_empty(values, name)
  for value in values:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= 1:
      raise ValueError(f"{name}={values!r}: {value!r} is not a fraction in (0, 1].")
  if any(later >= earlier for earlier, later in zip(values, values[1:])):
    raise ValueError(f"{name}={values!r} is not strictly decreasing.")
