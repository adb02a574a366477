"""K-FAC factors and the Kron-OBD / Kron-OBS scores against dense float64 references.

Tolerances (float64): factors and Fisher blocks to rtol 1e-10, the scores to
rtol 1e-8 (the OBS reference inverts a dense damped F̂).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import oba_jax
from oba_jax import criteria, kfac, scores
from oba_jax.delta import removal_delta
from numerics import x64  # noqa: F401  (x64: float64 for every test)
from test_prune import TinyNet  # conv -> BatchNorm -> ReLU -> mean -> dense

KEY = jax.random.key(3)
FACTOR_RTOL = 1e-10
SCORE_RTOL = 1e-8
DAMPING = 1e-3


# --- tiny models, with taps: an additive zero on every layer output -----------------


def mlp(batch_size=4, seed=0):
  """tanh MLP; its layers are written three ways: x @ W, x @ Wᵀ (a [out, in] weight), einsum."""
  k = jax.random.split(jax.random.key(seed), 8)
  params = {
      "dense0": {"kernel": jax.random.normal(k[0], (5, 4)) / 2,
                 "bias": jax.random.normal(k[1], (4,))},
      "dense1": {"weight": jax.random.normal(k[2], (3, 4)) / 2,
                 "bias": jax.random.normal(k[3], (3,))},
      "dense2": {"kernel": jax.random.normal(k[4], (3, 6)) / 2},
  }

  def apply(p, x, taps=None):
    tap = lambda name, y: y if taps is None else y + taps[name]
    x = jnp.tanh(tap("dense0", x @ p["dense0"]["kernel"]) + p["dense0"]["bias"])
    x = jnp.tanh(tap("dense1", x @ p["dense1"]["weight"].T) + p["dense1"]["bias"])
    return tap("dense2", jnp.einsum("ni,io->no", x, p["dense2"]["kernel"]))

  images = jax.random.normal(k[5], (batch_size, 5))
  return apply, params, {"image": images}, {"dense0": (4,), "dense1": (3,), "dense2": (6,)}


def convnet(batch_size=3, size=6, seed=0):
  """conv (3x3 SAME, bias) -> relu -> conv (2x2, stride 2, no bias) -> mean -> dense, NHWC."""
  k = jax.random.split(jax.random.key(seed), 6)
  params = {
      "conv0": {"kernel": jax.random.normal(k[0], (3, 3, 2, 3)) / 3,
                "bias": jax.random.normal(k[1], (3,))},
      "conv1": {"kernel": jax.random.normal(k[2], (2, 2, 3, 4)) / 3},
      "head": {"kernel": jax.random.normal(k[3], (4, 5)), "bias": jax.random.normal(k[4], (5,))},
  }

  def conv(x, w, stride, padding):
    return jax.lax.conv_general_dilated(x, w, stride, padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def apply(p, x, taps=None):
    tap = lambda name, y: y if taps is None else y + taps[name]
    x = jax.nn.relu(tap("conv0", conv(x, p["conv0"]["kernel"], (1, 1), "SAME"))
                    + p["conv0"]["bias"].reshape(1, 1, 1, -1))
    x = jax.nn.relu(tap("conv1", conv(x, p["conv1"]["kernel"], (2, 2), "VALID")))
    return tap("head", x.mean(axis=(1, 2)) @ p["head"]["kernel"]) + p["head"]["bias"]

  images = jax.random.normal(k[5], (batch_size, size, size, 2))
  half = size // 2
  return apply, params, {"image": images}, {"conv0": (size, size, 3), "conv1": (half, half, 4),
                                              "head": (5,)}


def one_position_convnet(layout="NHWC"):
  """A 3x3 VALID conv on 3x3 images (one output position), bias, then dense.

  layout "NCHW" uses NCHW images and an OIHW kernel, to check other dimension numbers.
  """
  k = jax.random.split(jax.random.key(1), 5)
  kernel = jax.random.normal(k[0], (3, 3, 2, 4)) / 3
  images = jax.random.normal(k[4], (1, 3, 3, 2))
  numbers = ("NHWC", "HWIO", "NHWC")
  if layout == "NCHW":
    kernel, images = kernel.transpose(3, 2, 0, 1), images.transpose(0, 3, 1, 2)
    numbers = ("NCHW", "OIHW", "NCHW")
  params = {"conv": {"kernel": kernel, "bias": jax.random.normal(k[1], (4,))},
            "head": {"kernel": jax.random.normal(k[2], (4, 3)),
                     "bias": jax.random.normal(k[3], (3,))}}
  bias_shape = (1, 1, 1, -1) if layout == "NHWC" else (1, -1, 1, 1)

  def apply(p, x):
    y = jax.lax.conv_general_dilated(x, p["conv"]["kernel"], (1, 1), "VALID",
                                     dimension_numbers=numbers)
    y = jnp.tanh(y + p["conv"]["bias"].reshape(bias_shape)).reshape(x.shape[0], -1)
    return y @ p["head"]["kernel"] + p["head"]["bias"]

  return apply, params, {"image": images}


def model_fn(apply):
  return lambda p, batch: apply(p, batch["image"])


def sampled_labels(apply, params, batch, num_samples):
  """The labels `kfac.factors` samples with KEY: [num_samples, examples]."""
  log_probs = jax.nn.log_softmax(apply(params, batch["image"]))
  return jax.random.categorical(KEY, log_probs, shape=(num_samples,) + log_probs.shape[:-1])


def layer_named(blocks, name):
  (found,) = [f for f in blocks if f.layer.path.startswith(name + "/")]
  return found


def im2col(x, ksize, stride, padding):
  """Explicit patches [examples * positions, C_in * kh * kw], channel-major, by Python loops."""
  n, h, w, c = x.shape
  if padding == "SAME":
    x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out_h = (x.shape[1] - ksize) // stride + 1
  out_w = (x.shape[2] - ksize) // stride + 1
  rows = [np.transpose(x[i, a * stride:a * stride + ksize, b * stride:b * stride + ksize, :],
                       (2, 0, 1)).reshape(-1)
          for i in range(n) for a in range(out_h) for b in range(out_w)]
  return np.stack(rows)


# --- which layers -------------------------------------------------------------


def test_layers_are_found_in_the_jaxpr_with_their_biases():
  apply, params, batch, _ = mlp()
  layers = kfac.find_layers(model_fn(apply), params, batch)
  assert [(l.path, l.primitive) for l in layers] == [
      ("dense0/kernel", "dot_general"), ("dense1/weight", "dot_general"),
      ("dense2/kernel", "dot_general")]
  leaves = [oba_jax.delta.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  assert [None if l.bias is None else leaves[l.bias] for l in layers] == [
      "dense0/bias", "dense1/bias", None]
  assert layers[1].kernel_axes == (1, 0)  # the [out, in] weight is used transposed

  apply, params, batch, _ = convnet()
  layers = kfac.find_layers(model_fn(apply), params, batch)
  assert [l.path for l in layers] == ["conv0/kernel", "conv1/kernel", "head/kernel"]
  assert [l.bias is not None for l in layers] == [True, False, True]


def test_nnx_model_layers_skip_batchnorm():
  model = TinyNet(nnx.Rngs(0))
  model.eval()
  apply_fn, params = oba_jax.functional(model)
  layers = kfac.find_layers(lambda p, b: apply_fn(p, b["image"]), params, BATCH)
  assert [(l.path, l.bias is not None) for l in layers] == [("conv/kernel", True),
                                                             ("classifier/kernel", True)]


# --- factors against dense references --------------------------------------------


def per_example_fisher_block(apply, params, batch, layer, label):
  """Outer product of the gradient of log p(label | x) over the layer's kernel (and bias)."""
  def log_prob(p):
    return jax.nn.log_softmax(apply(p, batch["image"]))[0, label]

  grads = jax.tree.leaves(jax.grad(log_prob)(params))
  g = kfac.to_matrix(layer, grads).reshape(-1)
  return jnp.outer(g, g)


