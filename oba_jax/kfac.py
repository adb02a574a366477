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

Layers are found in the jaxpr, with no module names and no per-layer-type code
(`oba_jax.kfac_layers`): a dense or conv product of a parameter leaf, and the
bias added to its output. The model is re-evaluated with a zero probe added to
every layer output and its inputs captured: the vjp with respect to the probes,
pulled back from the sampled labels' cotangent onehot(ŷ) - softmax, gives every
layer's output gradients in one backward pass, without weight gradients.

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
the model. The factors take a page of code with the jaxpr walk of `kfac_layers`.

This module imports nothing from oba_jax but `kfac_layers`.
"""

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from oba_jax.kfac_layers import (BIAS_VIEWS, KERNEL_VIEWS, LAYERS, Layer,  # noqa: F401
                                 ModelFn, discover, find_layers, walker)

PyTree = Any

HIGHEST = jax.lax.Precision.HIGHEST  # factors in full float32 (no TF32 on GPUs)


class Factors(NamedTuple):
  """The K-FAC block A ⊗ G of one layer (module docstring); A has a bias row last."""

  layer: Layer
  A: jax.Array  # [din (+1 with a bias), din (+1)]
  G: jax.Array  # [dout, dout]


def factors(model_fn: ModelFn, params: PyTree, batch: PyTree, key: jax.Array,
            num_samples: int = 1) -> tuple[Factors, ...]:
  """The K-FAC factors A, G of every layer (module docstring), labels sampled from the model.

  `num_samples` labels per row of the logits; G averages over them. Costs about
  one forward and one backward pass without weight gradients, plus the factors'
  products (a conv's A is about din/dout times its forward pass).
  """
  if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
    raise ValueError(f"num_samples={num_samples!r} is not an integer >= 1.")
  run = walker(model_fn, params, batch)
  found = discover(run)
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
