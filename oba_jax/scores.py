"""Per-parameter importance scores: predicted loss changes of a pruning step.

Every criterion returns a pytree like `params`. Entry i is parameter i's signed
contribution to the predicted change of the loss when the parameters move by
`delta` (by default `-params` on conv/dense kernels and biases, see
`oba_jax.delta`), so that summing all entries gives the prediction itself:

    sum(oba(..., first_order=True)) = gᵀδ + ½ δᵀCδ   ≈   L(θ + δ) - L(θ).

Absolute values, normalisers and per-channel sums belong to the reduction step
(`oba_jax.structure`), not to the scores.

Relation to the paper's code (NEU-REAL/OBA):
- `oba(curvature="hessian")` is the exact HVP element δᵢ(Hδ)ᵢ/2 with the full
  Hessian. The official code calls this "FastOBA" (order 2).
- `oba(curvature="bilinear")` is δᵢ(H_bil δ)ᵢ/2, the quantity the official "OBA"
  score computes, in every BatchNorm mode: only the second-order terms of the
  network's products (weight × activation, attention's activation × activation),
  with the output gradients held fixed and every other operation to first order
  (`oba_jax.bilinear`), without the official code's implementation defects. The
  official pipeline scores with BatchNorm in training mode (batch statistics).
- `oba(curvature="residual")` is δᵢ((H - GGN)δ)ᵢ/2. It equals "bilinear" on
  networks whose nonlinearities are piecewise linear and whose normalisation
  uses fixed statistics (ReLU nets, BatchNorm in inference mode), and only
  there. With batch-statistics BatchNorm a conv's own residual terms vanish up
  to BatchNorm's ε (scale invariance, exact mathematics, float64 included),
  while the official score stays of order one.
- `taylor(order=k)` is the k-th Taylor term attributed per parameter; the
  official FastOBA drops the 1/k!, which only rescales scores of one order.
The official scores use δ = +θ and no ½; for second-order scores that changes
neither ranking nor sign, and for first-order terms our sign is the true one.

The K-FAC baselines (`kron_obd`, `kron_obs`; factors in `oba_jax.kfac`) replace
the curvature by a Kronecker-factored Fisher per layer. Kron-OBD's entries sum
to ½ Σᵢ δᵢ² F̂ᵢᵢ; Kron-OBS's entries of one output unit sum to that unit's OBS
saliency, so its total is the sum of the units' saliencies, each removed alone.

All functions are pure and jit-able. Called outside `jax.jit` they also check
that the scores are finite.
"""

import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from oba_jax import kfac
from oba_jax.curvature import (bilinear_vp, fisher_diagonal, ggn_vp, grad_derivative,
                               hutchinson_diagonal, hvp, residual_vp)
from oba_jax.delta import Prunable, prunable_mask, removal_delta, removal_direction
from oba_jax.estimate import accumulate
from oba_jax.validate import check_choice, check_score_inputs, check_scores

PyTree = Any

CURVATURES = ("hessian", "ggn", "residual")  # the exact split: "hessian" = "ggn" + "residual"
OBA_CURVATURES = CURVATURES + ("bilinear",)  # every curvature `oba` accepts
DIAGONALS = ("hutchinson", "fisher")
MAX_TAYLOR_ORDER = 4

__all__ = ["oba", "taylor", "obd", "kron_obd", "kron_obs", "magnitude", "random", "accumulate",
           "CURVATURES", "OBA_CURVATURES"]


