"""Exactness of the scores against dense float64 references on tiny networks."""

import functools
import math

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import oba_jax
from oba_jax import curvature, scores
from oba_jax.delta import removal_delta
from oba_jax.models import ResNetCIFAR
from numerics import rel_err, x64  # noqa: F401  (x64: float64 for every test)


# --- tiny problems ------------------------------------------------------------


def mlp_problem(seed=0, sizes=(6, 5, 4, 3), batch_size=8):
  """A plain-dict tanh MLP with softmax cross-entropy."""
  keys = jax.random.split(jax.random.key(seed), len(sizes) + 1)
  params = {
      f"dense{i}": {
          "kernel": jax.random.normal(keys[i], (m, n), jnp.float64) / math.sqrt(m),
          "bias": 0.1 * jax.random.normal(jax.random.fold_in(keys[i], 1), (n,), jnp.float64),
      }
      for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:]))
  }
  batch = {
      "image": jax.random.normal(keys[-1], (batch_size, sizes[0]), jnp.float64),
      "label": jax.random.randint(jax.random.fold_in(keys[-1], 1), (batch_size,), 0, sizes[-1]),
  }

  def apply_fn(p, x):
    for i in range(len(sizes) - 1):
      x = x @ p[f"dense{i}"]["kernel"] + p[f"dense{i}"]["bias"]
      if i < len(sizes) - 2:
        x = jnp.tanh(x)
    return x

  return oba_jax.classification(apply_fn), params, batch


def nnx_cnn_problem(train=False, seed=0):
  """A tiny wide-ResNet (BatchNorm, residual adds, a projection) on 6x6 images."""
  model = ResNetCIFAR(8, width=2, in_channels=1, num_classes=3, rngs=nnx.Rngs(seed))
  model.train() if train else model.eval()
  # Non-trivial BN statistics and affine parameters.
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.BatchNorm):
      normal = lambda k, shape: jax.random.normal(k, shape, jnp.float32)
      k = jax.random.fold_in(jax.random.key(seed), len(path))
      var.mean[...] = 0.1 * normal(k, var.mean.shape)
      var.var[...] = 1.0 + 0.2 * jax.random.uniform(k, var.var.shape, jnp.float32)
      var.scale[...] = 1.0 + 0.2 * normal(jax.random.fold_in(k, 1), var.scale.shape)
      var.bias[...] = 0.1 * normal(jax.random.fold_in(k, 2), var.bias.shape)
  nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.float64), nnx.state(model)))
  apply_fn, params = oba_jax.functional(model)
  key = jax.random.key(seed + 1)
  batch = {
      "image": jax.random.normal(key, (4, 6, 6, 1), jnp.float64),
      "label": jax.random.randint(jax.random.fold_in(key, 1), (4,), 0, 3),
  }
  return oba_jax.classification(apply_fn), params, batch


def linen_problem():
  class MLP(linen.Module):
    @linen.compact
    def __call__(self, x):
      x = linen.gelu(linen.Dense(5)(x))
      return linen.Dense(3)(x)

  model = MLP()
  x = jax.random.normal(jax.random.key(3), (8, 4), jnp.float64)
  params = jax.tree.map(lambda p: p.astype(jnp.float64), model.init(jax.random.key(0), x)["params"])
  batch = {"image": x, "label": jnp.arange(8) % 3}
  return oba_jax.classification(lambda p, x: model.apply({"params": p}, x)), params, batch


PROBLEMS = {
    "dict_mlp": mlp_problem,
    "nnx_resnet_bn_eval": nnx_cnn_problem,
    "linen_mlp": linen_problem,
}


# --- dense references ---------------------------------------------------------


def dense_curvatures(objective, params, batch):
  """Dense H, GGN and residual = H - GGN over the flattened parameters."""
  flat, unravel = ravel_pytree(params)
  hessian = jax.hessian(lambda f: objective.loss(unravel(f), batch))(flat)
  outputs = objective.model(params, batch)
  jac = jax.jacfwd(lambda f: objective.model(unravel(f), batch).ravel())(flat)
  h_out = jax.hessian(lambda o: objective.output_loss(o.reshape(outputs.shape), batch))(
      outputs.ravel())
  ggn = jac.T @ h_out @ jac
  return {"hessian": hessian, "ggn": ggn, "residual": hessian - ggn}, unravel


@pytest.mark.parametrize("name", sorted(PROBLEMS))
@pytest.mark.parametrize("kind", scores.CURVATURES)
def test_oba_matches_dense_reference(name, kind):
  objective, params, batch = PROBLEMS[name]()
  dense, unravel = dense_curvatures(objective, params, batch)
  delta = ravel_pytree(removal_delta(params))[0]
  assert jnp.count_nonzero(delta) > 0
  expected = unravel(delta * (dense[kind] @ delta) / 2)
  got = scores.oba(objective.loss, params, batch, curvature=kind,
                   model_fn=objective.model, output_loss_fn=objective.output_loss)
  assert jax.tree.structure(got) == jax.tree.structure(params)
  assert rel_err(got, expected) <= 1e-10


