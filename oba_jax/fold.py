"""Folding inference-mode BatchNorm into the convolution or dense layer that feeds it.

An inference-mode BatchNorm is a per-feature affine map, `y = (x - mean) * s + beta`
with `s = scale / sqrt(var + epsilon)`. When `x` is exactly the output of an
`nnx.Conv` or `nnx.Linear` (kernel `W`, bias `b`), `y` is the same layer with
kernel `W * s` (scaled along its output-feature axis, which is also right for
grouped and depthwise convs) and bias `(b - mean) * s + beta`. `fold_batchnorm`
builds that layer and replaces the BatchNorm by `Identity`, so the normalisation's
operations leave the compiled program (on XLA:CPU, which fuses them with the convs,
that measured as no speed-up: experiments/RESULTS.md). It is the last step of an
inference export, after `surgery.compact`.

Which BatchNorm feeds on which layer is read from the dataflow of the jaxpr of
one forward pass, not from attribute names: each parameter leaf belongs to the
`nnx.Conv`, `nnx.Linear` or `nnx.BatchNorm` module that holds it, and a module's
*chain* is the run of equations in which its parameters meet the activations
(conv + bias add, or sub, mul, add). A pair folds when the layer's chain ends in
the very variable the BatchNorm's chain starts from, nothing else reads that
variable, each chain is exactly its module's call (conv or matmul, then the bias
add if any; sub, mul, then the shift if any), each module's parameters meet the
data in that chain only (a module called twice, or a parameter also read
elsewhere, does not fold), the BatchNorm normalises the last axis, and both are
of the exact Flax types (a subclass may compute something else). Calls (`jit`,
`custom_jvp`, `remat`) are walked through; loops (`scan`, `while`, `cond`) are
not, so layers inside them stay.

This module imports only the structure tracer; `surgery` re-exports it.
"""

import collections
import dataclasses
from collections.abc import Sequence

import jax
from flax import nnx
from jax.extend import core as jcore

from oba_jax.delta import path_str
from oba_jax.structure.tracer import functional, inner_jaxpr

_LAYERS = (nnx.Conv, nnx.Linear)
_LAYER_OPS = ("conv_general_dilated", "dot_general")
_LOOPS = ("scan", "while", "cond")


class Identity(nnx.Module):
  """What a folded BatchNorm becomes: returns its input, holds no state.

  A plain module, so a folded model splits, merges and checkpoints like any
  other (its state simply lacks the folded BatchNorms' leaves).
  """

  def __call__(self, x, *args, **kwargs):
    del args, kwargs  # BatchNorm's `use_running_average` and `mask`
    return x


def fold_batchnorm(model: nnx.Module, *example_inputs) -> tuple[nnx.Module, dict[str, str]]:
  """A new module with every foldable BatchNorm folded into its conv or dense layer.

  In inference mode the new module computes what `model` computes, up to float
  rounding: in float32 the tests hold `|folded - model| <= 1e-5 * |model| +
  1e-5 * max|model|` elementwise (CIFAR ResNet and VGG, dense, grouped and
  depthwise layers, compacted models). BatchNorms that cannot be folded (see
  the module docstring) are left as they are; the returned mapping says which
  were folded. A layer without a bias gets one (`use_bias=True`).

  Args:
    model: an NNX module with every `nnx.BatchNorm` in inference mode
      (`model.eval()`); left unchanged. Concrete or abstract (`nnx.eval_shape`),
      e.g. to restore a folded checkpoint.
    *example_inputs: inputs of one forward pass (only shapes and dtypes matter).

  Returns:
    `(folded_model, folded)`, where `folded` maps each folded BatchNorm's path
    ('blocks/0/conv1/bn') to the path of the layer it went into.

  Raises:
    ValueError: a BatchNorm is in training mode (folding is an inference
      export; a folded BatchNorm could no longer use batch statistics).
  """
  pairs = foldable_batchnorms(model, *example_inputs)
  graphdef, state = nnx.split(model)
  new = nnx.merge(graphdef, state, copy=True)
  modules = {_path(p): m for p, m in nnx.iter_graph(new)}
  for bn_path, layer_path in pairs.items():
    _fold_into(modules[layer_path], modules[bn_path])
  for bn_path in pairs:
    _replace(new, modules[bn_path])
  return new, pairs