def oba(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    batch: PyTree,
    *,
    delta: PyTree | None = None,
    prunable: Prunable | None = None,
    curvature: str = "hessian",
    first_order: bool = False,
    model_fn: Callable[[PyTree, PyTree], PyTree] | None = None,
    output_loss_fn: Callable[[PyTree, PyTree], jax.Array] | None = None,
) -> PyTree:
  """Optimal Brain Apoptosis: δᵢ (C δ)ᵢ / 2 per parameter, with exact products.

  Args:
    loss_fn: `loss_fn(params, batch) -> scalar`.
    params: any pytree of arrays.
    batch: any pytree, passed through to the functions.
    delta: the perturbation; default `-params` on prunable leaves, differentiated
      along symbolically (`oba_jax.removal_jvp`: about 2.0 gradients of arithmetic
      instead of 2.7). A `oba_jax.delta.Removal` is that default for another mask.
    prunable: which entries `delta` moves (see `oba_jax.delta.removal_delta`).
    curvature: "hessian" (C = H, one jvp over grad), "ggn" (C = Jᵀ H_out J),
      "residual" (C = H - GGN) or "bilinear" (C = H_bil, the official code's
      product terms; from `loss_fn` alone). "hessian" = "ggn" + "residual".
    first_order: also add the gradient term gᵢ δᵢ.
    model_fn: `model_fn(params, batch) -> outputs`; needed for "ggn" and "residual"
      (ignored by "hessian" and "bilinear").
    output_loss_fn: `output_loss_fn(outputs, batch) -> scalar` with
      `loss_fn(p, b) == output_loss_fn(model_fn(p, b), b)`; needed with `model_fn`.

  Returns:
    A pytree like `params`; its sum is the Taylor prediction of L(θ + δ) - L(θ).
  """
  check_choice("curvature", curvature, OBA_CURVATURES)
  direction = removal_direction(params, delta, prunable)
  delta = removal_delta(params, delta, prunable)
  check_score_inputs(loss_fn, params, batch)
  if curvature == "hessian":
    grad, c_delta = hvp(loss_fn, params, batch, direction)
  elif curvature == "bilinear":
    grad, c_delta = bilinear_vp(loss_fn, params, batch, direction)
  else:
    if model_fn is None or output_loss_fn is None:
      raise ValueError(
          f"curvature={curvature!r} needs model_fn(params, batch) -> outputs and "
          "output_loss_fn(outputs, batch) -> scalar; got "
          f"model_fn={model_fn!r}, output_loss_fn={output_loss_fn!r}."
      )
    product = ggn_vp if curvature == "ggn" else residual_vp
    grad, c_delta = product(model_fn, output_loss_fn, params, batch, direction)
  scores = jax.tree.map(lambda d, cd: d * cd / 2, delta, c_delta)
  if first_order:
    scores = jax.tree.map(lambda s, d, g: s + d * g, scores, delta, grad)
  return check_scores(scores, f"oba(curvature={curvature!r})", batch)


def taylor(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    batch: PyTree,
    *,
    order: int,
    delta: PyTree | None = None,
    prunable: Prunable | None = None,
) -> PyTree:
  """The k-th Taylor term of L(θ + δ) attributed per parameter ("FastOBA").

  Entry i is δᵢ · dᵏ⁻¹/dtᵏ⁻¹ [∂L/∂θᵢ](θ + tδ) / k!, so the entries sum to the k-th
  term (1/k!) dᵏ/dtᵏ L(θ + tδ) of the expansion. order=1 is the first-order
  Taylor score gᵢδᵢ, order=2 equals `oba(curvature="hessian")`. Computed with
  k-1 nested `jax.jvp` over `jax.grad`; the official FastOBA omits the 1/k!.
  """
  if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= MAX_TAYLOR_ORDER:
    raise ValueError(f"order must be an integer in 1..{MAX_TAYLOR_ORDER}, got {order!r}.")
  direction = removal_direction(params, delta, prunable)
  delta = removal_delta(params, delta, prunable)
  check_score_inputs(loss_fn, params, batch)
  derivative = grad_derivative(loss_fn, params, batch, direction, order - 1)
  scale = 1.0 / math.factorial(order)
  scores = jax.tree.map(lambda d, g: d * g * scale, delta, derivative)
  return check_scores(scores, f"taylor(order={order})", batch)


def obd(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    batch: PyTree,
    *,
    key: jax.Array,
    diag: str = "hutchinson",
    num_probes: int = 1,
    probe_batch: int = 1,
    delta: PyTree | None = None,
    prunable: Prunable | None = None,
    model_fn: Callable[[PyTree, PyTree], PyTree] | None = None,
    output_weights: Callable[[PyTree], jax.Array] | None = None,
) -> PyTree:
  """Optimal Brain Damage: δᵢ² Dᵢᵢ / 2 with D a diagonal curvature estimate.

  Args:
    diag: "hutchinson" (unbiased Hessian diagonal from `num_probes` Rademacher
      probes, see `curvature.hutchinson_diagonal`) or "fisher" (the Fisher
      diagonal of a softmax classifier with labels sampled from the model; needs
      `model_fn(params, batch) -> logits`, [batch, classes] or per position
      [batch, ..., classes] with `output_weights(batch) -> [batch, ...]` the
      positions' weights in the loss; `num_probes` labels per softmax).
    key: a PRNG key for the probes or the sampled labels.
  """
  check_choice("diag", diag, DIAGONALS)
  if key is None:
    raise ValueError("obd needs key=jax.random.key(...) for its random probes or labels.")
  delta = removal_delta(params, delta, prunable)
  check_score_inputs(loss_fn, params, batch)
  if diag == "hutchinson":
    diagonal = hutchinson_diagonal(loss_fn, params, batch, key, num_probes, probe_batch)
  else:
    if model_fn is None:
      raise ValueError("diag='fisher' needs model_fn(params, batch) -> logits [batch, classes].")
    diagonal = fisher_diagonal(model_fn, params, batch, key, num_probes, output_weights)
  scores = jax.tree.map(lambda d, h: d * d * h / 2, delta, diagonal)
  return check_scores(scores, f"obd(diag={diag!r})", batch)


