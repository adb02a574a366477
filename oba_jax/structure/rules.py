"""How each jaxpr primitive couples the axes of its operands and results.

A rule takes the layouts of an equation's inputs and returns those of its
outputs, unifying atoms on the way (see `atoms`). Convolutions and matrix
products also record their MACs as a product of axes. Rules are looked up by
primitive name in `RULES`; `register_rule` adds one for a new primitive.
Primitives without a rule produce fresh data axes, and the tracer raises if one
of them touched a prunable group.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from jax.extend import core as jcore

from oba_jax.structure.atoms import ONE, Atoms, Layout, UnsupportedLayoutError

Shape = tuple[Layout, ...]  # the layouts of one array's axes


@dataclasses.dataclass
class Walk:
  """What a walk over a jaxpr accumulates."""

  atoms: Atoms
  param_paths: dict[Any, str] = dataclasses.field(default_factory=dict)  # jaxpr var -> path
  mac_terms: list[tuple[str, list[Layout]]] = dataclasses.field(default_factory=list)
  unsupported: list[tuple[str, Shape]] = dataclasses.field(default_factory=list)

  def fresh(self, shape: Sequence[int], fixed: bool = True) -> Shape:
    return tuple(self.atoms.new(int(s), fixed) for s in shape)

  def label(self, eqn, kind: str) -> str:
    """The layer a cost belongs to: the module path of a parameter operand."""
    for v in eqn.invars[::-1]:
      if not isinstance(v, jcore.Literal) and v in self.param_paths:
        return self.param_paths[v].rpartition("/")[0] or self.param_paths[v]
    return f"{kind} of activations"


Rule = Callable[[Walk, Any, list[Shape]], list[Shape]]
RULES: dict[str, Rule] = {}


def register_rule(*names: str) -> Callable[[Rule], Rule]:
  """Decorator: `rule(walk, eqn, input_shapes) -> output_shapes` for these primitives."""

  def register(rule: Rule) -> Rule:
    for name in names:
      RULES[name] = rule
    return rule

  return register


def _in_shape(eqn, i: int) -> tuple[int, ...]:
  return tuple(eqn.invars[i].aval.shape)


def _out_shape(eqn, i: int = 0) -> tuple[int, ...]:
  return tuple(eqn.outvars[i].aval.shape)


@register_rule(*"""
    add sub mul div max min pow atan2 rem and or xor ne eq lt gt le ge select_n clamp nextafter
    neg exp exp2 log log1p expm1 tanh logistic sin cos tan asin acos atan sinh cosh asinh acosh
    atanh sqrt rsqrt cbrt abs sign floor ceil round is_finite erf erfc erf_inv integer_pow square
    convert_element_type stop_gradient copy copy_p reduce_precision not real imag conj lgamma
    digamma add_any""".split())
def elementwise(walk: Walk, eqn, ins: list[Shape]) -> list[Shape]:
  """Operands match the result axis by axis, up to scalars and broadcast size-1 axes."""
  shape = _out_shape(eqn)
  out, chosen = list(walk.fresh(shape)), [False] * len(shape)
  for i, x in enumerate(ins):
    if len(x) != len(shape):
      continue
    for d, (axis, size) in enumerate(zip(x, _in_shape(eqn, i))):
      if size != shape[d]:
        continue
      if chosen[d]:
        walk.atoms.unify(out[d], axis)
      else:
        out[d], chosen[d] = axis, True
  return [tuple(out)] * len(eqn.outvars)


@register_rule("optimization_barrier", "sharding_constraint", "device_put", "pvary")
def identity(walk: Walk, eqn, ins: list[Shape]) -> list[Shape]:
  """Each output is its input (placement and scheduling hints)."""
  return list(ins)


@register_rule("broadcast_in_dim")
def broadcast_in_dim(walk: Walk, eqn, ins: list[Shape]) -> list[Shape]:
  """New axes are free replications (e.g. the query heads a key/value head serves)."""
  shape = eqn.params["shape"]
  out = list(walk.fresh(shape, fixed=False))
  for src, dst in enumerate(eqn.params["broadcast_dimensions"]):
    if _in_shape(eqn, 0)[src] == shape[dst]:
      out[dst] = ins[0][src]
  return [tuple(out)]


@register_rule("reshape")
def reshape(walk: Walk, eqn, ins: list[Shape]) -> list[Shape]:
  """Regroups row-major factors, merging and splitting atoms to match the new axes."""
  old, new, atoms = _in_shape(eqn, 0), eqn.params["new_sizes"], walk.atoms
  olds = [(n, layout) for n, layout in zip(old, ins[0]) if n != 1]
  news = [j for j, n in enumerate(new) if n != 1]
  out: list[Layout] = [ONE] * len(new)
  for block_old, block_new in _blocks([n for n, _ in olds], [new[j] for j in news]):
    sources, targets = olds[block_old], [news[j] for j in block_new]
    if len(sources) == 1 and len(targets) == 1:
      out[targets[0]] = sources[0][1]  # carried over unchanged (may be a concatenation)
      continue
    pending: list[int] = []
    for _, layout in sources:
      layout = atoms.expand(layout)
      if len(layout) != 1:
        raise UnsupportedLayoutError("reshape merges a concatenated axis with other axes.")
      pending.extend(layout[0])
    for j in targets:
      out[j] = (tuple(atoms.take(pending, new[j])),)
  return [tuple(out)]


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


@register_rule("squeeze")
def squeeze(walk: Walk, eqn, ins: list[Shape]) -> list[Shape]:
  dims = {d % len(ins[0]) for d in eqn.params["dimensions"]}
  return [tuple(a for d, a in enumerate(ins[0]) if d not in dims)]


@register_rule("expand_dims")
def expand_dims(walk: Walk, eqn, ins: list[Shape]) -> list[Shape]:
  out = list(ins[0])
  for d in sorted(eqn.params["dimensions"]):
    out.insert(d, ONE)
  return [tuple(out)]


@register_rule("transpose")
def transpose(walk: Walk, eqn, ins: list[Shape]) -> list[Shape]:
  return [tuple(ins[0][d] for d in eqn.params["permutation"])]


@register_rule(*"reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or argmax "
               "argmin".split())
def reduction(walk: Walk, eqn, ins: list[Shape]) -> list[Shape]:
  """Reduced axes disappear; they are marked, since normalising over channels matters."""
  axes = set(eqn.params["axes"])
  for d in axes:
    walk.atoms.mark_reduced(ins[0][d])
  return [tuple(a for d, a in enumerate(ins[0]) if d not in axes)] * len(eqn.outvars)


@register_rule("dot_general")
def dot_general(walk: Walk, eqn, ins: list[Shape]) -> list[Shape]:
  lhs, rhs = ins
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  for a, b in [*zip(lc, rc), *zip(lb, rb)]:
    walk.atoms.unify(lhs[a], rhs[b])
  free = lambda x, used: [x[d] for d in range(len(x)) if d not in used]
  out = (*(lhs[d] for d in lb), *free(lhs, {*lc, *lb}), *free(rhs, {*rc, *rb}))
  walk.mac_terms.append((walk.label(eqn, "dot_general"), [*out, *(lhs[d] for d in lc)]))
  return [out]


@register_rule("conv_general_dilated")
def conv(walk: Walk, eqn, ins: list[Shape]) -> list[Shape]:
  """Features: input = kernel input (per group); output = kernel output. Windows are data."""
  atoms, p = walk.atoms, eqn.params
  lhs, rhs = ins
  dn = p["dimension_numbers"]
  if p.get("batch_group_count", 1) != 1:
    walk.unsupported.append(("conv_general_dilated with batch_group_count > 1", lhs + rhs))
  rhs_in, rhs_out = rhs[dn.rhs_spec[1]], rhs[dn.rhs_spec[0]]
  groups = p["feature_group_count"]
  if groups == 1:
    atoms.unify(lhs[dn.lhs_spec[1]], rhs_in)
    features = rhs_out
  else:  # input features = (group, in per group); output features = (group, out per group)
    (group,) = atoms.new(groups, False)
    (per_group,) = atoms.new(atoms.layout_size(rhs_out) // groups, False)
    (in_per_group,) = atoms.expand(rhs_in)
    atoms.unify(lhs[dn.lhs_spec[1]], ((*group, *in_per_group),))
    features = ((*group, *per_group),)
    atoms.unify(rhs_out, features)
  for d in dn.rhs_spec[2:]:
    atoms.fix(rhs[d])
  shape = _out_shape(eqn)
  out: list[Layout] = [ONE] * len(shape)
  out[dn.out_spec[0]], out[dn.out_spec[1]] = lhs[dn.lhs_spec[0]], features
  for d in dn.out_spec[2:]:
    out[d] = atoms.new(shape[d], True)
  walk.mac_terms.append((walk.label(eqn, "conv"), [*out, rhs_in, *(rhs[d] for d in dn.rhs_spec[2:])]))
  return [tuple(out)]


@register_rule("concatenate")
def concatenate(walk: Walk, eqn, ins: list[Shape]) -> list[Shape]:
  """The operands' segments laid side by side; the other axes are shared."""
  dim = eqn.params["dimension"]
  for x in ins[1:]:
    for d, (a, b) in enumerate(zip(ins[0], x)):
      if d != dim:
        walk.atoms.unify(a, b)
  out = list(ins[0])
  out[dim] = tuple(s for x in ins for s in walk.atoms.expand(x[dim]))
  return [tuple(out)]


