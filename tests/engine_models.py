"""Small models for the structure engine's general mechanisms (test-only).

Each exercises one pattern an unseen model may use: constants passed into
jitted helpers, split/sliced layer outputs, grouped convolutions behind a
channel shuffle, GroupNorm, attention with Python-int head counts, embeddings
(tied and untied heads), `lax.scan`/`lax.map` over stacked parameters,
bilinear upsampling with skip concatenations, LayerNorm'd ConvNeXt blocks and
SwiGLU transformer blocks. Widths are 2-12 so that each runs in a second.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


class WhereGate(nnx.Module):
  """`jnp.where(mask, x, 0.0)`: a literal passed into a jitted helper."""

  def __init__(self, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(3, 6, rngs=rngs)
    self.fc2 = nnx.Linear(6, 2, rngs=rngs)

  def __call__(self, x):
    h = self.fc1(x)
    return self.fc2(jnp.where(h > 0.1, h, 0.0))


class SplitBranches(nnx.Module):
  """One layer's output split into two branches, rejoined in the other order, then sliced."""

  def __init__(self, rngs: nnx.Rngs):
    self.fc = nnx.Linear(4, 8, rngs=rngs)
    self.left = nnx.Linear(3, 4, rngs=rngs)
    self.right = nnx.Linear(5, 4, rngs=rngs)
    self.out = nnx.Linear(6, 2, rngs=rngs)

  def __call__(self, x):  # sizes read from the layers, so that `compact` can resize them
    a, b = jnp.split(self.fc(x), [self.left.in_features], axis=-1)
    y = jnp.concatenate([self.right(nnx.relu(b)), self.left(nnx.relu(a))], axis=-1)
    return self.out(nnx.relu(y[..., :self.out.in_features]))


def channel_shuffle(x, groups):
  *lead, c = x.shape
  return x.reshape(*lead, groups, c // groups).swapaxes(-1, -2).reshape(*lead, c)


class ShuffleBlock(nnx.Module):
  """ShuffleNet-style: grouped 1x1, channel shuffle, depthwise 3x3, grouped 1x1, residual."""

  def __init__(self, rngs: nnx.Rngs, channels=8, groups=2):
    self.stem = nnx.Conv(3, channels, (3, 3), rngs=rngs)
    self.reduce = nnx.Conv(channels, channels, (1, 1), feature_group_count=groups, rngs=rngs)
    self.depthwise = nnx.Conv(channels, channels, (3, 3), feature_group_count=channels,
                              rngs=rngs)
    self.expand = nnx.Conv(channels, channels, (1, 1), feature_group_count=groups, rngs=rngs)
    self.head = nnx.Linear(channels, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.stem(x))
    h = channel_shuffle(nnx.relu(self.reduce(x)), self.reduce.feature_group_count)
    h = self.expand(self.depthwise(h))
    return self.head(nnx.relu(x + h).mean(axis=(1, 2)))


class GroupNormCNN(nnx.Module):
  """Convolutions normalised by GroupNorm: whole groups are exactly removable."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.norm1 = nnx.GroupNorm(8, num_groups=4, rngs=rngs)
    self.conv2 = nnx.Conv(8, 6, (3, 3), rngs=rngs)
    self.norm2 = nnx.GroupNorm(6, num_groups=2, rngs=rngs)
    self.head = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.norm1(self.conv1(x)))
    x = nnx.relu(self.norm2(self.conv2(x)))
    return self.head(x.mean(axis=(1, 2)))


class UNet(nnx.Module):
  """Two-level U-Net: pooling, bilinear upsampling and a skip concatenation."""

  def __init__(self, rngs: nnx.Rngs):
    self.enc1 = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.enc2 = nnx.Conv(4, 6, (3, 3), rngs=rngs)
    self.dec = nnx.Conv(6 + 4, 4, (3, 3), rngs=rngs)
    self.out = nnx.Conv(4, 2, (1, 1), rngs=rngs)

  def __call__(self, x):
    skip = nnx.relu(self.enc1(x))
    h = nnx.relu(self.enc2(nnx.avg_pool(skip, (2, 2), (2, 2))))
    h = jax.image.resize(h, skip.shape[:3] + h.shape[3:], "bilinear")
    return self.out(nnx.relu(self.dec(jnp.concatenate([h, skip], axis=-1))))


class ConvNeXtBlock(nnx.Module):
  """Patchify stem, depthwise conv, LayerNorm, inverted MLP, layer scale, residual."""

  def __init__(self, rngs: nnx.Rngs, dim=6):
    self.stem = nnx.Conv(3, dim, (2, 2), strides=2, rngs=rngs)
    self.dw = nnx.Conv(dim, dim, (3, 3), feature_group_count=dim, rngs=rngs)
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.pw1 = nnx.Linear(dim, 4 * dim, rngs=rngs)
    self.pw2 = nnx.Linear(4 * dim, dim, rngs=rngs)
    self.gamma = nnx.Param(jnp.full((dim,), 0.5))
    self.head = nnx.Linear(dim, 3, rngs=rngs)

  def __call__(self, x):
    x = self.stem(x)
    h = self.pw2(nnx.gelu(self.pw1(self.norm(self.dw(x)))))
    return self.head((x + self.gamma[...] * h).mean(axis=(1, 2)))


class IntHeadsAttention(nnx.Module):
  """A user's attention that keeps its head count and head size as Python ints."""

  def __init__(self, dim: int, num_heads: int, rngs: nnx.Rngs):
    self.num_heads, self.head_size = num_heads, dim // num_heads
    self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, rngs=rngs)

  def __call__(self, x):
    b, t, _ = x.shape
    q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
    heads = lambda y: y.reshape(b, t, self.num_heads, self.head_size)
    q, k, v = heads(q), heads(k), heads(v)
    weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return self.proj(out.reshape(b, t, self.num_heads * self.head_size))