def kron_obd(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    batch: PyTree,
    *,
    key: jax.Array,
    model_fn: Callable[[PyTree, PyTree], jax.Array],
    num_samples: int = 1,
    delta: PyTree | None = None,
    prunable: Prunable | None = None,
) -> PyTree:
  """Kron-OBD: δᵢ² F̂ᵢᵢ / 2 with F̂ = A ⊗ G, the K-FAC Fisher of each layer.

  F̂ᵢᵢ = A_jj G_kk for the kernel entry W[j, k] (a bias is the row of a constant
  input 1, A = 1 there); see `oba_jax.kfac` for the factors (true Fisher, labels
  sampled from the model, `num_samples` per example) and for which parameters
  have a block: the others score 0. `model_fn(params, batch) -> logits`;
  `loss_fn` is its softmax cross-entropy, used to check the inputs.
  """
  if key is None:
    raise ValueError("kron_obd needs key=jax.random.key(...) for its sampled labels.")
  delta = removal_delta(params, delta, prunable)
  check_score_inputs(loss_fn, params, batch)
  diagonal = kfac.kron_diagonal(kfac.factors(model_fn, params, batch, key, num_samples), params)
  scores = jax.tree.map(lambda d, h: d * d * h / 2, delta, diagonal)
  return check_scores(scores, "kron_obd", batch)


def kron_obs(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    batch: PyTree,
    *,
    key: jax.Array,
    model_fn: Callable[[PyTree, PyTree], jax.Array],
    damping: float = 1e-3,
    num_samples: int = 1,
    delta: PyTree | None = None,
    prunable: Prunable | None = None,
) -> PyTree:
  """Kron-OBS: the OBS saliency of each output unit under F̂ = A ⊗ G, split over its entries.

  For output unit c of a layer (column c of W, its bias last: a conv's output
  channel, a dense layer's output feature), moving it by δ_c while the layer's
  other units compensate optimally costs (Wang et al. 2019)

      s_c = ½ δ_cᵀ (P F̂⁻¹ Pᵀ)⁻¹ δ_c = ½ δ_cᵀ A δ_c / [G⁻¹]_cc,

  P the selection of the unit's entries, with damped factors A + γ_A I and
  G + γ_G I, γ = `damping` · the factor's mean eigenvalue (π-corrected Tikhonov
  damping of F̂ with λ = damping² · mean eigenvalue of A ⊗ G). Entry (j, c)
  scores δ_jc (A δ_c)_j / (2 [G⁻¹]_cc), so the unit's entries sum to s_c,
  EigenDamage's per-output-channel saliency. A kernel entry scores only as part
  of its output unit: the input-channel slice j of a consumer layer sums input
  j's shares of every output unit's saliency, not a saliency of removing input
  j. The default delta removes every unit; other parameters score 0 (see
  `oba_jax.kfac`).
  """
  if key is None:
    raise ValueError("kron_obs needs key=jax.random.key(...) for its sampled labels.")
  if isinstance(damping, bool) or not isinstance(damping, numbers.Real) or not damping > 0:
    raise ValueError(f"damping={damping!r} is not a positive number; accepted: > 0, e.g. 1e-3.")
  delta = removal_delta(params, delta, prunable)
  check_score_inputs(loss_fn, params, batch)
  blocks = kfac.factors(model_fn, params, batch, key, num_samples)
  product = kfac.unit_obs_product(blocks, delta, damping)
  scores = jax.tree.map(lambda d, cd: d * cd / 2, delta, product)
  return check_scores(scores, "kron_obs", batch)


def magnitude(params: PyTree, *, delta: PyTree | None = None, prunable: Prunable | None = None) -> PyTree:
  """|δᵢ|: the magnitude of what is removed (L1 magnitude pruning)."""
  return jax.tree.map(jnp.abs, removal_delta(params, delta, prunable))


def random(key: jax.Array, params: PyTree, *, prunable: Prunable | None = None) -> PyTree:
  """Uniform [0, 1) scores on prunable entries and 0 elsewhere: the random baseline."""
  leaves, treedef = jax.tree.flatten(params)
  keys = treedef.unflatten(list(jax.random.split(key, len(leaves))))
  return jax.tree.map(
      lambda k, p, m: jnp.where(m, jax.random.uniform(k, jnp.shape(p), jnp.result_type(p)), 0),
      keys, params, prunable_mask(params, prunable),
  )
