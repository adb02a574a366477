"""Physical compaction: the smaller function, or a smaller NNX module, without the planned slices.

`compact_fn(apply_fn, params, plan)` works for every model `structure.trace`
accepts (NNX through `oba_jax.functional`, Linen's `apply`, plain functions):
it re-runs the traced jaxpr with every shape parameter rewritten from the
traced layouts (`oba_jax.structure.rebuild`) and slices the parameters; no
per-layer code. It returns `(compact_apply, compact_params)`.

`compact(model, plan)` returns an NNX module instead. It deletes, from every
parameter and state leaf (BatchNorm statistics included), the indices that the
plan removes from each group, then updates the static attributes of the layers
that hold shapes: `nnx.Linear`, `nnx.LinearGeneral`, `nnx.MultiHeadAttention`,
`nnx.Conv` (grouped and depthwise: `feature_group_count` from the traced
layout), `nnx.BatchNorm`, `nnx.LayerNorm`, `nnx.RMSNorm`, `nnx.GroupNorm`
(`num_groups`, `group_size`), `nnx.Embed` and `oba_jax.models.vit.MultiHeadAttention`,
stacked (`nnx.vmap`) or not. Those updates are per *layer type*
(a registry: `register_resizer`), never per architecture. A module that keeps
a shape elsewhere (say, a head count as a Python int) would come out broken, so
`compact` checks its result: it runs the new module abstractly on the traced
input shapes and compares with `compact_fn`'s, and raises `CompactionError`
naming the module and the suspect attribute otherwise.

With inference-mode normalisation the compacted model computes what the masked
model computes (every member of a removed slice zeroed), except for groups
flagged `normalized`, whose removal changes a normalisation's statistics.
Abstract models (`nnx.eval_shape`) compact too, which is how a compacted
checkpoint is restored: rebuild the dense abstract model, compact it with the
saved plan, restore into it.

`fold_batchnorm(model, x)` (from `oba_jax.fold`) folds inference-mode BatchNorms
into the conv or dense layer before them: the last step of a fast inference
export, after `compact`.
"""

import collections
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from flax import nnx

from oba_jax import fold as _fold
from oba_jax.delta import path_str
from oba_jax.models.vit import MultiHeadAttention
from oba_jax.structure.groups import Structure
from oba_jax.structure.rebuild import Rebuild, kept_atoms
from oba_jax.structure.tracer import analyse, functional

if TYPE_CHECKING:
  import oba_jax.plan

# resizer(module, factors): `factors(leaf, axis)` gives the row-major factor sizes
# of that axis of the module's leaf (e.g. 'kernel', 'query/kernel') after removal,
# or None when the axis was not touched; `factors(leaf, axis, original=True)` the
# sizes before removal.
Factors = Callable[..., tuple[int, ...] | None]
Resizer = Callable[[nnx.Module, Factors], None]
_RESIZERS: dict[type, Resizer] = {}

fold_batchnorm, foldable_batchnorms, Identity = (
    _fold.fold_batchnorm, _fold.foldable_batchnorms, _fold.Identity)


class CompactionError(ValueError):
  """`compact` built a module that does not compute the compacted function."""


def register_resizer(module_type: type, resizer: Resizer) -> None:
  """Teaches `compact` how to update the static attributes of a layer type.

  `resizer(module, factors)` runs on every module of that exact type after its
  leaves were sliced (`module.kernel.shape` etc. are already the new shapes);
  `factors(leaf, axis)` and `factors(leaf, axis, original=True)` give the
  traced row-major factors of a leaf's axis after and before removal, e.g.
  (heads, head_dim) for an attention projection, so that the resizer can set
  `module.num_heads = factors("query/kernel", 1)[0]`.
  """
  _RESIZERS[module_type] = resizer


def compact_fn(apply_fn: Callable, params: Any, plan: "oba_jax.plan.Plan", *,
               structure: Structure | None = None,
               example_inputs: Sequence[Any] | None = None) -> tuple[Callable, Any]:
  """The compacted function and parameters: `(compact_apply, compact_params)`.

  `compact_apply(compact_params, *inputs)` computes what `apply_fn` computes
  with the plan's slices zeroed (masked), except for groups flagged
  `normalized`, at the narrower shapes. It works for any input shapes (each new
  shape is traced once) and under `jax.jit`.

  Args:
    apply_fn: `apply_fn(params, *inputs)`, the function the structure was traced
      from or any function with the same parameters (e.g. `oba_jax.functional(model)`
      for a structure traced from the NNX module).
    params: its (dense) parameters.
    plan: from `plan.select`.
    structure: the structure the plan was selected on; defaults to `plan.structure`.
    example_inputs: inputs to trace at; defaults to the structure's.
  """
  structure = _structure_of(plan, structure)
  fn = lambda p, s, *inputs: (apply_fn(p, *inputs), s)
  inputs = structure.inputs if example_inputs is None else tuple(example_inputs)
  run, small, _ = _rebuilt(fn, params, {}, inputs, structure, plan.removed)
  return (lambda p, *x: run(p, {}, *x)[0]), small


