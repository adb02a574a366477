"""Call equations of a jaxpr whose bodies a walker enters in place, and their bodies.

Shared by the jaxpr walks that look through `jit`, `checkpoint`, custom-derivative
calls and the like (`bilinear`, `kfac`).
"""

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
