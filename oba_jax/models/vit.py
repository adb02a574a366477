"""Vision Transformer (Dosovitskiy et al., 2021) in Flax NNX, laid out like torchvision's.

A `patch_size`-strided conv (`conv_proj`) cuts the NHWC image into patch embeddings (row-major), a
learned `class_token` is prepended, learned `pos_embedding`s are added, and `num_layers` pre-LN
encoder blocks follow (LayerNorm eps 1e-6, exact erf GELU). The final LayerNorm'd class token feeds
the `head`. No dropout: the model is meant for inference and fine-tuning of pretrained weights.

Attention layout, which the structure tracer relies on. With `head_dim = hidden_dim // num_heads`:

- `query`, `key`, `value` and `out` are separate `nnx.Linear`s; `query` and `out` are
  [hidden_dim, num_heads * head_dim] and [num_heads * head_dim, hidden_dim], `key` and `value`
  are [hidden_dim, num_kv_heads * head_dim].
- Head `h` owns output features [h * head_dim, (h + 1) * head_dim) of `query` (likewise of `key`
  and `value` for kv head `h`) and the same input features of `out`: projections are reshaped
  (batch, tokens, heads * head_dim) -> (batch, tokens, heads, head_dim) and back.
- Grouped-query attention: kv head `g` serves the `num_heads // num_kv_heads` consecutive query
  heads [g * group, (g + 1) * group); `num_kv_heads == num_heads` is ordinary multi-head attention.
- Head counts are read from the kernel shapes at call time, so an attention whose heads were
  removed (narrower kernels) runs unchanged. `head_dim` (queries and keys) and `value_head_dim`
  are attributes that `oba_jax.surgery` updates when dimensions within heads are removed; the
  softmax `scale` stays 1/sqrt(original head_dim), so removal does not change the function.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def _layer_norm(features: int, *, rngs: nnx.Rngs):
  return nnx.LayerNorm(features, epsilon=1e-6, rngs=rngs)


class MultiHeadAttention(nnx.Module):
  """Softmax self-attention with separate q/k/v/out projections and optional grouped kv heads."""

  def __init__(self, hidden_dim: int, num_heads: int, num_kv_heads: int | None = None, *,
               rngs: nnx.Rngs):
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads < 1 or hidden_dim % num_heads:
      raise ValueError(f"num_heads={num_heads} must be a positive divisor of "
                       f"hidden_dim={hidden_dim}.")
    if num_kv_heads < 1 or num_heads % num_kv_heads:
      raise ValueError(f"num_kv_heads={num_kv_heads} must be a positive divisor of "
                       f"num_heads={num_heads}.")
    self.head_dim = self.value_head_dim = hidden_dim // num_heads
    self.scale = self.head_dim**-0.5
    kv_dim = num_kv_heads * self.head_dim
    self.query = nnx.Linear(hidden_dim, hidden_dim, rngs=rngs)
    self.key = nnx.Linear(hidden_dim, kv_dim, rngs=rngs)
    self.value = nnx.Linear(hidden_dim, kv_dim, rngs=rngs)
    self.out = nnx.Linear(hidden_dim, hidden_dim, rngs=rngs)

  @staticmethod
  def _heads(x: jax.Array, head_dim: int) -> jax.Array:
    """(batch, tokens, heads * head_dim) -> (batch, tokens, heads, head_dim)."""
    return x.reshape(*x.shape[:-1], -1, head_dim)

  def __call__(self, x: jax.Array) -> jax.Array:
    q = self._heads(self.query(x), self.head_dim)
    k = self._heads(self.key(x), self.head_dim)
    v = self._heads(self.value(x), self.value_head_dim)
    group = q.shape[2] // k.shape[2]
    if group > 1:  # each kv head serves `group` consecutive query heads
      k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * self.scale
    weights = jax.nn.softmax(logits, axis=-1)
    y = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return self.out(y.reshape(*y.shape[:2], -1))


class EncoderBlock(nnx.Module):
  """Pre-LN transformer block: x + attention(ln_1(x)), then x + fc2(gelu(fc1(ln_2(x))))."""

  def __init__(self, hidden_dim: int, num_heads: int, mlp_dim: int,
               num_kv_heads: int | None = None, *, rngs: nnx.Rngs):
    self.ln_1 = _layer_norm(hidden_dim, rngs=rngs)
    self.attention = MultiHeadAttention(hidden_dim, num_heads, num_kv_heads, rngs=rngs)
    self.ln_2 = _layer_norm(hidden_dim, rngs=rngs)
    self.fc1 = nnx.Linear(hidden_dim, mlp_dim, rngs=rngs)
    self.fc2 = nnx.Linear(mlp_dim, hidden_dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attention(self.ln_1(x))
    return x + self.fc2(nnx.gelu(self.fc1(self.ln_2(x)), approximate=False))


class VisionTransformer(nnx.Module):
  """A torchvision-layout ViT classifying on its class token.

  Args:
    image_size: height and width of the (square) input images.
    patch_size: side of the square patches; must divide `image_size`.
    hidden_dim, num_layers, num_heads, mlp_dim: transformer size (ViT-B: 768, 12, 12, 3072).
    num_classes: outputs of the `head`.
    in_channels: channels of the input images.
    num_kv_heads: key/value heads for grouped-query attention; defaults to `num_heads`.
    rngs: parameter initialisation.
  """

  def __init__(self, *, image_size: int, patch_size: int, hidden_dim: int, num_layers: int,
               num_heads: int, mlp_dim: int, num_classes: int = 1000, in_channels: int = 3,
               num_kv_heads: int | None = None, rngs: nnx.Rngs):
    if patch_size < 1 or image_size % patch_size:
      raise ValueError(f"patch_size={patch_size} must be a positive divisor of "
                       f"image_size={image_size}.")
    self.image_size, self.in_channels = image_size, in_channels
    num_tokens = (image_size // patch_size) ** 2 + 1
    self.conv_proj = nnx.Conv(in_channels, hidden_dim, (patch_size, patch_size), patch_size,
                              padding="VALID", rngs=rngs)
    self.class_token = nnx.Param(jnp.zeros((1, 1, hidden_dim)))
    self.pos_embedding = nnx.Param(
        nnx.initializers.normal(0.02)(rngs.params(), (1, num_tokens, hidden_dim)))
    self.layers = nnx.List([
        EncoderBlock(hidden_dim, num_heads, mlp_dim, num_kv_heads, rngs=rngs)
        for _ in range(num_layers)
    ])
    self.ln = _layer_norm(hidden_dim, rngs=rngs)
    self.head = nnx.Linear(hidden_dim, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits [batch, num_classes] for images [batch, image_size, image_size, in_channels]."""
    size, channels = self.image_size, self.in_channels
    if x.ndim != 4 or x.shape[1:] != (size, size, channels):
      raise ValueError(f"VisionTransformer expects images of shape (batch, {size}, {size}, "
                       f"{channels}), the size its position embeddings were built for; "
                       f"got {x.shape}.")
    x = self.conv_proj(x)
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    class_token = jnp.broadcast_to(self.class_token[...], (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([class_token, x], axis=1) + self.pos_embedding[...]
    for layer in self.layers:
      x = layer(x)
    return self.head(self.ln(x)[:, 0])


vit_b16 = functools.partial(VisionTransformer, image_size=224, patch_size=16, hidden_dim=768,
                            num_layers=12, num_heads=12, mlp_dim=3072)
