"""Numerical helpers shared by the exactness tests."""

import jax
import jax.numpy as jnp
import pytest
from jax.flatten_util import ravel_pytree


@pytest.fixture(autouse=True)
def x64():
  """Float64 for the test (import it into a test module to apply it to every test there)."""
  with jax.enable_x64(True):
    yield


def rel_err(a, b) -> float:
  """‖a - b‖ / ‖b‖ over all leaves of two pytrees."""
  a, b = ravel_pytree(a)[0], ravel_pytree(b)[0]
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
