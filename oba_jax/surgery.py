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
(a registry: `register_resizer`, in `oba_jax.resizers`), never per architecture.
A module that keeps a shape elsewhere (say, a head count as a Python int) would
come out broken, so `compact` checks its result: it runs the new module on the
traced input shapes, and on the traced example input when that was concrete, and
compares shapes and numbers with `compact_fn`'s. Otherwise it raises
`CompactionError` naming the module and the suspect attribute.

`compact_fn` computes what the masked model computes (every member of a removed
slice zeroed). A normalisation over a cut group (flagged `normalized`) keeps
its divisor at the original width there, which is the masked model's function
for RMSNorm and for statistics computed as mean(x²) − mean(x)² (Flax's), not
for a variance of centred values. `compact` keeps an RMSNorm exact (rescaled);
a LayerNorm or GroupNorm over a cut group cannot keep the original width, so
`compact` refuses it unless called with `renormalize=True`. Abstract models (`nnx.eval_shape`) compact too, which is how a compacted
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
from oba_jax import masks
from oba_jax.delta import KERNEL_NAMES, path_str
from oba_jax.resizers import _RESIZERS, Factors, Resizer, register_resizer  # noqa: F401
from oba_jax.structure.groups import Structure
from oba_jax.structure.rebuild import Rebuild, kept_atoms
from oba_jax.structure.reduce import param_members
from oba_jax.structure.tracer import analyse, functional

if TYPE_CHECKING:
  import oba_jax.plan

fold_batchnorm, foldable_batchnorms, Identity = (
    _fold.fold_batchnorm, _fold.foldable_batchnorms, _fold.Identity)


class CompactionError(ValueError):
  """The compacted module or function would not compute what it should."""


def compact_fn(apply_fn: Callable, params: Any, plan: "oba_jax.plan.Plan", *,
               structure: Structure | None = None,
               example_inputs: Sequence[Any] | None = None) -> tuple[Callable, Any]:
  """The compacted function and parameters: `(compact_apply, compact_params)`.

  `compact_apply(compact_params, *inputs)` computes what `apply_fn` computes
  with the plan's slices zeroed (masked), at the narrower shapes. It works for
  any input shapes (each new shape is traced once) and under `jax.jit`. When the
  plan cuts a group flagged `normalized`, the normalisation keeps its original
  divisor, which is exact for RMSNorm and mean(x²) − mean(x)² statistics but
  not for a variance of centred values: so then both functions run on the
  example inputs, and a difference raises `CompactionError`.

  Args:
    apply_fn: `apply_fn(params, *inputs)`, the function the structure was traced
      from or any function with the same parameters (e.g. `oba_jax.functional(model)`
      for a structure traced from the NNX module).
    params: its (dense) parameters.
    plan: from `plan.select`.
    structure: the structure the plan was selected on; defaults to `plan.structure`.
    example_inputs: inputs to trace at; defaults to the structure's.

  Raises:
    CompactionError: a cut `normalized` group changes the function, or cannot
      be checked because no concrete example input is known.
  """
  structure = _structure_of(plan, structure)
  fn = lambda p, s, *inputs: (apply_fn(p, *inputs), s)
  inputs = structure.inputs if example_inputs is None else tuple(example_inputs)
  run, small, _ = _rebuilt(fn, params, {}, inputs, structure, plan.removed)
  compacted = lambda p, *x: run(p, {}, *x)[0]
  cut = _cut_normalized(structure, plan.removed)
  if cut:
    examples = inputs if _concrete(inputs) else structure.example
    if examples is None:
      raise CompactionError(
          f"the plan cuts groups {cut[:4]}, which a normalisation reduces over, and no "
          "concrete example input is known to check that the compacted function still "
          "computes the masked one: pass example_inputs=(arrays, ...).")
    masked = apply_fn(masks.apply_plan(params, structure, plan), *examples)
    difference = _relative_difference(compacted(small, *examples), masked)
    if difference is not None:
      raise CompactionError(
          f"the plan cuts groups {cut[:4]}, which a normalisation reduces over with "
          "statistics that the removed features change (a variance of centred values), so "
          "the compacted function computes another function than the masked model "
          f"(relative difference {difference:.3g} on the example input). Keep those groups "
          "(structure.trace(..., ignore=[...]) with parameters of theirs, e.g. "
          f"{sorted({m.path for m in param_members(structure.group(cut[0]))})[:3]}) or use "
          "the masked parameters.")
  return compacted, small


def _cut_normalized(structure: Structure, removed) -> list[str]:
  """The names of the groups flagged `normalized` that lose indices."""
  return [g.name for g in structure.groups if g.normalized and len(removed.get(g.name, ()))]


def _concrete(tree) -> bool:
  return all(isinstance(x, (np.ndarray, np.generic, jax.Array)) for x in jax.tree.leaves(tree))


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
            structure: Structure | None = None, *, verify: bool = True,
            renormalize: bool = False) -> nnx.Module:
  """A new module without the indices `plan.removed[group]` of each group.

  Args:
    model: the dense NNX module (left unchanged); concrete or abstract.
    plan: from `plan.select` on this model's structure (or `Plan.from_json`).
    structure: `structure.trace(model, ...)`; defaults to the structure the plan
      was selected on (a plan read from JSON needs it passed).
    verify: run the new module on the traced input shapes and compare its
      leaves and output shapes with `compact_fn`'s; when the model is concrete
      and the structure was traced from concrete inputs, also run both on those
      inputs and compare the numbers.
    renormalize: accept cut groups that a LayerNorm, GroupNorm (positions within
      a group) or another normalisation reduces over: the new module then
      normalises over the kept features only, so it computes another function
      than `compact_fn` and the masked model. RMSNorm needs no permission: it is
      kept exact (see `_resize_rms_norm`).

  Raises:
    CompactionError: the new module does not run, not at the shapes of the
      compacted function (a layer keeps a shape that no resizer updates), or
      computes other numbers than `compact_fn` (a normalisation over a cut
      group without `renormalize=True`, naming its module).
  """
  structure = _structure_of(plan, structure)
  structure.check_model(model)
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
    _verify(model, new, structure, removed, factors, renormalize)
  return new