@pytest.mark.parametrize("train", [False, True])
def test_hessian_is_ggn_plus_residual(train):
  objective, params, batch = nnx_cnn_problem(train=train)
  kw = dict(model_fn=objective.model, output_loss_fn=objective.output_loss)
  parts = [scores.oba(objective.loss, params, batch, curvature=c, **kw) for c in scores.CURVATURES]
  total = jax.tree.map(lambda g, r: g + r, parts[1], parts[2])
  assert rel_err(total, parts[0]) <= 1e-10


def test_first_order_adds_gradient_term():
  objective, params, batch = mlp_problem()
  grad = jax.grad(objective.loss)(params, batch)
  delta = removal_delta(params)
  second = scores.oba(objective.loss, params, batch)
  both = scores.oba(objective.loss, params, batch, first_order=True)
  expected = jax.tree.map(lambda s, g, d: s + g * d, second, grad, delta)
  assert rel_err(both, expected) <= 1e-12


def test_sum_is_exact_change_of_a_quadratic_loss():
  key = jax.random.key(7)
  n = 9
  m = jax.random.normal(key, (n, n), jnp.float64)
  a = m @ m.T - 2.0 * jnp.eye(n)  # symmetric, indefinite
  b = jax.random.normal(jax.random.fold_in(key, 1), (n,), jnp.float64)
  params = {"layer": {"kernel": jnp.arange(6.0).reshape(2, 3) / 5, "bias": jnp.array([0.3, -1.0, 2.0])}}

  def loss(p, batch):
    theta = ravel_pytree(p)[0]
    return 0.5 * theta @ a @ theta + b @ theta + batch

  delta = jax.tree.map(lambda x: 0.7 * jax.random.normal(key, x.shape, jnp.float64) - x, params)
  got = scores.oba(loss, params, 1.5, delta=delta, first_order=True)
  moved = jax.tree.map(jnp.add, params, delta)
  predicted = sum(float(jnp.sum(x)) for x in jax.tree.leaves(got))
  assert abs(predicted - float(loss(moved, 1.5) - loss(params, 1.5))) <= 1e-12


# --- higher Taylor orders -----------------------------------------------------


def nested_jacfwd_reference(loss, params, batch, delta, order):
  flat, unravel = ravel_pytree(params)
  d = ravel_pytree(delta)[0]
  tensor = lambda f: loss(unravel(f), batch)
  for _ in range(order):
    tensor = jax.jacfwd(tensor)
  t = tensor(flat)  # shape (P,) * order
  for _ in range(order - 1):
    t = t @ d
  return unravel(d * t / math.factorial(order))


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_taylor_matches_nested_jacfwd(order):
  objective, params, batch = mlp_problem(sizes=(3, 4, 2), batch_size=5)
  delta = removal_delta(params)
  expected = nested_jacfwd_reference(objective.loss, params, batch, delta, order)
  got = scores.taylor(objective.loss, params, batch, order=order)
  assert rel_err(got, expected) <= 1e-10


def test_taylor_order_two_is_oba_hessian():
  objective, params, batch = nnx_cnn_problem()
  assert rel_err(scores.taylor(objective.loss, params, batch, order=2),
                 scores.oba(objective.loss, params, batch)) <= 1e-12


def test_taylor_terms_sum_to_the_loss_change_of_a_polynomial():
  # A quartic loss: orders 1..4 of the Taylor series reproduce it exactly.
  params = {"w": {"kernel": jnp.array([[0.5, -1.2], [0.3, 0.8]])}}
  loss = lambda p, c: jnp.sum(p["w"]["kernel"] ** 4) + c * jnp.sum(p["w"]["kernel"]) ** 3
  delta = {"w": {"kernel": jnp.array([[0.2, 0.1], [-0.4, 0.3]])}}
  total = sum(
      float(sum(jnp.sum(x) for x in jax.tree.leaves(
          scores.taylor(loss, params, 0.7, order=k, delta=delta))))
      for k in range(1, 5))
  moved = jax.tree.map(jnp.add, params, delta)
  assert abs(total - float(loss(moved, 0.7) - loss(params, 0.7))) <= 1e-12


# --- OBD baselines ------------------------------------------------------------


def test_hutchinson_error_falls_with_probes():
  objective, params, batch = mlp_problem(sizes=(4, 3, 2), batch_size=6)
  flat, unravel = ravel_pytree(params)
  exact = unravel(jnp.diag(jax.hessian(lambda f: objective.loss(unravel(f), batch))(flat)))
  estimate = jax.jit(functools.partial(curvature.hutchinson_diagonal, objective.loss),
                     static_argnums=(3, 4))
  errors = [rel_err(estimate(params, batch, jax.random.key(1), n, n), exact)
            for n in (20, 200, 2000)]
  assert errors[0] > errors[1] > errors[2]
  assert errors[2] <= 0.05


