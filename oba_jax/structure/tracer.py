"""Finds coupled groups by walking the jaxpr of a model's forward pass.

Every axis of every array in the jaxpr gets a layout of atoms (`atoms`), and
every primitive says which atoms are the same index space (`rules`): a
convolution's input features are its kernel's input features, an addition's
operands share every axis, a reshape from (B, N, D) to (B, N, H, hd) splits the
atom of D into those of H and hd, a concatenation lays its operands side by side.

Calls (jit, custom_jvp/vjp, remat) are walked through, each call site on its
own `Scope`, so that a function called twice may see different channels.
Loops are walked once: `lax.scan` (and `lax.map`) couples each carry's input
and output axes (an iteration hands its carry to the next), its per-iteration
slices of `xs` are the body's inputs and the stacked axis is data, and its
MACs are the body's times the length. A parameter stacked along a layer axis
and scanned over is therefore pruned *uniformly*: index c of a group removes
slice c of every layer (the compacted body must have one shape for all
iterations). `lax.while_loop` couples carries the same way; its MACs are one
iteration's (the trip count is not known when tracing). `lax.cond` and
`lax.switch` walk every branch on the same operands and couple their results;
their MACs are the costliest branch's.

When the walk ends, each class of atoms is a potential group: its members are
the parameter (and state) axes that contain it, with the index map their
layouts give. A class is prunable when it touches a parameter and no *fixed*
atom. Fixed atoms come from the data (batch, spatial positions, tokens, the
model's inputs and outputs, convolution windows, loop iterations) or from the
parameters named in `ignore`. No per-architecture knowledge is needed, only
the primitives'.

A group is named after one member, `<path>@<axis>[+<offset>][.<position>]`:
the offset tells apart the parts of one axis that a split or slice sends to
different places, the position the factors of a reshaped axis (heads and
dimensions within heads). Names are unique by construction.

Convolutions and matrix products also give the cost model: their MACs are
products of axis sizes, that is, polynomials in the groups' widths.
"""

import collections
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend import core as jcore

from oba_jax.delta import KERNEL_NAMES, path_str
from oba_jax.structure.atoms import Atoms, Layout, UnsupportedLayoutError
from oba_jax.structure.groups import Group, Member, Structure, Term
from oba_jax.structure.rules import RULES, Shape, Walk, unsupported
from oba_jax.validate import is_traced


class UnsupportedPrimitiveError(UnsupportedLayoutError):
  """A primitive the tracer cannot follow touches a prunable axis."""


@dataclasses.dataclass
class Scope:
  """The layouts of one walk over one jaxpr, and the scopes of the jaxprs its equations call.

  `calls[i]` holds one scope per inner jaxpr of equation i (a call's body, a
  loop's body and condition), in the order `walk_jaxpr` walked them.
  """

  layouts: dict = dataclasses.field(default_factory=dict)  # jaxpr var -> Shape
  calls: dict[int, list["Scope"]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Traced:
  """Everything one trace found: the jaxpr, its layouts, and the groups' atoms."""

  closed: Any  # the ClosedJaxpr of fn(params, state, *inputs) -> (outputs, state)
  walk: Walk
  scope: Scope
  leaves: list[tuple[str, str, Any]]  # (path, "params" | "state", value)
  leaf_shapes: list[Shape]
  members: dict[int, list[Member]]  # atom root -> members
  names: dict[int, str]  # root of every group -> its name
  out_tree: Any  # the pytree structure of fn's result

  @property
  def atoms(self) -> Atoms:
    return self.walk.atoms


def trace(model: nnx.Module | Callable, *example_inputs, ignore: Sequence[str] = (),
          params: Any = None) -> Structure:
  """The coupled groups of `model` and its cost model, from the jaxpr of one forward pass.

  Args:
    model: a Flax NNX module (its `nnx.Param`s are the parameters, its other
      state, e.g. BatchNorm statistics, the state), or a pure function
      `apply_fn(params, *inputs)` together with `params=` (Linen's
      `lambda p, x: module.apply({"params": p}, x)`, `oba_jax.functional`'s).
    *example_inputs: inputs of the forward pass (only shapes and dtypes matter).
    ignore: parameter path prefixes whose axes must never be pruned (e.g.
      'conv_proj' for a ViT's patch embedding); their groups disappear.
    params: the parameters, when `model` is a function.

  Returns:
    A `Structure`: the prunable groups (output axes of the model, input axes and
    anything coupled to the data excluded) and the MAC and parameter counts as
    polynomials in the groups' widths.

  Raises:
    UnsupportedPrimitiveError: a primitive the tracer cannot follow acts on an
      axis of a prunable group (names the primitive and a parameter).
  """
  fn, params, state = functional(model, params)
  traced = analyse(fn, params, state, example_inputs, ignore)
  atoms, names, members = traced.atoms, traced.names, traced.members
  order = {path: i for i, (path, _, _) in enumerate(traced.leaves)}
  roots = sorted(names, key=lambda r: (order[names[r].split("@")[0]], names[r]))
  groups = tuple(Group(names[r], atoms.size[r], tuple(members[r]), normalized=atoms.reduced[r])
                 for r in roots)
  walk = traced.walk
  mac_terms = [t for label, axes in walk.mac_terms for t in _terms(atoms, label, axes, names)]
  param_terms = [t for (path, collection, _), shape in zip(traced.leaves, traced.leaf_shapes)
                 if collection == "params" for t in _terms(atoms, path, shape, names)]
  shapes = {path: tuple(np.shape(x)) for path, _, x in traced.leaves}
  inputs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)),
                        tuple(example_inputs))
  concrete = all(isinstance(x, (np.ndarray, np.generic, jax.Array)) and not is_traced(x)
                 for x in jax.tree.leaves(example_inputs))
  return Structure(groups, tuple(mac_terms), tuple(param_terms), shapes, inputs=inputs,
                   ignore=tuple(ignore), example=tuple(example_inputs) if concrete else None)


