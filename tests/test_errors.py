"""Bad input gets a clear error that names the problem, before any work is done."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from oba_jax import models, scores

PARAMS = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros((2,))}}
BATCH = {"image": jnp.ones((4, 3)), "label": jnp.zeros((4,), jnp.int32)}


def loss(p, b):
  return jnp.mean((b["image"] @ p["dense"]["kernel"] + p["dense"]["bias"]) ** 2)


def test_delta_with_another_structure():
  with pytest.raises(ValueError, match=r"delta does not have the structure.*missing leaves \['dense/bias'\]"):
    scores.oba(loss, PARAMS, BATCH, delta={"dense": {"kernel": jnp.ones((3, 2))}})


def test_delta_with_another_shape():
  bad = {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros((2,))}}
  with pytest.raises(ValueError, match=r"'dense/kernel' has shape \(2, 3\).*\(3, 2\)"):
    scores.oba(loss, PARAMS, BATCH, delta=bad)


def test_prunable_mask_with_another_shape():
  bad = {"dense": {"kernel": np.ones((3,), bool), "bias": True}}
  with pytest.raises(ValueError, match="prunable mask leaf 'dense/kernel'"):
    scores.magnitude(PARAMS, prunable=bad)


def test_non_scalar_loss():
  per_example = lambda p, b: (b["image"] @ p["dense"]["kernel"]).sum(-1)
  with pytest.raises(TypeError, match=r"must return a real scalar, got shape=\(4,\)"):
    scores.oba(per_example, PARAMS, BATCH)
  with pytest.raises(TypeError, match="real scalar"):
    scores.taylor(per_example, PARAMS, BATCH, order=3)


@pytest.mark.parametrize("order", [0, 5, 2.0, True, "2"])
def test_taylor_order_out_of_range(order):
  with pytest.raises(ValueError, match=r"order must be an integer in 1\.\.4"):
    scores.taylor(loss, PARAMS, BATCH, order=order)


@pytest.mark.parametrize("curvature", ["ggn", "residual"])
def test_gauss_newton_split_needs_model_fn(curvature):
  with pytest.raises(ValueError, match=f"curvature='{curvature}' needs model_fn"):
    scores.oba(loss, PARAMS, BATCH, curvature=curvature)


def test_unknown_choices():
  with pytest.raises(ValueError, match=r"curvature='fisher' is not supported; accepted: \['bilinear', 'ggn', 'hessian', 'residual'\]"):
    scores.oba(loss, PARAMS, BATCH, curvature="fisher")
  with pytest.raises(ValueError, match="diag='kfac' is not supported"):
    scores.obd(loss, PARAMS, BATCH, key=jax.random.key(0), diag="kfac")
  with pytest.raises(ValueError, match="needs key"):
    scores.obd(loss, PARAMS, BATCH, key=None)
  with pytest.raises(ValueError, match="diag='fisher' needs model_fn"):
    scores.obd(loss, PARAMS, BATCH, key=jax.random.key(0), diag="fisher")
  with pytest.raises(ValueError, match="multiple of probe_batch"):
    scores.obd(loss, PARAMS, BATCH, key=jax.random.key(0), num_probes=3, probe_batch=2)


def test_nan_scores_name_the_leaf():
  nan_params = {"dense": {"kernel": jnp.full((3, 2), jnp.nan), "bias": jnp.zeros((2,))}}
  with pytest.raises(FloatingPointError, match=r"parameter 'dense/kernel' holds 6 NaN or Inf"):
    scores.oba(loss, nan_params, BATCH)
  log_loss = lambda p, b: jnp.mean(jnp.log(b["image"] @ p["dense"]["kernel"] - 3.0))
  with pytest.raises(FloatingPointError, match="taylor"):
    scores.taylor(log_loss, PARAMS, BATCH, order=1)


def test_bad_model_arguments():
  with pytest.raises(ValueError, match="depth=21 must be 6n\\+2"):
    models.ResNetCIFAR(21, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"VGG depth=17 is not supported; accepted: \[11, 13, 16, 19\]"):
    models.VGG(17, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="width must be a positive integer"):
    models.VGG(11, width=0, rngs=nnx.Rngs(0))


# --- reliability probes (issue 13): each failed silently or with a raw traceback ----------


def test_an_empty_batch_is_refused():
  empty = {"image": jnp.ones((0, 3)), "label": jnp.zeros((0,), jnp.int32)}
  with pytest.raises(ValueError, match=r"batch leaf 'image' has shape \(0, 3\): the batch is empty"):
    scores.oba(loss, PARAMS, empty)
  with pytest.raises(ValueError, match="the batch is empty"):
    scores.accumulate(lambda p, b: scores.taylor(loss, p, b), PARAMS, [empty])


def test_integer_parameters_are_refused_by_name():
  integer = {"dense": {"kernel": jnp.ones((3, 2), jnp.int32), "bias": jnp.zeros((2,))}}
  with pytest.raises(TypeError, match=r"parameter 'dense/kernel' has dtype int32; .* floating"):
    scores.oba(lambda p, b: jnp.mean(b["image"] @ p["dense"]["kernel"] * 1.0), integer, BATCH)


def test_plan_from_garbage_json():
  from oba_jax import plan
  with pytest.raises(ValueError, match=r"not the JSON of a Plan .*'garbage'"):
    plan.Plan.from_json("garbage")


def test_model_sizes_must_be_positive():
  with pytest.raises(ValueError, match=r"model 'resnet8_cifar': width=0 must be a positive integer"):
    models.check("resnet8_cifar", width=0)
  with pytest.raises(ValueError, match=r"does not take these arguments .*depth_multiplier"):
    models.check("resnet8_cifar", depth_multiplier=2)


# --- reliability probes (issue 26): numerics that passed silently ---------------------------


def _conv_then_norm(p, b):
  """A conv layer then a normalisation with batch statistics (training-mode BatchNorm)."""
  h = jax.lax.conv_general_dilated(b["image"], p["conv"]["kernel"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  h = (h - h.mean(0)) / jnp.sqrt(h.var(0) + 1e-5) * p["bn"]["scale"]
  return jnp.mean((h.mean((1, 2)) @ p["head"]["kernel"] - b["label"][:, None]) ** 2)


def _conv_params(key=0):
  k1, k2 = jax.random.split(jax.random.key(key))
  return {"bn": {"scale": jnp.ones((4,))}, "conv": {"kernel": jax.random.normal(k1, (3, 3, 2, 4))},
          "head": {"kernel": jax.random.normal(k2, (4, 1))}}


def test_a_nan_conv_kernel_is_blamed_not_the_batchnorm_scale_after_it():
  params = _conv_params()
  params["conv"]["kernel"] = params["conv"]["kernel"].at[1, 1, 0, 0].set(jnp.nan)  # center tap
  batch = {"image": jnp.ones((4, 1, 1, 2)), "label": jnp.arange(4.0)}
  with pytest.raises(FloatingPointError, match=r"parameter 'conv/kernel' holds 1 NaN or Inf"):
    scores.oba(_conv_then_norm, params, batch)
  with pytest.raises(FloatingPointError, match=r"parameter 'conv/kernel' holds 1 NaN or Inf"):
    scores.accumulate(lambda p, b: scores.oba(_conv_then_norm, p, b), params, [batch])


def test_scores_that_are_zero_because_of_a_batch_of_one_warn_with_the_reason():
  params = _conv_params()
  one = {"image": jnp.ones((1, 1, 1, 2)), "label": jnp.ones((1,))}  # a 1x1 map, one example
  with pytest.warns(RuntimeWarning, match="every score is zero.*one example: BatchNorm with batch"):
    zero = scores.oba(_conv_then_norm, params, one)
  assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(zero))
  with pytest.warns(RuntimeWarning, match="accumulate over 2 batches: every score is zero"):
    scores.accumulate(lambda p, b: scores.oba(_conv_then_norm, p, b), params, [one, one])
  two = {"image": jax.random.normal(jax.random.key(1), (2, 1, 1, 2)), "label": jnp.ones((2,))}
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # non-zero scores say nothing
    scores.oba(_conv_then_norm, params, two)


def test_half_precision_scores_are_summed_in_float32():
  params = {"w": jax.random.normal(jax.random.key(0), (64, 32)).astype(jnp.bfloat16)}
  x = jax.random.normal(jax.random.key(1), (16, 64)).astype(jnp.bfloat16)
  score = lambda p, b: scores.oba(lambda q, c: jnp.mean((c @ q["w"]) ** 2).astype(jnp.float32),
                                  p, b)
  one = scores.accumulate(score, params, [x])
  many = scores.accumulate(score, params, [x] * 200)  # the same batch: the same mean
  assert one["w"].dtype == many["w"].dtype == jnp.float32
  one, many = np.asarray(one["w"]), np.asarray(many["w"])
  # A bfloat16 running sum was 0.12 off (relative to the largest score) after 200 batches.
  assert np.abs(many - one).max() <= 1e-5 * np.abs(one).max()
