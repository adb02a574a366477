"""The smaller function: a traced jaxpr re-run at the compacted shapes.

`structure.tracer` gives every axis of every array in a model's jaxpr a layout
of atoms, and a plan removes indices of some atoms (groups). The layout then
says, for every array, which of its entries are kept. `Rebuild` re-runs the
jaxpr equation by equation on the compacted parameters: arrays simply come out
smaller, and the few primitives that carry a shape in their parameters (reshape
sizes, broadcast shapes, slice bounds, split sizes, a grouped convolution's
`feature_group_count`, gather and dynamic-slice sizes) get it rewritten from
the same layouts (`REWRITES`, one entry per primitive, never per layer).
Equations whose inputs did not shrink run at full size and keep only the kept
entries of their results (an `iota` of channel positions, a constant). Calls
are inlined; `lax.scan`, `lax.while_loop` and `lax.cond` are rebuilt around
re-run bodies.
Every result is checked against the shape its layout predicts, so a primitive
whose shape parameters are not understood fails loudly, naming it.

Custom derivative rules (`custom_jvp`, `custom_vjp`) are inlined: the
compacted function differentiates its primal code.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from oba_jax.structure.atoms import Layout
from oba_jax.structure.tracer import Scope, Traced, UnsupportedPrimitiveError, inner_jaxpr
from oba_jax.structure.tracer import live_equations

Rewrite = Callable[["Rebuild", Any, Scope, list, list[tuple[int, ...]]], dict]
REWRITES: dict[str, Rewrite] = {}


def register_rewrite(*names: str) -> Callable[[Rewrite], Rewrite]:
  """Decorator: `rewrite(rebuild, eqn, scope, inputs, out_shapes) -> params` for primitives.

  For a primitive that stores a shape in its parameters: given the (compacted)
  input values and the compacted output shapes, the parameters to bind it with.
  """

  def register(rewrite: Rewrite) -> Rewrite:
    for name in names:
      REWRITES[name] = rewrite
    return rewrite

  return register


def kept_atoms(traced: Traced, removed: Mapping[str, Sequence[int]]) -> dict[int, np.ndarray]:
  """{group atom root: bool mask of its kept indices} for the groups with removals."""
  roots = {name: root for root, name in traced.names.items()}
  kept = {}
  for name, indices in removed.items():
    indices = np.asarray(indices, np.int64)
    if not indices.size:
      continue
    if name not in roots:
      raise ValueError(f"group {name!r} of the plan is not a group of the traced function "
                       f"(its groups: {sorted(roots)[:6]} ...): the plan belongs to another model.")
    size = traced.atoms.size[roots[name]]
    if indices.min() < 0 or indices.max() >= size:
      raise ValueError(f"group {name!r} has {size} indices; cannot remove {indices[:5].tolist()}.")
    if np.unique(indices).size == size:
      raise ValueError(f"the plan removes all {size} indices of group {name!r}.")
    mask = np.ones(size, bool)
    mask[indices] = False
    kept[roots[name]] = mask
  return kept


class Rebuild:
  """Re-runs a traced jaxpr with some atoms' indices removed (see the module docstring)."""

  def __init__(self, traced: Traced, kept: Mapping[int, np.ndarray]):
    self.traced, self.atoms, self.kept = traced, traced.atoms, dict(kept)

  # --- which entries survive ----------------------------------------------------

  def axis_mask(self, layout: Layout) -> np.ndarray | None:
    """Bool mask of the kept entries along an axis of this layout; None if all are kept."""
    atoms = self.atoms
    segments = atoms.expand(layout)
    if not any(atoms.find(a) in self.kept for s in segments for a in s):
      return None
    parts = []
    for segment in segments:
      mask = np.ones((), bool)
      for a in segment:
        r = atoms.find(a)
        mask = np.multiply.outer(mask, self.kept.get(r, np.ones(atoms.size[r], bool)))
      parts.append(mask.ravel())
    return np.concatenate(parts)

  def masks(self, shape) -> list[np.ndarray | None]:
    return [self.axis_mask(layout) for layout in shape]

  def shape(self, scope: Scope, var) -> tuple[int, ...]:
    """The compacted shape of a jaxpr variable."""
    full = tuple(var.aval.shape)
    if isinstance(var, jcore.Literal) or var not in scope.layouts:
      return full
    return tuple(n if m is None else int(m.sum())
                 for n, m in zip(full, self.masks(scope.layouts[var])))

  def take(self, value, shape):
    """`value` (an array or a ShapeDtypeStruct) without the removed entries of `shape`."""
    for axis, mask in enumerate(self.masks(shape)):
      if mask is None:
        continue
      if isinstance(value, jax.ShapeDtypeStruct):
        sizes = list(value.shape)
        sizes[axis] = int(mask.sum())
        value = jax.ShapeDtypeStruct(tuple(sizes), value.dtype)
      elif isinstance(value, jax.core.Tracer) or not getattr(value, "is_fully_addressable", True):
        value = jnp.take(value, np.flatnonzero(mask), axis=axis)
      else:  # on the host: no compilation per leaf shape
        value = jax.device_put(np.take(np.asarray(value), np.flatnonzero(mask), axis=axis))
    return value

  # --- re-running ---------------------------------------------------------------

  def leaves(self, values: Sequence[Any]) -> list:
    """The traced parameter and state leaves (in `traced.leaves` order), compacted."""
    return [self.take(v, shape) for v, shape in zip(values, self.traced.leaf_shapes)]

  def run(self, jaxpr, scope: Scope, consts: Sequence[Any], args: Sequence[Any]) -> list:
    """The outputs of `jaxpr` on compacted `args` (its constants are compacted here)."""
    env = {}
    for var, value in zip(jaxpr.constvars, consts):
      env[var] = self.take(value, scope.layouts[var])
    for var, value in zip(jaxpr.invars, args):
      env[var] = value
    read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]
    for i in live_equations(jaxpr):
      eqn = jaxpr.eqns[i]
      outs = self._equation(eqn, scope, scope.calls.get(i, []), [read(v) for v in eqn.invars])
      for var, value in zip(eqn.outvars, outs):
        env[var] = value
    return [read(v) for v in jaxpr.outvars]

  def _equation(self, eqn, scope: Scope, calls: list[Scope], ins: list) -> list:
    name = eqn.primitive.name
    if name == "scan":
      return self._scan(eqn, calls[0], ins)
    if name == "while":
      return self._while(eqn, calls, ins)
    if name == "cond":
      return self._cond(eqn, calls, ins)
    inner = inner_jaxpr(eqn)
    if inner is not None:  # jit, custom_jvp/vjp, remat: inlined
      closed = next(eqn.params[k] for k in ("jaxpr", "call_jaxpr", "fun_jaxpr")
                    if k in eqn.params)
      return self.run(inner, calls[0], getattr(closed, "consts", ()), ins)
    expected = [self.shape(scope, v) for v in eqn.outvars]
    shrunk = any(np.shape(x) != tuple(v.aval.shape) for x, v in zip(ins, eqn.invars))
    params = (REWRITES.get(name, _same)(self, eqn, scope, ins, expected) if shrunk
              else eqn.params)
    with eqn.ctx.manager:
      outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(params))
    outs = list(outs) if eqn.primitive.multiple_results else [outs]
    if not shrunk:  # computed at full size (iota, constants): keep the kept entries
      outs = [self.take(o, scope.layouts[v]) if v in scope.layouts else o
              for o, v in zip(outs, eqn.outvars)]
    for out, want in zip(outs, expected):
      if tuple(np.shape(out)) != want:
        raise UnsupportedPrimitiveError(
            f"compacting primitive {name!r} gave shape {tuple(np.shape(out))} where the traced "
            f"layouts give {want}: its parameters {sorted(eqn.params)} hold a shape that "
            "oba_jax does not rewrite. Register one with "
            "oba_jax.structure.rebuild.register_rewrite.")
    return outs

  def _scan(self, eqn, scope: Scope, ins: list) -> list:
    p = eqn.params
    body, nc, nk = p["jaxpr"], p["num_consts"], p["num_carry"]
    consts, carry, xs = ins[:nc], ins[nc:nc + nk], ins[nc + nk:]

    def step(c, x):
      outs = self.run(body.jaxpr, scope, body.consts, [*consts, *c, *x])
      return outs[:nk], outs[nk:]

    carry, ys = jax.lax.scan(step, list(carry), list(xs), length=p["length"],
                             reverse=p["reverse"], unroll=p["unroll"])
    return [*carry, *ys]

  def _while(self, eqn, calls: list[Scope], ins: list) -> list:
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cond_consts, body_consts, carry = ins[:nc], ins[nc:nc + nb], ins[nc + nb:]
    body, cond = p["body_jaxpr"], p["cond_jaxpr"]
    step = lambda c: self.run(body.jaxpr, calls[0], body.consts, [*body_consts, *c])
    test = lambda c: self.run(cond.jaxpr, calls[1], cond.consts, [*cond_consts, *c])[0]
    return list(jax.lax.while_loop(test, step, list(carry)))


  def _cond(self, eqn, calls: list[Scope], ins: list) -> list:
    branches = [lambda *x, b=b, s=s: self.run(b.jaxpr, s, b.consts, x)
                for b, s in zip(eqn.params["branches"], calls)]
    return list(jax.lax.switch(ins[0], branches, *ins[1:]))


