"""curvature="bilinear" (H_bil, the official OBA matrix) against dense float64 references.

The references are written independently of `oba_jax.bilinear`: each test
network is a plain function that calls `prod(b, u, v)` for every product the
documented rule counts (a parameter value times an activation, or a matrix
product of two activations), and

    H_bil = Σ_products J_uᵀ M J_v + (J_uᵀ M J_v)ᵀ,   M = ∂²⟨g, b(u, v)⟩ / ∂u ∂v,

with g the exact gradient at the product's output (from zero probes), J_u, J_v
the exact operand Jacobians (`jax.jacfwd`) and M from `jax.jacfwd(jax.grad)`.
The implementation sees only the unmarked loss (`prod = b(u, v)`) or the NNX
model it mirrors, and has to find the products in the jaxpr itself.
"""

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import oba_jax
from oba_jax import bilinear, curvature, scores
from oba_jax.delta import path_str, removal_delta
from numerics import rel_err, x64  # noqa: F401  (x64: float64 for every test)


def plain(b, u, v):
  return b(u, v)


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# --- the dense reference --------------------------------------------------------


def dense_bilinear(net, params, batch):
  """Dense H_bil over the flattened params of `net(params, batch, prod) -> loss`."""
  flat, unravel = ravel_pytree(params)
  recorded = []
  net(params, batch, lambda b, u, v: (recorded.append((b, u, v)), b(u, v))[1])

  def probed(p, probes):
    it = iter(probes)
    return net(p, batch, lambda b, u, v: b(u, v) + next(it))

  probes = [jnp.zeros(jnp.shape(b(u, v))) for b, u, v in recorded]
  out_grads = jax.grad(probed, argnums=1)(params, probes)

  def operand(i, which, f):
    found = []
    net(unravel(f), batch, lambda b, u, v: (found.append((u, v)), b(u, v))[1])
    return jnp.ravel(found[i][which])

  hessian = jnp.zeros((flat.size, flat.size))
  for i, (b, u, v) in enumerate(recorded):
    j_u = jax.jacfwd(functools.partial(operand, i, 0))(flat)
    j_v = jax.jacfwd(functools.partial(operand, i, 1))(flat)
    pairing = lambda uu, vv: jnp.vdot(out_grads[i], b(uu.reshape(jnp.shape(u)),
                                                      vv.reshape(jnp.shape(v))))
    m = jax.jacfwd(jax.grad(pairing, argnums=0), argnums=1)(jnp.ravel(u), jnp.ravel(v))
    block = j_u.T @ m @ j_v
    hessian = hessian + block + block.T
  return hessian, unravel, len(recorded)


# --- networks, each with its `prod` marks -------------------------------------------


def mlp_logits(p, batch, prod=plain):
  x = batch["image"]
  for i in range(3):
    x = prod(jnp.matmul, x, p[f"dense{i}"]["kernel"]) + p[f"dense{i}"]["bias"]
    if i < 2:
      x = jax.nn.relu(x)
  return x


def mlp_net(p, batch, prod=plain):
  return cross_entropy(mlp_logits(p, batch, prod), batch["label"])


def mlp_problem(seed=0, sizes=(6, 5, 4, 3)):
  keys = jax.random.split(jax.random.key(seed), len(sizes) + 1)
  params = {f"dense{i}": {
      "kernel": jax.random.normal(keys[i], (m, n), jnp.float64) / math.sqrt(m),
      "bias": 0.1 * jax.random.normal(jax.random.fold_in(keys[i], 1), (n,), jnp.float64)}
      for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:]))}
  batch = {"image": jax.random.normal(keys[-1], (8, sizes[0]), jnp.float64),
           "label": jax.random.randint(jax.random.fold_in(keys[-1], 1), (8,), 0, sizes[-1])}
  return mlp_net, mlp_net, params, batch


