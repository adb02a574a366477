"""Physical compaction: a smaller NNX module with the planned slices removed.

`compact` deletes, from every parameter and state leaf (BatchNorm statistics
included), the indices that the plan removes from each group, then updates the
static attributes of the layers that hold shapes (`in_features`,
`out_features`, `num_features`, a grouped convolution's `feature_group_count`,
an attention's `head_dim`). Those updates are per *layer type* (a small
registry users can extend with `register_resizer`), never per architecture.

With inference-mode normalisation the compacted model computes what the masked
model computes (every member of a removed slice zeroed), except for groups
flagged `normalized`, whose removal changes a normalisation's statistics.
Abstract models (`nnx.eval_shape`) compact too, which is how a compacted
checkpoint is restored: rebuild the dense abstract model, compact it with the
saved plan, restore into it.
"""

import collections
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import jax
import numpy as np
from flax import nnx

from oba_jax.models.vit import MultiHeadAttention
from oba_jax.structure.groups import Structure

if TYPE_CHECKING:
  import oba_jax.plan

# resizer(module, factors): `factors(leaf, axis)` gives the row-major factor sizes
# of that axis of the module's leaf (e.g. 'kernel', 'query/kernel') after removal,
# or None when the axis was not touched.
Factors = Callable[[str, int], tuple[int, ...] | None]
Resizer = Callable[[nnx.Module, Factors], None]
_RESIZERS: dict[type, Resizer] = {}


def register_resizer(module_type: type, resizer: Resizer) -> None:
  """Teaches `compact` how to update the static attributes of a layer type."""
  _RESIZERS[module_type] = resizer


def compact(model: nnx.Module, plan: "oba_jax.plan.Plan",
            structure: Structure | None = None) -> nnx.Module:
  """A new module without the indices `plan.removed[group]` of each group.

  Args:
    model: the dense NNX module (left unchanged); concrete or abstract.
    plan: from `plan.select` on this model's structure (or `Plan.from_json`).
    structure: `structure.trace(model, ...)`; defaults to the structure the plan
      was selected on (a plan read from JSON needs it passed).
  """
  structure = plan.structure if structure is None else structure
  if structure is None:
    raise ValueError("this plan carries no structure (it was read from JSON): pass "
                     "structure=oba_jax.structure.trace(model, example_input).")
  plan.check_matches(structure)
  structure.check_model_leaves({"/".join(map(str, path)): np.shape(v.get_value())
                                for path, v in nnx.to_flat_state(nnx.state(model))})
  removed = plan.removed
  deletions: dict[tuple[str, int], set[int]] = collections.defaultdict(set)
  factors: dict[tuple[str, int, int], list[int]] = {}
  for group in structure.groups:
    indices = np.unique(np.asarray(removed.get(group.name, ()), dtype=np.int64))
    if indices.size and (indices.min() < 0 or indices.max() >= group.size):
      raise ValueError(f"group {group.name!r} has {group.size} indices; cannot remove "
                       f"{indices.tolist()[:5]} ...")
    if indices.size == group.size:
      raise ValueError(f"the plan removes all {group.size} indices of group {group.name!r}.")
    for m in group.members:
      deletions[(m.path, m.axis)].update(m.indices(indices).tolist())
      sizes = factors.setdefault((m.path, m.axis, m.offset), list(m.factors))
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
      resizer(node, lambda leaf, axis, prefix=prefix: _lookup(factors, prefix + leaf, axis))
  return new


def _lookup(factors, path: str, axis: int) -> tuple[int, ...] | None:
  found = [sizes for (p, a, _), sizes in sorted(factors.items()) if p == path and a == axis]
  return tuple(found[0]) if found else None


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


def _resize_linear(module: nnx.Linear, _) -> None:
  module.in_features, module.out_features = module.kernel.shape


def _resize_conv(module: nnx.Conv, factors) -> None:
  module.out_features = module.kernel.shape[-1]
  if module.feature_group_count > 1:  # output features are (group, out per group)
    sizes = factors("kernel", module.kernel.ndim - 1)
    module.feature_group_count = sizes[0] if sizes else module.feature_group_count
  module.in_features = module.kernel.shape[-2] * module.feature_group_count


def _resize_norm(module, _) -> None:
  module.num_features = module.scale.shape[0] if module.scale is not None else module.num_features


def _resize_attention(module: MultiHeadAttention, factors) -> None:
  for leaf, attribute in (("query/kernel", "head_dim"), ("value/kernel", "value_head_dim")):
    sizes = factors(leaf, 1)  # (heads..., head_dim)
    if sizes:
      setattr(module, attribute, sizes[-1])


register_resizer(nnx.Linear, _resize_linear)
register_resizer(MultiHeadAttention, _resize_attention)
register_resizer(nnx.Conv, _resize_conv)
for _norm in (nnx.BatchNorm, nnx.LayerNorm):
  register_resizer(_norm, _resize_norm)
