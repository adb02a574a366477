"""The structure engine on unseen patterns: trace -> plan -> masked == compact_fn == compact.

Every model here is small and new to the engine; each exercises one general
mechanism (see `engine_models`). The chain: trace, random group scores (groups
flagged `normalized` ranked last), `plan.select(KeptFlops(0.5))`, then the
masked outputs equal `compact_fn`'s outputs (unless a normalized group lost
indices), `compact`'s outputs equal those too (or `compact` refuses clearly),
the MACs counted on the compacted function equal the plan's prediction, and
group names are unique.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import engine_models as em
import oba_jax
import structure_models as sm
from oba_jax import flops, masks, plan, surgery
from oba_jax.structure import UnsupportedPrimitiveError, trace

IMAGE = (2, 8, 8, 3)


def close(a, b, tol=1e-5):
  a, b = jnp.asarray(a), jnp.asarray(b)
  assert a.shape == b.shape
  assert float(jnp.linalg.norm(a - b)) <= tol * max(float(jnp.linalg.norm(b)), 1e-6)


def chain(apply_fn, params, inputs, *, model=None, ignore=(), ratio=0.5, seed=0):
  """Runs the chain and returns (structure, plan, compact_apply, compact_params, outputs)."""
  s = (trace(model, *inputs, ignore=ignore) if model is not None
       else trace(apply_fn, *inputs, params=params, ignore=ignore))
  names = [g.name for g in s.groups]
  assert len(set(names)) == len(names) and names
  rng = np.random.default_rng(seed)
  scores = {g.name: rng.random(g.size) + (10.0 if g.normalized else 0.0) for g in s.groups}
  chosen = plan.select(s, scores, target=plan.KeptFlops(ratio))
  assert chosen.predicted.macs <= ratio * s.cost().macs
  small_fn, small_params = surgery.compact_fn(apply_fn, params, chosen)
  got = small_fn(small_params, *inputs)
  if not any(chosen.removed[g.name] for g in s.groups if g.normalized):
    close(got, apply_fn(masks.apply_plan(params, s, chosen), *inputs))
  counted = flops.count(small_fn, *inputs, params=small_params)
  assert (counted.macs, counted.params) == (chosen.predicted.macs, chosen.predicted.params)
  close(jax.jit(small_fn)(small_params, *inputs), got)
  return s, chosen, small_fn, small_params, got


def nnx_chain(model, *inputs, **kw):
  """The chain for an NNX module, and `compact`'s module checked against `compact_fn`."""
  model.eval()
  apply_fn, params = oba_jax.functional(model)
  s, chosen, small_fn, small_params, got = chain(apply_fn, params, inputs, model=model, **kw)
  small = surgery.compact(model, chosen)
  close(small(*inputs), got)
  return s, chosen, small


def image(seed=1, shape=IMAGE):
  return jax.random.normal(jax.random.key(seed), shape)


def tokens(vocab, seed=1):
  return jax.random.randint(jax.random.key(seed), (2, 5), 0, vocab)


# --- the chain on every model -----------------------------------------------------

NNX_MODELS = {
    "dense_block": (lambda: sm.DenseBlock(nnx.Rngs(0)), lambda: image()),
    "inverted_residual": (lambda: sm.InvertedResidual(nnx.Rngs(0)), lambda: image()),
    "conv_flatten_dense": (lambda: sm.ConvFlattenDense(nnx.Rngs(0)),
                           lambda: image(shape=(2, 6, 6, 3))),
    "where_gate": (lambda: em.WhereGate(nnx.Rngs(0)), lambda: image(shape=(2, 3))),
    "split_branches": (lambda: em.SplitBranches(nnx.Rngs(0)), lambda: image(shape=(2, 4))),
    "shuffle_block": (lambda: em.ShuffleBlock(nnx.Rngs(0)), lambda: image()),
    "group_norm_cnn": (lambda: em.GroupNormCNN(nnx.Rngs(0)), lambda: image()),
    "unet": (lambda: em.UNet(nnx.Rngs(0)), lambda: image()),
    "convnext_block": (lambda: em.ConvNeXtBlock(nnx.Rngs(0)), lambda: image()),
    "lm_untied": (lambda: em.TinyLM(nnx.Rngs(0)), lambda: tokens(11)),
    "lm_tied": (lambda: em.TinyLM(nnx.Rngs(0), tied=True), lambda: tokens(11)),
    "nnx_scanned_stack": (lambda: em.ScannedStack(nnx.Rngs(0)), lambda: image(shape=(2, 3))),
}


@pytest.fixture(autouse=True)
def causal_attention_resizer():
  """The documented way to teach `compact` a custom module (removed again after each test)."""
  surgery.register_resizer(em.CausalAttention, em.resize_causal_attention)
  yield
  surgery._RESIZERS.pop(em.CausalAttention, None)


@pytest.mark.parametrize("name", sorted(NNX_MODELS))
def test_nnx_models_chain(name):
  ctor, inputs = NNX_MODELS[name]
  nnx_chain(ctor(), inputs())