def foldable_batchnorms(model: nnx.Module, *example_inputs) -> dict[str, str]:
  """`{batchnorm path: layer path}` of the pairs `fold_batchnorm` folds; see there."""
  training = [_path(p) for p, m in nnx.iter_graph(model)
              if isinstance(m, nnx.BatchNorm) and m.use_running_average is not True]
  if training:
    raise ValueError(f"{len(training)} BatchNorm(s) {training[:3]}{' ...' * (len(training) > 3)} "
                     "not in inference mode (use_running_average is not True); fold_batchnorm "
                     "folds the running statistics of an inference export: call model.eval() "
                     "first.")
  if not example_inputs:
    raise ValueError("fold_batchnorm needs example inputs to trace the model: "
                     "fold_batchnorm(model, x).")
  owner = {}  # module path -> module, for the exact types that can fold
  for p, m in nnx.iter_graph(model):
    if type(m) in (*_LAYERS, nnx.BatchNorm):
      owner[_path(p)] = m
  if not any(isinstance(m, nnx.BatchNorm) for m in owner.values()):
    return {}
  flow = _Dataflow(model, example_inputs, owner)
  pairs = {}
  for bn_path, bn in owner.items():
    chain = flow.chains.get(bn_path)
    if not isinstance(bn, nnx.BatchNorm) or chain is None:
      continue
    source = flow.producer.get(chain.start)
    if (source is None or not isinstance(owner[source], _LAYERS)
        or flow.consumers[chain.start] != 1
        or chain.ops != ["sub", "mul"] + ["add"] * (bn.bias is not None)
        or not _last_axis(bn, chain.start.aval.ndim)
        or chain.start.aval.shape[-1] != owner[source].kernel.shape[-1]):
      continue
    layer, bias = flow.chains[source], owner[source].bias is not None
    if layer.ops[0] in _LAYER_OPS and layer.ops[1:] == ["add"] * bias:
      pairs[bn_path] = source
  return pairs


@dataclasses.dataclass
class _Chain:
  """The equations in which one module's parameters meet the activations, in order."""

  start: jcore.Var  # the activation the first equation reads
  end: jcore.Var  # the last equation's result
  ops: list[str]


