"""Which dense and conv layers a model has: found in the jaxpr of `model_fn(params, batch)`.

The jaxpr is walked (calls such as `jit` and einsum's `pjit` are entered). A
*layer* is a `dot_general` or a `conv_general_dilated` of a parameter leaf, seen as
it is or through casts and transposes, with an operand that depends on the batch.
Its *bias* is a 1-D parameter leaf, reshaped or broadcast along the
output-feature axis, that an `add` adds to the layer's output. No module names,
no per-layer-type code. `walker` re-evaluates the model with a probe added to
every layer output and the layers' inputs captured, which is what K-FAC
differentiates.

This is the layer discovery of the K-FAC baselines (`oba_jax.kfac` computes the
factors from what it finds). It imports nothing from oba_jax but `delta` (for leaf
paths) and `jaxpr_calls`.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from oba_jax.delta import path_str
from oba_jax.jaxpr_calls import CUSTOM_JVP, INLINED, call_body

PyTree = Any
ModelFn = Callable[[PyTree, PyTree], jax.Array]

LAYERS = ("dot_general", "conv_general_dilated")
KERNEL_VIEWS = ("convert_element_type", "copy", "copy_p", "transpose")  # keep entries apart
BIAS_VIEWS = ("convert_element_type", "copy", "copy_p", "reshape", "broadcast_in_dim")


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Layer:
  """One use of a parameter leaf as the kernel of a dense or conv layer (static).

  Attributes:
    path: the kernel leaf's path, e.g. 'conv1/kernel'.
    kernel: the kernel's index among `jax.tree.leaves(params)`.
    bias: the index of the bias leaf added to the layer's output, or None.
    primitive: "dot_general" or "conv_general_dilated".
    kernel_axes: the kernel's axes in matrix order: input axes, then output axes.
    num_inputs: how many of `kernel_axes` are input axes.
    input_perm: the axes of the input (conv: of its patches) as rows, then features.
    output_perm: the axes of the output as rows, then features.
    patches: a conv's `conv_general_dilated_patches` arguments, else None.
  """

  path: str
  kernel: int
  bias: int | None
  primitive: str
  kernel_axes: tuple[int, ...]
  num_inputs: int
  input_perm: tuple[int, ...]
  output_perm: tuple[int, ...]
  patches: tuple | None = None


class _View(NamedTuple):
  """A parameter leaf seen through casts and transposes: value axis i is leaf axis axes[i]."""

  leaf: int
  axes: tuple[int, ...]


class _Bias(NamedTuple):
  """A 1-D parameter leaf laid along one axis of a value, constant along the others."""

  leaf: int
  axis: int


class _Tag(NamedTuple):
  data: bool = False  # depends on the batch
  view: _View | _Bias | None = None
  layer: int | None = None  # the output of this layer


_NONE = _Tag()


class _Walk:
  """The state of one walk: layers found so far, probes to add, inputs captured."""

  def __init__(self, paths: Sequence[str], probes: Sequence[jax.Array] | None):
    self.paths, self.probes = paths, probes
    self.layers: list[Layer] = []
    self.out_avals: list = []
    self.inputs: list[jax.Array] = []




def _has_layers(jaxpr) -> bool:
  return any(e.primitive.name in LAYERS or any(_has_layers(getattr(j, "jaxpr", j))
                                               for j in jcore.jaxprs_in_params(e.params))
             for e in jaxpr.eqns)


def _bind(eqn, values) -> list:
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(eqn.params))
  return list(out) if eqn.primitive.multiple_results else [out]


def _walk(jaxpr, consts, args, tags, walk: _Walk) -> tuple[list, list]:
  env = dict(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  tag_env = dict(zip(jaxpr.invars, tags))
  read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]
  read_tag = lambda v: _NONE if isinstance(v, jcore.Literal) else tag_env.get(v, _NONE)
  for eqn in jaxpr.eqns:
    values, in_tags = [read(v) for v in eqn.invars], [read_tag(v) for v in eqn.invars]
    name = eqn.primitive.name
    kernel_in = any(isinstance(t.view, _View) for t in in_tags)
    if name in INLINED or (name == CUSTOM_JVP and kernel_in and _has_layers(call_body(eqn)[0])):
      body, body_consts = call_body(eqn)
      outs, out_tags = _walk(body, body_consts, values, in_tags, walk)
    elif name in LAYERS and _layer_operands(in_tags) is not None:
      outs, out_tags = _apply_layer(eqn, values, in_tags, walk)
    else:
      if kernel_in and name != CUSTOM_JVP and any(
          _has_layers(getattr(j, "jaxpr", j)) for j in jcore.jaxprs_in_params(eqn.params)):
        raise NotImplementedError(
            f"K-FAC cannot look inside `{name}`, which holds a dense or conv layer of a parameter "
            "(e.g. nnx.scan over layers); unroll it into a Python loop.")
      outs = _bind(eqn, values)
      data = any(t.data for t in in_tags)
      out_tags = [_Tag(data, _view_of(eqn, in_tags)) for _ in outs]
      if name in ("add", "add_any"):
        _match_bias(eqn, in_tags, walk)
    env.update(zip(eqn.outvars, outs))
    tag_env.update(zip(eqn.outvars, out_tags))
  return [read(v) for v in jaxpr.outvars], [read_tag(v) for v in jaxpr.outvars]


def _view_of(eqn, in_tags) -> _View | _Bias | None:
  """The parameter view an equation's output is, if it is one (casts, transposes, reshapes)."""
  if len(in_tags) != 1 or in_tags[0].data or in_tags[0].view is None:
    return None
  view, name = in_tags[0].view, eqn.primitive.name
  in_shape, out_shape = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
  if isinstance(view, _View) and len(view.axes) == 1:
    view = _Bias(view.leaf, 0)
  if isinstance(view, _View):
    if name == "transpose":
      return _View(view.leaf, tuple(view.axes[p] for p in eqn.params["permutation"]))
    return view if name in KERNEL_VIEWS else None
  if name not in BIAS_VIEWS:
    return None
  if name == "broadcast_in_dim":
    return _Bias(view.leaf, eqn.params["broadcast_dimensions"][view.axis])
  if name == "reshape":
    if any(s != 1 for i, s in enumerate(in_shape) if i != view.axis):
      return None
    long = [i for i, s in enumerate(out_shape) if s != 1]
    if len(long) != 1 or out_shape[long[0]] != in_shape[view.axis]:
      return None
    return _Bias(view.leaf, long[0])
  return view