@pytest.mark.parametrize("problem", ["mlp", "conv_nhwc", "conv_nchw"])
def test_one_example_fisher_block_is_exactly_a_kron_g(problem):
  if problem == "mlp":
    apply, params, batch, _ = mlp(batch_size=1)
  else:
    apply, params, batch = one_position_convnet(problem[-4:].upper())
  blocks = kfac.factors(model_fn(apply), params, batch, KEY)
  label = int(sampled_labels(apply, params, batch, 1)[0, 0])
  want_biases = [True, True, False] if problem == "mlp" else [True, True]
  assert [f.layer.bias is not None for f in blocks] == want_biases
  for f in blocks:
    exact = per_example_fisher_block(apply, params, batch, f.layer, label)
    np.testing.assert_allclose(jnp.kron(f.A, f.G), exact, rtol=FACTOR_RTOL,
                               atol=FACTOR_RTOL * float(jnp.abs(exact).max()))


@pytest.mark.parametrize("problem", ["mlp", "convnet"])
def test_factors_of_several_examples_are_explicit_sums(problem):
  apply, params, batch, out_shapes = (mlp if problem == "mlp" else convnet)()
  num_samples = 2
  blocks = kfac.factors(model_fn(apply), params, batch, KEY, num_samples=num_samples)
  labels = sampled_labels(apply, params, batch, num_samples)
  x = batch["image"]
  n = x.shape[0]
  taps = {name: jnp.zeros((n,) + shape) for name, shape in out_shapes.items()}

  def log_lik(t, labels):
    log_probs = jax.nn.log_softmax(apply(params, x, t))
    return jnp.sum(jnp.take_along_axis(log_probs, labels[:, None], axis=1))

  out_grads = [jax.grad(log_lik)(taps, labels[s]) for s in range(num_samples)]
  # Layer inputs, computed by hand.
  if problem == "mlp":
    p = params
    h0 = np.tanh(x @ p["dense0"]["kernel"] + p["dense0"]["bias"])
    h1 = np.tanh(h0 @ p["dense1"]["weight"].T + p["dense1"]["bias"])
    inputs = {"dense0": (np.asarray(x), True), "dense1": (h0, True), "dense2": (h1, False)}
  else:
    p = params
    y0 = jax.lax.conv_general_dilated(x, p["conv0"]["kernel"], (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h0 = np.asarray(jax.nn.relu(y0 + p["conv0"]["bias"]))
    y1 = jax.lax.conv_general_dilated(h0, p["conv1"]["kernel"], (2, 2), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h1 = np.asarray(jax.nn.relu(y1)).mean(axis=(1, 2))
    inputs = {"conv0": (im2col(np.asarray(x), 3, 1, "SAME"), True),
              "conv1": (im2col(h0, 2, 2, "VALID"), False), "head": (h1, True)}
  for name, (rows, has_bias) in inputs.items():
    f = layer_named(blocks, name)
    if has_bias:
      rows = np.concatenate([rows, np.ones((rows.shape[0], 1))], axis=1)
    np.testing.assert_allclose(f.A, rows.T @ rows / rows.shape[0], rtol=FACTOR_RTOL)
    g_rows = [np.asarray(g[name]).reshape(-1, f.G.shape[0]) for g in out_grads]
    want = sum(r.T @ r for r in g_rows) / (n * num_samples)  # mean over examples of Σ_positions
    np.testing.assert_allclose(f.G, want, rtol=FACTOR_RTOL, atol=1e-14)


# --- the scores against dense formulas ----------------------------------------------


def loss_of(apply):
  return lambda p, b: jnp.mean(jax.nn.logsumexp(apply(p, b["image"]), axis=-1))  # checks only


@pytest.mark.parametrize("problem", ["mlp", "convnet"])
def test_kron_obd_is_half_delta_squared_times_the_diagonal_of_a_kron_g(problem):
  apply, params, batch, _ = (mlp if problem == "mlp" else convnet)()
  score = scores.kron_obd(loss_of(apply), params, batch, key=KEY, model_fn=model_fn(apply))
  blocks = kfac.factors(model_fn(apply), params, batch, KEY)
  delta = jax.tree.leaves(removal_delta(params))
  leaves = jax.tree.leaves(score)
  for f in blocks:
    d = kfac.to_matrix(f.layer, delta).reshape(-1)
    want = d * d * jnp.diag(jnp.kron(f.A, f.G)) / 2
    np.testing.assert_allclose(kfac.to_matrix(f.layer, leaves).reshape(-1), want,
                               rtol=SCORE_RTOL)


def dense_obs(f, delta_leaves, damping):
  """Per entry δ_i (C δ)_i / 2 with C = (P F̂⁻¹ Pᵀ)⁻¹ per unit, F̂ = kron(A_d, G_d) dense."""
  damp = lambda m: m + damping * np.trace(m) / m.shape[0] * np.eye(m.shape[0])
  a, g = np.asarray(f.A), np.asarray(f.G)
  f_inv = np.linalg.inv(np.kron(damp(a), damp(g)))
  w = np.asarray(kfac.to_matrix(f.layer, delta_leaves))
  din, dout = w.shape
  out, unit_saliency = np.zeros_like(w), np.zeros(dout)
  for c in range(dout):
    sel = np.arange(din) * dout + c  # P: the entries of output unit c
    curvature = np.linalg.inv(f_inv[np.ix_(sel, sel)])
    out[:, c] = w[:, c] * (curvature @ w[:, c]) / 2
    unit_saliency[c] = w[:, c] @ curvature @ w[:, c] / 2
  return out, unit_saliency


@pytest.mark.parametrize("problem", ["mlp", "convnet"])
def test_kron_obs_is_the_dense_obs_saliency_of_each_output_unit(problem):
  apply, params, batch, _ = (mlp if problem == "mlp" else convnet)()
  score = scores.kron_obs(loss_of(apply), params, batch, key=KEY, model_fn=model_fn(apply),
                          damping=DAMPING)
  blocks = kfac.factors(model_fn(apply), params, batch, KEY)
  delta = jax.tree.leaves(removal_delta(params))
  leaves = jax.tree.leaves(score)
  for f in blocks:
    want, unit_saliency = dense_obs(f, delta, DAMPING)
    got = np.asarray(kfac.to_matrix(f.layer, leaves))
    np.testing.assert_allclose(got, want, rtol=SCORE_RTOL, atol=SCORE_RTOL * np.abs(want).max())
    np.testing.assert_allclose(got.sum(axis=0), unit_saliency, rtol=SCORE_RTOL)
    assert np.all(unit_saliency > 0)


def test_parameters_outside_layers_score_zero():
  model = TinyNet(nnx.Rngs(0))
  model.eval()
  model.conv.bias[...] = jnp.full((4,), 0.1)  # a bias of zeros would score 0 as well
  apply_fn, params = oba_jax.functional(model)
  objective = oba_jax.classification(apply_fn)
  for name in ("kron_obd", "kron_obs"):
    s = criteria.CRITERIA[name].score(objective, params, BATCH, KEY)
    assert not np.any(s["bn"]["scale"]) and not np.any(s["bn"]["bias"])
    assert np.all(np.asarray(s["conv"]["bias"]) != 0)


# --- through the criteria --------------------------------------------------------------


BATCH = {"image": jax.random.normal(jax.random.key(1), (8, 6, 6, 1)),
         "label": jax.random.randint(jax.random.key(2), (8,), 0, 10)}


@pytest.mark.parametrize("name", ["kron_obd", "kron_obs"])
def test_criteria_run_through_importance(name):
  model = TinyNet(nnx.Rngs(0))
  model.eval()
  score = criteria.importance(name, model, [BATCH, BATCH], num_batches=2, key=KEY)
  params = oba_jax.functional(model)[1]
  assert jax.tree.structure(score) == jax.tree.structure(params)
  assert all(np.isfinite(s).all() for s in jax.tree.leaves(score))
  assert np.any(score["conv"]["kernel"]) and np.any(score["classifier"]["kernel"])
  assert criteria.CRITERIA[name].per_example and criteria.CRITERIA[name].uses_data
  assert criteria.CRITERIA[name].entrywise == (name == "kron_obd")


def test_scores_are_jittable():
  apply, params, batch, _ = convnet()
  fn = jax.jit(lambda p, b: scores.kron_obs(loss_of(apply), p, b, key=KEY,
                                            model_fn=model_fn(apply)))
  got = fn(params, batch)
  want = scores.kron_obs(loss_of(apply), params, batch, key=KEY, model_fn=model_fn(apply))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14), got, want)


# --- bad input -------------------------------------------------------------------------


def test_bad_input_is_refused_with_the_value_and_what_is_accepted():
  apply, params, batch, _ = mlp()
  args = (loss_of(apply), params, batch)
  with pytest.raises(ValueError, match=r"damping=0 is not a positive number"):
    scores.kron_obs(*args, key=KEY, model_fn=model_fn(apply), damping=0)
  with pytest.raises(ValueError, match=r"num_samples=0 is not an integer >= 1"):
    scores.kron_obd(*args, key=KEY, model_fn=model_fn(apply), num_samples=0)
  with pytest.raises(ValueError, match=r"kron_obd needs key="):
    scores.kron_obd(*args, key=None, model_fn=model_fn(apply))


def test_grouped_convolutions_are_refused():
  params = {"conv": {"kernel": jnp.ones((3, 3, 1, 4))}}
  x = {"image": jnp.ones((2, 5, 5, 4))}

  def apply(p, b):
    y = jax.lax.conv_general_dilated(b["image"], p["conv"]["kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=4)
    return y.mean(axis=(1, 2))

  with pytest.raises(NotImplementedError, match=r"'conv/kernel' is a grouped convolution "
                                                r"\(feature_group_count=4"):
    kfac.factors(apply, params, x, KEY)


def test_a_layer_count_matches_its_parameters():
  """Every entry of every layer's kernel is in exactly one block position."""
  apply, params, batch, _ = convnet()
  for layer in kfac.find_layers(model_fn(apply), params, batch):
    kernel = jax.tree.leaves(params)[layer.kernel]
    w = kfac.to_matrix(layer, jax.tree.leaves(params))
    assert w.shape[0] * w.shape[1] == kernel.size + (0 if layer.bias is None else w.shape[1])
    assert math.isclose(float(jnp.sum(w)), float(jnp.sum(kernel)) + (
        0.0 if layer.bias is None else float(jnp.sum(jax.tree.leaves(params)[layer.bias]))),
        rel_tol=1e-12)
