"""Low-rank adapters (LoRA) on a model's 2-D kernels, as pure functions over parameter pytrees.

  adapters = lora.init(params, rank=8, key=key)          # {"layers/0/attn/q_proj/kernel": {"a", "b"}}
  merged = lora.merge(params, adapters, scale=alpha / 8)  # W + scale * a @ b, a plain pytree

A kernel W of shape (in, out) gets a (in, rank) and b (rank, out): `a` starts random
(normal / sqrt(in)), `b` at zero, so the adapted model equals the base one until `b` moves.
Targets are chosen by shape, not by architecture: by default every 2-D parameter but an
embedding table (a leaf named "embedding"); `where(path, leaf)` chooses others.

To train only the adapters with `train.finetune`, wrap the model in `Adapted`: its base weights
become `Frozen` variables (not `nnx.Param`, so the optimizer never sees them) and its adapters
are its only `nnx.Param`s. `merged_model(model, adapters, scale)` gives back a plain module of
the base's structure (for evaluation and export).
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

PyTree = Any
Where = Callable[[tuple, jax.Array], bool]


def default_where(path: tuple, leaf: jax.Array) -> bool:
  """Every 2-D parameter but an embedding table."""
  return jnp.ndim(leaf) == 2 and str(path[-1]) != "embedding"


def path_name(path: tuple) -> str:
  """"layers/0/attn/q_proj/kernel" for the key path of a nested dict."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def targets(params: PyTree, where: Where | None = None) -> list[str]:
  """The path names of the leaves of `params` that get adapters, in tree order."""
  where = default_where if where is None else where
  found = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
    if where(keys, leaf):
      found.append(path_name(path))
  return found


def init(params: PyTree, rank: int, key: jax.Array, where: Where | None = None) -> dict:
  """{path name: {"a": (in, rank), "b": (rank, out) zeros}} for every target of `params`."""
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
    raise ValueError(f"rank={rank!r} must be a positive integer.")
  leaves = dict(_named_leaves(params))
  names = targets(params, where)
  if not names:
    raise ValueError("no parameter gets an adapter: `where` chose no leaf (the default "
                     "chooses every 2-D parameter but an embedding table).")
  adapters = {}
  for i, name in enumerate(names):
    kernel = leaves[name]
    if jnp.ndim(kernel) != 2:
      raise ValueError(f"{name} has shape {jnp.shape(kernel)}; adapters go on 2-D kernels.")
    fan_in, fan_out = kernel.shape
    a = jax.random.normal(jax.random.fold_in(key, i), (fan_in, rank), jnp.float32)
    adapters[name] = {"a": (a / jnp.sqrt(fan_in)).astype(kernel.dtype),
                      "b": jnp.zeros((rank, fan_out), kernel.dtype)}
  return adapters


def merge(params: PyTree, adapters: Mapping[str, Mapping[str, jax.Array]],
          scale: float = 1.0) -> PyTree:
  """`params` with W + scale * a @ b at every adapted leaf (the others unchanged)."""
  unknown = sorted(set(adapters) - {name for name, _ in _named_leaves(params)})
  if unknown:
    raise ValueError(f"adapters for {unknown}, which are not parameters of the model.")

  def merged(path, leaf):
    adapter = adapters.get(path_name(path))
    if adapter is None:
      return leaf
    delta = adapter["a"].astype(jnp.float32) @ adapter["b"].astype(jnp.float32)
    return (leaf + scale * delta).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(merged, params)


def _named_leaves(params: PyTree):
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    yield path_name(path), leaf


class Frozen(nnx.Variable):
  """A weight that is not trained (not an `nnx.Param`)."""


class Adapter(nnx.Module):
  """The trained factors of one kernel's update."""

  def __init__(self, a: jax.Array, b: jax.Array):
    self.a = nnx.Param(a)
    self.b = nnx.Param(b)


class Adapted(nnx.Module):
  """`model` with its parameters frozen and low-rank updates of its targets trained.

  Calling it runs `model` with the merged weights (`merge`), so the adapters get gradients
  and the base weights none; `adapters_of(adapted)` reads the trained factors back.
  """

  def __init__(self, model: nnx.Module, adapters: Mapping[str, Mapping[str, jax.Array]],
               scale: float):
    self.base = _frozen(model)
    self.names = tuple(adapters)
    self.scale = float(scale)
    self.adapters = nnx.List([Adapter(adapters[n]["a"], adapters[n]["b"]) for n in self.names])

  def __call__(self, *args, **kwargs):
    graphdef, state = nnx.split(self.base)
    pure = merge(nnx.to_pure_dict(state), adapters_of(self), self.scale)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)(*args, **kwargs)


def adapters_of(adapted: Adapted) -> dict:
  """{path name: {"a", "b"}}: the current factors of `adapted`."""
  return {name: {"a": adapter.a[...], "b": adapter.b[...]}
          for name, adapter in zip(adapted.names, adapted.adapters)}


def merged_model(model: nnx.Module, adapters: Mapping, scale: float) -> nnx.Module:
  """A copy of `model` whose parameters are `merge`d with `adapters`: a plain module."""
  model = nnx.clone(model)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  nnx.replace_by_pure_dict(params, merge(nnx.to_pure_dict(params), adapters, scale))
  return nnx.merge(graphdef, params, rest)


def _frozen(model: nnx.Module) -> nnx.Module:
  """A copy of `model` whose `nnx.Param`s are `Frozen` variables of the same values."""
  model = nnx.clone(model)
  for path, node in list(nnx.iter_graph(model)):
    if isinstance(node, nnx.Param):
      parent = model
      for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
      if isinstance(path[-1], int):
        parent[path[-1]] = Frozen(node[...])
      else:
        setattr(parent, path[-1], Frozen(node[...]))
  return model