class SmallCNN(nnx.Module):
  """conv-BN-ReLU, conv-BN + residual add, ReLU, strided bias-free conv-BN-ReLU, pool, dense."""

  def __init__(self, rngs):
    self.conv1 = nnx.Conv(1, 3, (3, 3), padding="SAME", rngs=rngs)
    self.bn1 = nnx.BatchNorm(3, rngs=rngs)
    self.conv2 = nnx.Conv(3, 3, (3, 3), padding="SAME", rngs=rngs)
    self.bn2 = nnx.BatchNorm(3, rngs=rngs)
    self.conv3 = nnx.Conv(3, 4, (3, 3), strides=2, padding="SAME", use_bias=False, rngs=rngs)
    self.bn3 = nnx.BatchNorm(4, rngs=rngs)
    self.dense = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.bn1(self.conv1(x)))
    h = nnx.relu(self.bn2(self.conv2(h)) + h)
    h = nnx.relu(self.bn3(self.conv3(h)))
    return self.dense(jnp.mean(h, axis=(1, 2)))


def conv(x, kernel, stride=1):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def batch_norm(prod, x, p, stats, train, eps=1e-5):
  """Flax's factorisation: (x - mean) * (rsqrt(var + eps) * scale) + bias."""
  if train:
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.maximum(jnp.mean(x * x, axis=(0, 1, 2)) - mean * mean, 0.0)
    # rsqrt(batch var) * scale: an activation times a parameter; x - mean times it: two activations.
    return (x - mean) * prod(jnp.multiply, jax.lax.rsqrt(var + eps), p["scale"]) + p["bias"]
  # Running statistics are constants: rsqrt(var) * scale is a parameter value.
  return prod(jnp.multiply, x - stats["mean"], jax.lax.rsqrt(stats["var"] + eps) * p["scale"]) \
      + p["bias"]


def cnn_mirror(stats, train):
  """The SmallCNN forward pass written by hand, with its products marked."""

  def net(p, batch, prod=plain):
    layer = lambda name, x, stride=1: prod(functools.partial(conv, stride=stride), x,
                                           p[name]["kernel"]) + p[name].get("bias", 0.0)
    bn = lambda name, x: batch_norm(prod, x, p[name], stats[name], train)
    h = jax.nn.relu(bn("bn1", layer("conv1", batch["image"])))
    h = jax.nn.relu(bn("bn2", layer("conv2", h)) + h)
    h = jax.nn.relu(bn("bn3", layer("conv3", h, 2)))
    logits = prod(jnp.matmul, jnp.mean(h, axis=(1, 2)), p["dense"]["kernel"]) + p["dense"]["bias"]
    return cross_entropy(logits, batch["label"])

  return net


def cnn_problem(train, seed=0):
  objective, stats, params, batch = cnn_model(train, seed)
  return objective.loss, cnn_mirror(stats, train), params, batch


def cnn_model(train, seed=0):
  """SmallCNN with non-trivial BN statistics and biases, as an Objective, in float64."""
  model = SmallCNN(nnx.Rngs(seed))
  for i, (_, bn) in enumerate(sorted((p, m) for p, m in nnx.iter_graph(model)
                                     if isinstance(m, nnx.BatchNorm))):
    k = jax.random.key(100 + i)
    normal = lambda j, shape: jax.random.normal(jax.random.fold_in(k, j), shape, jnp.float32)
    bn.mean[...] = 0.1 * jax.random.normal(k, bn.mean.shape, jnp.float32)
    bn.var[...] = 1.0 + 0.2 * jax.random.uniform(jax.random.fold_in(k, 1), bn.var.shape,
                                                 jnp.float32)
    bn.scale[...] = 1.0 + 0.2 * normal(2, bn.scale.shape)
    bn.bias[...] = 0.1 * normal(3, bn.bias.shape)
  for _, c in nnx.iter_graph(model):
    if isinstance(c, (nnx.Conv, nnx.Linear)) and c.bias is not None:
      c.bias[...] = 0.1 * jax.random.normal(jax.random.key(7), c.bias.shape, jnp.float32)
  nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.float64), nnx.state(model)))
  model.train() if train else model.eval()
  stats = {name: {"mean": getattr(model, name).mean[...], "var": getattr(model, name).var[...]}
           for name in ("bn1", "bn2", "bn3")}
  apply_fn, params = oba_jax.functional(model)
  key = jax.random.key(seed + 1)
  batch = {"image": jax.random.normal(key, (4, 6, 6, 1), jnp.float64),
           "label": jax.random.randint(jax.random.fold_in(key, 1), (4,), 0, 3)}
  return oba_jax.classification(apply_fn), stats, params, batch