def _structure_of(plan, structure) -> Structure:
  structure = plan.structure if structure is None else structure
  if structure is None:
    raise ValueError("this plan carries no structure (it was read from JSON): pass "
                     "structure=oba_jax.structure.trace(model, example_input).")
  plan.check_matches(structure)
  return structure


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jax.numpy.result_type(x)), tree)


def _rebuilt(fn, params, state, inputs, structure: Structure, removed):
  """`run(params, state, *inputs)` of the compacted `fn`, and its compacted params and state."""
  if not inputs:
    raise ValueError("the structure records no example inputs (it was built by hand): pass "
                     "example_inputs=(...).")
  traced = analyse(fn, params, state, inputs, structure.ignore)
  sizes = {name: traced.atoms.size[root] for root, name in traced.names.items()}
  for g in structure.groups:
    if removed.get(g.name) and sizes.get(g.name) != g.size:
      raise ValueError(f"group {g.name!r} (size {g.size}) of the plan's structure is "
                       f"{'missing' if g.name not in sizes else f'of size {sizes[g.name]}'} in "
                       "the traced function: the plan belongs to another model.")
  rebuild = Rebuild(traced, kept_atoms(traced, removed))
  leaves = rebuild.leaves([x for _, _, x in traced.leaves])
  num_params = len(jax.tree.leaves(params))
  small_params = jax.tree.unflatten(jax.tree.structure(params), leaves[:num_params])
  small_state = jax.tree.unflatten(jax.tree.structure(state), leaves[num_params:])
  dense = (_abstract(params), _abstract(state))
  cache = {_signature(inputs): rebuild}

  def run(p, s, *x):
    key = _signature(x)
    if key not in cache:  # other input shapes: trace the dense function at them
      t = analyse(fn, *dense, _abstract(x), structure.ignore)
      cache[key] = Rebuild(t, kept_atoms(t, removed))
    r = cache[key]
    outs = r.run(r.traced.closed.jaxpr, r.traced.scope, r.traced.closed.consts,
                 jax.tree.leaves((p, s, *x)))
    return jax.tree.unflatten(r.traced.out_tree, outs)

  return run, small_params, small_state


def _signature(inputs) -> tuple:
  leaves, treedef = jax.tree.flatten(tuple(inputs))
  return treedef, tuple((tuple(np.shape(x)), str(jax.numpy.result_type(x))) for x in leaves)


def compact(model: nnx.Module, plan: "oba_jax.plan.Plan",
            structure: Structure | None = None, *, verify: bool = True) -> nnx.Module:
  """A new module without the indices `plan.removed[group]` of each group.

  Args:
    model: the dense NNX module (left unchanged); concrete or abstract.
    plan: from `plan.select` on this model's structure (or `Plan.from_json`).
    structure: `structure.trace(model, ...)`; defaults to the structure the plan
      was selected on (a plan read from JSON needs it passed).
    verify: run the new module abstractly on the traced input shapes and
      compare its leaves and outputs with `compact_fn`'s.

  Raises:
    CompactionError: the new module does not run, or not at the shapes of the
      compacted function (a layer keeps a shape that no resizer updates).
  """
  structure = _structure_of(plan, structure)
  structure.check_model_leaves({"/".join(map(str, path)): np.shape(v.get_value())
                                for path, v in nnx.to_flat_state(nnx.state(model))})
  removed = plan.removed
  deletions: dict[tuple[str, int], set[int]] = collections.defaultdict(set)
  factors: dict[tuple[str, int, int], tuple[tuple[int, ...], list[int]]] = {}
  for group in structure.groups:
    indices = np.unique(np.asarray(removed.get(group.name, ()), dtype=np.int64))
    if indices.size and (indices.min() < 0 or indices.max() >= group.size):
      raise ValueError(f"group {group.name!r} has {group.size} indices; cannot remove "
                       f"{indices.tolist()[:5]} ...")
    if indices.size == group.size:
      raise ValueError(f"the plan removes all {group.size} indices of group {group.name!r}.")
    for m in group.members:
      deletions[(m.path, m.axis)].update(m.indices(indices).tolist())
      _, sizes = factors.setdefault((m.path, m.axis, m.offset), (m.factors, list(m.factors)))
      sizes[m.position] = group.size - indices.size

  graphdef, state = nnx.split(model)
  new = nnx.merge(graphdef, state, copy=True)
  for path, variable in nnx.to_flat_state(nnx.state(new)):
    name = "/".join(map(str, path))
    axes = {axis: idx for (p, axis), idx in deletions.items() if p == name and idx}
    if axes:
      variable.set_value(_delete(variable.get_value(), axes))

  for path, node in nnx.iter_graph(new):
    resizer = _RESIZERS.get(type(node))
    if resizer is not None:
      prefix = "".join(f"{k}/" for k in path)
      resizer(node, lambda leaf, axis, original=False, prefix=prefix:
              _lookup(factors, prefix + leaf, axis, original))
  if verify and structure.inputs:
    _verify(model, new, structure, removed, factors)
  return new