def _same(rebuild, eqn, scope, ins, out_shapes) -> dict:
  """Parameters without shapes: bound as traced."""
  return eqn.params


def _with(params: Mapping[str, Any], **changes) -> dict:
  return {**params, **{k: v for k, v in changes.items() if k in params}}


@register_rewrite("reshape")
def _reshape(rebuild, eqn, scope, ins, out_shapes) -> dict:
  return _with(eqn.params, new_sizes=tuple(out_shapes[0]), dimensions=None)


@register_rewrite("broadcast_in_dim")
def _broadcast(rebuild, eqn, scope, ins, out_shapes) -> dict:
  return _with(eqn.params, shape=tuple(out_shapes[0]))


def _kept_before(rebuild, scope, var, axis: int, index: int) -> int:
  """How many entries before `index` along `axis` of `var` are kept."""
  mask = rebuild.masks(scope.layouts[var])[axis]
  return index if mask is None else int(mask[:index].sum())


@register_rewrite("slice")
def _slice(rebuild, eqn, scope, ins, out_shapes) -> dict:
  p, var = eqn.params, eqn.invars[0]
  starts = tuple(_kept_before(rebuild, scope, var, d, s) for d, s in enumerate(p["start_indices"]))
  stops = tuple(_kept_before(rebuild, scope, var, d, s) for d, s in enumerate(p["limit_indices"]))
  return _with(p, start_indices=starts, limit_indices=stops)


@register_rewrite("split")
def _split(rebuild, eqn, scope, ins, out_shapes) -> dict:
  axis = eqn.params["axis"]
  return _with(eqn.params, sizes=tuple(s[axis] for s in out_shapes))


@register_rewrite("conv_general_dilated")
def _conv(rebuild, eqn, scope, ins, out_shapes) -> dict:
  """Groups = input features / kernel input features, both read from the compacted arrays."""
  dn = eqn.params["dimension_numbers"]
  lhs_in, rhs_in = np.shape(ins[0])[dn.lhs_spec[1]], np.shape(ins[1])[dn.rhs_spec[1]]
  return _with(eqn.params, feature_group_count=lhs_in // rhs_in)


@register_rewrite("gather", "dynamic_slice")
def _slice_sizes(rebuild, eqn, scope, ins, out_shapes) -> dict:
  """Axes taken whole stay whole."""
  full, now = tuple(eqn.invars[0].aval.shape), np.shape(ins[0])
  sizes = tuple(n if s == f else s for s, f, n in zip(eqn.params["slice_sizes"], full, now))
  return _with(eqn.params, slice_sizes=sizes)