def test_scanned_transformer_chain():
  params = em.scanned_transformer_params(jax.random.key(0))
  s, chosen, *_ = chain(em.scanned_transformer, params, (tokens(7),))
  heads = [g for g in s.groups if any(m.path == "blocks/wq" and m.axis == 2 and m.position == 0
                                      for m in g.members)]
  assert heads and heads[0].size == 2  # one group for the heads of every layer (uniform)


def test_mapped_experts_chain():
  params = em.mapped_experts_params(jax.random.key(0))
  chain(em.mapped_experts, params, (image(shape=(2, 4)),))


def test_while_loop_chain():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {"inp": jax.random.normal(k1, (3, 5)), "w": jax.random.normal(k2, (5, 5)) / 3,
            "out": jax.random.normal(k3, (5, 2))}
  chain(em.while_refined, params, (image(shape=(2, 3)),), ratio=0.7)


def test_hints_chain():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {"w1": jax.random.normal(k1, (3, 6)), "w2": jax.random.normal(k2, (6, 2)),
            "skip": jax.random.normal(k3, (3, 2))}
  chain(em.hinted, params, (image(shape=(2, 3)),), ratio=0.7)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_cond_chain(sign):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {"w1": jax.random.normal(k1, (3, 6)), "mix": jax.random.normal(k2, (6, 6)),
            "w2": jax.random.normal(k3, (6, 2))}
  x = jnp.abs(image(shape=(2, 3))) * sign  # takes one branch, then the other
  s, *_ = chain(em.branching, params, (x,), ratio=0.7)
  assert flops.count(em.branching, x, params=params).macs == 2 * 3 * 6 + 2 * 36 + 2 * 6 * 2


def test_linen_chain():
  module = em.LinenCNN()
  x = image()
  variables = module.init(jax.random.key(0), x)
  apply_fn = lambda p, x: module.apply({"params": p}, x)
  chain(apply_fn, variables["params"], (x,))


# --- the patterns one by one ---------------------------------------------------------


def test_literal_passed_into_a_jitted_helper_is_traced():
  s = trace(em.WhereGate(nnx.Rngs(0)), jnp.ones((2, 3)))
  assert [g.name for g in s.groups] == ["fc1/kernel@1"]


def test_split_parts_are_distinct_groups():
  s = trace(em.SplitBranches(nnx.Rngs(0)), jnp.ones((2, 4)))
  parts = {(m.offset, m.factors) for g in s.groups for m in g.members
           if (m.path, m.axis) == ("fc/kernel", 1)}
  assert parts == {(0, (3,)), (3, (5,))}
  names = [g.name for g in s.groups]
  assert {"fc/kernel@1", "fc/kernel@1+3"} <= set(names)
  # left's outputs land at y[4:8] and y[..., :6] keeps two of them: two groups.
  assert {"left/kernel@1", "left/kernel@1+2"} <= set(names)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shuffled_grouped_conv_keeps_its_groups(seed):
  model = em.ShuffleBlock(nnx.Rngs(0))
  _, chosen, small = nnx_chain(model, image(), seed=seed)
  close(small(image()), masks.apply(model, chosen)(image()))
  for conv in (small.reduce, small.expand, small.depthwise):
    assert conv.in_features == conv.kernel.shape[-2] * conv.feature_group_count
    assert conv.kernel.shape[-1] % conv.feature_group_count == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_norm_is_resized(seed):
  model = em.GroupNormCNN(nnx.Rngs(0))
  s, chosen, small = nnx_chain(model, image(), seed=seed)
  close(small(image()), masks.apply(model, chosen)(image()))
  for norm in (small.norm1, small.norm2):
    assert norm.num_groups * norm.group_size == norm.num_features == norm.scale.shape[0]
  whole = [g for g in s.groups if ("norm1/scale", 0, 0) in
           {(m.path, m.axis, m.position) for m in g.members}]
  assert whole and whole[0].size == 4 and not whole[0].normalized  # whole groups: exact


def test_int_head_count_refused_by_compact_and_fine_with_compact_fn():
  model = em.AttentionClassifier(nnx.Rngs(0))
  x = image(shape=(2, 5, 3))
  apply_fn, params = oba_jax.functional(model)
  s = trace(model, x)
  heads = next(g for g in s.groups if any(m.path == "attn/qkv/kernel" and m.position == 0
                                          and len(m.factors) == 2 for m in g.members))
  removed = {g.name: () for g in s.groups} | {heads.name: (1,)}
  chosen = plan.Plan(removed, {g.name: g.size - len(removed[g.name]) for g in s.groups},
                     s.cost(), s.cost(), plan.fingerprint(s), s)
  small_fn, small_params = surgery.compact_fn(apply_fn, params, chosen)
  close(small_fn(small_params, x), apply_fn(masks.apply_plan(params, s, chosen), x))
  with pytest.raises(surgery.CompactionError, match=r"`attn`.*num_heads = 2.*compact_fn"):
    surgery.compact(model, chosen)

  def resize(module, factors):
    module.num_heads, module.head_size = factors("qkv/kernel", 1)  # (heads, head size)

  surgery.register_resizer(em.IntHeadsAttention, resize)
  try:
    close(surgery.compact(model, chosen)(x), small_fn(small_params, x))
  finally:
    surgery._RESIZERS.pop(em.IntHeadsAttention)