def _lookup(factors, path: str, axis: int, original: bool = False) -> tuple[int, ...] | None:
  found = [sizes for (p, a, _), sizes in sorted(factors.items()) if p == path and a == axis]
  return tuple(found[0][0 if original else 1]) if found else None


def _verify(dense: nnx.Module, new: nnx.Module, structure: Structure, removed, factors) -> None:
  """Raises CompactionError unless `new` runs at the shapes of the compacted function."""
  fn, params, state = functional(dense, None)
  run, small_params, small_state = _rebuilt(fn, params, state, structure.inputs, structure,
                                            removed)
  _, new_params, new_state = functional(new, None)
  want = {path_str(p): np.shape(x) for p, x in
          jax.tree_util.tree_flatten_with_path((small_params, small_state))[0]}
  have = {path_str(p): np.shape(x) for p, x in
          jax.tree_util.tree_flatten_with_path((new_params, new_state))[0]}
  if want != have:  # both slice the same members: a bug, not a user error
    bad = [p for p in want if want[p] != have.get(p)]
    raise AssertionError(f"compact and compact_fn slice {bad[:3]} differently.")
  inputs = structure.inputs
  expected = jax.eval_shape(lambda p, s, *x: run(p, s, *x)[0], _abstract(small_params),
                            _abstract(small_state), *inputs)
  graphdef, new_state_all = nnx.split(new)
  paths: dict[int, str] = {}

  def forward(state, *x):
    module = nnx.merge(graphdef, state, copy=True)
    paths.update((id(node), "/".join(map(str, path))) for path, node in nnx.iter_graph(module)
                 if isinstance(node, nnx.Module))
    return module(*x)

  try:
    got = jax.eval_shape(forward, new_state_all, *inputs)
  except Exception as error:  # noqa: BLE001 - any failure of the user's module is reported
    path, module = _failing_module(paths, error)
    raise CompactionError(_diagnosis(path, module or new, factors, f"fails: {error}")) from error
  if jax.tree.map(lambda a: (a.shape, a.dtype), expected) != jax.tree.map(
      lambda a: (a.shape, a.dtype), got):
    raise CompactionError(_diagnosis("", new, factors,
                                     f"returns {got} where the compacted function returns "
                                     f"{expected}"))


def _failing_module(paths: Mapping[int, str], error: BaseException):
  """(path, module) of the innermost module (id in `paths`) running when `error` was raised."""
  found = ("", None)
  tb = error.__traceback__
  while tb is not None:
    owner = tb.tb_frame.f_locals.get("self")
    if owner is not None and id(owner) in paths:
      found = (paths[id(owner)], owner)
    tb = tb.tb_next
  return found


def _diagnosis(path: str, module: nnx.Module, factors, what: str) -> str:
  """A message naming the module and its integer attributes that look like stale sizes."""
  prefix = f"{path}/" if path else ""
  stale = set()
  for (leaf, _, _), (before, after) in factors.items():
    if leaf.startswith(prefix) and tuple(before) != tuple(after):
      stale.update(b for b, a in zip(before, after) if b != a)
      stale.add(math.prod(before))
  suspects = [f"{k} = {v}" for k, v in sorted(vars(module).items())
              if isinstance(v, int) and not isinstance(v, bool) and v in stale]
  where = f"`{path}` ({type(module).__name__})" if path else f"the model ({type(module).__name__})"
  hint = (f"Python ints in {where} equal to sizes that compaction changed: {', '.join(suspects)}. "
          if suspects else "")
  return (f"the compacted module {what} (in {where}). A size that compaction changed is kept "
          f"outside the parameters, in {where} or the code calling it. {hint}Use "
          "oba_jax.surgery.compact_fn, or register a resizer for "
          f"{type(module).__name__} with oba_jax.surgery.register_resizer.")