def attention_net(p, batch, prod=plain, heads=2):
  """Embedding, LayerNorm, softmax attention (q, k, v, out projections), residual, pool, dense."""
  dense = lambda name, x: prod(jnp.matmul, x, p[name]["kernel"]) + p[name]["bias"]
  x = dense("embed", batch["image"])  # [batch, tokens, features]
  mu = jnp.mean(x, -1, keepdims=True)
  var = jnp.mean((x - mu) ** 2, -1, keepdims=True)
  x_hat = (x - mu) * jax.lax.rsqrt(var + 1e-6)  # two activations: first order
  h = prod(jnp.multiply, x_hat, p["norm"]["scale"]) + p["norm"]["bias"]
  split = lambda t: t.reshape(t.shape[:2] + (heads, -1))
  q, k, v = (split(dense(n, h)) for n in ("query", "key", "value"))
  logits = prod(functools.partial(jnp.einsum, "bqhd,bkhd->bhqk"), q, k) / math.sqrt(q.shape[-1])
  a = jax.nn.softmax(logits, axis=-1)
  o = prod(functools.partial(jnp.einsum, "bhqk,bkhd->bqhd"), a, v)
  x = x + dense("out", o.reshape(o.shape[:2] + (-1,)))
  return cross_entropy(dense("classifier", jnp.mean(x, axis=1)), batch["label"])


def attention_problem(seed=0, features=4, inputs=3, tokens=3, classes=3):
  shapes = {"embed": (inputs, features), "query": (features, features), "key": (features, features),
            "value": (features, features), "out": (features, features),
            "classifier": (features, classes)}
  key = jax.random.key(seed)
  params = {name: {"kernel": jax.random.normal(jax.random.fold_in(key, i), s) / math.sqrt(s[0]),
                   "bias": 0.1 * jax.random.normal(jax.random.fold_in(key, 50 + i), s[1:])}
            for i, (name, s) in enumerate(shapes.items())}
  normal = lambda i: jax.random.normal(jax.random.fold_in(key, i), (features,))
  params["norm"] = {"scale": 1.0 + 0.2 * normal(98), "bias": 0.1 * normal(99)}
  batch = {"image": jax.random.normal(jax.random.fold_in(key, 100), (2, tokens, inputs)),
           "label": jnp.array([0, 2])}
  return attention_net, attention_net, params, batch


PROBLEMS = {
    "relu_mlp": mlp_problem,
    "cnn_bn_eval": functools.partial(cnn_problem, False),
    "cnn_bn_train": functools.partial(cnn_problem, True),
    "attention": attention_problem,
}


def resnet_problem(train):
  """The library's tiny wide ResNet (bias-free convs, BN, projection shortcuts)."""
  model = oba_jax.models.ResNetCIFAR(8, width=2, in_channels=1, num_classes=3, rngs=nnx.Rngs(0))
  model.train() if train else model.eval()
  nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.float64), nnx.state(model)))
  apply_fn, params = oba_jax.functional(model)
  key = jax.random.key(1)
  batch = {"image": jax.random.normal(key, (4, 6, 6, 1), jnp.float64),
           "label": jax.random.randint(jax.random.fold_in(key, 1), (4,), 0, 3)}
  return oba_jax.classification(apply_fn), params, batch


def random_like(params, seed=3):
  leaves, treedef = jax.tree.flatten(params)
  return treedef.unflatten([jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), x.shape)
                            for i, x in enumerate(leaves)])


def leaves_by_path(tree):
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@functools.cache
def reference(name):
  """(loss, params, batch, dense H_bil, unravel) of a problem, computed once per session."""
  with jax.enable_x64(True):
    loss, net, params, batch = PROBLEMS[name]()
    assert abs(float(loss(params, batch) - net(params, batch))) <= 1e-12  # the mirror is faithful
    hessian, unravel, _ = dense_bilinear(net, params, batch)
  return loss, params, batch, hessian, unravel


