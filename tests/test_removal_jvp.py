"""`removal_jvp`: `jax.jvp` along δ = −θ with fewer products, and the same derivative."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engine_models import (branching, hinted, mapped_experts, mapped_experts_params,
                           scanned_transformer, scanned_transformer_params)
from numerics import rel_err, x64  # noqa: F401  (float64 for every test here)
from oba_jax import curvature, models, scores
from oba_jax.delta import Removal, prunable_mask
from oba_jax.removal_jvp import removal_jvp

KEY = jax.random.key(0)


def _classifier_loss(model: nnx.Module, inputs, labels):
  graphdef, state, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, batch):
    logits = nnx.merge(graphdef, nnx.State(params), rest, copy=True)(batch[0])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch[1][:, None], 1))

  return loss, nnx.to_pure_dict(state), (inputs, labels)


def _image_problem(name, mode, **kwargs):
  model = models.create(name, **kwargs)
  model.train() if mode == "train" else model.eval()
  size = 28 if name == "vit" else 16
  images = jax.random.normal(KEY, (6, size, size, 3))
  # Running statistics in the images' dtype: training mode writes batch statistics into them.
  nnx.update(model, jax.tree.map(lambda s: s.astype(images.dtype),
                                 nnx.state(model, nnx.BatchStat)))
  return _classifier_loss(model, images, jnp.arange(6) % 10)


def _llama_problem():
  model = models.create("llama", vocab_size=50, d_model=24, num_layers=2, num_heads=6,
                        num_kv_heads=2, ffn_dim=16)
  graphdef, state, rest = nnx.split(model, nnx.Param, ...)
  tokens = jax.random.randint(KEY, (2, 9), 0, 50)

  def loss(params, tokens):
    logits = nnx.merge(graphdef, nnx.State(params), rest, copy=True)(tokens[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

  return loss, nnx.to_pure_dict(state), tokens


PROBLEMS = {
    "vgg_train": lambda: _image_problem("vgg11_cifar", "train", width=4),
    "vgg_eval": lambda: _image_problem("vgg11_cifar", "eval", width=4),
    "resnet_train": lambda: _image_problem("resnet20_cifar", "train", width=4),
    "vit": lambda: _image_problem("vit", "eval", image_size=28, patch_size=7, hidden_dim=16,
                                  mlp_dim=24, num_heads=2, num_layers=2, num_classes=10),
    "llama": _llama_problem,
}


def _along_values(f, params, mask):
  delta = jax.tree.map(lambda p, m: jnp.where(m, -p, jnp.zeros_like(p)), params, mask)
  return jax.jvp(f, (params,), (delta,))


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_hessian_vector_product_equals_jax_jvp_on_the_library_models(problem):
  loss, params, batch = PROBLEMS[problem]()
  gradient = lambda p: jax.grad(loss)(p, batch)
  mask = prunable_mask(params)
  want_grad, want = _along_values(gradient, params, mask)
  got_grad, got = removal_jvp(gradient, params, mask)
  single = jax.tree.leaves(want)[0].dtype == jnp.float32  # the Llama computes in float32
  assert rel_err(got, want) < (1e-5 if single else 1e-10)
  assert rel_err(got_grad, want_grad) < (1e-6 if single else 1e-12)


def test_every_curvature_along_a_removal_equals_along_its_values():
  loss, params, batch = PROBLEMS["vgg_eval"]()
  direction = Removal(prunable_mask(params))
  values = direction.values(params)
  for product in (curvature.hvp, curvature.bilinear_vp):
    assert rel_err(product(loss, params, batch, direction)[1],
                   product(loss, params, batch, values)[1]) < 1e-10
  for order in (1, 2, 3):
    assert rel_err(curvature.grad_derivative(loss, params, batch, direction, order),
                   curvature.grad_derivative(loss, params, batch, values, order)) < 1e-10


@pytest.mark.parametrize("fn, make_params", [
    (scanned_transformer, lambda: scanned_transformer_params(KEY)),
    (mapped_experts, lambda: mapped_experts_params(KEY)),
    (hinted, lambda: {k: jax.random.normal(jax.random.fold_in(KEY, i), (4, 4))
                      for i, k in enumerate(("w1", "w2", "skip"))}),
    (branching, lambda: {k: jax.random.normal(jax.random.fold_in(KEY, i), (4, 4))
                         for i, k in enumerate(("w1", "mix", "w2"))}),
])
def test_loops_branches_checkpoints_and_barriers_take_jax_jvp(fn, make_params):
  params = make_params()
  inputs = (jax.random.randint(KEY, (2, 5), 0, 7) if fn is scanned_transformer
            else jax.random.normal(KEY, (3, 4)))
  gradient = lambda p: jax.grad(lambda q: jnp.sum(jnp.sin(fn(q, inputs))))(p)
  mask = jax.tree.map(lambda _: True, params)
  assert rel_err(removal_jvp(gradient, params, mask)[1],
                 _along_values(gradient, params, mask)[1]) < 1e-10


def test_masks_of_arrays_bools_and_integer_leaves():
  params = {"w1": jax.random.normal(KEY, (3, 4)), "w2": jax.random.normal(KEY, (4, 2)),
            "scale": jnp.ones((4,)), "steps": jnp.array(3)}

  def loss(q, steps):
    h = jax.nn.relu(jnp.ones((5, 3)) @ q["w1"] * q["scale"]) + steps
    return jnp.sum(jnp.tanh(h @ q["w2"]) ** 2)

  def gradient(p):  # the integer leaf rides along: an input without a derivative
    return jax.grad(loss)({k: v for k, v in p.items() if k != "steps"}, p["steps"])

  partial = np.zeros((3, 4), bool)
  partial[1] = True
  for mask in ({"w1": True, "w2": True, "scale": False, "steps": False},
               {"w1": partial, "w2": jnp.ones((4, 2), bool), "scale": False, "steps": False},
               {"w1": False, "w2": False, "scale": False, "steps": False}):
    got = removal_jvp(gradient, params, mask)[1]
    floats = {k: v for k, v in params.items() if k != "steps"}
    want = _along_values(lambda q: gradient({**q, "steps": params["steps"]}), floats,
                         {k: v for k, v in mask.items() if k != "steps"})[1]
    np.testing.assert_allclose(np.concatenate([np.ravel(x) for x in jax.tree.leaves(got)]),
                               np.concatenate([np.ravel(x) for x in jax.tree.leaves(want)]),
                               rtol=1e-12, atol=1e-14)


def test_a_traced_mask_is_followed():
  loss, params, batch = PROBLEMS["vgg_eval"]()
  mask = prunable_mask(params)
  gradient = lambda p: jax.grad(loss)(p, batch)
  traced = jax.jit(lambda m: removal_jvp(gradient, params, m)[1])(
      jax.tree.map(lambda m, p: jnp.full(jnp.shape(p), m), mask, params))
  assert rel_err(traced, _along_values(gradient, params, mask)[1]) < 1e-10


def _flops(fn, *args) -> float:
  return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_convnet_score_costs_two_gradients_of_arithmetic(mode):
  """XLA's own FLOP count: 8 products per layer along values, 6 along the removal (grad: 3)."""
  with jax.enable_x64(False):
    loss, params, batch = _image_problem("resnet20_cifar", mode, width=8)
    gradient = _flops(lambda p, b: jax.grad(loss)(p, b), params, batch)
    score = _flops(lambda p, b: scores.oba(loss, p, b), params, batch)
    along_values = _flops(lambda p, b: scores.oba(loss, p, b, delta=jax.tree.map(
        lambda q, m: jnp.where(m, -q, 0 * q), p, prunable_mask(p))), params, batch)
  assert along_values / gradient > 2.5
  assert score / gradient < 2.1