@register_rule("pad")
def pad(walk: Walk, eqn, ins: list[Shape]) -> list[Shape]:
  """Edge padding becomes data segments around the operand's axis."""
  atoms, out = walk.atoms, []
  for d, (axis, (lo, hi, interior)) in enumerate(zip(ins[0], eqn.params["padding_config"])):
    if (lo, hi, interior) == (0, 0, 0):
      out.append(axis)
    elif interior == 0 and lo >= 0 and hi >= 0:
      edge = lambda n: atoms.new(n, True) if n else ()
      out.append(edge(lo) + atoms.expand(axis) + edge(hi))
    else:
      atoms.fix(axis)
      out.append(atoms.new(_out_shape(eqn)[d], True))
  return [tuple(out)]


@register_rule("slice")
def slice_(walk: Walk, eqn, ins: list[Shape]) -> list[Shape]:
  shape, p, out = _in_shape(eqn, 0), eqn.params, []
  strides = p["strides"] or (1,) * len(shape)
  for axis, size, start, stop, step in zip(ins[0], shape, p["start_indices"],
                                           p["limit_indices"], strides):
    if (start, stop, step) == (0, size, 1):
      out.append(axis)
    elif step == 1:
      out.append(walk.atoms.slice(axis, start, stop, size))
    else:
      walk.atoms.fix(axis)
      out.append(walk.atoms.new(len(range(start, stop, step)), True))
  return [tuple(out)]


