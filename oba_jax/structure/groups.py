"""Groups of coupled slices, and the cost of a network as a function of their widths.

A *group* is a set of parameter (and state) slices that must be removed
together: one index `c` of a group (one channel, feature, head) stands for one
slice in every member. A member says where: along `axis` of the leaf at `path`,
the segment `[offset, offset + prod(factors))` is a row-major array of shape
`factors`, and the group's index is its coordinate number `position`. So

- a conv's output channels: offset 0, factors (C,), position 0;
- a dense layer after a flatten of (H, W, C): factors (H, W, C), position 2;
- attention heads in a [D, H*hd] projection: factors (H, hd), position 0, and
  the dimensions within heads: the same factors, position 1;
- the second input of a concatenation: offset C1, factors (C2,), position 0.

Costs (MACs and parameter counts) are sums of `Term`s, each a constant times the
product of some groups' widths, which is exact for convolutions and matrix
products whose dimensions are group widths. `Structure.cost(kept)` evaluates
them for any widths, which is how a plan predicts the FLOPs of a pruned model.
"""

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
from flax import nnx

from oba_jax.functional import flat_state


@dataclasses.dataclass(frozen=True)
class Member:
  """One coupled slice: where index c of a group lives in one leaf."""

  path: str  # 'blocks/0/conv1/conv/kernel' (params) or a state path ('.../bn/mean')
  axis: int
  offset: int
  factors: tuple[int, ...]
  position: int
  collection: str = "params"  # "params" or "state" (e.g. BatchNorm statistics)

  @property
  def span(self) -> int:
    """How many entries along `axis` one group index covers."""
    return math.prod(self.factors) // self.factors[self.position]

  def indices(self, channels: Sequence[int] | np.ndarray) -> np.ndarray:
    """The sorted indices along `axis` that the group indices `channels` own."""
    channels = np.asarray(channels, dtype=np.int64)
    grid = np.arange(math.prod(self.factors)).reshape(self.factors)
    picked = np.take(grid, channels, axis=self.position)
    return np.sort(picked.ravel()) + self.offset


@dataclasses.dataclass(frozen=True)
class Group:
  """Slices removed together; `size` is the number of removable indices.

  `normalized` marks groups whose axis is also reduced over inside the network
  (LayerNorm or GroupNorm statistics, a softmax over features): removing indices
  then changes what the remaining ones compute, so zeroing them (masking) and
  removing them (compaction) give different models.
  """

  name: str
  size: int
  members: tuple[Member, ...]
  normalized: bool = False

  def member_paths(self) -> tuple[str, ...]:
    return tuple(dict.fromkeys(m.path for m in self.members))


@dataclasses.dataclass(frozen=True)
class Term:
  """`coefficient` times the product of the widths of `groups` (names, repeats allowed)."""

  label: str  # the layer or operation it counts, e.g. 'blocks/0/conv1/conv'
  coefficient: int
  groups: tuple[str, ...] = ()

  def value(self, widths: Mapping[str, int]) -> int:
    return self.coefficient * math.prod(widths[g] for g in self.groups)


@dataclasses.dataclass(frozen=True)
class Cost:
  macs: int
  params: int


@dataclasses.dataclass(frozen=True)
class Structure:
  """What `structure.trace` finds: the groups and the network's cost in their widths."""

  groups: tuple[Group, ...]
  mac_terms: tuple[Term, ...]
  param_terms: tuple[Term, ...]
  leaf_shapes: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
  inputs: tuple = ()  # the example inputs' shapes and dtypes (jax.ShapeDtypeStruct pytrees)
  # The example inputs themselves when they were concrete arrays (`surgery.compact` runs
  # its result on them), else None.
  example: tuple | None = dataclasses.field(default=None, compare=False, repr=False)
  ignore: tuple[str, ...] = ()  # the `ignore` prefixes it was traced with

  def check_model(self, model: nnx.Module) -> None:
    """Raises ValueError unless the NNX `model`'s leaves are the traced ones."""
    self.check_model_leaves({path: np.shape(variable.get_value())
                             for path, variable in flat_state(model).items()})

  def check_model_leaves(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raises ValueError unless a model's leaves (path -> shape) are the traced ones."""
    for path, traced in self.leaf_shapes.items():
      if path not in shapes:
        raise ValueError(f"the model has no leaf {path!r}, which the structure was traced with: "
                         "the structure (or plan) belongs to another model.")
      if tuple(shapes[path]) != tuple(traced):
        raise ValueError(f"the model's {path!r} has shape {tuple(shapes[path])}, the structure "
                         f"traced {tuple(traced)}: it belongs to another model.")

  def group(self, name: str) -> Group:
    for g in self.groups:
      if g.name == name:
        return g
    raise KeyError(f"no group named {name!r}; groups: {[g.name for g in self.groups][:8]} ...")

  def widths(self, kept: Mapping[str, int] | None = None) -> dict[str, int]:
    """Every group's width: its full size unless `kept` says otherwise."""
    widths = {g.name: g.size for g in self.groups}
    for name, width in (kept or {}).items():
      if name not in widths:
        raise KeyError(f"{name!r} is not a group of this structure.")
      if not 0 <= width <= widths[name]:
        raise ValueError(f"kept width {width} of group {name!r} is outside [0, {widths[name]}].")
      widths[name] = int(width)
    return widths

  def cost(self, kept: Mapping[str, int] | None = None) -> Cost:
    """MACs and parameters with the given kept widths (default: the dense network)."""
    widths = self.widths(kept)
    return Cost(macs=sum(t.value(widths) for t in self.mac_terms),
                params=sum(t.value(widths) for t in self.param_terms))