def _layer_operands(in_tags) -> tuple[int, int] | None:
  """(kernel operand, input operand) of a dense/conv equation, or None if it is no layer."""
  if len(in_tags) != 2:
    return None
  for k in (1, 0):
    kernel, x = in_tags[k], in_tags[1 - k]
    if isinstance(kernel.view, _View) and not kernel.data and x.data:
      return k, 1 - k
  return None


def _apply_layer(eqn, values, in_tags, walk: _Walk):
  k, i = _layer_operands(in_tags)
  view = in_tags[k].view
  path = walk.paths[view.leaf]
  layer = (_dense_layer if eqn.primitive.name == "dot_general" else _conv_layer)(
      eqn, k, view, path)
  index = len(walk.layers)
  walk.layers.append(layer)
  walk.out_avals.append(eqn.outvars[0].aval)
  walk.inputs.append(values[i])
  (y,) = _bind(eqn, values)
  if walk.probes is not None:
    y = y + walk.probes[index].astype(y.dtype)
  return [y], [_Tag(True, None, index)]


def _dense_layer(eqn, k: int, view: _View, path: str) -> Layer:
  (contract, batch) = eqn.params["dimension_numbers"]
  if batch[0] or batch[1]:
    raise NotImplementedError(
        f"K-FAC: parameter '{path}' is used in a dot_general with batch dimensions {batch}; "
        "accepted: a kernel contracted with the input, with no batch dimensions.")
  kc, xc = contract[k], contract[1 - k]
  k_ndim = len(eqn.invars[k].aval.shape)
  x_ndim = len(eqn.invars[1 - k].aval.shape)
  kf = [d for d in range(k_ndim) if d not in kc]
  xf = [d for d in range(x_ndim) if d not in xc]
  # dot_general's output: lhs free axes, then rhs free axes.
  if k == 1:
    out_perm = tuple(range(len(xf) + len(kf)))
  else:
    out_perm = tuple(range(len(kf), len(kf) + len(xf))) + tuple(range(len(kf)))
  return Layer(path, view.leaf, None, "dot_general",
               tuple(view.axes[d] for d in list(kc) + kf), len(kc),
               tuple(xf) + tuple(xc), out_perm)