@register_rule("split")
def split(walk: Walk, eqn, ins: list[Shape]) -> list[Shape]:
  axis, sizes = eqn.params["axis"], eqn.params["sizes"]
  bounds, total, outs = np.cumsum([0, *sizes]), _in_shape(eqn, 0)[axis], []
  for k in range(len(sizes)):
    out = list(ins[0])
    out[axis] = walk.atoms.slice(ins[0][axis], int(bounds[k]), int(bounds[k + 1]), total)
    outs.append(tuple(out))
  return outs


@register_rule("reduce_window_max", "reduce_window_sum", "reduce_window_min", "reduce_window",
               "cumsum", "cummax", "cummin", "cumprod", "cumlogsumexp")
def windowed(walk: Walk, eqn, ins: list[Shape]) -> list[Shape]:
  """Axes with a trivial window are kept; windowed axes (pooling, scans) are data."""
  p, n = eqn.params, len(ins[0])
  window = p.get("window_dimensions", (1,) * n)
  strides = p.get("window_strides", (1,) * n)
  padding = p.get("padding", ((0, 0),) * n)
  if "axis" in p:  # cumulative ops run along one axis
    window = tuple(2 if d == p["axis"] else 1 for d in range(n))
  out = []
  for d, axis in enumerate(ins[0]):
    if window[d] == 1 and strides[d] == 1 and tuple(padding[d]) == (0, 0):
      out.append(axis)
    else:
      walk.atoms.fix(axis)
      out.append(walk.atoms.new(_out_shape(eqn)[d], True))
  return [tuple(out)] * len(eqn.outvars)


@register_rule("dynamic_slice")
def dynamic_slice(walk: Walk, eqn, ins: list[Shape]) -> list[Shape]:
  """Slices at traced offsets: only whole axes keep their layout."""
  out = []
  for axis, size, full in zip(ins[0], eqn.params["slice_sizes"], _in_shape(eqn, 0)):
    if size == full:
      out.append(axis)
    else:
      walk.atoms.fix(axis)
      out.append(walk.atoms.new(int(size), True))
  return [tuple(out)]


