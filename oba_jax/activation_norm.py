"""An activation-aware magnitude score in the spirit of Wanda and FLAP: |δ| times input norms.

For every matrix product y = x · W in the forward pass of `loss_fn(params, batch)` in which W is
a parameter leaf used as it is (an `nnx.Linear` kernel, a tied embedding used as the head) and x
depends on the batch, the entry W[i, o] scores |δ[i, o]| · ‖x_i‖, where ‖x_i‖ is the L2 norm of
input feature i over every token of the batch (Wanda's |W|·‖X‖). A bias b[o] beside such a kernel
is a weight on a constant input 1, so it scores |δ[o]| · sqrt(number of tokens). Other prunable
entries (e.g. convolution kernels, which this score does not model) score |δ| (magnitude).
Summed per structure by the group reduction, this gives FLAP/Wanda-style structured importance:
an MLP unit or head is as important as the activation-weighted magnitude of its weights.

The products are found by walking the jaxpr (calls such as `jit` and einsum's `pjit` are walked
through), so no hooks or per-model code are needed. It reads one forward pass and no gradient.
The score is unsigned and entrywise; it predicts no loss change.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from oba_jax.delta import path_str, prunable_mask, removal_delta

PyTree = Any
_CALLS = ("pjit", "jit", "closed_call", "core_call", "remat", "checkpoint")


def input_sq_norms(loss_fn: Callable[[PyTree, PyTree], jax.Array], params: PyTree,
                   batch: PyTree) -> dict[str, tuple[int, jax.Array, jax.Array]]:
  """{leaf path: (contracted axis of the leaf, Σ x_i² per input feature, number of rows)} for
  every parameter leaf used directly as one operand of a `dot_general` whose other operand
  depends on the batch. A leaf used several times accumulates."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  paths = [path_str(p) for p, _ in leaves]
  batch_leaves = jax.tree.leaves(batch)
  closed = jax.make_jaxpr(lambda p, b: loss_fn(p, b))(params, batch)
  found: dict[str, list] = {}
  args = [x for _, x in leaves] + list(batch_leaves)
  tags = [("param", path) for path in paths] + [("data", None)] * len(batch_leaves)
  _walk(closed.jaxpr, closed.consts, args, tags, found)
  return {path: tuple(v) for path, v in found.items()}


def _walk(jaxpr, consts, args, tags, found) -> list:
  env, tag = {}, {}
  for var, value in zip(jaxpr.constvars, consts):
    env[var], tag[var] = value, None
  for var, value, t in zip(jaxpr.invars, args, tags):
    env[var], tag[var] = value, t

  def read(v):
    return (v.val, None) if isinstance(v, jcore.Literal) else (env[v], tag[v])

  for eqn in jaxpr.eqns:
    values, in_tags = zip(*map(read, eqn.invars)) if eqn.invars else ((), ())
    name = eqn.primitive.name
    if name in _CALLS and "jaxpr" in eqn.params:
      inner = eqn.params["jaxpr"]
      inner_jaxpr = getattr(inner, "jaxpr", inner)
      outs = _walk(inner_jaxpr, getattr(inner, "consts", ()), values, in_tags, found)
      depends = any(t is not None and t[0] == "data" for t in in_tags)
      out_tags = [("data", None) if depends else None] * len(outs)
    else:
      if name == "dot_general":
        _record(eqn, values, in_tags, found)
      with eqn.ctx.manager:
        outs = eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(eqn.params))
      outs = list(outs) if eqn.primitive.multiple_results else [outs]
      depends = any(t is not None and t[0] == "data" for t in in_tags)
      out_tags = [("data", None) if depends else None] * len(outs)
    for var, value, t in zip(eqn.outvars, outs, out_tags):
      env[var], tag[var] = value, t
  return [read(v)[0] for v in jaxpr.outvars]


def _record(eqn, values, in_tags, found) -> None:
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
  for p, a, p_contract, p_batch, a_contract in ((0, 1, lhs_contract, lhs_batch, rhs_contract),
                                                (1, 0, rhs_contract, rhs_batch, lhs_contract)):
    if (in_tags[p] is None or in_tags[p][0] != "param" or in_tags[a] is None
        or in_tags[a][0] != "data" or len(p_contract) != 1 or p_batch):
      continue
    x = values[a]
    axis = a_contract[0]
    sq = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=tuple(d for d in range(x.ndim)
                                                              if d != axis))
    rows = int(np.prod([s for d, s in enumerate(x.shape) if d != axis]))
    path = in_tags[p][1]
    if path in found:
      found[path][1] = found[path][1] + sq
      found[path][2] += rows
    else:
      found[path] = [int(p_contract[0]), sq, rows]


def activation_norm(loss_fn: Callable[[PyTree, PyTree], jax.Array], params: PyTree,
                    batch: PyTree, *, delta: PyTree | None = None) -> PyTree:
  """|δ| · ‖input feature‖ per entry (see the module docstring); a pytree like `params`."""
  delta = removal_delta(params, delta)
  norms = input_sq_norms(loss_fn, params, batch)
  mask = prunable_mask(params, None)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  deltas = treedef.flatten_up_to(delta)
  masks = treedef.flatten_up_to(mask)
  out = []
  for (path, leaf), d, m in zip(leaves, deltas, masks):
    name = path_str(path)
    parent = name.rpartition("/")[0]
    kernel = next((k for k in (f"{parent}/kernel", f"{parent}/weight", f"{parent}/w")
                   if k in norms), None)
    if name in norms:
      axis, sq, _ = norms[name]
      shape = [1] * jnp.ndim(leaf)
      shape[axis] = -1
      out.append(jnp.where(m, jnp.abs(d) * jnp.sqrt(sq).reshape(shape), 0))
    elif kernel is not None and jnp.ndim(leaf) == 1:  # a bias: weight on a constant 1 input
      out.append(jnp.where(m, jnp.abs(d) * np.sqrt(norms[kernel][2]), 0))
    else:
      out.append(jnp.where(m, jnp.abs(d), 0))
  return treedef.unflatten(out)