def test_embedding_feature_axis_is_a_group_and_rows_are_data():
  for tied in (False, True):
    s = trace(em.TinyLM(nnx.Rngs(0), tied=tied), tokens(11))
    members = {(m.path, m.axis) for g in s.groups for m in g.members}
    assert ("embed/embedding", 1) in members and ("embed/embedding", 0) not in members


def test_scan_macs_are_counted_per_iteration_and_carries_coupled():
  w = jax.random.normal(jax.random.key(0), (3, 4, 4))
  x = jnp.ones((2, 4))
  step = lambda c, w: (jnp.tanh(c @ w), None)
  fn = lambda p, x: jax.lax.scan(step, x @ p["a"], p["w"])[0] @ p["b"]
  params = {"a": jnp.ones((4, 4)), "w": w, "b": jnp.ones((4, 2))}
  assert flops.count(fn, x, params=params).macs == 2 * 16 + 3 * 2 * 16 + 2 * 8
  s = trace(fn, x, params=params)
  # The carry couples a's outputs with every layer's inputs and outputs: one group.
  (group,) = s.groups
  assert {(m.path, m.axis) for m in group.members} == {("a", 1), ("w", 1), ("w", 2), ("b", 0)}


def test_scanned_macs_are_the_blocks_times_the_length():
  params = em.scanned_transformer_params(jax.random.key(0))
  x = tokens(7)
  with_layers = lambda n: {**params, "blocks": jax.tree.map(lambda a: a[:n], params["blocks"])}
  macs = [flops.count(em.scanned_transformer, x, params=with_layers(n)).macs for n in (0, 1, 2)]
  assert macs[2] - macs[0] == 2 * (macs[1] - macs[0]) > 0


def test_unsupported_primitive_is_still_a_clear_error():
  with pytest.raises(UnsupportedPrimitiveError, match="'sort'"):
    trace(sm.SortsFeatures(nnx.Rngs(0)), jnp.ones((2, 3)))


def test_compact_fn_refuses_a_plan_of_another_model():
  unet, gn = em.UNet(nnx.Rngs(0)), em.GroupNormCNN(nnx.Rngs(0))
  s = trace(unet, image())
  chosen = plan.select(s, {g.name: np.arange(g.size, dtype=float) for g in s.groups},
                       target=plan.KeptFlops(0.5))
  with pytest.raises(ValueError, match="another model"):
    surgery.compact_fn(*oba_jax.functional(gn), chosen)


def test_compact_fn_runs_at_other_input_shapes():
  model = em.UNet(nnx.Rngs(0))
  model.eval()
  apply_fn, params = oba_jax.functional(model)
  s = trace(model, image())
  chosen = plan.select(s, {g.name: np.arange(g.size, dtype=float) for g in s.groups},
                       target=plan.KeptFlops(0.5))
  small_fn, small_params = surgery.compact_fn(apply_fn, params, chosen)
  bigger = image(shape=(3, 12, 12, 3))
  close(small_fn(small_params, bigger), apply_fn(masks.apply_plan(params, s, chosen), bigger))


class FlaxAttention(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.inp = nnx.Linear(3, 8, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8, decode=False,
                                       rngs=rngs)
    self.out = nnx.Linear(8, 2, rngs=rngs)

  def __call__(self, x):
    h = self.inp(x)
    return self.out(h + self.attn(h))


def test_flax_attention_heads_compact_and_mismatched_head_sizes_are_refused():
  model = FlaxAttention(nnx.Rngs(0))
  x = image(shape=(2, 5, 3))
  s = trace(model, x)
  heads = next(g for g in s.groups if any(m.path == "attn/query/kernel" and m.axis == 1
                                          for m in g.members))
  only_heads = {g.name: () for g in s.groups} | {heads.name: (0,)}
  for removed in (only_heads, None):
    if removed is None:  # query/key dims narrower than value dims: flax's attention refuses
      removed = only_heads | {g.name: (0,) for g in s.groups
                              if any(m.path == "attn/query/kernel" and m.axis == 2
                                     for m in g.members)}
    chosen = plan.Plan(removed, {g.name: g.size - len(removed[g.name]) for g in s.groups},
                       s.cost(), s.cost(), plan.fingerprint(s), s)
    apply_fn, params = oba_jax.functional(model)
    small_fn, small_params = surgery.compact_fn(apply_fn, params, chosen)
    expected = apply_fn(masks.apply_plan(params, s, chosen), x)
    close(small_fn(small_params, x), expected)
    if removed is only_heads:
      close(surgery.compact(model, chosen)(x), expected)
    else:
      with pytest.raises(surgery.CompactionError, match="`attn`"):
        surgery.compact(model, chosen)