def analyse(fn: Callable, params: Any, state: Any, example_inputs: Sequence[Any],
            ignore: Sequence[str] = ()) -> Traced:
  """Walks the jaxpr of `fn(params, state, *inputs) -> (outputs, state)`; see `trace`."""
  closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(params, state, *example_inputs)
  walk = Walk(Atoms())
  atoms = walk.atoms

  leaves = [(path_str(p), "params", x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]]
  leaves += [(path_str(p), "state", x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]]
  ignored = _ignored(ignore, [path for path, _, _ in leaves])
  leaf_shapes = [walk.fresh(np.shape(x), fixed=ignored(path)) for path, _, x in leaves]
  input_shapes = [walk.fresh(v.aval.shape) for v in closed.jaxpr.invars[len(leaves):]]
  for var, (path, collection, _) in zip(closed.jaxpr.invars, leaves):
    if collection == "params":
      walk.param_paths[var] = path

  scope = Scope()
  outs = walk_jaxpr(walk, closed.jaxpr, leaf_shapes + input_shapes, scope)
  num_state = sum(c == "state" for _, c, _ in leaves)
  for shape in outs[:len(outs) - num_state]:  # the model's outputs are never pruned
    for axis in shape:
      atoms.fix(axis)
  for before, after in zip(leaf_shapes[len(leaves) - num_state:], outs[len(outs) - num_state:]):
    for a, b in zip(before, after):  # updated state (e.g. running means) is the same state
      atoms.unify(a, b)

  used = {v for i in live_equations(closed.jaxpr) for v in closed.jaxpr.eqns[i].invars
          if not isinstance(v, jcore.Literal)}
  used |= {v for v in closed.jaxpr.outvars if not isinstance(v, jcore.Literal)}
  for var, shape in zip(closed.jaxpr.invars, leaf_shapes):
    if var not in used:  # a parameter the outputs never read: pruning it saves nothing
      for axis in shape:
        atoms.fix(axis)
  members = _members(atoms, leaves, leaf_shapes)
  shapes = {path: tuple(np.shape(x)) for path, _, x in leaves}
  names = {root: _group_name(ms, shapes) for root, ms in members.items()
           if not atoms.fixed[root] and any(m.collection == "params" for m in ms)}
  duplicates = [n for n, k in collections.Counter(names.values()).items() if k > 1]
  if duplicates:  # a tracer bug: names identify groups everywhere (plans, masks, costs)
    raise AssertionError(f"two groups share the names {duplicates[:3]}")
  _check_unsupported(walk, names)
  return Traced(closed, walk, scope, leaves, leaf_shapes, members, names,
                jax.tree.structure(out_shape))


def walk_jaxpr(walk: Walk, jaxpr, in_shapes: Sequence[Shape],
               scope: Scope | None = None) -> list[Shape]:
  """Layouts of the outputs of `jaxpr`, given those of its inputs (recorded in `scope`)."""
  scope = Scope() if scope is None else scope
  layouts = scope.layouts
  for var, shape in zip(jaxpr.invars, in_shapes):
    layouts[var] = shape
  # Closed-over arrays (e.g. BatchNorm statistics captured by a plain apply_fn) follow
  # the channels they meet; only a module's own state is sliced by compaction.
  for var in jaxpr.constvars:
    layouts[var] = walk.fresh(var.aval.shape, fixed=False)

  def read(v) -> Shape:
    return walk.fresh(np.shape(v.val)) if isinstance(v, jcore.Literal) else layouts[v]

  for i in live_equations(jaxpr):
    eqn = jaxpr.eqns[i]
    ins = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    if name in _LOOPS:
      outs, scope.calls[i] = _LOOPS[name](walk, eqn, ins)
    elif (inner := inner_jaxpr(eqn)) is not None:  # jit, custom_jvp/vjp, remat: the body
      _pass_param_paths(walk, eqn.invars, inner.invars)
      inner_scope = Scope()
      outs = walk_jaxpr(walk, inner, ins, inner_scope)
      scope.calls[i] = [inner_scope]
    else:
      outs = RULES.get(name, unsupported)(walk, eqn, ins)
    for var, shape in zip(eqn.outvars, outs):
      layouts[var] = shape
  return [read(v) for v in jaxpr.outvars]


