"""Exact curvature products and diagonal estimates, as pure functions over pytrees.

Conventions: `loss_fn(params, batch) -> scalar`; for the Gauss-Newton split the
loss is `output_loss_fn(model_fn(params, batch), batch)`, with `model_fn` the
network (outputs, e.g. logits) and `output_loss_fn` the loss of the outputs. Then

    H = Jᵀ H_out J  +  Σ_k (∂ℓ/∂o_k) ∇²o_k  =  GGN  +  residual,

where J = ∂outputs/∂params and H_out = ∇²ℓ(outputs). The residual is the part of
the Hessian that comes from the network's own second derivatives (products of
weights and activations, attention, normalisation and activation curvature);
it is what the official OBA code approximates on ReLU networks.

The official code's own matrix, H_bil (`bilinear_vp`), keeps of the residual
only the curvature of *products* (weight x activation, activation x activation
in attention) and takes every other operation, normalisation included, to first
order; see `oba_jax.bilinear`. On ReLU networks with fixed-statistics
normalisation H_bil = H - GGN.

Every product returns `(gradient, product)`: the gradient comes for free from the
same pass, and under `jax.jit` it is removed when unused.

The direction `v` is a pytree like `params`, or a `oba_jax.delta.Removal` (δ = −θ
on its mask, kept symbolic): along a removal the forward-over-reverse products
reuse the products of the pass itself (`oba_jax.removal_jvp`).

Costs, in units of one gradient: `hvp`, `residual_vp` and `bilinear_vp` are one
forward-over-reverse pass (about 2.7 in arithmetic along an arbitrary direction,
about 2.0 along a `Removal`); `ggn_vp` is one linearisation plus two transposed
passes (about 1.5 to 2).
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from oba_jax.bilinear import first_order_loss
from oba_jax.delta import Removal
from oba_jax.removal_jvp import removal_jvp

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]
ModelFn = Callable[[PyTree, PyTree], PyTree]
OutputLossFn = Callable[[PyTree, PyTree], jax.Array]


def directional_jvp(f: Callable[[PyTree], PyTree], params: PyTree,
                    v: "PyTree | Removal") -> tuple[PyTree, PyTree]:
  """`jax.jvp(f, (params,), (v,))`; along a `Removal`, the same with fewer products."""
  if isinstance(v, Removal):
    return removal_jvp(f, params, v.mask)
  return jax.jvp(f, (params,), (v,))


def hvp(loss_fn: LossFn, params: PyTree, batch: PyTree, v: PyTree) -> tuple[PyTree, PyTree]:
  """(∇L, H v), exact, by `jax.jvp` over `jax.grad` (forward-over-reverse)."""
  return directional_jvp(lambda p: jax.grad(loss_fn)(p, batch), params, v)


def ggn_vp(
    model_fn: ModelFn, output_loss_fn: OutputLossFn, params: PyTree, batch: PyTree, v: PyTree
) -> tuple[PyTree, PyTree]:
  """(∇L, Jᵀ H_out J v), exact: linearise the network once, push v, pull back."""
  if isinstance(v, Removal):
    v = v.values(params)
  outputs, push = jax.linearize(lambda p: model_fn(p, batch), params)
  out_grad, h_out_jv = jax.jvp(
      lambda o: jax.grad(output_loss_fn)(o, batch), (outputs,), (push(v),)
  )
  pull = jax.linear_transpose(push, params)
  return pull(out_grad)[0], pull(h_out_jv)[0]


def residual_vp(
    model_fn: ModelFn, output_loss_fn: OutputLossFn, params: PyTree, batch: PyTree, v: PyTree
) -> tuple[PyTree, PyTree]:
  """(∇L, (H - GGN) v), exact, in one forward-over-reverse pass.

  Differentiates θ ↦ J(θ)ᵀ ḡ along v with the output gradient ḡ = ∇ℓ held fixed:
  d/dt J(θ + t v)ᵀ ḡ = Σ_k ḡ_k ∇²o_k v, which is H v minus the GGN part.
  """

  def pulled_back_output_grad(p):
    outputs, pull = jax.vjp(lambda q: model_fn(q, batch), p)
    out_grad = jax.lax.stop_gradient(jax.grad(output_loss_fn)(outputs, batch))
    return pull(out_grad)[0]

  return directional_jvp(pulled_back_output_grad, params, v)


def bilinear_vp(loss_fn: LossFn, params: PyTree, batch: PyTree, v: PyTree) -> tuple[PyTree, PyTree]:
  """(∇L, H_bil v), exact: the official OBA curvature, product terms only.

  H_bil v = ∇_θ Σ_products ⟨sg(g), b(u(θ), sg(v̇)) + b(sg(u̇), v(θ))⟩ over the
  product equations y = b(u, v) of `loss_fn`'s jaxpr (parameter layers and
  products of two activations), with g = ∂L/∂y and u̇, v̇ the exact tangents
  along v. Computed as one `jax.jvp` over `jax.grad` of the loss re-evaluated
  with every other operation taken to first order (`oba_jax.bilinear`).
  """
  return directional_jvp(jax.grad(first_order_loss(loss_fn, params, batch)), params, v)


def grad_derivative(
    loss_fn: LossFn, params: PyTree, batch: PyTree, direction: PyTree, order: int
) -> PyTree:
  """dᵏ/dtᵏ ∇L(params + t·direction) at t = 0, by k nested `jax.jvp` (k = order).

  order 0 is the gradient, order 1 the Hessian-vector product H·direction,
  order 2 the third-derivative tensor contracted twice with direction, and so on.
  A `Removal` direction is fixed at its values at `params` for the inner
  derivatives (−θ there would move with θ) and kept symbolic for the outermost.
  """
  fixed = direction
  if isinstance(direction, Removal):
    fixed = direction.values(params)
  f = lambda p: jax.grad(loss_fn)(p, batch)
  for _ in range(order - 1):
    f = (lambda g: lambda p: jax.jvp(g, (p,), (fixed,))[1])(f)
  if order == 0:
    return f(params)
  return directional_jvp(f, params, direction)[1]


def rademacher_like(key: jax.Array, tree: PyTree) -> PyTree:
  """A pytree like `tree` of independent ±1 entries."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([
      jax.random.rademacher(k, jnp.shape(x), dtype=jnp.result_type(x))
      for k, x in zip(keys, leaves)
  ])


