"""The export restriction of a Llama: the groups whose removal would change the head size.

llama.cpp runs attention with one head size per model (`attention.key_length`, equal to the value
head size and to the rotary dimension count), so a pruned Llama exports only if every attention
keeps whole heads of the original size: an index of an allowed group removes a multiple of the
head size from every attention projection axis it touches (the q/k/v output features, the
`o_proj` input features) and never touches the rotary frequencies `inv_freq`. What breaks this,
read from the groups' members rather than from their names: rotary pairs (2 features of a head
and one frequency) and value features within heads (1 feature of every value head). KV groups,
query heads within a KV group, SwiGLU units and the model width pass.

  frozen = head_size_groups(structure, model)
  plan.select(structure, scores, target=..., frozen=frozen)   # frozen groups lose nothing
"""

import numpy as np
from flax import nnx

from oba_jax.models.llama import LlamaAttention
from oba_jax.structure.groups import Structure

# Each projection kernel's head axis: q/k/v [d_model, heads * head], o [heads * head, d_model].
HEAD_AXES = {"q_proj/kernel": 1, "k_proj/kernel": 1, "v_proj/kernel": 1, "o_proj/kernel": 0}


def head_size_groups(structure: Structure, model: nnx.Module) -> frozenset[str]:
  """Names of the groups of `structure` (traced from `model`) whose removal changes a head size.

  Raises:
    ValueError: `model` has no `LlamaAttention`, or `structure` was traced from another model.
  """
  head_axes, rotary = {}, set()
  for path, module in nnx.iter_graph(model):
    if isinstance(module, LlamaAttention):
      prefix = "".join(f"{p}/" for p in path)
      head = 2 * np.shape(module.inv_freq.get_value())[0]
      head_axes.update({(prefix + leaf, axis): head for leaf, axis in HEAD_AXES.items()})
      rotary.add(prefix + "inv_freq")
  if not head_axes:
    raise ValueError(f"{type(model).__name__} has no LlamaAttention: the head-size restriction "
                     "is for oba_jax.models.Llama.")
  structure.check_model(model)
  return frozenset(
      g.name for g in structure.groups
      if any(m.path in rotary or m.span % head_axes.get((m.path, m.axis), 1)
             for m in g.members))