def test_obd_hutchinson_is_half_delta_squared_times_diagonal():
  objective, params, batch = mlp_problem(sizes=(4, 3, 2))
  key = jax.random.key(5)
  diag = curvature.hutchinson_diagonal(objective.loss, params, batch, key, 8, 4)
  got = scores.obd(objective.loss, params, batch, key=key, num_probes=8, probe_batch=4)
  expected = jax.tree.map(lambda d, h: d * d * h / 2, removal_delta(params), diag)
  assert rel_err(got, expected) <= 1e-12


def test_fisher_diagonal_converges_to_exact_expectation():
  objective, params, batch = mlp_problem(sizes=(4, 3, 3), batch_size=4)

  def exact_fisher():
    # Enumerate every label: E_y[g_y²] = Σ_y p(y|x) g_y², averaged over examples.
    total = jax.tree.map(jnp.zeros_like, params)
    for n in range(4):
      example = jax.tree.map(lambda a: a[n:n + 1], batch)
      probs = jax.nn.softmax(objective.model(params, example))[0]
      for y in range(3):
        g = jax.grad(lambda p: jax.nn.log_softmax(objective.model(p, example))[0, y])(params)
        total = jax.tree.map(lambda t, gg: t + probs[y] * gg * gg / 4, total, g)
    return total

  estimate = curvature.fisher_diagonal(objective.model, params, batch, jax.random.key(0), 4000)
  assert rel_err(estimate, exact_fisher()) <= 0.05
  got = scores.obd(objective.loss, params, batch, key=jax.random.key(0), diag="fisher",
                   model_fn=objective.model, num_probes=4000)
  expected = jax.tree.map(lambda d, f: d * d * f / 2, removal_delta(params), estimate)
  assert rel_err(got, expected) <= 1e-12



def test_fisher_diagonal_per_position_is_the_weighted_gauss_newton_diagonal():
  # A tiny sequence model: logits [batch, positions, classes], positions weighted
  # (zeros for padding) as a next-token loss weighs them.
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float64),
            "u": jnp.asarray(rng.normal(size=(4, 4)) / 2, jnp.float64)}
  batch = {"x": jnp.asarray(rng.normal(size=(3, 5, 3))),
           "w": jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0.5, 1, 0, 1, 0]], jnp.float64)}
  model = lambda p, b: jnp.tanh(b["x"] @ p["w"]) @ p["u"]

  def output_loss(logits, b):
    nll = -jax.nn.log_softmax(logits)[..., 0]  # any targets: the GGN does not depend on them
    return jnp.sum(nll * b["w"]) / jnp.sum(b["w"])

  flat, unravel = ravel_pytree(params)
  jac = jax.jacobian(lambda f: model(unravel(f), batch))(flat)  # [3, 5, 4, P]
  h_out = jax.hessian(lambda o: output_loss(o, batch))(model(params, batch))
  ggn = jnp.einsum("abcp,abcdef,defq->pq", jac, h_out, jac)
  exact = unravel(jnp.diagonal(ggn))
  estimate = curvature.fisher_diagonal(model, params, batch, jax.random.key(1), 20000,
                                       output_weights=lambda b: b["w"])
  assert rel_err(estimate, exact) <= 0.03


# --- trivial baselines and the prunable convention ----------------------------


def test_default_delta_moves_only_conv_and_dense_parameters():
  _, params, _ = nnx_cnn_problem()
  params = jax.tree.map(lambda x: x + 1.0, params)  # no zero-valued leaves
  moved = removal_delta(params)
  for path, d in jax.tree_util.tree_flatten_with_path(moved)[0]:
    name = jax.tree_util.keystr(path)
    if "bn" in name:
      assert not jnp.any(d), name
    else:
      assert jnp.all(d == -jnp.asarray(params_at(params, path))), name


def params_at(tree, path):
  for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if p == path:
      return x


def test_magnitude_and_random():
  _, params, _ = mlp_problem()
  mag = scores.magnitude(params)
  assert rel_err(mag, jax.tree.map(jnp.abs, params)) == 0
  only_kernels = lambda path, leaf: path.endswith("kernel")
  r = scores.random(jax.random.key(0), params, prunable=only_kernels)
  for path, x in jax.tree_util.tree_flatten_with_path(r)[0]:
    if "kernel" in jax.tree_util.keystr(path):
      assert jnp.all((x > 0) & (x < 1))
    else:
      assert not jnp.any(x)


def test_prunable_mask_tree_restricts_delta():
  objective, params, batch = mlp_problem()
  mask = jax.tree.map(lambda _: False, params)
  mask["dense1"]["kernel"] = True
  got = scores.oba(objective.loss, params, batch, prunable=mask)
  nonzero = {jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(got)[0]
             if jnp.any(x)}
  assert nonzero == {"['dense1']['kernel']"}


def test_scores_are_jittable():
  objective, params, batch = nnx_cnn_problem()
  jitted = jax.jit(functools.partial(scores.oba, objective.loss, curvature="residual",
                                     model_fn=objective.model, output_loss_fn=objective.output_loss))
  eager = scores.oba(objective.loss, params, batch, curvature="residual",
                     model_fn=objective.model, output_loss_fn=objective.output_loss)
  assert rel_err(jitted(params, batch), eager) <= 1e-12