def _pass_param_paths(walk: Walk, outer, inner) -> None:
  """Inner variables that receive a parameter are that parameter (for cost labels)."""
  for var, inner_var in zip(outer, inner):
    if not isinstance(var, jcore.Literal) and var in walk.param_paths:
      walk.param_paths[inner_var] = walk.param_paths[var]


def _unify_shapes(walk: Walk, xs: Sequence[Shape], ys: Sequence[Shape]) -> None:
  for x, y in zip(xs, ys, strict=True):
    for a, b in zip(x, y, strict=True):
      walk.atoms.unify(a, b)


def _walk_scan(walk: Walk, eqn, ins: list[Shape]) -> tuple[list[Shape], list[Scope]]:
  """`lax.scan`: the body on one slice of `xs`; carries coupled; MACs times the length."""
  p = eqn.params
  body, length = p["jaxpr"].jaxpr, p["length"]
  consts, carry = ins[:p["num_consts"]], ins[p["num_consts"]:p["num_consts"] + p["num_carry"]]
  xs = ins[p["num_consts"] + p["num_carry"]:]
  for x in xs:  # the stacked axis (layers, time steps) is data
    walk.atoms.fix(x[0])
  _pass_param_paths(walk, eqn.invars, body.invars)
  first, scope = len(walk.mac_terms), Scope()
  outs = walk_jaxpr(walk, body, [*consts, *carry, *(x[1:] for x in xs)], scope)
  _unify_shapes(walk, carry, outs[:len(carry)])  # one iteration's carry is the next one's
  iterations = walk.atoms.new(length, True)
  walk.mac_terms[first:] = [(label, [*axes, iterations]) for label, axes in walk.mac_terms[first:]]
  ys = [(walk.atoms.new(length, True), *y) for y in outs[len(carry):]]
  return [*carry, *ys], [scope]


def _walk_while(walk: Walk, eqn, ins: list[Shape]) -> tuple[list[Shape], list[Scope]]:
  """`lax.while_loop`: carries coupled through body and condition; MACs of one iteration."""
  p = eqn.params
  nc, nb = p["cond_nconsts"], p["body_nconsts"]
  cond_consts, body_consts, carry = ins[:nc], ins[nc:nc + nb], ins[nc + nb:]
  body_scope, cond_scope = Scope(), Scope()
  outs = walk_jaxpr(walk, p["body_jaxpr"].jaxpr, [*body_consts, *carry], body_scope)
  _unify_shapes(walk, carry, outs)
  walk_jaxpr(walk, p["cond_jaxpr"].jaxpr, [*cond_consts, *carry], cond_scope)
  return list(carry), [body_scope, cond_scope]


def _walk_cond(walk: Walk, eqn, ins: list[Shape]) -> tuple[list[Shape], list[Scope]]:
  """`lax.cond`/`lax.switch`: every branch on the same operands; their results coupled.

  The costliest branch (at dense widths) gives the MACs: an upper bound.
  """
  outs, scopes, costliest, first = None, [], None, len(walk.mac_terms)
  for branch in eqn.params["branches"]:
    start, scope = len(walk.mac_terms), Scope()
    _pass_param_paths(walk, eqn.invars[1:], branch.jaxpr.invars)
    results = walk_jaxpr(walk, branch.jaxpr, ins[1:], scope)
    if outs is None:
      outs = results
    else:
      _unify_shapes(walk, outs, results)
    terms = walk.mac_terms[start:]
    dense = sum(math.prod(walk.atoms.layout_size(a) for a in axes) for _, axes in terms)
    if costliest is None or dense > costliest[0]:
      costliest = (dense, terms)
    scopes.append(scope)
  walk.mac_terms[first:] = costliest[1]
  return outs, scopes


_LOOPS = {"scan": _walk_scan, "while": _walk_while, "cond": _walk_cond}


def inner_jaxpr(eqn):
  """The body of a call-like equation (jit, custom_jvp/vjp, remat), or None."""
  for name in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    if name in eqn.params:
      return getattr(eqn.params[name], "jaxpr", eqn.params[name])  # ClosedJaxpr or Jaxpr
  return None