# --- exactness ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_scores_match_dense_reference(name):
  loss, params, batch, hessian, unravel = reference(name)
  delta = ravel_pytree(removal_delta(params))[0]
  expected = unravel(delta * (hessian @ delta) / 2)
  got = scores.oba(loss, params, batch, curvature="bilinear")
  assert jax.tree.structure(got) == jax.tree.structure(params)
  assert rel_err(got, expected) <= 1e-10
  # The sum is the quadratic form, and the first-order term adds g·δ.
  total = sum(float(jnp.sum(x)) for x in jax.tree.leaves(got))
  assert abs(total - float(delta @ hessian @ delta) / 2) <= 1e-10 * abs(total)
  with_grad = scores.oba(loss, params, batch, curvature="bilinear", first_order=True)
  grad = jax.grad(loss)(params, batch)
  assert rel_err(with_grad, jax.tree.map(lambda s, g, d: s + g * d, got, grad,
                                         removal_delta(params))) <= 1e-12


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_product_matches_dense_reference_in_every_direction(name):
  # A direction that moves every parameter, normalisation scales and biases included.
  loss, params, batch, hessian, unravel = reference(name)
  v = random_like(params)
  grad, h_v = curvature.bilinear_vp(loss, params, batch, v)
  assert rel_err(h_v, unravel(hessian @ ravel_pytree(v)[0])) <= 1e-10
  assert rel_err(grad, jax.grad(loss)(params, batch)) <= 1e-12
  assert float(jnp.max(jnp.abs(hessian - hessian.T))) <= 1e-12


def test_products_are_found_in_the_jaxpr():
  loss, _, params, batch = attention_problem()
  kinds = [p.kind for p in bilinear.products(loss, params, batch)]
  # The embedding reads the data (linear); norm scale, q, k, v, out, classifier are
  # parameter layers; q·kᵀ and A·v are the parallel terms.
  assert kinds.count("parameter") == 6 and kinds.count("parallel") == 2
  loss, _, params, batch = cnn_problem(train=True)
  found = bilinear.products(loss, params, batch)
  assert [p.primitive for p in found] == (["mul", "conv_general_dilated"] * 2
                                          + ["mul", "dot_general"])


# --- relations to the other curvatures -------------------------------------------


@pytest.mark.parametrize("name", ["relu_mlp", "cnn_bn_eval", "resnet_bn_eval"])
def test_equals_residual_on_relu_nets_with_fixed_statistics(name):
  if name == "resnet_bn_eval":
    objective, params, batch = resnet_problem(train=False)
    loss, model_fn, output_loss = objective.loss, objective.model, objective.output_loss
  else:
    loss, _, params, batch = PROBLEMS[name]()
    # Split the loss at the logits for the Gauss-Newton part; the bilinear score needs only loss.
    model_fn, output_loss = logits_split(name, params)
  bil = scores.oba(loss, params, batch, curvature="bilinear")
  res = scores.oba(loss, params, batch, curvature="residual", model_fn=model_fn,
                   output_loss_fn=output_loss)
  assert rel_err(bil, res) <= 1e-10
  v = random_like(params)
  assert rel_err(curvature.bilinear_vp(loss, params, batch, v)[1],
                 curvature.residual_vp(model_fn, output_loss, params, batch, v)[1]) <= 1e-10


def logits_split(name, params):
  """(model_fn, output_loss_fn) of the dict MLP or of SmallCNN in eval mode."""
  if name == "relu_mlp":
    return mlp_logits, lambda logits, batch: cross_entropy(logits, batch["label"])
  objective = cnn_model(train=False)[0]
  return objective.model, objective.output_loss


