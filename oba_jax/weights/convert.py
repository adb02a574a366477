"""Moving weights between a Flax NNX model and a PyTorch state dict, given a key-renaming table.

A variable's torch key is its dotted NNX path with the leaf given its PyTorch name (`kernel` and
`scale` -> `weight`, `mean` -> `running_mean`, `var` -> `running_var`), then rewritten by `renames`:
`(pattern, replacement)` regex substitutions applied in order. Variables that land on one key form
one fused tensor, concatenated along torch axis 0 in query, key, value order (PyTorch's
`in_proj_weight`, timm's `qkv`). Kernels are transposed between flax's [*spatial, in, out] and
torch's [out, in, *spatial]; every other variable is copied as it is.

This module knows no architecture; the tables live in `formats`.
"""

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

Renames = Sequence[tuple[str, str]]
Path = tuple[Any, ...]

_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}
_FUSED_ORDER = ("query", "key", "value")
_IGNORED = re.compile(r"(^|\.)num_batches_tracked$")  # PyTorch's BatchNorm step counters


def _weights(model: nnx.Module) -> dict[Path, nnx.Variable]:
  return dict(nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))))


def torch_keys(model: nnx.Module, renames: Renames) -> dict[str, list[Path]]:
  """Each torch key of `model` -> the NNX paths of the variables it holds, in fused order."""
  keys = {}
  for path in _weights(model):
    *module, leaf = map(str, path)
    key = ".".join([*module, _TORCH_LEAF.get(leaf, leaf)])
    for pattern, replacement in renames:
      key = re.sub(pattern, replacement, key)
    keys.setdefault(key, []).append(path)
  for paths in keys.values():
    if len(paths) > 1:  # a fused tensor: order its parts by their module's name
      paths.sort(key=lambda path: _FUSED_ORDER.index(path[-2]))
  return keys


def _torch_axes(path: Path, ndim: int) -> tuple[int, ...]:
  """The permutation taking the variable at `path` from flax's layout to torch's."""
  if path[-1] == "kernel":
    return (ndim - 1, ndim - 2, *range(ndim - 2))
  return tuple(range(ndim))


def _torch_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(shape[axis] for axis in _torch_axes(path, len(shape)))


def to_torch(model: nnx.Module, renames: Renames) -> dict[str, np.ndarray]:
  """`model`'s parameters and BatchNorm statistics as a state dict of C-contiguous numpy arrays."""
  weights = _weights(model)

  def torch_layout(path: Path) -> np.ndarray:
    value = np.asarray(weights[path][...])
    return np.transpose(value, _torch_axes(path, value.ndim))

  return {key: np.ascontiguousarray(np.concatenate([torch_layout(path) for path in paths]))
          for key, paths in torch_keys(model, renames).items()}


def from_torch(model: nnx.Module, state_dict: Mapping[str, Any], renames: Renames) -> None:
  """Overwrites `model`'s weights with `state_dict`'s, once every key and shape has checked out.

  Raises ValueError naming the first missing, misshapen or unexpected key; `model` is then
  untouched. `num_batches_tracked` entries are ignored.
  """
  weights, keys, updates = _weights(model), torch_keys(model, renames), {}
  for key, paths in keys.items():
    shapes = [_torch_shape(path, weights[path].shape) for path in paths]
    expected = (sum(shape[0] for shape in shapes), *shapes[0][1:])
    if key not in state_dict:
      raise ValueError(f"The state dict has no {key!r}; the model expects shape {expected}.")
    value = np.asarray(state_dict[key])
    if value.shape != expected:
      raise ValueError(f"The state dict's {key!r} has shape {value.shape}; the model expects "
                       f"{expected}.")
    parts = np.split(value, np.cumsum([shape[0] for shape in shapes[:-1]]))
    for path, part in zip(paths, parts):
      flax_axes = np.argsort(_torch_axes(path, part.ndim))
      updates[path] = jnp.asarray(np.transpose(part, flax_axes), dtype=weights[path].dtype)
  for key in state_dict:
    if key not in keys and not _IGNORED.search(key):
      raise ValueError(f"The state dict's {key!r} matches nothing in the model "
                       f"(its keys look like {next(iter(keys))!r}).")
  nnx.update(model, nnx.from_flat_state(updates))
