"""A BERT-family encoder in Flax NNX with mean pooling (sentence-transformers' all-MiniLM-L6-v2).

Word + learned position + token-type (type 0) embeddings, LayerNorm, then `num_layers` post-LN
blocks: x = LN(x + attention(x, mask)), x = LN(x + output(gelu(intermediate(x)))) with exact erf
GELU and LayerNorm eps 1e-12. The sentence embedding is the mean of the last hidden states over
the unmasked tokens (not normalised; cosine similarity normalises).

Attention: the projections and head bookkeeping are `oba_jax.models.vit.MultiHeadAttention`'s
(separate `query`/`key`/`value`/`out` `nnx.Linear`s with biases, head `h` owning features
[h * head_dim, (h + 1) * head_dim), `head_dim`/`value_head_dim` attributes that
`oba_jax.surgery` already updates, head counts read from the kernel shapes at call time), with a
key-padding mask added here. So a compacted encoder (heads or features within heads removed) runs
unchanged, with no per-model code in the engine.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from oba_jax.models.vit import MultiHeadAttention

_LN_EPS = 1e-12


def masked_attention(attention: MultiHeadAttention, x: jax.Array, mask: jax.Array) -> jax.Array:
  """`attention`'s softmax self-attention with keys where `mask` (batch, tokens) is False ignored."""
  q = attention._heads(attention.query(x), attention.head_dim)
  k = attention._heads(attention.key(x), attention.head_dim)
  v = attention._heads(attention.value(x), attention.value_head_dim)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * attention.scale
  logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(logits.dtype).min)
  weights = jax.nn.softmax(logits, axis=-1)
  y = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
  return attention.out(y.reshape(*y.shape[:2], -1))


class BertLayer(nnx.Module):
  """Post-LN encoder block."""

  def __init__(self, hidden: int, num_heads: int, ffn_dim: int, *, rngs: nnx.Rngs):
    self.attention = MultiHeadAttention(hidden, num_heads, rngs=rngs)
    self.attention_norm = nnx.LayerNorm(hidden, epsilon=_LN_EPS, rngs=rngs)
    self.intermediate = nnx.Linear(hidden, ffn_dim, rngs=rngs)
    self.output = nnx.Linear(ffn_dim, hidden, rngs=rngs)
    self.output_norm = nnx.LayerNorm(hidden, epsilon=_LN_EPS, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = self.attention_norm(x + masked_attention(self.attention, x, mask))
    h = nnx.gelu(self.intermediate(x), approximate=False)
    return self.output_norm(x + self.output(h))


class Bert(nnx.Module):
  """A BERT encoder: (token ids, mask) of shape (batch, tokens) -> hidden states or embeddings.

  `model(ids, mask)` gives mean-pooled sentence embeddings (batch, hidden);
  `model.hidden_states(ids, mask)` the last layer's token states.

  Args:
    vocab_size, hidden, num_layers, num_heads, ffn_dim: sizes (MiniLM-L6: 30522, 384, 6, 12, 1536).
    max_positions: rows of the position embedding (512).
    type_vocab_size: rows of the token-type embedding (2); every token has type 0.
    rngs: parameter initialisation.
  """

  def __init__(self, *, vocab_size: int, hidden: int, num_layers: int, num_heads: int,
               ffn_dim: int, max_positions: int = 512, type_vocab_size: int = 2, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)
    self.word_embeddings = nnx.Embed(vocab_size, hidden, embedding_init=init, rngs=rngs)
    self.position_embeddings = nnx.Embed(max_positions, hidden, embedding_init=init, rngs=rngs)
    self.token_type_embeddings = nnx.Embed(type_vocab_size, hidden, embedding_init=init, rngs=rngs)
    self.embeddings_norm = nnx.LayerNorm(hidden, epsilon=_LN_EPS, rngs=rngs)
    self.layers = nnx.List([BertLayer(hidden, num_heads, ffn_dim, rngs=rngs)
                            for _ in range(num_layers)])

  def hidden_states(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    max_positions = self.position_embeddings.embedding.shape[0]
    if ids.ndim != 2 or mask.shape != ids.shape or ids.shape[1] > max_positions:
      raise ValueError(f"Bert expects ids and mask of one shape (batch, tokens <= {max_positions});"
                       f" got {ids.shape} and {mask.shape}.")
    mask = mask.astype(bool)
    x = (self.word_embeddings(ids) + self.position_embeddings.embedding[:ids.shape[1]]
         + self.token_type_embeddings.embedding[0])
    x = self.embeddings_norm(x)
    for layer in self.layers:
      x = layer(x, mask)
    return x

  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    x = self.hidden_states(ids, mask)
    weights = mask.astype(x.dtype)[..., None]
    return (x * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1e-9)


minilm_l6 = functools.partial(Bert, vocab_size=30522, hidden=384, num_layers=6, num_heads=12,
                              ffn_dim=1536, max_positions=512, type_vocab_size=2)