def test_train_mode_batchnorm_keeps_what_residual_loses():
  # Batch-statistics BN makes each bias-free conv scale-invariant: the exact tangent
  # after conv+BN vanishes, so H - GGN hardly sees the convs (~1e-5 here), while the
  # product terms ("upward": the conv's output meets the next layer's kernel) stay of
  # order one. Per output channel, the official score sums to ~0 (oba_method.md §2.8).
  objective, params, batch = resnet_problem(train=True)
  bil = leaves_by_path(scores.oba(objective.loss, params, batch, curvature="bilinear"))
  res = leaves_by_path(scores.oba(objective.loss, params, batch, curvature="residual",
                                  model_fn=objective.model, output_loss_fn=objective.output_loss))
  convs = [k for k in bil if "conv" in k and "kernel" in k]
  assert len(convs) == 9  # the stem and eight block convs
  norm = lambda tree, keys: float(jnp.sqrt(sum(jnp.sum(tree[k] ** 2) for k in keys)))
  assert norm(bil, convs) >= 1.0
  assert norm(res, convs) <= 1e-4 * norm(bil, convs)
  for k in convs:
    assert float(jnp.linalg.norm(bil[k])) >= 0.02, k
    channel_sums = jnp.sum(bil[k], axis=(0, 1, 2))
    assert float(jnp.max(jnp.abs(channel_sums))) <= 1e-4 * float(jnp.linalg.norm(bil[k])), k


# --- structure of H_bil ------------------------------------------------------------


def layers(params):
  """Path prefixes ('block/conv') of the leaves that have a kernel or a bias."""
  paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  return sorted({p.rpartition("/")[0] for p in paths if p.rpartition("/")[2] == "kernel"})


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_zero_diagonal_blocks(name):
  # A layer never meets itself in a product, unless its output feeds both operands
  # of one: the attention embedding feeds q and k (and A and v). There the diagonal
  # block is not zero, though along δ = -θ LayerNorm's scale invariance hides it.
  loss, params, batch, hessian, unravel = reference(name)
  scale = float(jnp.max(jnp.abs(ravel_pytree(scores.oba(loss, params, batch,
                                                        curvature="bilinear"))[0])))
  for layer in layers(params):
    only = lambda path, leaf, layer=layer: path.startswith(layer + "/")
    mask = ravel_pytree(jax.tree.map(lambda m, x: jnp.full(x.shape, m),
                                     oba_jax.delta.prunable_mask(params, only), params))[0]
    v = removal_delta(params, random_like(params), only)
    flat_v = ravel_pytree(v)[0]
    own = jnp.where(mask, ravel_pytree(curvature.bilinear_vp(loss, params, batch, v)[1])[0], 0)
    dense_own = jnp.where(mask, hessian @ flat_v, 0)
    assert jnp.count_nonzero(flat_v) > 0, layer
    if name == "attention" and layer == "embed":
      assert float(jnp.linalg.norm(dense_own)) >= 1e-2 * float(jnp.linalg.norm(hessian @ flat_v))
      assert rel_err(own, dense_own) <= 1e-10
      continue
    assert float(jnp.max(jnp.abs(dense_own))) <= 1e-14 * float(jnp.max(jnp.abs(hessian)))
    assert float(jnp.max(jnp.abs(own))) <= 1e-12 * float(jnp.max(jnp.abs(hessian))), layer
    # So removing the layer alone scores zero (exactly zero scores warn that they rank nothing).
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", "oba.*every score is zero", RuntimeWarning)
      alone = scores.oba(loss, params, batch, curvature="bilinear", prunable=only)
    assert float(jnp.max(jnp.abs(ravel_pytree(alone)[0]))) <= 1e-12 * scale, layer


# --- sub-jaxprs, jit and errors ----------------------------------------------------


@jax.custom_vjp
def custom_dense(x, kernel):
  return x @ kernel


custom_dense.defvjp(lambda x, k: (x @ k, (x, k)), lambda res, g: (g @ res[1].T, res[0].T @ g))