def _lookup(factors, path: str, axis: int, original: bool = False) -> tuple[int, ...] | None:
  found = [sizes for (p, a, _), sizes in sorted(factors.items()) if p == path and a == axis]
  return tuple(found[0][0 if original else 1]) if found else None


def _verify(dense: nnx.Module, new: nnx.Module, structure: Structure, removed, factors,
            renormalize: bool) -> None:
  """Raises CompactionError unless `new` computes the compacted function.

  Shapes always; numbers on the structure's example inputs when they and the
  model are concrete.
  """
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
  concrete = not any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(new_state_all))
  if structure.example is None or not concrete:
    return
  def outputs_and_draws(state, *x):  # jitted: one compilation, not one per operation
    module = nnx.merge(graphdef, state, copy=True)
    counts = lambda: [c.get_value() for _, c in nnx.to_flat_state(nnx.state(module,
                                                                             nnx.RngCount))]
    before = counts()
    return module(*x), before, counts()

  got, before, after = jax.jit(outputs_and_draws)(new_state_all, *structure.example)
  if [int(c) for c in before] != [int(c) for c in after]:
    return  # the module drew random numbers (dropout in training mode): nothing to compare
  want = jax.jit(lambda p, s, *x: run(p, s, *x)[0])(small_params, small_state,
                                                     *structure.example)
  difference = _relative_difference(got, want)
  if difference is None:
    return
  cut = _cut_normalized(structure, removed)
  if cut and renormalize:
    return
  if cut:
    norms = _normalising_modules(new, [structure.group(name) for name in cut])
    raise CompactionError(
        f"the compacted module computes other outputs than compact_fn on the traced example "
        f"input (relative difference {difference:.3g}): groups {cut[:4]} lost "
        "indices, and a normalisation reduces over them (modules holding such features "
        f"outside conv and dense layers: {', '.join(norms) or 'none'}). The new module would "
        "normalise over the kept features only. Pass renormalize=True to "
        "accept that, keep those groups (e.g. structure.trace(..., ignore=...)), or use "
        "oba_jax.surgery.compact_fn, which keeps the normalisation over the original width.")
  raise CompactionError(_diagnosis("", new, factors, "computes other outputs than the "
                                   f"compacted function (relative difference {difference:.3g})"))


def _relative_difference(got, want) -> float | None:
  """‖got − want‖ / ‖want‖ over all output leaves when above rounding, else None."""
  got = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(got)]
  want_leaves = jax.tree.leaves(want)
  eps = max((float(jax.numpy.finfo(x.dtype).eps) for x in want_leaves
             if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)), default=0.0)
  want = [np.asarray(x, np.float64).ravel() for x in want_leaves]
  error = math.sqrt(sum(float(np.sum((g - w) ** 2)) for g, w in zip(got, want)))
  scale = math.sqrt(sum(float(np.sum(w ** 2)) for w in want))
  difference = error / max(scale, np.finfo(np.float64).tiny)
  return difference if difference > min(1e3 * eps, 1e-2) else None


def _normalising_modules(model: nnx.Module, groups) -> list[str]:
  """'`path` (Type)' of the submodules without a kernel that hold members of `groups`.

  Those are where normalisation layers keep their scale and bias; the model
  itself (path '') is left out.
  """
  modules = {"/".join(map(str, path)): node for path, node in nnx.iter_graph(model)
             if isinstance(node, nnx.Module)}
  found = []
  for g in groups:
    for m in param_members(g):
      owner, _, leaf = m.path.rpartition("/")
      if leaf not in KERNEL_NAMES and owner and owner in modules and not any(
          isinstance(getattr(modules[owner], k, None), nnx.Variable) for k in KERNEL_NAMES):
        found.append(f"`{owner}` ({type(modules[owner]).__name__})")
  return list(dict.fromkeys(found))


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
  return jax.device_put(np.asarray(out, dtype=value.dtype))  # no compilation per shape
