"""Finds coupled groups by walking the jaxpr of a model's forward pass.

Every axis of every array in the jaxpr is described by a *layout*: a
concatenation of segments, each segment a row-major product of *atoms* (index
spaces). Each primitive states which atoms are the same index space: a
convolution's input features are its kernel's input features, an addition's
operands share every axis, a reshape from (B, N, D) to (B, N, H, hd) splits the
atom of D into the atoms of H and hd, a concatenation lays its operands' atoms
side by side. A union-find over atoms, with refinement (one atom becoming a
product or a concatenation of finer atoms), collects all of it.

When the walk ends, each class of atoms is one potential group. Its members are
the parameter (and state) axes that contain it, with the index map the layout
gives. A class is prunable when it touches a parameter and no *fixed* atom. An
atom is fixed when it comes from the data: the batch, spatial positions, tokens
and the model's inputs and outputs, convolution windows, constants, or the
parameters named in `ignore`. No per-architecture knowledge is needed, only the
semantics of the primitives.

Convolutions and matrix products also give the cost model: their MACs are
products of axis sizes, which are polynomials in the groups' widths.
"""

import collections
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.extend import core as jcore

from oba_jax.delta import path_str
from oba_jax.structure.groups import Group, Member, Structure, Term

Segment = tuple[int, ...]  # atoms, row-major
Layout = tuple[Segment, ...]  # segments, concatenated
ONE: Layout = ((),)  # an axis of size 1


class UnsupportedPrimitiveError(NotImplementedError):
  """A primitive the tracer cannot follow touches a prunable axis."""