def hutchinson_diagonal(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    key: jax.Array,
    num_probes: int = 1,
    probe_batch: int = 1,
) -> PyTree:
  """Unbiased estimate of diag(H): the mean of z ⊙ (H z) over Rademacher probes z.

  The gradient map is linearised once and reused for every probe (about 1.3
  gradients per probe). Probes run `probe_batch` at a time under `vmap`; more
  than one group runs in a `lax.fori_loop`. On XLA:CPU convolution gradients in a
  loop are slow, so on CPU prefer one probe per batch and average over batches
  with `scores.accumulate`; the result is the same estimator.
  """
  if num_probes < 1 or probe_batch < 1 or num_probes % probe_batch:
    raise ValueError(
        f"num_probes={num_probes} must be a positive multiple of probe_batch={probe_batch}."
    )
  _, hvp_at = jax.linearize(lambda p: jax.grad(loss_fn)(p, batch), params)

  def probe_sum(group_key):
    zs = jax.vmap(rademacher_like, in_axes=(0, None))(
        jax.random.split(group_key, probe_batch), params
    )
    zhz = jax.vmap(lambda z: jax.tree.map(jnp.multiply, z, hvp_at(z)))(zs)
    return jax.tree.map(lambda x: x.sum(0), zhz)

  groups = num_probes // probe_batch
  group_keys = jax.random.split(key, groups)
  if groups == 1:
    total = probe_sum(group_keys[0])
  else:
    zero = jax.tree.map(jnp.zeros_like, params)
    total = jax.lax.fori_loop(
        0, groups, lambda i, acc: jax.tree.map(jnp.add, acc, probe_sum(group_keys[i])), zero
    )
  return jax.tree.map(lambda t: t / num_probes, total)


