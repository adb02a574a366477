"""MACs and parameter counts of a model, read from the jaxpr of its forward pass.

Counts every convolution and every matrix product (`dot_general`), including the
attention products between activations (q·kᵀ, softmax·v) that module-hook
counters such as thop miss. Normalisation, activations and pooling are not
counted. Inside `lax.scan` (and `lax.map`, `nnx.scan`) the body's MACs count once
per iteration; inside `lax.while_loop` once (the trip count is unknown). MACs are for the example input given (pass a batch of one for MACs
per example); FLOPs are about 2 x MACs.
"""

import collections
import dataclasses
from collections.abc import Mapping

from oba_jax.structure.groups import Structure
from oba_jax.structure.tracer import trace


@dataclasses.dataclass(frozen=True)
class Count:
  macs: int
  params: int
  macs_per_layer: Mapping[str, int]  # layer path (or 'dot_general of activations') -> MACs
  params_per_leaf: Mapping[str, int]


def count(model, *example_inputs, params=None) -> Count:
  """MACs and parameters of `model` (an NNX module, or `apply_fn` with `params=`)."""
  return of_structure(trace(model, *example_inputs, params=params))


def of_structure(structure: Structure, kept: Mapping[str, int] | None = None) -> Count:
  """The count of a traced model with some groups narrowed to `kept` widths."""
  widths = structure.widths(kept)
  macs, params = collections.Counter(), collections.Counter()
  for term in structure.mac_terms:
    macs[term.label] += term.value(widths)
  for term in structure.param_terms:
    params[term.label] += term.value(widths)
  return Count(sum(macs.values()), sum(params.values()), dict(macs), dict(params))