def _delete(value, axes: Mapping[int, set[int]]):
  """`value` without the given indices along each axis (abstract values: shapes only)."""
  if isinstance(value, jax.ShapeDtypeStruct):
    shape = list(value.shape)
    for axis, idx in axes.items():
      shape[axis] -= len(idx)
    return jax.ShapeDtypeStruct(tuple(shape), value.dtype, sharding=value.sharding)
  out = np.asarray(value)
  for axis, idx in axes.items():
    out = np.delete(out, sorted(idx), axis=axis)
  return jax.numpy.asarray(out, dtype=value.dtype)


def _leading(original: Sequence[int], now: Sequence[int], minor: int) -> int:
  """The product of the new factors before those whose original product is `minor`.

  A grouped axis is (groups, per group), possibly refined into finer factors:
  the groups are the factors left of the ones making up `minor` entries.
  """
  for k in range(len(original) + 1):
    if math.prod(original[k:]) == minor:
      return math.prod(now[:k])
  raise ValueError(f"an axis factorised as {tuple(original)} does not end in {minor} entries "
                   "per group: cannot resize the grouped layer.")


def _resize_linear(module: nnx.Linear, _) -> None:
  module.in_features, module.out_features = module.kernel.shape[-2:]  # stacked: (layers, in, out)


def _resize_conv(module: nnx.Conv, factors) -> None:
  groups, axis = module.feature_group_count, module.kernel.ndim - 1
  if groups > 1 and factors("kernel", axis):  # output features are (group, out per group)
    original = factors("kernel", axis, original=True)
    module.feature_group_count = _leading(original, factors("kernel", axis),
                                          math.prod(original) // groups)
  module.out_features = module.kernel.shape[-1]
  module.in_features = module.kernel.shape[-2] * module.feature_group_count


def _norm_leaf(module) -> str | None:
  return next((n for n in ("scale", "bias") if getattr(module, n, None) is not None), None)


def _resize_norm(module, _) -> None:
  leaf = _norm_leaf(module)
  if leaf is not None:
    module.num_features = getattr(module, leaf).shape[-1]


def _resize_group_norm(module: nnx.GroupNorm, factors) -> None:
  """Channels are (groups, per group); removing whole groups keeps the statistics exact."""
  leaf = _norm_leaf(module)
  axis = getattr(module, leaf).ndim - 1 if leaf else 0
  if leaf is None or not factors(leaf, axis):
    return
  original, now = factors(leaf, axis, original=True), factors(leaf, axis)
  features = getattr(module, leaf).shape[-1]
  module.num_groups = _leading(original, now, module.group_size)
  module.group_size = features // module.num_groups
  module.num_features = features


def _resize_embed(module: nnx.Embed, _) -> None:
  module.num_embeddings, module.features = module.embedding.shape[-2:]


def _resize_attention(module: MultiHeadAttention, factors) -> None:
  axis = module.query.kernel.ndim - 1  # stacked modules have a leading layer axis
  for leaf, attribute in (("query/kernel", "head_dim"), ("value/kernel", "value_head_dim")):
    sizes = factors(leaf, axis)  # (heads..., head_dim)
    if sizes:
      setattr(module, attribute, sizes[-1])


def _resize_linear_general(module: nnx.LinearGeneral, _) -> None:
  """Kernel axes end in (in..., out...): sizes read from the new kernel."""
  num_in, num_out = len(module.in_features), len(module.out_features)
  shape = module.kernel.shape[module.kernel.ndim - num_in - num_out:]
  module.in_features, module.out_features = tuple(shape[:num_in]), tuple(shape[num_in:])


def _resize_flax_attention(module: nnx.MultiHeadAttention, _) -> None:
  """Flax's attention checks its input width; heads and sizes come from the kernels."""
  module.in_features = module.query.kernel.shape[0]
  module.in_kv_features = module.key.kernel.shape[0]
  module.num_heads, module.head_dim = module.query.kernel.shape[1:3]
  if hasattr(module, "num_kv_heads"):
    module.num_kv_heads = module.key.kernel.shape[1]
  module.qkv_features = module.num_heads * module.head_dim
  module.out_features = module.out.kernel.shape[-1]


register_resizer(nnx.Linear, _resize_linear)
register_resizer(nnx.LinearGeneral, _resize_linear_general)
register_resizer(nnx.MultiHeadAttention, _resize_flax_attention)
register_resizer(MultiHeadAttention, _resize_attention)
register_resizer(nnx.Conv, _resize_conv)
register_resizer(nnx.GroupNorm, _resize_group_norm)
register_resizer(nnx.Embed, _resize_embed)
for _norm in (nnx.BatchNorm, nnx.LayerNorm, nnx.RMSNorm):
  register_resizer(_norm, _resize_norm)
