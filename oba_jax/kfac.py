"""Kronecker-factored (K-FAC) Fisher blocks of the dense and conv layers of a model.

The K-FAC baselines of the OBA paper (Kron-OBD, Kron-OBS; Wang et al. 2019,
"EigenDamage") approximate the true Fisher of a softmax classifier by one block
per layer, F̂ = A ⊗ G, with

    A = E[a aᵀ]   a: the layer's input (a conv's im2col patch), one row per
                  example and output position, with a trailing 1 when a bias is
                  added to the layer's output (homogeneous coordinates);
    G = E_n[Σ_t g_t g_tᵀ]   g_t = ∂ log p(ŷ | x_n) / ∂y_t, the gradient of the
                  log-likelihood of a label ŷ sampled from the model, at the
                  layer's (pre-activation) output y, summed over positions t.

A is the mean over examples × positions, G the mean over examples of the sum
over positions, so A ⊗ G = Σ_t E[a aᵀ] ⊗ E[g gᵀ] (means over positions) is
KFC's |T|·Ω ⊗ Γ (Grosse & Martens 2016) and the Fisher is that of the *mean*
loss over examples, as in `curvature.fisher_diagonal`. For one example and one
position A ⊗ G is the exact Fisher block of the layer's kernel (and bias); for
several it is K-FAC's approximation E[a aᵀ ⊗ g gᵀ] ≈ E[a aᵀ] ⊗ E[g gᵀ]. The
matrix of a kernel is W[j, k], j its input axes (conv: input channel, then
filter positions, the order of `lax.conv_general_dilated_patches`) and k its
output axes; its vec is row-major, so F̂ = kron(A, G).

How layers are found: the jaxpr of `model_fn(params, batch)` is walked (calls
such as `jit` and einsum's `pjit` are entered). A *layer* is a `dot_general` or
a `conv_general_dilated` of a parameter leaf, seen as it is or through casts and
transposes, with an operand that depends on the batch. Its *bias* is a 1-D
parameter leaf, reshaped or broadcast along the output-feature axis, that an
`add` adds to the layer's output. The model is then re-evaluated with a zero
probe added to every layer output and its inputs captured: the vjp with respect
to the probes, pulled back from the sampled labels' cotangent onehot(ŷ) -
softmax, gives every layer's output gradients in one backward pass, without
weight gradients. No module names, no per-layer-type code.

Conventions and limits:
- The output gradients of a whole batch come from one backward pass of
  Σ_n log p(ŷ_n | x_n), so the examples must not interact: normalise with fixed
  statistics (`model.eval()`). With batch-statistics BatchNorm each row mixes
  examples, as in PyTorch K-FAC hooks, and G is not a per-example Fisher.
- `model_fn` returns logits [examples, ..., classes]; one label is sampled per
  row (`num_samples` per row), the examples are the leading axis.
- Parameters that are not kernels of such layers (normalisation scales, biases
  not added to a layer's output, embeddings used by `gather`) get no block:
  their K-FAC scores are 0. So does a kernel reshaped, reversed (as
  `lax.conv_transpose` does) or sliced before its product, and a bias of a
  kernel with several output axes (an attention projection's [heads, head_dim]).
- A leaf used by several layers (weight sharing) gets one block per use; its
  scores are the sum over uses (the cross-use blocks are ignored).
- Grouped or depthwise convolutions, kernels with `dot_general` batch axes and
  layers inside `scan`, `while` or `cond` raise NotImplementedError.
- Memory: din² + dout² per layer (dout = the product of the kernel's output
  axes; a language model's vocabulary head would need vocab² floats).

Why our own factors: PyPI's `kfac-jax` 0.0.8 (the newest offered here) needs
`distrax` and `dm-tree`, which are not installed, reaches into `jax.core`
internals that jax 0.10 deprecates, and needs the loss registered by hand inside
the model. The factors take a page of code with the jaxpr walk below.

This module imports nothing from oba_jax but `delta` (for leaf paths) and `jaxpr_calls`.
"""

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from oba_jax.delta import path_str
from oba_jax.jaxpr_calls import CUSTOM_JVP, INLINED, call_body

PyTree = Any
ModelFn = Callable[[PyTree, PyTree], jax.Array]

