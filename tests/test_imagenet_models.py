"""ImageNet ResNet and ViT: shapes, full-size parameter counts, attention layout, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from oba_jax.models import resnet, vit


def tiny_resnet(block=resnet.Bottleneck, layers=(1, 2, 1, 1), **kwargs):
  return resnet.ResNet(layers, block, width=8, num_classes=10, rngs=nnx.Rngs(0), **kwargs)


def tiny_vit(**kwargs):
  return vit.VisionTransformer(image_size=32, patch_size=8, hidden_dim=32, num_layers=2,
                               num_heads=4, mlp_dim=64, num_classes=10, rngs=nnx.Rngs(0),
                               **kwargs)


@nnx.jit
def forward(model, x):
  return model(x)


def param_count(make_model) -> int:
  model = nnx.eval_shape(make_model)
  return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("make_model, expected", [
    (resnet.resnet18, 11_689_512),
    (resnet.resnet34, 21_797_672),
    (resnet.resnet50, 25_557_032),
    (resnet.resnet101, 44_549_160),
    (resnet.resnet152, 60_192_808),
    (vit.vit_b16, 86_567_656),
], ids=["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vit_b16"])
def test_full_size_parameter_counts_match_torchvision(make_model, expected):
  assert param_count(lambda: make_model(rngs=nnx.Rngs(0))) == expected


@pytest.mark.parametrize("block", [resnet.BasicBlock, resnet.Bottleneck])
def test_resnet_logits_shape(block):
  model = tiny_resnet(block)
  model.eval()
  assert forward(model, jnp.ones((2, 32, 32, 3))).shape == (2, 10)


def test_resnet_is_torchvision_v1_5():
  model = tiny_resnet()
  first = model.layer2.layers[0]
  assert model.conv1.padding == ((3, 3), (3, 3)) and model.conv1.strides == 2
  assert first.conv1.strides == 1 and first.conv2.strides == 2  # stride on the 3x3
  assert first.downsample.layers[0].strides == 2
  assert model.layer2.layers[1].downsample is None  # identity shortcut inside a stage
  assert (model.bn1.epsilon, model.bn1.momentum) == (1e-5, 0.9)
  assert all(conv.bias is None for _, conv in nnx.iter_graph(model) if isinstance(conv, nnx.Conv))
  assert model.fc.in_features == 8 * 8 * 4


def test_vit_logits_shape_and_attention_kernels():
  model = tiny_vit(num_kv_heads=2)
  attention = model.layers[0].attention
  assert attention.query.kernel.shape == attention.out.kernel.shape == (32, 32)
  assert attention.key.kernel.shape == attention.value.kernel.shape == (32, 16)
  assert model.pos_embedding.shape == (1, 17, 32)
  assert forward(model, jnp.ones((2, 32, 32, 3))).shape == (2, 10)


def test_grouped_kv_heads_equal_repeated_multi_head_attention():
  """Kv head g serves query heads [g * group, (g + 1) * group): repeating its kernels shows it."""
  grouped = vit.MultiHeadAttention(32, 4, num_kv_heads=2, rngs=nnx.Rngs(1))
  full = vit.MultiHeadAttention(32, 4, rngs=nnx.Rngs(2))
  for name in ("query", "out"):
    nnx.update(getattr(full, name), nnx.state(getattr(grouped, name)))
  for name in ("key", "value"):
    source, target = getattr(grouped, name), getattr(full, name)
    target.kernel[...] = jnp.repeat(source.kernel[...].reshape(32, 2, 8), 2, axis=1).reshape(32, 32)
    target.bias[...] = jnp.repeat(source.bias[...].reshape(2, 8), 2, axis=0).reshape(32)
  x = jax.random.normal(jax.random.key(0), (2, 5, 32))
  np.testing.assert_allclose(grouped(x), full(x), atol=1e-5)


def test_removing_a_head_equals_zeroing_its_output_features():
  """Head h is features [h * hd, (h + 1) * hd) of q/k/v and the same inputs of `out`."""
  attention = vit.MultiHeadAttention(32, 4, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 5, 32))
  keep = np.r_[0:16, 24:32]  # drop head 2
  zeroed = nnx.clone(attention)
  zeroed.out.kernel[...] = zeroed.out.kernel[...].at[16:24].set(0.0)
  pruned = nnx.clone(attention)
  for name in ("query", "key", "value"):
    layer = getattr(pruned, name)
    layer.kernel, layer.bias = nnx.Param(layer.kernel[:, keep]), nnx.Param(layer.bias[keep])
  pruned.out.kernel = nnx.Param(pruned.out.kernel[keep])
  np.testing.assert_allclose(pruned(x), zeroed(x), atol=1e-5)


def test_vit_rejects_images_of_another_size():
  model = tiny_vit()
  with pytest.raises(ValueError, match=r"\(batch, 32, 32, 3\).*got \(2, 28, 28, 3\)"):
    model(jnp.ones((2, 28, 28, 3)))
  with pytest.raises(ValueError, match=r"got \(32, 32, 3\)"):
    model(jnp.ones((32, 32, 3)))


def test_resnet_rejects_wrong_channels():
  with pytest.raises(ValueError, match=r"\(batch, height, width, 3\); got \(1, 32, 32, 1\)"):
    tiny_resnet()(jnp.ones((1, 32, 32, 1)))


@pytest.mark.parametrize("kwargs, message", [
    (dict(patch_size=7), "patch_size=7 must be a positive divisor of image_size=32"),
    (dict(num_heads=3), "num_heads=3 must be a positive divisor of hidden_dim=32"),
    (dict(num_kv_heads=3), "num_kv_heads=3 must be a positive divisor of num_heads=4"),
])
def test_vit_rejects_bad_sizes(kwargs, message):
  args = dict(image_size=32, patch_size=8, hidden_dim=32, num_layers=1, num_heads=4, mlp_dim=8)
  with pytest.raises(ValueError, match=message):
    vit.VisionTransformer(**{**args, **kwargs}, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kwargs, message", [
    (dict(layers=(1, 1, 1)), r"layers=\(1, 1, 1\) must be 4 positive block counts"),
    (dict(width=0), "width must be a positive integer, got 0"),
])
def test_resnet_rejects_bad_sizes(kwargs, message):
  args = dict(layers=(1, 1, 1, 1), block=resnet.BasicBlock, width=8)
  with pytest.raises(ValueError, match=message):
    resnet.ResNet(**{**args, **kwargs}, rngs=nnx.Rngs(0))
