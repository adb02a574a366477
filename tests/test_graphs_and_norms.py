"""Graph networks (scatter-add over nodes) and normalisations under `compact`.

- `jax.ops.segment_sum` on a pruned feature axis: the node axis it indexes is
  data, the feature axis carries through; a jraph GCN layer and a jraph
  message-passing block prune, compact exactly and count their MACs.
- `surgery.compact` never silently differs: an RMSNorm over a cut group is kept
  exact; a LayerNorm or GroupNorm (positions within a group) is refused by name
  unless `renormalize=True`.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import engine_models as em
import oba_jax
from numerics import x64  # noqa: F401 - x64 is an autouse fixture
from oba_jax import flops, masks, plan, surgery
from oba_jax.structure import trace

jraph = pytest.importorskip("jraph")

NODES, FEATURES, HIDDEN, EDGES = 5, 3, 6, 7


def graph():
  senders = jnp.array([0, 1, 2, 3, 4, 0, 2])
  receivers = jnp.array([1, 2, 3, 4, 0, 2, 0])
  nodes = jax.random.normal(jax.random.key(3), (NODES, FEATURES))
  edges = jax.random.normal(jax.random.key(4), (EDGES, 2))
  return jraph.GraphsTuple(nodes=nodes, edges=edges, senders=senders, receivers=receivers,
                           n_node=jnp.array([NODES]), n_edge=jnp.array([EDGES]), globals=None)


def dense(key, n_in, n_out):
  k1, k2 = jax.random.split(key)
  return {"kernel": jax.random.normal(k1, (n_in, n_out)), "bias": jax.random.normal(k2, (n_out,))}


def linear(p, x):
  return x @ p["kernel"] + p["bias"]


def gcn(params, g):
  """Two jraph GCN layers (symmetric normalisation, self edges) and a readout."""
  for name in ("gcn1", "gcn2"):
    layer = jraph.GraphConvolution(lambda x, p=params[name]: linear(p, x), add_self_edges=True)
    g = layer(g)._replace(nodes=jax.nn.relu(layer(g).nodes))
  return linear(params["readout"], g.nodes)


def gcn_params():
  k = jax.random.split(jax.random.key(0), 3)
  return {"gcn1": dense(k[0], FEATURES, HIDDEN), "gcn2": dense(k[1], HIDDEN, HIDDEN),
          "readout": dense(k[2], HIDDEN, 2)}


def message_passing(params, g):
  """One jraph GraphNetwork block: edge MLP on (edge, sender, receiver), node MLP on sums."""

  def update_edge(edges, senders, receivers, _):
    return jax.nn.relu(linear(params["edge"], jnp.concatenate([edges, senders, receivers], -1)))

  def update_node(nodes, _, received, __):
    return jax.nn.relu(linear(params["node"], jnp.concatenate([nodes, received], -1)))

  g = jraph.GraphNetwork(update_edge, update_node)(g)
  return linear(params["readout"], g.nodes)


def message_passing_params():
  k = jax.random.split(jax.random.key(1), 3)
  return {"edge": dense(k[0], 2 + 2 * FEATURES, HIDDEN),
          "node": dense(k[1], FEATURES + HIDDEN, HIDDEN), "readout": dense(k[2], HIDDEN, 2)}


@pytest.mark.parametrize("model", [(gcn, gcn_params), (message_passing, message_passing_params)],
                         ids=["gcn", "message_passing"])
def test_graph_networks_prune_and_compact_exactly(model):
  apply_fn, make_params = model
  params, g = make_params(), graph()
  s = trace(apply_fn, g, params=params)
  hidden = [grp for grp in s.groups if grp.size == HIDDEN]
  assert hidden, [grp.name for grp in s.groups]
  rng = np.random.default_rng(0)
  chosen = plan.select(s, {grp.name: rng.random(grp.size) for grp in s.groups},
                       target=plan.KeptFlops(0.5))
  assert any(len(chosen.removed[grp.name]) for grp in hidden)
  small_fn, small_params = surgery.compact_fn(apply_fn, params, chosen)
  np.testing.assert_allclose(small_fn(small_params, g),
                             apply_fn(masks.apply_plan(params, s, chosen), g), atol=1e-12)
  counted = flops.count(small_fn, g, params=small_params)
  assert (counted.macs, counted.params) == (chosen.predicted.macs, chosen.predicted.params)


def test_segment_sum_counts_one_mac_per_summed_entry():
  params, g = gcn_params(), graph()
  macs = flops.count(gcn, g, params=params).macs_per_layer
  summed = sum(v for k, v in macs.items() if k.startswith("scatter-add"))
  # Per layer: the messages (edges + self edges) x features, and the degree counts (one each).
  edges = EDGES + NODES
  assert summed == 2 * (edges * HIDDEN + 2 * edges)


# --- compact over normalisations ----------------------------------------------------


def cut_normalized(model, *inputs):
  """A plan that removes indices of the model's normalized groups (they rank first)."""
  model.eval()
  s = trace(model, *inputs)
  rng = np.random.default_rng(0)
  scores = {g.name: rng.random(g.size) - (10.0 if g.normalized else 0.0) for g in s.groups}
  chosen = plan.select(s, scores, target=plan.KeptFlops(0.7))
  assert any(len(chosen.removed[g.name]) for g in s.groups if g.normalized)
  return chosen


