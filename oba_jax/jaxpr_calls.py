"""What the jaxpr walkers share: call equations entered in place, live equations, binding.

Shared by the jaxpr walks that look through `jit`, `checkpoint`, custom-derivative
calls and the like (`bilinear`, `kfac`, `removal_jvp`).
"""

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from jax.extend import core as jcore

# Calls whose bodies are evaluated in place; the parameter holding the body.
INLINED = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
           "remat2": "jaxpr", "checkpoint": "jaxpr", "custom_vjp_call": "call_jaxpr",
           "custom_vjp_call_jaxpr": "fun_jaxpr"}
CUSTOM_JVP = "custom_jvp_call"


def call_body(eqn) -> tuple:
  """(jaxpr, consts) of a call equation's single sub-jaxpr."""
  sub = eqn.params[INLINED.get(eqn.primitive.name, "call_jaxpr")]
  if isinstance(sub, jcore.ClosedJaxpr):
    return sub.jaxpr, sub.consts
  return sub, ()


def is_float(aval) -> bool:
  """Whether a value of this abstract type carries a derivative (a real or complex float)."""
  return jnp.issubdtype(getattr(aval, "dtype", jnp.int32), jnp.inexact)


def live_equations(jaxpr) -> list:
  """The equations the outputs depend on (drops, e.g., BatchNorm's running-average updates)."""
  needed = {v for v in jaxpr.outvars if not isinstance(v, jcore.Literal)}
  live = []
  for eqn in reversed(jaxpr.eqns):
    if any(v in needed for v in eqn.outvars):
      live.append(eqn)
      needed.update(v for v in eqn.invars if not isinstance(v, jcore.Literal))
  return live[::-1]


def bind(eqn, values: Sequence[Any]) -> list:
  """Applies `eqn`'s primitive, with its parameters, to `values`; always a list of outputs."""
  params = eqn.primitive.get_bind_params(eqn.params)
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*values, **params)
  return list(out) if eqn.primitive.multiple_results else [out]
