"""Weight import and export: round trips, files, errors, and logits against PyTorch references."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from oba_jax import weights
from oba_jax.models import resnet, vit
from oba_jax.weights import convert, formats

RESNET_LAYERS = (1, 2, 1, 1)


def tiny_resnet(block=resnet.Bottleneck, seed=0):
  return resnet.ResNet(RESNET_LAYERS, block, width=8, num_classes=10, rngs=nnx.Rngs(seed))


def tiny_vit(seed=0, **kwargs):
  return vit.VisionTransformer(image_size=32, patch_size=8, hidden_dim=32, num_layers=2,
                               num_heads=4, mlp_dim=64, num_classes=10, rngs=nnx.Rngs(seed),
                               **kwargs)


def variables(model):
  return nnx.to_pure_dict(nnx.state(model))


def assert_same_variables(a, b):
  jax.tree.map(np.testing.assert_array_equal, variables(a), variables(b))


def random_state_dict(model, format="torchvision", seed=0):
  """Random weights in `format`'s keys and shapes, scaled to keep activations of order one."""
  rng = np.random.default_rng(seed)

  def draw(key, shape):
    if key.endswith("running_var"):
      return rng.uniform(0.5, 1.5, shape)
    if len(shape) == 1 and key.endswith("weight"):  # BatchNorm and LayerNorm scales
      return 1.0 + 0.2 * rng.standard_normal(shape)
    return rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))

  return {key: draw(key, value.shape).astype(np.float32)
          for key, value in weights.export(model, format).items()}


# -- round trips -----------------------------------------------------------------------------------

@pytest.mark.parametrize("make_model, format", [
    (lambda seed: tiny_resnet(resnet.Bottleneck, seed), "torchvision"),
    (lambda seed: tiny_resnet(resnet.BasicBlock, seed), "torchvision"),
    (lambda seed: tiny_vit(seed), "torchvision"),
    (lambda seed: tiny_vit(seed), "timm"),
    (lambda seed: tiny_vit(seed, num_kv_heads=2), "torchvision"),
], ids=["resnet-bottleneck", "resnet-basic", "vit-torchvision", "vit-timm", "vit-gqa"])
def test_export_then_load_gives_identical_variables(make_model, format):
  source, target = make_model(0), make_model(1)
  weights.load(target, weights.export(source, format), format)
  assert_same_variables(source, target)


def test_load_fills_an_abstract_model():
  source = tiny_vit()
  target = nnx.eval_shape(tiny_vit)
  weights.load(target, weights.export(source, "timm"), "timm")
  assert_same_variables(source, target)


def test_exported_keys_are_torchvision_and_timm_names():
  resnet_keys = weights.export(tiny_resnet())
  assert resnet_keys["conv1.weight"].shape == (8, 3, 7, 7)
  assert resnet_keys["layer2.0.downsample.0.weight"].shape == (64, 32, 1, 1)
  assert resnet_keys["layer2.1.bn3.running_var"].shape == (64,)
  assert resnet_keys["fc.weight"].shape == (10, 256)
  torchvision = weights.export(tiny_vit(num_kv_heads=2))
  in_proj = torchvision["encoder.layers.encoder_layer_1.self_attention.in_proj_weight"]
  assert in_proj.shape == (32 + 2 * 16, 32)  # query, then 2 grouped kv heads each for key, value
  assert torchvision["encoder.pos_embedding"].shape == (1, 17, 32)
  timm = weights.export(tiny_vit(), "timm")
  assert timm["blocks.1.attn.qkv.weight"].shape == (96, 32)
  assert timm["patch_embed.proj.weight"].shape == (32, 3, 8, 8)


def test_full_size_key_sets():
  """torchvision's resnet50 and vit_b_16 (less num_batches_tracked), timm's vit_base_patch16_224."""
  r50 = nnx.eval_shape(lambda: resnet.resnet50(rngs=nnx.Rngs(0)))
  r50 = convert.torch_keys(r50, formats.RESNET_TORCHVISION)
  assert len(r50) == 267
  assert {"layer4.2.bn3.running_var", "layer1.0.downsample.1.weight"} <= set(r50)
  b16 = nnx.eval_shape(lambda: vit.vit_b16(rngs=nnx.Rngs(0)))
  torchvision = convert.torch_keys(b16, formats.VIT_TORCHVISION)
  assert len(torchvision) == 152
  assert "encoder.layers.encoder_layer_11.self_attention.in_proj_weight" in torchvision
  timm = convert.torch_keys(b16, formats.VIT_TIMM)
  assert len(timm) == 152 and {"cls_token", "pos_embed", "blocks.11.attn.qkv.bias"} <= set(timm)