LAYERS = ("dot_general", "conv_general_dilated")
KERNEL_VIEWS = ("convert_element_type", "copy", "copy_p", "transpose")  # keep entries apart
BIAS_VIEWS = ("convert_element_type", "copy", "copy_p", "reshape", "broadcast_in_dim")
HIGHEST = jax.lax.Precision.HIGHEST  # factors in full float32 (no TF32 on GPUs)


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


class Factors(NamedTuple):
  """The K-FAC block A ⊗ G of one layer (module docstring); A has a bias row last."""

  layer: Layer
  A: jax.Array  # [din (+1 with a bias), din (+1)]
  G: jax.Array  # [dout, dout]


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


def _walker(model_fn: ModelFn, params: PyTree, batch: PyTree) -> Callable:
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


def _discover(run: Callable) -> _Walk:
  """The walk without probes, traced only (no values computed): the layers and their outputs."""
  found = []

  def trace():
    found.append(run(None)[1])
    return ()

  jax.eval_shape(trace)
  return found[0]


def find_layers(model_fn: ModelFn, params: PyTree, batch: PyTree) -> tuple[Layer, ...]:
  """The dense and conv layers of `model_fn(params, batch)`, in evaluation order."""
  return tuple(_discover(_walker(model_fn, params, batch)).layers)


def factors(model_fn: ModelFn, params: PyTree, batch: PyTree, key: jax.Array,
            num_samples: int = 1) -> tuple[Factors, ...]:
  """The K-FAC factors A, G of every layer (module docstring), labels sampled from the model.

  `num_samples` labels per row of the logits; G averages over them. Costs about
  one forward and one backward pass without weight gradients, plus the factors'
  products (a conv's A is about din/dout times its forward pass).
  """
  if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
    raise ValueError(f"num_samples={num_samples!r} is not an integer >= 1.")
  run = _walker(model_fn, params, batch)
  found = _discover(run)
  layers, avals = found.layers, found.out_avals
  if not layers:
    return ()

  def probed(probes):
    outs, walk = run(probes)
    return outs[0], walk.inputs

  zeros = [jnp.zeros(a.shape, a.dtype) for a in avals]
  logits, pull, inputs = jax.vjp(probed, zeros, has_aux=True)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))
  labels = jax.random.categorical(key, log_probs, shape=(num_samples,) + log_probs.shape[:-1])
  # ∂ log p(ŷ)/∂logits = onehot(ŷ) - softmax(logits), for every row at once.
  cotangents = jax.nn.one_hot(labels, logits.shape[-1], dtype=log_probs.dtype) - jnp.exp(log_probs)
  grads = jax.vmap(lambda c: pull(c.astype(logits.dtype))[0])(cotangents)
  examples = logits.shape[0]
  return tuple(
      Factors(layer, _input_factor(layer, x),
              _output_factor(layer, g) / (examples * num_samples))
      for layer, x, g in zip(layers, inputs, grads))


def _input_factor(layer: Layer, x: jax.Array) -> jax.Array:
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  if layer.patches is not None:
    filter_shape, strides, padding, lhs_dil, rhs_dil, dn = layer.patches
    x = jax.lax.conv_general_dilated_patches(x, filter_shape, strides, padding, lhs_dil,
                                             rhs_dil, dn, precision=HIGHEST)
  rows = jnp.transpose(x, layer.input_perm)
  features = 1 if layer.patches is not None else layer.num_inputs  # trailing axes
  rows = rows.reshape(-1, math.prod(rows.shape[rows.ndim - features:]))
  if layer.bias is not None:
    rows = jnp.concatenate([rows, jnp.ones_like(rows[:, :1])], axis=1)
  return jnp.matmul(rows.T, rows, precision=HIGHEST) / rows.shape[0]


def _output_factor(layer: Layer, g: jax.Array) -> jax.Array:
  """Σ over samples and rows of g gᵀ; g has a leading sample axis."""
  g = g.astype(jnp.promote_types(g.dtype, jnp.float32))
  g = jnp.transpose(g, (0,) + tuple(a + 1 for a in layer.output_perm))
  outputs = len(layer.kernel_axes) - layer.num_inputs
  rows = g.reshape(-1, math.prod(g.shape[g.ndim - outputs:]))
  return jnp.matmul(rows.T, rows, precision=HIGHEST)