def test_calls_remat_and_custom_rules_are_seen_through():
  # The same MLP with a layer under jax.checkpoint, one under jax.jit and one with a
  # custom VJP: the same products, the same H_bil.
  _, _, params, batch = mlp_problem()

  def wrapped(p, b):
    x = jax.checkpoint(lambda x: jax.nn.relu(x @ p["dense0"]["kernel"] + p["dense0"]["bias"]))(
        b["image"])
    x = jax.jit(lambda x, w: jax.nn.relu(x @ w))(x, p["dense1"]["kernel"])
    return cross_entropy(custom_dense(x, p["dense2"]["kernel"]) + p["dense2"]["bias"], b["label"])

  def reference_loss(p, b):
    x = jax.nn.relu(b["image"] @ p["dense0"]["kernel"] + p["dense0"]["bias"])
    x = jax.nn.relu(x @ p["dense1"]["kernel"])
    return cross_entropy(x @ p["dense2"]["kernel"] + p["dense2"]["bias"], b["label"])

  kinds = [p.kind for p in bilinear.products(wrapped, params, batch)]
  assert kinds == ["parameter", "parameter"]
  v = random_like(params)
  assert rel_err(curvature.bilinear_vp(wrapped, params, batch, v)[1],
                 curvature.bilinear_vp(reference_loss, params, batch, v)[1]) <= 1e-12


def test_products_inside_a_loop_are_an_error():
  _, _, params, batch = mlp_problem(sizes=(4, 4, 4, 4))

  def scanned(p, b):
    kernels = jnp.stack([p[f"dense{i}"]["kernel"] for i in range(3)])
    x, _ = jax.lax.scan(lambda x, k: (jax.nn.relu(x @ k), None), b["image"], kernels)
    return cross_entropy(x, b["label"])

  with pytest.raises(NotImplementedError, match="cannot look inside `scan`"):
    scores.oba(scanned, params, batch, curvature="bilinear")


def test_bilinear_is_jittable():
  loss, _, params, batch = cnn_problem(train=True)
  jitted = jax.jit(functools.partial(scores.oba, loss, curvature="bilinear"))
  eager = scores.oba(loss, params, batch, curvature="bilinear")
  assert rel_err(jitted(params, batch), eager) <= 1e-12


def test_bad_input_errors():
  loss, _, params, batch = mlp_problem()
  with pytest.raises(ValueError, match=r"accepted: \['bilinear', 'ggn', 'hessian', 'residual'\]"):
    scores.oba(loss, params, batch, curvature="bilinar")
  with pytest.raises(TypeError, match="must return a real scalar"):
    scores.oba(lambda p, b: jnp.ones(3), params, batch, curvature="bilinear")
  with pytest.raises(ValueError, match="does not have the structure of params"):
    scores.oba(loss, params, batch, curvature="bilinear", delta={"dense0": params["dense0"]})


def test_custom_derivative_rules_are_kept():
  # ReLU's custom rule says relu'(0) = 0; its body max(x, 0) would say 1/2. Pruned
  # (all-zero) channels put exact zeros there, so the rule must survive.
  params = {"dense0": {"kernel": jnp.array([[1.0, -1.0], [0.0, 0.0]])},
            "dense1": {"kernel": jnp.array([[1.0], [2.0]])}}
  batch = jnp.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])
  model_fn = lambda p, x: jax.nn.relu(x @ p["dense0"]["kernel"]) @ p["dense1"]["kernel"]
  output_loss = lambda y, x: jnp.sum(y ** 2)
  loss = lambda p, x: output_loss(model_fn(p, x), x)
  v = random_like(params)
  grad, h_v = curvature.bilinear_vp(loss, params, batch, v)
  assert rel_err(grad, jax.grad(loss)(params, batch)) == 0
  assert rel_err(h_v, curvature.residual_vp(model_fn, output_loss, params, batch, v)[1]) <= 1e-12


def test_accumulate_over_batches():
  # Under scores.accumulate's jitted, mesh-sharded step, with batch-statistics BN.
  loss, _, params, batch = cnn_problem(train=True)
  batches = [batch, {"image": 0.5 * batch["image"] + 0.1, "label": batch["label"][::-1]}]
  score_fn = functools.partial(scores.oba, loss, curvature="bilinear")
  got = scores.accumulate(score_fn, params, batches)
  expected = jax.tree.map(lambda a, b: (a + b) / 2, *(score_fn(params, b) for b in batches))
  assert rel_err(got, expected) <= 1e-10