class _Atoms:
  """Union-find over index spaces, with refinement into finer ones."""

  def __init__(self):
    self.size: list[int] = []
    self.parent: list[int] = []
    self.fixed: list[bool] = []
    self.reduced: list[bool] = []
    self.definition: dict[int, Layout] = {}

  def new(self, size: int, fixed: bool) -> Layout:
    """A fresh axis of `size`: one new atom, or no atom for size 1."""
    if size == 1:
      return ONE
    self.size.append(size)
    self.parent.append(len(self.parent))
    self.fixed.append(fixed)
    self.reduced.append(False)
    return ((len(self.size) - 1,),)

  def atom(self, size: int) -> int:
    return self.new(size, False)[0][0]

  def find(self, a: int) -> int:
    root = a
    while self.parent[root] != root:
      root = self.parent[root]
    while self.parent[a] != root:
      self.parent[a], a = root, self.parent[a]
    return root

  def expand(self, layout: Layout) -> Layout:
    """The layout in finest atoms (roots without definitions)."""
    segments: list[Segment] = []
    for segment in layout:
      parts: list[Segment] = [()]  # the segment may become a concatenation
      for a in segment:
        r = self.find(a)
        if r not in self.definition:
          parts = [p + (r,) for p in parts]
          continue
        inner = self.expand(self.definition[r])
        if len(inner) == 1:
          parts = [p + inner[0] for p in parts]
        elif parts == [()]:  # a concatenated leading factor distributes over the rest
          parts = list(inner)
        else:
          raise UnsupportedPrimitiveError(
              "a concatenated axis is used as a minor factor of a reshaped axis; the channels "
              "it holds are interleaved and cannot be tracked as contiguous slices.")
      segments.extend(parts)
    return tuple(segments)

  def segment_size(self, segment: Segment) -> int:
    return math.prod(self.size[a] for a in segment)

  def layout_size(self, layout: Layout) -> int:
    return sum(self.segment_size(s) for s in self.expand(layout))

  def refine(self, a: int, layout: Layout) -> None:
    a = self.find(a)
    self.definition[a] = layout
    for segment in layout:
      for b in segment:
        self.fixed[b] |= self.fixed[a]
        self.reduced[b] |= self.reduced[a]

  def split_product(self, a: int, leading: int) -> tuple[int, int]:
    """Refines atom `a` into a product (leading, size/leading); returns the two atoms."""
    first, second = self.atom(leading), self.atom(self.size[a] // leading)
    self.refine(a, ((first, second),))
    return first, second

  def union(self, a: int, b: int) -> None:
    ra, rb = self.find(a), self.find(b)
    if ra != rb:
      self.parent[rb] = ra
      self.fixed[ra] |= self.fixed[rb]
      self.reduced[ra] |= self.reduced[rb]

  def unify(self, x: Layout, y: Layout) -> None:
    """Declares two axes (of equal size) to be the same index space."""
    x, y = self.expand(x), self.expand(y)
    if x == y:
      return
    if len(x) == 1 and len(y) == 1:
      self._unify_products(list(x[0]), list(y[0]))
      return
    # Concatenations: split segments at each other's boundaries, then pair them.
    bounds = sorted(set(self._bounds(x)) | set(self._bounds(y)))
    if self._split_at(x, bounds) or self._split_at(y, bounds):
      self.unify(x, y)
      return
    for sx, sy in zip(x, y, strict=True):
      self._unify_products(list(sx), list(sy))

  def _bounds(self, layout: Layout) -> list[int]:
    return list(np.cumsum([self.segment_size(s) for s in layout]))

  def _split_at(self, layout: Layout, bounds: Sequence[int]) -> bool:
    """Splits the leading atom of a segment that straddles a boundary; True if it did."""
    start = 0
    for segment in layout:
      size = self.segment_size(segment)
      inside = [b - start for b in bounds if start < b < start + size]
      if inside:
        lead, minor = segment[0], self.segment_size(segment[1:])
        if any(cut % minor for cut in inside):
          raise UnsupportedPrimitiveError("concatenation boundaries cut through a product axis.")
        cuts = [c // minor for c in inside]
        pieces = np.diff([0, *cuts, self.size[lead]])
        self.refine(lead, tuple((self.atom(int(p)),) if p > 1 else () for p in pieces))
        return True
      start += size
    return False

  def _unify_products(self, xs: list[int], ys: list[int]) -> None:
    while xs and ys:
      a, b = xs.pop(0), ys.pop(0)
      sa, sb = self.size[a], self.size[b]
      if sa == sb:
        self.union(a, b)
      elif sa < sb and sb % sa == 0:
        first, rest = self.split_product(b, sa)
        self.union(a, first)
        ys.insert(0, rest)
      elif sb < sa and sa % sb == 0:
        first, rest = self.split_product(a, sb)
        self.union(first, b)
        xs.insert(0, rest)
      else:
        raise UnsupportedPrimitiveError(
            f"axes factorised as {sa}x... and {sb}x... cannot be aligned (no common refinement).")
    if xs or ys:
      raise AssertionError("unify: sizes differ")  # a tracer bug, never user input


@dataclasses.dataclass
class _Walk:
  atoms: _Atoms
  layouts: dict[Any, tuple[Layout, ...]] = dataclasses.field(default_factory=dict)
  params: dict[Any, str] = dataclasses.field(default_factory=dict)  # var -> param path
  mac_terms: list[tuple[str, list[Layout]]] = dataclasses.field(default_factory=list)
  unsupported: list[tuple[str, tuple[Layout, ...]]] = dataclasses.field(default_factory=list)


def _fresh(atoms: _Atoms, shape, fixed=True) -> tuple[Layout, ...]:
  return tuple(atoms.new(int(s), fixed) for s in shape)


_ELEMENTWISE = frozenset("""
  add sub mul div max min pow atan2 rem and or xor ne eq lt gt le ge select_n clamp nextafter
  neg exp exp2 log log1p expm1 tanh logistic sin cos tan asin acos atan sinh cosh asinh acosh
  atanh sqrt rsqrt cbrt abs sign floor ceil round is_finite erf erfc erf_inv integer_pow square
  convert_element_type stop_gradient copy copy_p reduce_precision not real imag conj lgamma
  digamma add_any optimization_barrier
""".split())
_REDUCTIONS = frozenset("reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or "
                        "argmax argmin".split())
_CALLS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def _sub_jaxpr(eqn):
  for name in _CALLS:
    if name in eqn.params:
      sub = eqn.params[name]
      return getattr(sub, "jaxpr", sub)  # a ClosedJaxpr or a Jaxpr
  return None


def _walk(walk: _Walk, jaxpr, in_layouts: Sequence[tuple[Layout, ...]]) -> list:
  atoms = walk.atoms
  for var, layout in zip(jaxpr.invars, in_layouts):
    walk.layouts[var] = layout
  # Closed-over arrays (e.g. BatchNorm statistics captured by a plain apply_fn) follow
  # the channels they meet; only the module's own state is sliced by compaction.
  for var in jaxpr.constvars:
    walk.layouts[var] = _fresh(atoms, var.aval.shape, fixed=False)

  def read(v):
    if isinstance(v, jcore.Literal):
      return _fresh(atoms, np.shape(v.val))
    return walk.layouts[v]

  for eqn in _live(jaxpr):
    ins = [read(v) for v in eqn.invars]
    outs = _rule(walk, eqn, ins)
    for var, layout in zip(eqn.outvars, outs):
      walk.layouts[var] = layout
  return [read(v) for v in jaxpr.outvars]


def _live(jaxpr) -> list:
  """The equations that contribute to the outputs (e.g. not discarded BatchNorm updates)."""
  needed = {v for v in jaxpr.outvars if not isinstance(v, jcore.Literal)}
  live = []
  for eqn in reversed(jaxpr.eqns):
    if any(v in needed for v in eqn.outvars) or eqn.effects:
      live.append(eqn)
      needed.update(v for v in eqn.invars if not isinstance(v, jcore.Literal))
  return live[::-1]


def _rule(walk: _Walk, eqn, ins) -> list[tuple[Layout, ...]]:
  """Output layouts of one equation; records couplings and costs on the way."""
  atoms, name, p = walk.atoms, eqn.primitive.name, eqn.params
  out_shapes = [v.aval.shape for v in eqn.outvars]

  sub = _sub_jaxpr(eqn)
  if sub is not None:
    inner = sub
    for inner_var, outer in zip(inner.invars, eqn.invars):
      if not isinstance(outer, jcore.Literal) and outer in walk.params:
        walk.params[inner_var] = walk.params[outer]
    return _walk(walk, inner, ins)

  if name in _ELEMENTWISE:  # operands match the output, up to scalars and size-1 axes
    shape = out_shapes[0]
    out = list(_fresh(atoms, shape))
    chosen = [False] * len(shape)
    for x, v in zip(ins, eqn.invars):
      if len(x) != len(shape):
        continue
      for i, (axis, size) in enumerate(zip(x, v.aval.shape)):
        if size != shape[i]:
          continue
        if chosen[i]:
          atoms.unify(out[i], axis)
        else:
          out[i], chosen[i] = axis, True
    return [tuple(out)] * len(out_shapes)

  if name == "broadcast_in_dim":
    (x,), shape = ins[:1], p["shape"]
    out = list(_fresh(atoms, shape, fixed=False))
    for src, dst in enumerate(p["broadcast_dimensions"]):
      if eqn.invars[0].aval.shape[src] == shape[dst]:
        out[dst] = x[src]
    return [tuple(out)]

  if name == "reshape":
    return [_reshape(atoms, ins[0], eqn.invars[0].aval.shape, p["new_sizes"])]

  if name == "squeeze":
    dims = {d % len(ins[0]) for d in p["dimensions"]}
    return [tuple(a for i, a in enumerate(ins[0]) if i not in dims)]

  if name == "expand_dims":
    out = list(ins[0])
    for d in sorted(p["dimensions"]):
      out.insert(d, ONE)
    return [tuple(out)]

  if name == "transpose":
    return [tuple(ins[0][i] for i in p["permutation"])]

  if name in _REDUCTIONS:
    axes = set(p["axes"])
    for i in axes:
      _mark_reduced(atoms, ins[0][i])
    return [tuple(a for i, a in enumerate(ins[0]) if i not in axes)] * len(out_shapes)

  if name == "dot_general":
    return [_dot_general(walk, eqn, ins)]

  if name == "conv_general_dilated":
    return [_conv(walk, eqn, ins)]

  if name == "concatenate":
    dim = p["dimension"]
    for x in ins[1:]:
      for i, (a, b) in enumerate(zip(ins[0], x)):
        if i != dim:
          atoms.unify(a, b)
    out = list(ins[0])
    out[dim] = tuple(s for x in ins for s in atoms.expand(x[dim]))
    return [tuple(out)]

  if name == "pad":
    out = []
    for axis, (lo, hi, interior) in zip(ins[0], p["padding_config"]):
      if (lo, hi, interior) == (0, 0, 0):
        out.append(axis)
      elif interior == 0 and lo >= 0 and hi >= 0:
        edge = lambda n: atoms.new(n, True) if n else ()
        out.append(edge(lo) + atoms.expand(axis) + edge(hi))
      else:
        _fix(atoms, axis)
        out.append(atoms.new(out_shapes[0][len(out)], True))
    return [tuple(out)]

  if name == "slice":
    strides = p["strides"] or (1,) * len(ins[0])
    out = []
    for axis, size, start, stop, step in zip(ins[0], eqn.invars[0].aval.shape,
                                             p["start_indices"], p["limit_indices"], strides):
      if (start, stop, step) == (0, size, 1):
        out.append(axis)
      elif step == 1:
        out.append(_slice_axis(atoms, axis, start, stop, size))
      else:
        _fix(atoms, axis)
        out.append(atoms.new(len(range(start, stop, step)), True))
    return [tuple(out)]

  if name == "split":
    axis = p["axis"]
    sizes, offsets, outs = p["sizes"], np.cumsum([0, *p["sizes"]]), []
    total = eqn.invars[0].aval.shape[axis]
    for k, size in enumerate(sizes):
      out = list(ins[0])
      out[axis] = _slice_axis(atoms, ins[0][axis], int(offsets[k]), int(offsets[k + 1]), total)
      outs.append(tuple(out))
    return outs

  if name in ("reduce_window_max", "reduce_window_sum", "reduce_window_min", "reduce_window",
              "cumsum", "cummax", "cummin", "cumprod", "cumlogsumexp"):
    return [_windowed(atoms, eqn, ins[0], out_shapes[0])] * len(out_shapes)

  if name.startswith("scatter") and eqn.invars[0].aval.shape == eqn.invars[2].aval.shape:
    for a, b in zip(ins[0], ins[2]):  # a full overwrite (e.g. `x.at[...].set(y)`)
      atoms.unify(a, b)
    return [ins[0]]

  if name in ("dynamic_slice", "dynamic_update_slice"):
    x = ins[0]
    sizes = p.get("slice_sizes", out_shapes[0])
    out = []
    for axis, size, full in zip(x, sizes, eqn.invars[0].aval.shape):
      if size == full:
        out.append(axis)
      else:
        _fix(atoms, axis)
        out.append(atoms.new(int(size), True))
    if name == "dynamic_update_slice":
      for a, b in zip(x, ins[1]):
        _fix(atoms, b) if atoms.layout_size(a) != atoms.layout_size(b) else atoms.unify(a, b)
      return [x]
    return [tuple(out)]

  if name in ("iota", "rng_bit_generator", "random_bits", "random_seed", "random_wrap",
              "random_unwrap", "threefry2x32", "random_fold_in", "random_split"):
    return [_fresh(atoms, s) for s in out_shapes]

  # Anything else: the outputs are new data; complain later if it touched a group.
  walk.unsupported.append((name, tuple(a for x in ins for a in x)))
  return [_fresh(atoms, s) for s in out_shapes]


def _fix(atoms: _Atoms, layout: Layout) -> None:
  for segment in atoms.expand(layout):
    for a in segment:
      atoms.fixed[atoms.find(a)] = True


def _mark_reduced(atoms: _Atoms, layout: Layout) -> None:
  for segment in atoms.expand(layout):
    for a in segment:
      atoms.reduced[atoms.find(a)] = True


def _slice_axis(atoms: _Atoms, axis: Layout, start: int, stop: int, size: int) -> Layout:
  """The layout of axis[start:stop]: refines the axis so that the slice is a segment."""
  sizes = (start, stop - start, size - stop)
  pieces = [(atoms.atom(n),) if n > 1 else () for n in sizes]
  whole = atoms.atom(size)
  atoms.refine(whole, tuple(piece for piece, n in zip(pieces, sizes) if n))
  atoms.unify(((whole,),), axis)
  return (pieces[1],)


def _windowed(atoms: _Atoms, eqn, x: tuple[Layout, ...], shape) -> tuple[Layout, ...]:
  """Window ops keep the axes with a trivial window; the others become data axes."""
  p, n = eqn.params, len(x)
  window = p.get("window_dimensions", (1,) * n)
  strides = p.get("window_strides", (1,) * n)
  padding = p.get("padding", ((0, 0),) * n)
  if "axis" in p:  # cumulative ops run along one axis
    window = tuple(2 if i == p["axis"] else 1 for i in range(n))
  out = []
  for i, axis in enumerate(x):
    if window[i] == 1 and strides[i] == 1 and tuple(padding[i]) == (0, 0):
      out.append(axis)
    else:
      _fix(atoms, axis)
      out.append(atoms.new(int(shape[i]), True))
  return tuple(out)


def _reshape(atoms: _Atoms, x: tuple[Layout, ...], old: Sequence[int],
             new: Sequence[int]) -> tuple[Layout, ...]:
  """Regroups row-major factors: merges and splits atoms to match the new axes."""
  olds = [(n, layout) for n, layout in zip(old, x) if n != 1]
  news = [j for j, n in enumerate(new) if n != 1]
  out: list[Layout] = [ONE] * len(new)
  for block_old, block_new in _blocks([n for n, _ in olds], [new[j] for j in news]):
    ins, targets = olds[block_old], [news[j] for j in block_new]
    if len(ins) == 1 and len(targets) == 1:
      out[targets[0]] = ins[0][1]  # carried over unchanged (may be a concatenation)
      continue
    pending: list[int] = []
    for _, layout in ins:
      layout = atoms.expand(layout)
      if len(layout) != 1:
        raise UnsupportedPrimitiveError("reshape merges a concatenated axis with other axes.")
      pending.extend(layout[0])
    for j in targets:
      out[j] = (tuple(_take(atoms, pending, new[j])),)
  return tuple(out)


def _blocks(a: Sequence[int], b: Sequence[int]):
  """Consecutive runs of `a` and `b` (sizes > 1) with equal products."""
  i = j = 0
  while i < len(a):
    i0, j0 = i, j
    pa, pb = a[i], b[j]
    i, j = i + 1, j + 1
    while pa != pb:
      if pa < pb:
        pa, i = pa * a[i], i + 1
      else:
        pb, j = pb * b[j], j + 1
    yield slice(i0, i), list(range(j0, j))


def _take(atoms: _Atoms, pending: list[int], size: int) -> list[int]:
  """Pops leading atoms making up `size`, splitting one atom if it is larger."""
  taken = []
  while size > 1:
    a = pending.pop(0)
    n = atoms.size[a]
    if size % n == 0:
      taken.append(a)
      size //= n
    elif n % size == 0:
      first, rest = atoms.split_product(a, size)
      taken.append(first)
      pending.insert(0, rest)
      size = 1
    else:
      raise UnsupportedPrimitiveError(
          f"reshape splits an axis of size {n} into pieces of {size}; no common refinement.")
  return taken


def _dot_general(walk: _Walk, eqn, ins) -> tuple[Layout, ...]:
  atoms = walk.atoms
  lhs, rhs = ins
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  for a, b in zip(lc, rc):
    atoms.unify(lhs[a], rhs[b])
  for a, b in zip(lb, rb):
    atoms.unify(lhs[a], rhs[b])
  lfree = [lhs[i] for i in range(len(lhs)) if i not in lc and i not in lb]
  rfree = [rhs[i] for i in range(len(rhs)) if i not in rc and i not in rb]
  out = tuple([lhs[i] for i in lb] + lfree + rfree)
  walk.mac_terms.append((_label(walk, eqn, "dot_general"), [*out, *(lhs[i] for i in lc)]))
  return out


def _conv(walk: _Walk, eqn, ins) -> tuple[Layout, ...]:
  atoms, p = walk.atoms, eqn.params
  lhs, rhs = ins
  dn = p["dimension_numbers"]
  lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  if p.get("batch_group_count", 1) != 1:
    walk.unsupported.append(("conv_general_dilated(batch_group_count>1)", tuple(lhs) + tuple(rhs)))
  groups = p["feature_group_count"]
  rhs_in, rhs_out = rhs[rhs_spec[1]], rhs[rhs_spec[0]]
  if groups == 1:
    atoms.unify(lhs[lhs_spec[1]], rhs_in)
    out_features = rhs_out
  else:  # input features = (group, in per group); output features = (group, out per group)
    group = atoms.new(groups, False)
    in_per_group = atoms.expand(rhs_in)
    out_per_group = atoms.new(atoms.layout_size(rhs_out) // groups, False)
    atoms.unify(lhs[lhs_spec[1]], ((*group[0], *in_per_group[0]),))
    out_features = ((*group[0], *out_per_group[0]),)
    atoms.unify(rhs_out, out_features)
  for d in rhs_spec[2:]:
    _fix(atoms, rhs[d])  # kernel windows
  out_shape = eqn.outvars[0].aval.shape
  out: list[Layout] = [ONE] * len(out_shape)
  out[out_spec[0]] = lhs[lhs_spec[0]]
  out[out_spec[1]] = out_features
  for d in out_spec[2:]:
    out[d] = atoms.new(int(out_shape[d]), True)
  walk.mac_terms.append((_label(walk, eqn, "conv"),
                         [*out, rhs_in, *(rhs[d] for d in rhs_spec[2:])]))
  return tuple(out)


def _label(walk: _Walk, eqn, kind: str) -> str:
  for v in eqn.invars[::-1]:
    if not isinstance(v, jcore.Literal) and v in walk.params:
      path = walk.params[v]
      return path.rsplit("/", 1)[0] if "/" in path else path
  return f"{kind} of activations"


def _polynomial(atoms: _Atoms, layouts: Sequence[Layout],
                names: dict[int, str]) -> collections.Counter:
  """Σ of monomials (group names -> coefficient) for the product of the axes' sizes."""
  poly = collections.Counter({(): 1})
  for layout in layouts:
    axis = collections.Counter()
    for segment in atoms.expand(layout):
      coefficient, groups = 1, []
      for a in segment:
        r = atoms.find(a)
        if r in names:
          groups.append(names[r])
        else:
          coefficient *= atoms.size[r]
      axis[tuple(sorted(groups))] += coefficient
    poly = _multiply(poly, axis)
  return poly


def _multiply(p: collections.Counter, q: collections.Counter) -> collections.Counter:
  out = collections.Counter()
  for mp, cp in p.items():
    for mq, cq in q.items():
      out[tuple(sorted(mp + mq))] += cp * cq
  return out


def _terms(label: str, poly: collections.Counter) -> list[Term]:
  return [Term(label, c, m) for m, c in sorted(poly.items()) if c]


def trace(model: nnx.Module | Callable, *example_inputs, ignore: Sequence[str] = (),
          params: Any = None) -> Structure:
  """The coupled groups of `model` and its cost model, from the jaxpr of one forward pass.

  Args:
    model: a Flax NNX module (its `nnx.Param`s are the parameters, its other
      state, e.g. BatchNorm statistics, the state), or a pure function
      `apply_fn(params, *inputs)` together with `params=`.
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
  if isinstance(model, nnx.Module):
    graphdef, param_state, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(param_state)
    state = nnx.to_pure_dict(rest)
    def fn(p, s, *x):  # also returns the updated state, which stays coupled to the channels
      module = nnx.merge(graphdef, nnx.State(p), nnx.State(s), copy=True)
      return module(*x), nnx.to_pure_dict(nnx.state(module, nnx.Not(nnx.Param)))
  elif params is not None:
    state, fn = {}, (lambda p, s, *x: (model(p, *x), s))
  else:
    raise TypeError("trace needs an nnx.Module, or a function apply_fn(params, *inputs) with "
                    "params=.")
  closed = jax.make_jaxpr(fn)(params, state, *example_inputs)
  atoms = _Atoms()
  walk = _Walk(atoms)

  leaves = {}  # invar -> (path, collection)
  in_layouts = []
  flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_state = jax.tree_util.tree_flatten_with_path(state)[0]
  flat_inputs = jax.tree.leaves(example_inputs)
  invars = closed.jaxpr.invars
  if len(invars) != len(flat_params) + len(flat_state) + len(flat_inputs):
    raise AssertionError("unexpected jaxpr signature")
  ignored = tuple(i.strip("/") for i in ignore)
  for var, (path, leaf) in zip(invars, flat_params + flat_state):
    name = path_str(path)
    is_param = len(leaves) < len(flat_params)
    leaves[var] = (name, "params" if is_param else "state")
    if is_param:
      walk.params[var] = name
    fixed = any(name == i or name.startswith(i + "/") for i in ignored)
    in_layouts.append(_fresh(atoms, np.shape(leaf), fixed=fixed))
  for _ in flat_inputs:
    in_layouts.append(_fresh(atoms, invars[len(in_layouts)].aval.shape, fixed=True))
  unmatched = [i for i in ignored if not any(n == i or n.startswith(i + "/")
                                              for n, c in leaves.values())]
  if unmatched:
    raise ValueError(f"ignore={unmatched} matches no parameter path; paths look like "
                     f"{next(iter(leaves.values()))[0]!r}.")

  outs = _walk(walk, closed.jaxpr, in_layouts)
  num_outputs = len(closed.jaxpr.outvars) - len(flat_state)
  for layout in outs[:num_outputs]:  # the model's outputs are never pruned
    for axis in layout:
      _fix(atoms, axis)
  for old, new in zip(in_layouts[len(flat_params):], outs[num_outputs:]):
    for a, b in zip(old, new):
      atoms.unify(a, b)

  # Collect the members of every class of atoms.
  members: dict[int, list[Member]] = collections.defaultdict(list)
  for var, layout in zip(invars, in_layouts):
    if var not in leaves:
      continue
    name, collection = leaves[var]
    for axis, axis_layout in enumerate(layout):
      offset = 0
      for segment in atoms.expand(axis_layout):
        factors = tuple(atoms.size[a] for a in segment)
        for position, a in enumerate(segment):
          members[atoms.find(a)].append(
              Member(name, axis, offset, factors, position, collection))
        offset += math.prod(factors)

  names: dict[int, str] = {}
  groups = []
  for root, ms in members.items():
    if atoms.fixed[root] or not any(m.collection == "params" for m in ms):
      continue
    names[root] = _group_name(ms, closed, leaves)
    groups.append((names[root], root, ms))
  _check_unsupported(walk, names)

  order = {name: i for i, (name, _) in enumerate(leaves.values())}
  groups.sort(key=lambda g: (order.get(g[0].split("@")[0], 0), g[0]))
  structure_groups = tuple(
      Group(name, atoms.size[root], tuple(ms), normalized=atoms.reduced[root])
      for name, root, ms in groups)
  mac_terms = [t for label, layouts in walk.mac_terms
               for t in _terms(label, _polynomial(atoms, layouts, names))]
  param_terms = [t for var, layout in zip(invars, in_layouts)
                 if var in leaves and leaves[var][1] == "params"
                 for t in _terms(leaves[var][0], _polynomial(atoms, layout, names))]
  leaf_shapes = {path_str(path): tuple(np.shape(leaf)) for path, leaf in flat_params + flat_state}
  return Structure(structure_groups, tuple(mac_terms), tuple(param_terms), leaf_shapes)


def _group_name(ms: Sequence[Member], closed, leaves) -> str:
  """Names a group after its producer: the first kernel whose output axis it is."""
  params = [m for m in ms if m.collection == "params"]
  kernels = [m for m in params if m.path.rsplit("/", 1)[-1] in ("kernel", "weight", "w")]
  producers = [m for m in kernels if m.axis == _ndim(closed, leaves, m.path) - 1]
  m = (producers or kernels or params)[0]
  suffix = f".{m.position}" if len(m.factors) > 1 else ""
  return f"{m.path}@{m.axis}{suffix}"


def _ndim(closed, leaves, path: str) -> int:
  for var, (name, _) in leaves.items():
    if name == path:
      return len(var.aval.shape)
  return -1


def _check_unsupported(walk: _Walk, names: dict[int, str]) -> None:
  atoms = walk.atoms
  for primitive, layouts in walk.unsupported:
    for layout in layouts:
      for segment in atoms.expand(layout):
        for a in segment:
          r = atoms.find(a)
          if r in names and not atoms.fixed[r]:
            raise UnsupportedPrimitiveError(
                f"primitive {primitive!r} acts on the axis of group {names[r]!r} (parameter "
                f"{names[r].split('@')[0]!r}); oba_jax cannot follow channels through it. Pass "
                f"ignore=[...] for the parameters feeding it, or report the primitive.")