@pytest.fixture
def attention_resizer():
  surgery.register_resizer(em.CausalAttention, em.resize_causal_attention)
  yield
  surgery._RESIZERS.pop(em.CausalAttention, None)


def test_compact_keeps_rmsnorm_exact(attention_resizer):  # noqa: ARG001 - fixture
  model = em.TinyLM(nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 5), 0, 11)
  chosen = cut_normalized(model, tokens)
  small = surgery.compact(model, chosen)
  want = masks.apply(model, chosen)(tokens)
  np.testing.assert_allclose(small(tokens), want, rtol=1e-5, atol=1e-6)  # float32 models


@pytest.mark.parametrize("name, make, module", [
    ("layer_norm", lambda: em.ConvNeXtBlock(nnx.Rngs(0)), "`norm` (LayerNorm)"),
    ("group_norm", lambda: em.GroupNormCNN(nnx.Rngs(0)), "`norm1` (GroupNorm)"),
])
def test_compact_refuses_other_normalisations_unless_asked(name, make, module):
  del name
  model = make()
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  chosen = cut_normalized(model, x)
  with pytest.raises(surgery.CompactionError, match=re.escape(module) + ".*renormalize=True"):
    surgery.compact(model, chosen)
  small = surgery.compact(model, chosen, renormalize=True)
  small_fn, small_params = surgery.compact_fn(*oba_jax.functional(model), chosen)
  masked = masks.apply(model, chosen)(x)
  np.testing.assert_allclose(small_fn(small_params, x), masked, rtol=1e-5, atol=1e-6)  # float32 models
  assert float(jnp.linalg.norm(small(x) - masked)) > 1e-3 * float(jnp.linalg.norm(masked))


def test_compact_fn_refuses_a_cut_centred_variance_normalisation():
  eqx = pytest.importorskip("equinox")
  k1, k2 = jax.random.split(jax.random.key(0))
  model = [eqx.nn.Linear(3, 6, key=k1), eqx.nn.LayerNorm(6), eqx.nn.Linear(6, 2, key=k2)]
  params, static = eqx.partition(model, eqx.is_array)

  def apply_fn(p, x):  # eqx.nn.LayerNorm: the variance of centred values
    first, norm, last = eqx.combine(p, static)
    return jax.vmap(lambda v: last(jax.nn.relu(norm(first(v)))))(x)

  x = jax.random.normal(jax.random.key(1), (4, 3))
  s = trace(apply_fn, x, params=params)
  (hidden,) = [g for g in s.groups if g.normalized]
  chosen = plan.from_removed(s, {g.name: [0] if g is hidden else [] for g in s.groups})
  with pytest.raises(surgery.CompactionError, match=r"another function than the masked model"):
    surgery.compact_fn(apply_fn, params, chosen)