class AttentionClassifier(nnx.Module):
  def __init__(self, rngs: nnx.Rngs, dim=8, heads=2):
    self.embed = nnx.Linear(3, dim, rngs=rngs)
    self.attn = IntHeadsAttention(dim, heads, rngs)
    self.head = nnx.Linear(dim, 2, rngs=rngs)

  def __call__(self, x):
    h = self.embed(x)
    return self.head((h + self.attn(h)).mean(axis=1))


class CausalAttention(nnx.Module):
  """Causal multi-head attention; the head count is read from the kernels at call time."""

  def __init__(self, dim: int, heads: int, rngs: nnx.Rngs):
    self.head_dim = self.value_head_dim = dim // heads
    self.q = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
    self.k = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
    self.v = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
    self.o = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)

  def __call__(self, x):
    b, t, _ = x.shape
    split = lambda y, size: y.reshape(b, t, -1, size)
    q, k = split(self.q(x), self.head_dim), split(self.k(x), self.head_dim)
    v = split(self.v(x), self.value_head_dim)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.5
    causal = jnp.tril(jnp.ones((t, t), bool))
    weights = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
    return self.o(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, -1))


def resize_causal_attention(module: CausalAttention, factors) -> None:
  """A resizer (`surgery.register_resizer`): head sizes are the minor factors of q's, v's."""
  for leaf, attribute in (("q/kernel", "head_dim"), ("v/kernel", "value_head_dim")):
    sizes = factors(leaf, 1)
    if sizes:
      setattr(module, attribute, sizes[-1])


class SwiGLUBlock(nnx.Module):
  """Pre-RMSNorm transformer block with a SwiGLU MLP."""

  def __init__(self, dim: int, heads: int, hidden: int, rngs: nnx.Rngs):
    self.norm1 = nnx.RMSNorm(dim, rngs=rngs)
    self.attn = CausalAttention(dim, heads, rngs)
    self.norm2 = nnx.RMSNorm(dim, rngs=rngs)
    self.gate = nnx.Linear(dim, hidden, use_bias=False, rngs=rngs)
    self.up = nnx.Linear(dim, hidden, use_bias=False, rngs=rngs)
    self.down = nnx.Linear(hidden, dim, use_bias=False, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.norm1(x))
    h = self.norm2(x)
    return x + self.down(nnx.silu(self.gate(h)) * self.up(h))


class TinyLM(nnx.Module):
  """Token embedding, SwiGLU blocks, RMSNorm, and a tied or untied output head."""

  def __init__(self, rngs: nnx.Rngs, vocab=11, dim=8, heads=2, hidden=12, layers=2, tied=False):
    self.embed = nnx.Embed(vocab, dim, rngs=rngs)
    self.blocks = nnx.List([SwiGLUBlock(dim, heads, hidden, rngs) for _ in range(layers)])
    self.norm = nnx.RMSNorm(dim, rngs=rngs)
    self.head = None if tied else nnx.Linear(dim, vocab, use_bias=False, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x)
    x = self.norm(x)
    return self.embed.attend(x) if self.head is None else self.head(x)


class ResidualMLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs, dim=4, hidden=6):
    self.fc1 = nnx.Linear(dim, hidden, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, dim, rngs=rngs)

  def __call__(self, x):
    return x + self.fc2(nnx.relu(self.fc1(x)))


