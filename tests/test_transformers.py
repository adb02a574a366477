"""Llama and BERT models: forward passes, and structured pruning through the generic engine.

Tiny random models only; the real checkpoints are tested in test_transformer_weights.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from oba_jax import functional, masks, plan, scores, structure, surgery
from oba_jax.models import Bert, Llama, create
from oba_jax.models.llama import apply_rope, rope_frequencies

LLAMA = dict(vocab_size=50, d_model=24, num_layers=2, num_heads=6, num_kv_heads=2, ffn_dim=16)
BERT = dict(vocab_size=50, hidden=24, num_layers=2, num_heads=4, ffn_dim=16, max_positions=16)
BERT_IGNORE = ("word_embeddings", "position_embeddings", "token_type_embeddings")


def _tokens(shape=(2, 7), vocab=50, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(0, vocab, shape))


def _rope_reference(x, inv_freq):
  x = np.asarray(x, np.float64)
  out = x.copy()
  for t in range(x.shape[1]):
    for i, f in enumerate(np.asarray(inv_freq, np.float64)):
      c, s = np.cos(t * f), np.sin(t * f)
      a, b = x[:, t, :, 2 * i], x[:, t, :, 2 * i + 1]
      out[:, t, :, 2 * i], out[:, t, :, 2 * i + 1] = a * c - b * s, a * s + b * c
  return out


def test_rope_rotates_interleaved_pairs():
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))
  inv_freq = jnp.asarray(rope_frequencies(8, 100.0))
  np.testing.assert_allclose(apply_rope(x, inv_freq), _rope_reference(x, inv_freq), atol=1e-5)


def test_llama_is_causal_and_gqa_matches_repeated_heads():
  model = Llama(**LLAMA, rngs=nnx.Rngs(0))
  tokens = _tokens()
  logits = model(tokens)
  assert logits.shape == (2, 7, 50)
  changed = tokens.at[:, -1].set((tokens[:, -1] + 1) % 50)
  np.testing.assert_allclose(model(changed)[:, :-1], logits[:, :-1], atol=1e-6)
  # Grouped-query attention equals multi-head attention with each kv head's weights repeated.
  mha = Llama(**dict(LLAMA, num_kv_heads=6), rngs=nnx.Rngs(1))
  for dense, grouped in zip(mha.layers, model.layers):
    for name in ("q_proj", "o_proj"):
      getattr(dense.attn, name).kernel[...] = getattr(grouped.attn, name).kernel[...]
    for name in ("k_proj", "v_proj"):
      kernel = getattr(grouped.attn, name).kernel[...].reshape(24, 2, 1, 4)
      getattr(dense.attn, name).kernel[...] = jnp.repeat(kernel, 3, axis=2).reshape(24, 24)
    for name in ("attn_norm", "mlp_norm", "mlp"):
      nnx.update(getattr(dense, name), nnx.state(getattr(grouped, name)))
  mha.embed.embedding[...] = model.embed.embedding[...]
  np.testing.assert_allclose(mha(tokens), logits, atol=1e-5)


def test_llama_untied_head_and_registry():
  model = create("llama", **dict(LLAMA, tie_embeddings=False))
  assert model.lm_head is not None and model(_tokens()).shape == (2, 7, 50)
  with pytest.raises(ValueError, match="integer token ids"):
    model(jnp.zeros((2, 7)))


def test_bert_mean_pools_over_the_mask():
  model = Bert(**BERT, rngs=nnx.Rngs(0))
  tokens = _tokens()
  mask = jnp.array([[1] * 7, [1] * 4 + [0] * 3])
  embedding = model(tokens, mask)
  assert embedding.shape == (2, 24)
  # Padded tokens change nothing: the second sentence alone, unpadded.
  alone = model(tokens[1:, :4], mask[1:, :4])
  np.testing.assert_allclose(embedding[1:], alone, atol=1e-5)
  with pytest.raises(ValueError, match="ids and mask"):
    model(tokens, mask[:, :3])


def _group_kinds(traced):
  return sorted({g.name.split("/", 2)[-1] for g in traced.groups})


def test_trace_finds_heads_kv_groups_and_mlp_units():
  llama = Llama(**LLAMA, rngs=nnx.Rngs(0))
  traced = structure.trace(llama, _tokens(), ignore=("embed",))
  sizes = {g.name: g.size for g in traced.groups}
  # per layer: kv groups (2), rotary pairs (head_dim/2 = 2), query heads within a kv group (3),
  # value features within a head (4), SwiGLU units (16)
  assert sizes["layers/0/attn/k_proj/kernel@1.0"] == 2
  assert sizes["layers/0/attn/k_proj/kernel@1.1"] == 2
  assert sizes["layers/0/attn/q_proj/kernel@1.1"] == 3
  assert sizes["layers/0/attn/v_proj/kernel@1.1"] == 4
  assert sizes["layers/0/mlp/gate_proj/kernel@1"] == 16
  assert len(traced.groups) == 2 * 5
  bert = Bert(**BERT, rngs=nnx.Rngs(0))
  mask = jnp.ones((2, 7), bool)
  traced = structure.trace(bert, _tokens(), mask, ignore=BERT_IGNORE)
  sizes = {g.name: g.size for g in traced.groups}
  assert sizes["layers/0/attention/key/kernel@1.0"] == 4  # heads
  assert sizes["layers/0/intermediate/kernel@1"] == 16
  assert len(traced.groups) == 2 * 4


def _lm_loss(apply_fn):
  def loss(params, batch):
    logits = apply_fn(params, batch["tokens"])[:, :-1]
    targets, weights = batch["tokens"][:, 1:], batch["mask"][:, 1:].astype(jnp.float32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    return (nll * weights).sum() / weights.sum()
  return loss


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_prune_compact_equals_masked(kind):
  """OBA scores -> group scores -> plan -> compact_fn and compact == the masked model (1e-5)."""
  tokens = _tokens((3, 7))
  mask = jnp.array([[1] * 7, [1] * 5 + [0] * 2, [1] * 7])
  if kind == "llama":
    model, inputs, ignore = Llama(**LLAMA, rngs=nnx.Rngs(0)), (tokens,), ("embed",)
    apply_fn, params = functional(model)
    loss = _lm_loss(apply_fn)
  else:
    model, inputs, ignore = Bert(**BERT, rngs=nnx.Rngs(0)), (tokens, mask), BERT_IGNORE
    apply_fn, params = functional(model)

    def loss(params, batch):  # in-batch InfoNCE between a sentence and itself shifted by one
      a = apply_fn(params, batch["tokens"], batch["mask"])
      b = apply_fn(params, jnp.roll(batch["tokens"], 1, axis=1), batch["mask"])
      a, b = (x / jnp.linalg.norm(x, axis=-1, keepdims=True) for x in (a, b))
      logits = a @ b.T / 0.05
      return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=-1)))
  batch = {"tokens": tokens, "mask": mask}
  score = scores.oba(loss, params, batch)
  traced = structure.trace(model, *inputs, ignore=ignore)
  chosen = plan.select(traced, structure.group_scores(traced, score), target=plan.KeptParams(0.7))
  assert sum(len(v) for v in chosen.removed.values()) > 0
  masked = masks.apply(model, chosen)
  reference = masked(*inputs)
  fn, small_params = surgery.compact_fn(*functional(masked), chosen)
  np.testing.assert_allclose(fn(small_params, *inputs), reference, atol=1e-5)
  small = surgery.compact(masked, chosen)
  np.testing.assert_allclose(small(*inputs), reference, atol=1e-5)
  dense_count = sum(np.size(x) for x in jax.tree.leaves(params))
  small_count = sum(np.size(x) for x in jax.tree.leaves(functional(small)[1]))
  assert small_count < dense_count


def test_activation_norm_is_weight_times_input_feature_norm():
  from oba_jax.activation_norm import activation_norm
  rng = np.random.RandomState(0)
  params = {"fc1": {"kernel": jnp.asarray(rng.randn(3, 4), jnp.float32),
                    "bias": jnp.asarray(rng.randn(4), jnp.float32)},
            "fc2": {"kernel": jnp.asarray(rng.randn(4, 2), jnp.float32)}}
  x = jnp.asarray(rng.randn(2, 5, 3), jnp.float32)

  def loss(p, batch):
    h = jax.nn.relu(jnp.einsum("btd,de->bte", batch, p["fc1"]["kernel"]) + p["fc1"]["bias"])
    return jnp.sum(h @ p["fc2"]["kernel"])

  score = activation_norm(loss, params, x)
  h = jax.nn.relu(x @ params["fc1"]["kernel"] + params["fc1"]["bias"])
  norm = lambda a: jnp.sqrt(jnp.sum(a.reshape(-1, a.shape[-1]) ** 2, axis=0))
  np.testing.assert_allclose(score["fc1"]["kernel"],
                             jnp.abs(params["fc1"]["kernel"]) * norm(x)[:, None], rtol=1e-5)
  np.testing.assert_allclose(score["fc2"]["kernel"],
                             jnp.abs(params["fc2"]["kernel"]) * norm(h)[:, None], rtol=1e-5)
  np.testing.assert_allclose(score["fc1"]["bias"], jnp.abs(params["fc1"]["bias"]) * np.sqrt(10),
                             rtol=1e-5)


@pytest.mark.xfail(strict=True, raises=structure.UnsupportedLayoutError,
                   reason="engine limitation: an axis split and restacked as the minor factor of "
                          "a reshaped axis (interleaved rotary pairs written with stack) is not "
                          "followed; models.llama.apply_rope avoids it with a fixed 2x2 product")
def test_trace_follows_restacked_interleaved_pairs():
  class Pairs(nnx.Module):
    def __init__(self):
      self.proj = nnx.Linear(4, 8, rngs=nnx.Rngs(0))
      self.out = nnx.Linear(8, 4, rngs=nnx.Rngs(1))

    def __call__(self, x):
      y = self.proj(x).reshape(*x.shape[:-1], 2, 2, 2)  # (heads, pairs, 2)
      y = jnp.stack([-y[..., 1], y[..., 0]], axis=-1)  # rotate each interleaved pair
      return self.out(y.reshape(*x.shape[:-1], 8))

  structure.trace(Pairs(), jnp.ones((1, 3, 4)))