class _Dataflow:
  """Which variables carry data, which modules' parameters reach them, and who reads them.

  `chains[module]` is the module's chain, absent when its parameters meet the
  data anywhere else; `producer[var]` the module whose chain ends in `var`;
  `consumers[var]` how many live equations (and outputs) read `var`.
  """

  def __init__(self, model: nnx.Module, inputs: Sequence, owner: dict):
    fn, params, state = functional(model, None)
    closed = jax.make_jaxpr(lambda p, s, *x: fn(p, s, *x)[0])(params, state, *inputs)
    paths = [path_str(p) for tree in (params, state)
             for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    jaxpr = closed.jaxpr
    modules = {}  # leaf variable -> owning module path
    for var, path in zip(jaxpr.invars, paths):
      parent = path.rpartition("/")[0]
      if parent in owner:
        modules[var] = parent
    data = set(jaxpr.invars[len(paths):])
    ops = _live(_flatten(jaxpr, {}), jaxpr.outvars)

    reaches = {var: frozenset([m]) for var, m in modules.items()}  # var -> modules
    self.consumers = collections.Counter(v for v in jaxpr.outvars if _is_var(v))
    steps, broken = collections.defaultdict(list), set()
    for name, ins, outs in ops:
      ins = list(dict.fromkeys(v for v in ins if _is_var(v)))  # distinct variables, in order
      self.consumers.update(ins)
      found = frozenset().union(*(reaches.get(v, ()) for v in ins))
      for v in outs:
        reaches[v] = found
      activations = [v for v in ins if v in data]
      if not activations:
        continue
      data.update(outs)
      weights = frozenset().union(*(reaches.get(v, ()) for v in ins if v not in data))
      if (len(activations) == 1 and len(weights) == 1 and len(outs) == 1
          and name not in _LOOPS):
        steps[next(iter(weights))].append((name, activations[0], outs[0]))
      else:
        broken |= weights
    for v in jaxpr.outvars:  # parameters returned as they are must stay as they are
      if _is_var(v) and v not in data:
        broken |= reaches.get(v, frozenset())
    self.chains, self.producer = {}, {}
    for module, links in steps.items():
      joined = all(b[1] == a[2] and self.consumers[a[2]] == 1 for a, b in zip(links, links[1:]))
      if module not in broken and joined:
        self.chains[module] = _Chain(links[0][1], links[-1][2], [n for n, _, _ in links])
        self.producer[links[-1][2]] = module


def _is_var(v) -> bool:
  return not isinstance(v, jcore.Literal)


def _flatten(jaxpr, env: dict) -> list[tuple[str, list, list]]:
  """(primitive, inputs, outputs) of every equation, with calls inlined.

  `env` maps a call body's variables to the caller's; literals stay literals.
  """
  ops = []
  read = lambda v: env.get(v, v) if _is_var(v) else v
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    inner = None if eqn.primitive.name in _LOOPS else inner_jaxpr(eqn)
    if inner is None or len(inner.invars) != len(ins):
      ops.append((eqn.primitive.name, ins, list(eqn.outvars)))
      continue
    body_env = {v: x for v, x in zip(inner.invars, ins) if _is_var(x)}
    ops += _flatten(inner, body_env)
    for v, result in zip(eqn.outvars, inner.outvars):
      env[v] = body_env.get(result, result) if _is_var(result) else result
  return ops


def _live(ops: list, outvars) -> list:
  """The operations that contribute to the outputs."""
  needed = {v for v in outvars if _is_var(v)}
  live = []
  for op in reversed(ops):
    if any(v in needed for v in op[2]):
      live.append(op)
      needed.update(v for v in op[1] if _is_var(v))
  return live[::-1]


def _last_axis(bn: nnx.BatchNorm, ndim: int) -> bool:
  axes = bn.axis if isinstance(bn.axis, (tuple, list)) else (bn.axis,)
  return len(axes) == 1 and axes[0] % ndim == ndim - 1


def _path(path) -> str:
  return "/".join(map(str, path))


def _fold_into(layer, bn: nnx.BatchNorm) -> None:
  """Gives `layer` the kernel and bias of `layer` followed by `bn` (shapes only if abstract)."""
  optional = lambda v: None if v is None else v.get_value()
  values = (layer.kernel.get_value(), optional(layer.bias), bn.mean.get_value(),
            bn.var.get_value(), optional(bn.scale), optional(bn.bias))

  def folded(kernel, bias, mean, var, scale, beta):
    s = jax.lax.rsqrt(var + bn.epsilon)
    s = s if scale is None else s * scale
    new_bias = ((0.0 if bias is None else bias) - mean) * s
    new_bias = new_bias if beta is None else new_bias + beta
    return (kernel * s).astype(kernel.dtype), new_bias.astype(kernel.dtype)

  abstract = any(isinstance(v, jax.ShapeDtypeStruct) for v in values)
  kernel, bias = (jax.eval_shape if abstract else lambda f, *a: f(*a))(folded, *values)
  layer.kernel.set_value(kernel)
  if layer.bias is None:
    layer.bias = nnx.Param(bias)
    layer.use_bias = True
  else:
    layer.bias.set_value(bias)


def _replace(model: nnx.Module, old: nnx.Module) -> None:
  """Puts an `Identity` wherever the graph of `model` references `old`."""
  while True:
    path = next((p for p, m in nnx.iter_graph(model) if m is old), None)
    if path is None:
      return
    parent = model
    for key in path[:-1]:
      parent = getattr(parent, key) if isinstance(key, str) else parent[key]
    if isinstance(path[-1], str):
      setattr(parent, path[-1], Identity())
    else:
      parent[path[-1]] = Identity()

