"""Checks that turn bad input into clear errors before any work is done."""

import numbers
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
  """Raises unless params are floating, the batch holds examples and the loss is a scalar.

  Integer parameters have no derivatives (JAX would fail deep inside with a
  `float0` error) and an empty batch would give scores of zero, so both are
  refused here, before any work.
  """
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      raise TypeError(
          f"parameter '{path_str(path)}' has dtype {jnp.result_type(leaf)}; scores "
          "differentiate the loss, so parameters must be floating (cast them, e.g. "
          "jax.tree.map(lambda x: x.astype(jnp.float32), params), or leave integer "
          "state out of params).")
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