# --- matrices of kernels, and back ---------------------------------------------


def to_matrix(layer: Layer, leaves: Sequence[jax.Array]) -> jax.Array:
  """The layer's [din (+1), dout] matrix W (with the bias as its last row) from `leaves`."""
  kernel = leaves[layer.kernel]
  shape = [kernel.shape[a] for a in layer.kernel_axes]
  w = jnp.transpose(kernel, layer.kernel_axes).reshape(
      math.prod(shape[:layer.num_inputs]), math.prod(shape[layer.num_inputs:]))
  if layer.bias is not None:
    w = jnp.concatenate([w, leaves[layer.bias].reshape(1, -1).astype(w.dtype)], axis=0)
  return w


def add_matrix(layer: Layer, leaves: list, matrix: jax.Array) -> None:
  """Adds a [din (+1), dout] matrix of the layer back onto the kernel (and bias) leaves."""
  kernel = leaves[layer.kernel]
  shape = [kernel.shape[a] for a in layer.kernel_axes]
  din = math.prod(shape[:layer.num_inputs])
  part = jnp.transpose(matrix[:din].reshape(shape), np.argsort(layer.kernel_axes))
  leaves[layer.kernel] = leaves[layer.kernel] + part.astype(kernel.dtype)
  if layer.bias is not None:
    bias = leaves[layer.bias]
    leaves[layer.bias] = bias + matrix[din].reshape(bias.shape).astype(bias.dtype)


def _scatter(params: PyTree, blocks) -> PyTree:
  """A pytree like `params`: zeros plus each (layer, matrix) of `blocks` added back."""
  leaves, treedef = jax.tree.flatten(params)
  out = [jnp.zeros_like(x) for x in leaves]
  for layer, matrix in blocks:
    add_matrix(layer, out, matrix)
  return treedef.unflatten(out)


def kron_diagonal(blocks: Sequence[Factors], params: PyTree) -> PyTree:
  """diag(A ⊗ G) arranged like `params`: A_jj G_kk at W[j, k], 0 outside the layers."""
  return _scatter(params, [(f.layer, jnp.outer(jnp.diag(f.A), jnp.diag(f.G))) for f in blocks])


def damped(matrix: jax.Array, damping: float) -> jax.Array:
  """M + damping · (mean eigenvalue of M) · I, floored at the smallest normal float."""
  n = matrix.shape[0]
  gamma = jnp.maximum(damping * jnp.trace(matrix) / n, jnp.finfo(matrix.dtype).tiny)
  return matrix + gamma * jnp.eye(n, dtype=matrix.dtype)


def inverse_diagonal(matrix: jax.Array) -> jax.Array:
  """diag(M⁻¹) of a symmetric positive-definite M, by Cholesky: Σ_i (L⁻¹)_ic²."""
  chol = jnp.linalg.cholesky(matrix)
  inv = jax.scipy.linalg.solve_triangular(chol, jnp.eye(matrix.shape[0], dtype=matrix.dtype),
                                          lower=True)
  return jnp.sum(inv * inv, axis=0)


def unit_obs_product(blocks: Sequence[Factors], delta: PyTree, damping: float) -> PyTree:
  """C δ arranged like `delta`, with C the OBS curvature of each output unit (column c):

  C_c = A_d / [G_d⁻¹]_cc, A_d and G_d the damped factors (`damped`), so that
  ½ δ_cᵀ C_c δ_c = ½ δ_cᵀ (P F̂_d⁻¹ Pᵀ)⁻¹ δ_c is the OBS saliency of moving unit
  c by δ_c (P: its entries) while the layer's other units compensate.
  """
  leaves = jax.tree.leaves(delta)
  out = []
  for f in blocks:
    a_d, g_d = damped(f.A, damping), damped(f.G, damping)
    w = to_matrix(f.layer, leaves).astype(a_d.dtype)
    out.append((f.layer, jnp.matmul(a_d, w, precision=HIGHEST) / inverse_diagonal(g_d)))
  return _scatter(delta, out)