@register_rule("gather")
def gather(walk: Walk, eqn, ins: list[Shape]) -> list[Shape]:
  """Rows looked up by index (an embedding): indexed axes are data, whole axes carry over.

  An operand axis taken whole (slice size = its size) and not collapsed is a
  feature axis of the result (`offset_dims`, in order); an axis the indices
  select from, or slice partially, is data. Batched axes (`operand_batching_dims`)
  are the indices' batched axes; the result's other axes are the indices'.
  """
  atoms, p = walk.atoms, eqn.params
  operand, indices = ins
  dn, sizes = p["dimension_numbers"], p["slice_sizes"]
  full = _in_shape(eqn, 0)
  batching = tuple(getattr(dn, "operand_batching_dims", ()))
  index_batching = tuple(getattr(dn, "start_indices_batching_dims", ()))
  for a, b in zip(batching, index_batching):
    atoms.unify(operand[a], indices[b])
  whole = [d for d in range(len(operand))
           if d not in dn.collapsed_slice_dims and d not in batching]
  for d in range(len(operand)):
    if d in dn.start_index_map or (d not in batching and sizes[d] != full[d]):
      atoms.fix(operand[d])
  shape = _out_shape(eqn)
  out: list[Layout] = [ONE] * len(shape)
  for dst, d in zip(dn.offset_dims, whole):
    out[dst] = operand[d] if sizes[d] == full[d] else atoms.new(shape[dst], True)
  vector_dim = len(indices) - 1  # jax puts the index vector last
  batch_axes = [d for d in range(len(indices)) if d != vector_dim]
  rest = [d for d in range(len(shape)) if d not in dn.offset_dims]
  for dst, d in zip(rest, batch_axes):
    out[dst] = indices[d]
  return [tuple(out)]


@register_rule("scatter", "scatter-add", "scatter_add")
def scatter(walk: Walk, eqn, ins: list[Shape]) -> list[Shape]:
  """Rows written or summed into by index (`x.at[i].set/add`, `segment_sum`): like `gather`.

  The operand axes the indices select (`scatter_dims_to_operand_dims`, e.g. the
  nodes of a graph) are data, and so are the updates' scatter axes (the edges);
  an update window axis that covers its operand axis whole is the same axis (a
  feature axis carried through, e.g. a GCN's channels). A scatter-add accumulates
  every update entry once: its MACs are the updates' size, what a sparse-dense
  product with one nonzero per update costs (`segment_sum` of messages is the
  adjacency matrix times the features).
  """
  atoms, dn = walk.atoms, eqn.params["dimension_numbers"]
  operand, _, updates = ins
  op_shape, up_shape = _in_shape(eqn, 0), _in_shape(eqn, 2)
  indexed = set(dn.scatter_dims_to_operand_dims) | set(dn.operand_batching_dims)
  window = [d for d in range(len(operand))
            if d not in dn.inserted_window_dims and d not in dn.operand_batching_dims]
  for d in indexed:
    atoms.fix(operand[d])
  for d_up, d_op in zip(dn.update_window_dims, window):
    if d_op in indexed or up_shape[d_up] != op_shape[d_op]:
      atoms.fix(operand[d_op])
      atoms.fix(updates[d_up])
    else:
      atoms.unify(operand[d_op], updates[d_up])
  for d in range(len(updates)):
    if d not in dn.update_window_dims:
      atoms.fix(updates[d])
  if eqn.primitive.name != "scatter":
    walk.mac_terms.append((walk.label(eqn, "scatter-add"), list(updates)))
  return [operand]


@register_rule("dynamic_update_slice")
def overwrite(walk: Walk, eqn, ins: list[Shape]) -> list[Shape]:
  """A full overwrite shares every axis; anything else is data."""
  if _in_shape(eqn, 0) != _in_shape(eqn, 1):
    return unsupported(walk, eqn, ins)
  for a, b in zip(ins[0], ins[1]):
    walk.atoms.unify(a, b)
  return [ins[0]]


@register_rule("iota", "rng_bit_generator", "random_bits", "random_seed", "random_wrap",
               "random_unwrap", "threefry2x32", "random_fold_in", "random_split")
def data(walk: Walk, eqn, ins: list[Shape]) -> list[Shape]:
  """Fresh data arrays, coupled to nothing."""
  return [walk.fresh(v.aval.shape) for v in eqn.outvars]


def unsupported(walk: Walk, eqn, ins: list[Shape]) -> list[Shape]:
  """No rule: the outputs are new data; the tracer complains if a group was touched."""
  walk.unsupported.append((eqn.primitive.name, tuple(a for x in ins for a in x)))
  return [walk.fresh(v.aval.shape) for v in eqn.outvars]
