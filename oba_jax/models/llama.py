"""A Llama-family decoder-only language model in Flax NNX (SmolLM2, Llama 2/3, Mistral-style).

Pre-norm blocks: x + attention(RMSNorm(x)), then x + down(silu(gate(h)) * up(h)) with
h = RMSNorm(x); a final RMSNorm and a language-model head that is either the token embedding
transposed (`tie_embeddings=True`, as in SmolLM2) or its own `lm_head`. No biases anywhere.

Attention layout, which the structure tracer and `oba_jax.surgery` rely on (no per-model code):

- `q_proj`, `k_proj`, `v_proj`, `o_proj` are separate bias-free `nnx.Linear`s:
  [d_model, heads * head_dim], [d_model, kv_heads * head_dim] (twice), [heads * head_dim, d_model].
  Head `h` owns output features [h * head_dim, (h + 1) * head_dim) of `q_proj`.
- Grouped-query attention: kv head `g` serves the `heads // kv_heads` consecutive query heads
  [g * group, (g + 1) * group) (K and V are repeated along the head axis).
- Rotary position embedding on **interleaved pairs**: features (2i, 2i + 1) of a query or key
  head are rotated by the angle position * inv_freq[i]. This is the q/k layout of GGUF files
  (llama.cpp's converter permutes Hugging Face's rotate-half layout into it), so GGUF weights load
  unpermuted. A Hugging Face checkpoint would need that permutation applied to `q_proj`/`k_proj`.
- Nothing about sizes is kept as a Python int: the query/key head size is `2 * inv_freq.size`,
  where `inv_freq` is a non-trainable `RopeFrequencies` variable (state, not a parameter), and the
  head counts and the value head size are read from the kernel shapes at call time. An attention
  whose heads, KV groups, rotary pairs or value features were removed therefore runs unchanged,
  and removing rotary pair i from queries and keys removes inv_freq[i] with them. The softmax
  scale stays 1/sqrt(original head size), so removal does not change the function.
- Causal masking only: right-padded batches are fine (a padded position never influences an
  earlier one); the loss must ignore the padded targets.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class RopeFrequencies(nnx.Variable):
  """Rotary inverse frequencies of one attention: fixed state, never trained or scored."""


def rope_frequencies(head_dim: int, theta: float) -> np.ndarray:
  """inv_freq[i] = theta^(-2i / head_dim), i < head_dim / 2 (float32)."""
  return (1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)).astype(np.float32)


def apply_rope(x: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """x (batch, tokens, heads, 2 * pairs) with features (2i, 2i + 1) rotated by position * inv_freq[i].

  Written without splitting the pair axis: (x0, x1) -> (x0, x1) * cos + (-x1, x0) * sin, where
  (-x1, x0) is a product with a fixed 2 x 2 matrix built from `iota`. Slicing or stacking the pair
  axis would make it a concatenated minor factor of the head axis, a layout the structure tracer
  cannot follow (`UnsupportedLayoutError`); this form keeps it a product (pairs, 2) whose factor 2
  is data, so that rotary pairs stay prunable as units.
  """
  positions = jax.lax.iota(jnp.float32, x.shape[1])
  angles = positions[:, None] * inv_freq[None, :]  # (tokens, pairs)
  cos, sin = jnp.cos(angles)[:, None, :, None], jnp.sin(angles)[:, None, :, None]
  pairs = x.reshape(*x.shape[:-1], -1, 2)
  i = jax.lax.iota(jnp.int32, 2)
  swap = (i[:, None] + i[None, :] == 1).astype(x.dtype)  # [[0, 1], [1, 0]]
  sign = (2 * i - 1).astype(x.dtype)  # [-1, 1]
  swapped = jnp.einsum("...t,ts->...s", pairs, swap) * sign  # (-x1, x0)
  return (pairs * cos + swapped * sin).reshape(x.shape)


class LlamaAttention(nnx.Module):
  """Causal grouped-query self-attention with interleaved rotary embeddings."""

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int | None = None,
               *, rope_theta: float = 10000.0, rngs: nnx.Rngs):
    head_dim = d_model // num_heads if head_dim is None else head_dim
    if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
      raise ValueError(f"num_kv_heads={num_kv_heads} must be a positive divisor of "
                       f"num_heads={num_heads}.")
    if head_dim < 2 or head_dim % 2:
      raise ValueError(f"head_dim={head_dim} must be a positive even number (rotary pairs).")
    linear = functools.partial(nnx.Linear, use_bias=False, rngs=rngs)
    self.q_proj = linear(d_model, num_heads * head_dim)
    self.k_proj = linear(d_model, num_kv_heads * head_dim)
    self.v_proj = linear(d_model, num_kv_heads * head_dim)
    self.o_proj = linear(num_heads * head_dim, d_model)
    self.inv_freq = RopeFrequencies(jnp.asarray(rope_frequencies(head_dim, rope_theta)))
    self.scale = float(head_dim) ** -0.5

  def __call__(self, x: jax.Array) -> jax.Array:
    inv_freq = self.inv_freq[...]
    head_dim = 2 * inv_freq.shape[0]
    q = self.q_proj(x)
    k = self.k_proj(x)
    num_kv_heads = k.shape[-1] // head_dim
    q = q.reshape(*x.shape[:2], -1, head_dim)
    k = k.reshape(*x.shape[:2], num_kv_heads, head_dim)
    v = self.v_proj(x)
    v = v.reshape(*x.shape[:2], num_kv_heads, v.shape[-1] // num_kv_heads)
    q, k = apply_rope(q, inv_freq), apply_rope(k, inv_freq)
    group = q.shape[2] // num_kv_heads
    if group > 1:  # each kv head serves `group` consecutive query heads
      k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * self.scale
    tokens = x.shape[1]
    causal = jnp.tril(jnp.ones((tokens, tokens), dtype=bool))
    logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1)
    y = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return self.o_proj(y.reshape(*y.shape[:2], -1))


class LlamaMLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, d_model: int, ffn_dim: int, *, rngs: nnx.Rngs):
    linear = functools.partial(nnx.Linear, use_bias=False, rngs=rngs)
    self.gate_proj = linear(d_model, ffn_dim)
    self.up_proj = linear(d_model, ffn_dim)
    self.down_proj = linear(ffn_dim, d_model)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(nnx.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nnx.Module):
  """Pre-norm decoder block."""

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, ffn_dim: int,
               head_dim: int | None, *, rope_theta: float, norm_eps: float, rngs: nnx.Rngs):
    self.attn_norm = nnx.RMSNorm(d_model, epsilon=norm_eps, rngs=rngs)
    self.attn = LlamaAttention(d_model, num_heads, num_kv_heads, head_dim, rope_theta=rope_theta,
                               rngs=rngs)
    self.mlp_norm = nnx.RMSNorm(d_model, epsilon=norm_eps, rngs=rngs)
    self.mlp = LlamaMLP(d_model, ffn_dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.attn_norm(x))
    return x + self.mlp(self.mlp_norm(x))


class Llama(nnx.Module):
  """A Llama-family causal language model: token ids (batch, tokens) -> logits (.., vocab).

  Args:
    vocab_size, d_model, num_layers, num_heads, ffn_dim: sizes (SmolLM2-135M: 49152, 576, 30, 9,
      1536). `num_heads`, `num_kv_heads` and `ffn_dim` may also be one value per layer (a pruned
      model's widths, as a GGUF `deci` file holds them).
    num_kv_heads: key/value heads (grouped-query attention); defaults to `num_heads`.
    head_dim: query/key/value head size; defaults to d_model // num_heads (needed when the head
      counts differ by layer).
    rope_theta: rotary base (SmolLM2: 1e5).
    norm_eps: RMSNorm epsilon.
    tie_embeddings: the head is the token embedding transposed (no `lm_head`).
    rngs: parameter initialisation.
  """

  def __init__(self, *, vocab_size: int, d_model: int, num_layers: int,
               num_heads: int | Sequence[int], ffn_dim: int | Sequence[int],
               num_kv_heads: int | Sequence[int] | None = None, head_dim: int | None = None,
               rope_theta: float = 10000.0, norm_eps: float = 1e-5, tie_embeddings: bool = True,
               rngs: nnx.Rngs):
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if head_dim is None and not isinstance(num_heads, int):
      raise ValueError(f"num_heads={num_heads!r} differs by layer: give head_dim.")
    heads, kv_heads, ffn = (_per_layer(name, value, num_layers) for name, value in (
        ("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("ffn_dim", ffn_dim)))
    self.embed = nnx.Embed(vocab_size, d_model, embedding_init=nnx.initializers.normal(0.02),
                           rngs=rngs)
    self.layers = nnx.List([
        LlamaBlock(d_model, heads[i], kv_heads[i], ffn[i], head_dim, rope_theta=rope_theta,
                   norm_eps=norm_eps, rngs=rngs) for i in range(num_layers)
    ])
    self.norm = nnx.RMSNorm(d_model, epsilon=norm_eps, rngs=rngs)
    self.lm_head = None if tie_embeddings else nnx.Linear(d_model, vocab_size, use_bias=False,
                                                          rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"Llama expects integer token ids of shape (batch, tokens); got "
                       f"{tokens.dtype}{tokens.shape}.")
    x = self.embed(tokens)
    for layer in self.layers:
      x = layer(x)
    x = self.norm(x)
    return self.embed.attend(x) if self.lm_head is None else self.lm_head(x)


def _per_layer(name: str, value: int | Sequence[int], num_layers: int) -> tuple[int, ...]:
  """One width per layer: `value` repeated, or `value` itself when it has one per layer."""
  if isinstance(value, int):
    return (value,) * num_layers
  values = tuple(value)
  if len(values) != num_layers or not all(isinstance(v, int) for v in values):
    raise ValueError(f"{name}={value!r} is neither an int nor {num_layers} ints (one per layer).")
  return values


smollm2_135m = functools.partial(Llama, vocab_size=49152, d_model=576, num_layers=30, num_heads=9,
                                 num_kv_heads=3, ffn_dim=1536, rope_theta=100000.0, norm_eps=1e-5,
                                 tie_embeddings=True)