def _conv_layer(eqn, k: int, view: _View, path: str) -> Layer:
  p = eqn.params
  if k != 1:
    raise NotImplementedError(f"K-FAC: parameter '{path}' is the lhs of a convolution; "
                              "accepted: the kernel as the rhs (filter).")
  if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
    raise NotImplementedError(
        f"K-FAC: '{path}' is a grouped convolution (feature_group_count="
        f"{p['feature_group_count']}, batch_group_count={p['batch_group_count']}); accepted: 1.")
  dn = p["dimension_numbers"]
  lhs_spec, rhs_spec, out_spec = dn
  kernel_shape = eqn.invars[1].aval.shape
  filter_shape = tuple(kernel_shape[d] for d in rhs_spec[2:])
  rows_last = tuple((out_spec[0], *out_spec[2:], out_spec[1]))
  patches = (filter_shape, tuple(p["window_strides"]), tuple(map(tuple, p["padding"])),
             tuple(p["lhs_dilation"]), tuple(p["rhs_dilation"]), dn)
  axes = tuple(view.axes[d] for d in (rhs_spec[1], *rhs_spec[2:], rhs_spec[0]))
  return Layer(path, view.leaf, None, "conv_general_dilated", axes, len(axes) - 1,
               rows_last, rows_last, patches)


def _match_bias(eqn, in_tags, walk: _Walk) -> None:
  """Records a bias when `eqn` adds a 1-D parameter along a layer output's feature axis."""
  for a, b in ((0, 1), (1, 0)):
    out, bias = in_tags[a], in_tags[b]
    if isinstance(bias.view, _View) and len(bias.view.axes) == 1:
      bias = bias._replace(view=_Bias(bias.view.leaf, 0))
    if out.layer is None or not isinstance(bias.view, _Bias) or bias.data:
      continue
    layer = walk.layers[out.layer]
    shape = eqn.invars[a].aval.shape
    outputs = len(layer.kernel_axes) - layer.num_inputs
    axis = bias.view.axis
    if (layer.bias is None and shape == eqn.outvars[0].aval.shape
        and layer.output_perm[len(layer.output_perm) - outputs:] == (axis,)
        and eqn.invars[b].aval.shape[axis] == shape[axis]):
      walk.layers[out.layer] = dataclasses.replace(layer, bias=bias.view.leaf)


def walker(model_fn: ModelFn, params: PyTree, batch: PyTree) -> Callable:
  """`run(probes) -> (outputs, walk)`: the model re-evaluated with probes on its layers."""
  closed = jax.make_jaxpr(model_fn)(params, batch)
  outs = [v.aval for v in closed.jaxpr.outvars]
  if len(outs) != 1 or len(outs[0].shape) < 2 or not jnp.issubdtype(outs[0].dtype, jnp.inexact):
    raise TypeError("model_fn(params, batch) must return one array of logits [examples, ..., "
                    f"classes], got {', '.join(o.str_short() for o in outs) or 'nothing'}.")
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  paths = [path_str(p) for p, _ in flat]
  leaves = [x for _, x in flat]
  batch_leaves = jax.tree.leaves(batch)
  tags = ([_Tag(False, _View(i, tuple(range(jnp.ndim(x)))))
           if jnp.issubdtype(jnp.result_type(x), jnp.inexact) else _NONE
           for i, x in enumerate(leaves)] + [_Tag(True)] * len(batch_leaves))

  def run(probes):
    walk = _Walk(paths, probes)
    outs, _ = _walk(closed.jaxpr, closed.consts, leaves + batch_leaves, tags, walk)
    return outs, walk

  return run


def discover(run: Callable) -> _Walk:
  """The walk without probes, traced only (no values computed): the layers and their outputs."""
  found = []

  def trace():
    found.append(run(None)[1])
    return ()

  jax.eval_shape(trace)
  return found[0]


def find_layers(model_fn: ModelFn, params: PyTree, batch: PyTree) -> tuple[Layer, ...]:
  """The dense and conv layers of `model_fn(params, batch)`, in evaluation order."""
  return tuple(discover(walker(model_fn, params, batch)).layers)