# -- files -----------------------------------------------------------------------------------------

def test_load_from_safetensors_file(tmp_path):
  source, target = tiny_resnet(seed=0), tiny_resnet(seed=1)
  path = tmp_path / "resnet.safetensors"
  safetensors.numpy.save_file(weights.export(source), path)
  weights.load(target, path)
  assert_same_variables(source, target)


def test_read_state_dict_rejects_unknown_suffix(tmp_path):
  with pytest.raises(ValueError, match=r"suffix '\.npz' is not one of \('\.safetensors', '\.pth'"):
    weights.read_state_dict(tmp_path / "weights.npz")


def test_reading_pth_without_torch_says_how_to_install(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ImportError, match=r"pip install torch==2\.13\.0"):
    weights.read_state_dict(tmp_path / "weights.pth")


def test_read_pth_state_dict(tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "weights.pth"
  torch.save({"w": torch.ones(2, 3, dtype=torch.bfloat16), "n": torch.tensor(7)}, path)
  read = weights.read_state_dict(path)
  assert read["w"].dtype == np.float32 and read["w"].shape == (2, 3) and read["n"] == 7
  torch.save({"model": {"w": torch.ones(1)}}, path)
  with pytest.raises(ValueError, match="'model' holds a dict"):
    weights.read_state_dict(path)


# -- errors ----------------------------------------------------------------------------------------

def test_another_architecture_fails_on_the_first_missing_key_and_changes_nothing():
  model = tiny_resnet()
  before = variables(model)
  with pytest.raises(ValueError, match=r"no 'bn1\.bias'; the model expects shape \(8,\)"):
    weights.load(model, weights.export(tiny_vit()))
  jax.tree.map(np.testing.assert_array_equal, before, variables(model))


def test_wrong_size_names_key_and_both_shapes():
  model = tiny_vit()
  before = variables(model)
  other = vit.VisionTransformer(image_size=32, patch_size=8, hidden_dim=32, num_layers=2,
                                num_heads=4, mlp_dim=48, num_classes=10, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"'encoder\.layers\.encoder_layer_0\.mlp\.0\.bias' has "
                                       r"shape \(48,\); the model expects \(64,\)"):
    weights.load(model, weights.export(other))
  jax.tree.map(np.testing.assert_array_equal, before, variables(model))


def test_unexpected_key_is_named_and_num_batches_tracked_ignored():
  model = tiny_resnet()
  sd = weights.export(model) | {"bn1.num_batches_tracked": np.array(3)}
  weights.load(model, sd)
  with pytest.raises(ValueError, match=r"'layer5\.0\.conv1\.weight' matches nothing"):
    weights.load(model, sd | {"layer5.0.conv1.weight": np.zeros(1)})


def test_unknown_format_and_model():
  with pytest.raises(ValueError, match=r"format='timm' is not available for ResNet; accepted: "
                                       r"\['torchvision'\]"):
    weights.export(tiny_resnet(), "timm")
  with pytest.raises(TypeError, match="No weight formats for Linear"):
    weights.export(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))


# -- logits against PyTorch references written with torch.nn.functional ----------------------------

def torch_resnet(sd, x, bottleneck):
  """torchvision's ResNet forward (eval mode) from its state dict."""
  import torch.nn.functional as F

  def bn(y, name):
    return F.batch_norm(y, sd[f"{name}.running_mean"], sd[f"{name}.running_var"],
                        sd[f"{name}.weight"], sd[f"{name}.bias"], training=False, eps=1e-5)

  x = F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), "bn1"))
  x = F.max_pool2d(x, 3, stride=2, padding=1)
  for stage, num_blocks in enumerate(RESNET_LAYERS, 1):
    for index in range(num_blocks):
      name, stride = f"layer{stage}.{index}", 2 if stage > 1 and index == 0 else 1
      convs = [(1, 0), (stride, 1), (1, 0)] if bottleneck else [(stride, 1), (1, 1)]
      y = x
      for i, (conv_stride, padding) in enumerate(convs, 1):
        y = bn(F.conv2d(y, sd[f"{name}.conv{i}.weight"], stride=conv_stride, padding=padding),
               f"{name}.bn{i}")
        y = F.relu(y) if i < len(convs) else y
      if f"{name}.downsample.0.weight" in sd:
        x = F.conv2d(x, sd[f"{name}.downsample.0.weight"], stride=stride)
        x = bn(x, f"{name}.downsample.1")
      x = F.relu(y + x)
  return F.linear(x.mean((2, 3)), sd["fc.weight"], sd["fc.bias"])