def live_equations(jaxpr) -> list[int]:
  """Indices of the equations that contribute to the outputs (not, e.g., discarded updates)."""
  needed = {v for v in jaxpr.outvars if not isinstance(v, jcore.Literal)}
  live = []
  for i in reversed(range(len(jaxpr.eqns))):
    eqn = jaxpr.eqns[i]
    if eqn.effects or any(v in needed for v in eqn.outvars):
      live.append(i)
      needed.update(v for v in eqn.invars if not isinstance(v, jcore.Literal))
  return live[::-1]


def functional(model, params) -> tuple[Callable, Any, Any]:
  """`fn(params, state, *inputs) -> (outputs, updated state)` with its params and state."""
  if isinstance(model, nnx.Module):
    graphdef, param_state, rest = nnx.split(model, nnx.Param, ...)

    def fn(p, s, *inputs):
      module = nnx.merge(graphdef, nnx.State(p), nnx.State(s), copy=True)
      return module(*inputs), nnx.to_pure_dict(nnx.state(module, nnx.Not(nnx.Param)))

    return fn, nnx.to_pure_dict(param_state), nnx.to_pure_dict(rest)
  if callable(model) and params is not None:
    return (lambda p, s, *inputs: (model(p, *inputs), s)), params, {}
  raise TypeError("trace needs an nnx.Module, or a function apply_fn(params, *inputs) with "
                  f"params=; got {type(model).__name__} and params={type(params).__name__}.")


def _ignored(ignore: Sequence[str], paths: Sequence[str]) -> Callable[[str], bool]:
  """A predicate on leaf paths for the `ignore` prefixes; each prefix must match a leaf."""
  prefixes = [i.strip("/") for i in ignore]
  matches = lambda path, prefix: path == prefix or path.startswith(prefix + "/")
  unmatched = [i for i in prefixes if not any(matches(p, i) for p in paths)]
  if unmatched:
    raise ValueError(f"ignore={unmatched} matches no parameter path; paths look like "
                     f"{paths[0]!r}.")
  return lambda path: any(matches(path, i) for i in prefixes)


def _members(atoms: Atoms, leaves, leaf_shapes) -> dict[int, list[Member]]:
  """Every leaf axis, split into the atoms it holds: class root -> members."""
  members: dict[int, list[Member]] = collections.defaultdict(list)
  for (path, collection, _), shape in zip(leaves, leaf_shapes):
    for axis, layout in enumerate(shape):
      offset = 0
      for segment in atoms.expand(layout):
        factors = tuple(atoms.size[a] for a in segment)
        for position, a in enumerate(segment):
          members[atoms.find(a)].append(
              Member(path, axis, offset, factors, position, collection))
        offset += math.prod(factors)
  return members


def _group_name(members: Sequence[Member], shapes: dict[str, tuple[int, ...]]) -> str:
  """'<path>@<axis>[+<offset>][.<position>]' of the group's producer: a kernel's output axis.

  One (path, axis, offset, position) holds exactly one atom, so two groups
  never get the same name.
  """
  params = [m for m in members if m.collection == "params"]
  kernels = [m for m in params if m.path.rpartition("/")[2] in KERNEL_NAMES]
  producers = [m for m in kernels if m.axis == len(shapes[m.path]) - 1]
  m = (producers or kernels or params)[0]
  return (f"{m.path}@{m.axis}" + (f"+{m.offset}" if m.offset else "")
          + (f".{m.position}" if len(m.factors) > 1 else ""))


def _terms(atoms: Atoms, label: str, axes: Sequence[Layout], names: dict[int, str]) -> list[Term]:
  """The product of the axes' sizes as monomials in the widths of the named groups."""
  poly = collections.Counter({(): 1})
  for layout in axes:
    axis = collections.Counter()  # an axis is a sum (of segments) of products (of atoms)
    for segment in atoms.expand(layout):
      roots = [atoms.find(a) for a in segment]
      coefficient = math.prod(atoms.size[r] for r in roots if r not in names)
      axis[tuple(sorted(names[r] for r in roots if r in names))] += coefficient
    product = collections.Counter()
    for mp, cp in poly.items():
      for mq, cq in axis.items():
        product[tuple(sorted(mp + mq))] += cp * cq
    poly = product
  return [Term(label, c, m) for m, c in sorted(poly.items()) if c]


def _check_unsupported(walk: Walk, names: dict[int, str]) -> None:
  atoms = walk.atoms
  for primitive, axes in walk.unsupported:
    for layout in axes:
      for segment in atoms.expand(layout):
        for root in (atoms.find(a) for a in segment):
          if root in names:
            raise UnsupportedPrimitiveError(
                f"primitive {primitive!r} acts on the axis of group {names[root]!r} (parameter "
                f"{names[root].split('@')[0]!r}); oba_jax cannot follow channels through it. "
                "Pass ignore=[...] for the parameters feeding it, or register a rule with "
                "oba_jax.structure.register_rule.")