class ScannedStack(nnx.Module):
  """Blocks created with `nnx.vmap` (stacked leaves) and applied with `nnx.scan`."""

  def __init__(self, rngs: nnx.Rngs, layers=3):
    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return ResidualMLP(rngs)

    self.blocks = make(rngs)
    self.inp = nnx.Linear(3, 4, rngs=rngs)
    self.out = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x, block):
      return block(x)

    return self.out(run(self.inp(x), self.blocks))


# --- plain functions and Linen ---------------------------------------------------


def scanned_transformer_params(key, vocab=7, dim=8, heads=2, hidden=12, layers=2):
  """Parameters of `scanned_transformer`: every block's weights stacked on a leading axis."""
  keys = iter(jax.random.split(key, 16))
  normal = lambda *shape: jax.random.normal(next(keys), shape) / jnp.sqrt(shape[-2] * 1.0)
  return {"embed": jax.random.normal(next(keys), (vocab, dim)),
          "blocks": {"scale1": jnp.ones((layers, dim)), "scale2": jnp.ones((layers, dim)),
                     "wq": normal(layers, dim, dim), "wk": normal(layers, dim, dim),
                     "wv": normal(layers, dim, dim), "wo": normal(layers, dim, dim),
                     "w1": normal(layers, dim, hidden), "b1": jnp.zeros((layers, hidden)),
                     "w2": normal(layers, hidden, dim)},
          "head": {"kernel": normal(dim, vocab)}}


def _layer_norm(x, scale):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale


def scanned_transformer(params, tokens, heads=2):
  """A decoder whose (rematerialised) blocks run under `lax.scan` over stacked parameters."""
  x = jnp.take(params["embed"], tokens, axis=0)
  b, t, _ = x.shape

  def block(x, p):
    h = _layer_norm(x, p["scale1"])
    split = lambda y: y.reshape(b, t, heads, -1)
    q, k, v = split(h @ p["wq"]), split(h @ p["wk"]), split(h @ p["wv"])
    weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), axis=-1)
    x = x + jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, -1) @ p["wo"]
    h = jax.nn.gelu(_layer_norm(x, p["scale2"]) @ p["w1"] + p["b1"])
    return x + h @ p["w2"], None

  x, _ = jax.lax.scan(jax.checkpoint(block), x, params["blocks"])  # rematerialised blocks
  return x @ params["head"]["kernel"]


def mapped_experts(params, x):
  """`lax.map` over stacked expert weights, averaged."""
  hidden = jax.lax.map(lambda w: jax.nn.relu(x @ w["w1"]) @ w["w2"], params["experts"])
  return hidden.mean(axis=0) @ params["out"]


def mapped_experts_params(key, experts=3, dim=4, hidden=6):
  k1, k2, k3 = jax.random.split(key, 3)
  return {"experts": {"w1": jax.random.normal(k1, (experts, dim, hidden)),
                      "w2": jax.random.normal(k2, (experts, hidden, dim))},
          "out": jax.random.normal(k3, (dim, 2))}


def while_refined(params, x):
  """A `lax.while_loop` whose carry holds hidden features."""
  h = x @ params["inp"]
  _, h = jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, jnp.tanh(c[1] @ params["w"])),
                            (0, h))
  return h @ params["out"]


def hinted(params, x):
  """Placement and scheduling hints on hidden features."""
  h, x = jax.lax.optimization_barrier((jax.nn.relu(x @ params["w1"]), x))
  mesh = jax.make_mesh((1,), ("data",))
  h = jax.lax.with_sharding_constraint(h, jax.sharding.NamedSharding(mesh, jax.P()))
  return h @ params["w2"] + x @ params["skip"]


def branching(params, x):
  """`lax.cond` between two uses of the same hidden features."""
  h = jax.nn.relu(x @ params["w1"])
  h = jax.lax.cond(x.sum() > 0, lambda h: jnp.tanh(h @ params["mix"]), lambda h: h * 2.0, h)
  return h @ params["w2"]


class LinenCNN(nn.Module):
  """A Linen CNN with a bilinear upsample and a masked ReLU."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(6, (3, 3))(x)
    x = jnp.where(x > 0, x, 0.0)
    x = jax.image.resize(x, (x.shape[0], 2 * x.shape[1], 2 * x.shape[2], x.shape[3]), "bilinear")
    x = nn.relu(nn.Conv(5, (3, 3))(x))
    return nn.Dense(3)(x.mean(axis=(1, 2)))