def fisher_diagonal(
    model_fn: ModelFn, params: PyTree, batch: PyTree, key: jax.Array, num_samples: int = 1,
    output_weights: Callable[[PyTree], jax.Array] | None = None,
) -> PyTree:
  """Diagonal of the Fisher of a softmax model, labels sampled from the model.

  `model_fn(params, batch)` returns logits [batch, ..., classes]: one softmax per
  example (a classifier) or one per position of each example (a language model).
  `output_weights(batch)` gives each softmax's weight in the loss, shape
  [batch, ...] (e.g. 0 at padding and at the last position of a next-token loss);
  default 1 each. With weights w and W = Σ w over the batch,

      F_ii = Σ_n E_y (Σ_t √w_nt ∂ log p(y_nt | x_n) / ∂θ_i)² / W,

  an unbiased estimate of the Gauss-Newton diagonal of the weighted mean
  cross-entropy (labels at different positions are independent, so the cross
  terms vanish in expectation); for a classifier it is the mean over examples of
  (∂ log p(y | x_n) / ∂θ_i)². `num_samples` labels are drawn per softmax ("true"
  Fisher, not the empirical one). Examples are the leading axis of every leaf of
  `batch` and run one at a time, so use a model with inference-mode
  normalisation and a loss whose examples are independent (not an in-batch
  contrastive loss). Memory: one gradient per example in flight.
  """
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}.")

  def example_fisher(params, example, example_key):
    example, weights = example
    single = jax.tree.map(lambda a: a[None], example)
    logits, pull = jax.vjp(lambda p: model_fn(p, single), params)
    log_probs = jax.nn.log_softmax(logits)
    labels = jax.random.categorical(example_key, log_probs[0],
                                    shape=(num_samples,) + log_probs.shape[1:-1])
    # ∂ log p(y)/∂logits = onehot(y) - softmax(logits), one row per sampled label.
    cotangents = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype) - jnp.exp(log_probs)
    cotangents = cotangents * jnp.sqrt(weights)[None, ..., None].astype(logits.dtype)
    grads = jax.vmap(lambda c: pull(c[None])[0])(cotangents)
    return jax.tree.map(lambda g: jnp.mean(g * g, axis=0), grads)

  size = jax.tree.leaves(batch)[0].shape[0]
  if output_weights is None:
    weights = jnp.ones((size,))
  else:
    weights = jnp.asarray(output_weights(batch), jnp.float32)
  mean = mean_over_examples(example_fisher, params, (batch, weights), jax.random.split(key, size))
  return jax.tree.map(lambda f: f * (size / jnp.maximum(jnp.sum(weights), 1e-12)), mean)


def mean_over_examples(example_fn: Callable[[PyTree, PyTree, jax.Array], PyTree], params: PyTree,
                       batch: PyTree, keys: jax.Array) -> PyTree:
  """The mean of `example_fn(params, example, key)` over the leading axis of `batch` and `keys`.

  `vmap` over the examples of a batch that is sharded over devices gives wrong
  per-example conv-kernel gradients under XLA's SPMD partitioner (jax 0.10). So
  with a device mesh in context (`jax.set_mesh`, as `estimate.accumulate` sets
  it), each device maps over its own examples (`jax.shard_map`, the batch split
  over every mesh axis, or over the 'data' axis alone when the batch does not
  split over all of them, as on a data x model mesh) and the sums are added
  across devices. The parameters
  are cast to per-device values first: a gradient with respect to a replicated
  value inside `shard_map` would come back summed over the devices. Exact on any
  number of devices; under your own `jit` of a sharded batch, set the mesh too.
  """
  size = jax.tree.leaves(batch)[0].shape[0]

  def example_sum(params, examples, example_keys):
    per_example = jax.vmap(example_fn, in_axes=(None, 0, 0))(params, examples, example_keys)
    return jax.tree.map(lambda x: jnp.sum(x, axis=0), per_example)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    total = example_sum(params, batch, keys)
  else:
    axes = _example_axes(mesh, size)

    def local(params, examples, example_keys):
      params = jax.tree.map(lambda p: jax.lax.pcast(p, axes, to="varying"), params)
      return jax.lax.psum(example_sum(params, examples, example_keys), axes)

    total = jax.shard_map(
        local, in_specs=(PartitionSpec(), PartitionSpec(axes), PartitionSpec(axes)),
        out_specs=PartitionSpec(), axis_names=set(axes))(params, batch, keys)
  return jax.tree.map(lambda t: t / size, total)


def _example_axes(mesh, size: int) -> tuple[str, ...]:
  """The mesh axes to split `size` examples over: all of them, else 'data' alone."""
  if size % mesh.size == 0:
    return tuple(mesh.axis_names)
  if "data" in mesh.axis_names and size % mesh.shape["data"] == 0:
    return ("data",)
  raise ValueError(f"a batch of {size} examples does not split over the {mesh.size} devices "
                   f"of the mesh {dict(mesh.shape)}, nor over its 'data' axis.")
