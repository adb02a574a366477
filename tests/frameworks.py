"""Tiny models from third-party JAX libraries, as a user writes them: `apply_fn(params, x)`.

Each builder returns `(apply_fn, params, prunable)`: the framework's own parameter
pytree (an `eqx.Module`, haiku's nested dict, penzai's `ParameterValue`s by label)
and the `prunable=` its naming needs (None when the default kernel/bias rule
matches). Builders skip the test when the library is not installed.
"""

import jax
import jax.numpy as jnp
import pytest

IN_FEATURES, OUT_FEATURES = 3, 2


def equinox_mlp():
  """`eqx.nn.MLP`, partitioned into arrays and the rest (leaves 'layers/0/weight')."""
  eqx = pytest.importorskip("equinox")
  model = eqx.nn.MLP(IN_FEATURES, OUT_FEATURES, 6, 2, key=jax.random.key(0))
  params, static = eqx.partition(model, eqx.is_array)
  return (lambda p, x: jax.vmap(eqx.combine(p, static))(x)), params, None


def haiku_mlp():
  """`hk.nets.MLP` through `hk.transform` (leaves 'mlp/~/linear_0/w')."""
  hk = pytest.importorskip("haiku")
  f = hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP([6, 6, OUT_FEATURES])(x)))
  return f.apply, f.init(jax.random.key(0), jnp.zeros((1, IN_FEATURES))), None


def penzai_mlp():
  """Penzai named-axis layers; its leaves ('fc1.weights/value/data_array') miss the naming rule."""
  pz = pytest.importorskip("penzai.pz")
  linear = lambda name, i, o, seed: pz.nn.Linear.from_config(
      name=name, init_base_rng=jax.random.key(seed), input_axes=i, output_axes=o,
      dtype=jnp.float64)
  model = pz.nn.Sequential([
      linear("fc1", {"features": IN_FEATURES}, {"hidden": 6}, 0),
      pz.nn.AddBias.from_config(name="fc1_bias", init_base_rng=jax.random.key(2), biased_axes={"hidden": 6},
                                dtype=jnp.float64),
      pz.nn.Elementwise(jax.nn.relu),
      linear("fc2", {"hidden": 6}, {"out": OUT_FEATURES}, 1),
  ])
  unbound, values = pz.unbind_params(model, freeze=True)
  params = {v.label: v for v in values}
  params = jax.tree.map(lambda x: x + 0.1 if x.ndim == 1 else x, params)  # non-zero biases

  def apply_fn(p, x):
    bound = pz.bind_variables(unbound, list(p.values()))
    return bound(pz.nx.wrap(x).tag("batch", "features")).unwrap("batch", "out")

  scored = lambda path, leaf: path.split("/")[0].rpartition(".")[2] in ("weights", "bias")
  return apply_fn, params, scored


FRAMEWORKS = {"equinox": equinox_mlp, "haiku": haiku_mlp, "penzai": penzai_mlp}
