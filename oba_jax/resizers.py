"""How `surgery.compact` updates the static attributes of a layer type after slicing.

A resizer runs on every module of its exact type once the module's leaves hold
the compacted shapes, and sets what the layer keeps outside its arrays (feature
counts, head counts, group counts, an RMSNorm's epsilon). This is a registry per
*layer type* (`register_resizer`), never per architecture; it ships the Flax NNX
layers and this package's ViT attention. It owns no slicing and no checks
(`oba_jax.surgery`).
"""

import math
from collections.abc import Callable, Sequence

import jax
from flax import nnx

from oba_jax.models.vit import MultiHeadAttention

# resizer(module, factors): `factors(leaf, axis)` gives the row-major factor sizes
# of that axis of the module's leaf (e.g. 'kernel', 'query/kernel') after removal,
# or None when the axis was not touched; `factors(leaf, axis, original=True)` the
# sizes before removal.
Factors = Callable[..., tuple[int, ...] | None]
Resizer = Callable[[nnx.Module, Factors], None]
_RESIZERS: dict[type, Resizer] = {}

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


def _resize_rms_norm(module: nnx.RMSNorm, factors) -> None:
  """Keeps RMSNorm exact when its features shrink from D to D′ (the masked model's function).

  Masked, the removed features are 0: y = s·x / √(Σ′x²/D + ε), Σ′ over the kept
  ones. The narrow layer computes s′·x / √(Σ′x²/D′ + ε′); with ε′ = ε·D/D′ its
  root is √(D/D′)·√(Σ′x²/D + ε), so s′ = s·√(D/D′) gives the same y.
  """
  _resize_norm(module, factors)
  axis = module.scale.ndim - 1 if module.scale is not None else None
  now = factors("scale", axis) if axis is not None else None
  if not now:
    return  # features not cut (or no scale: `compact`'s check refuses the difference)
  ratio = math.prod(factors("scale", axis, original=True)) / math.prod(now)
  module.epsilon = module.epsilon * ratio
  value = module.scale.get_value()
  if not isinstance(value, jax.ShapeDtypeStruct):
    module.scale.set_value((value * math.sqrt(ratio)).astype(value.dtype))


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
register_resizer(nnx.RMSNorm, _resize_rms_norm)
for _norm in (nnx.BatchNorm, nnx.LayerNorm):
  register_resizer(_norm, _resize_norm)