VIT_KEYS = {
    "torchvision": dict(token="class_token", pos="encoder.pos_embedding", patch="conv_proj",
                        block="encoder.layers.encoder_layer_{}.", ln_1="ln_1", ln_2="ln_2",
                        qkv="self_attention.in_proj_", proj="self_attention.out_proj.",
                        fc1="mlp.0", fc2="mlp.3", norm="encoder.ln", head="heads.head"),
    "timm": dict(token="cls_token", pos="pos_embed", patch="patch_embed.proj", block="blocks.{}.",
                 ln_1="norm1", ln_2="norm2", qkv="attn.qkv.", proj="attn.proj.", fc1="mlp.fc1",
                 fc2="mlp.fc2", norm="norm", head="head"),
}


def torch_vit(sd, x, format, num_heads=4, num_layers=2, patch_size=8):
  """torchvision's ViT forward, attention by PyTorch's multi_head_attention_forward, or timm's,
  attention by its fused-qkv scaled_dot_product_attention, from a state dict."""
  import torch
  import torch.nn.functional as F
  names = VIT_KEYS[format]
  ln = lambda y, name: F.layer_norm(y, y.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"],
                                    eps=1e-6)
  linear = lambda y, name: F.linear(y, sd[f"{name}.weight"], sd[f"{name}.bias"])
  patch = names["patch"]
  x = F.conv2d(x, sd[f"{patch}.weight"], sd[f"{patch}.bias"], stride=patch_size)
  x = x.flatten(2).transpose(1, 2)
  x = torch.cat([sd[names["token"]].expand(x.shape[0], -1, -1), x], dim=1) + sd[names["pos"]]
  batch, tokens, dim = x.shape
  for i in range(num_layers):
    block = names["block"].format(i)
    qkv_w, qkv_b = sd[block + names["qkv"] + "weight"], sd[block + names["qkv"] + "bias"]
    proj_w, proj_b = sd[block + names["proj"] + "weight"], sd[block + names["proj"] + "bias"]
    y = ln(x, block + names["ln_1"])
    if format == "torchvision":
      y = y.transpose(0, 1)  # (tokens, batch, dim)
      y, _ = F.multi_head_attention_forward(y, y, y, dim, num_heads, qkv_w, qkv_b, None, None,
                                            False, 0.0, proj_w, proj_b, training=False,
                                            need_weights=False)
      y = y.transpose(0, 1)
    else:
      qkv = F.linear(y, qkv_w, qkv_b).reshape(batch, tokens, 3, num_heads, -1)
      q, k, v = qkv.permute(2, 0, 3, 1, 4)
      y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, dim)
      y = F.linear(y, proj_w, proj_b)
    x = x + y
    y = F.gelu(linear(ln(x, block + names["ln_2"]), block + names["fc1"]))
    x = x + linear(y, block + names["fc2"])
  return linear(ln(x, names["norm"])[:, 0], names["head"])


@pytest.mark.parametrize("make_model, format, reference", [
    (tiny_resnet, "torchvision", lambda sd, x: torch_resnet(sd, x, bottleneck=True)),
    (lambda: tiny_resnet(resnet.BasicBlock), "torchvision",
     lambda sd, x: torch_resnet(sd, x, bottleneck=False)),
    (tiny_vit, "torchvision", lambda sd, x: torch_vit(sd, x, "torchvision")),
    (tiny_vit, "timm", lambda sd, x: torch_vit(sd, x, "timm")),
], ids=["resnet-bottleneck", "resnet-basic", "vit-torchvision", "vit-timm"])
def test_imported_model_matches_pytorch_reference(make_model, format, reference):
  torch = pytest.importorskip("torch")
  model = make_model()
  sd = random_state_dict(model, format)
  weights.load(model, sd, format)
  model.eval()
  images = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    expected = reference({key: torch.from_numpy(value) for key, value in sd.items()},
                         torch.from_numpy(images)).numpy()
  logits = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(images.transpose(0, 2, 3, 1)))
  assert np.abs(expected).max() > 0.1  # not vacuous
  np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
