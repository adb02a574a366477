"""The paper's official CIFAR VGG and ResNet state dicts: round trips, errors, and logits against
PyTorch modules laid out as the official code's (NEU-REAL/OBA, EigenDamage's models)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from oba_jax import weights
from oba_jax.models import resnet_cifar, vgg
from oba_jax.weights import convert, formats

VGG_DEPTH, VGG_WIDTH = 11, 8
RESNET_DEPTH, RESNET_WIDTH = 8, 4


def tiny_vgg(seed=0, depth=VGG_DEPTH, width=VGG_WIDTH):
  return vgg.VGG(depth, width=width, num_classes=10, rngs=nnx.Rngs(seed))


def tiny_resnet(seed=0, depth=RESNET_DEPTH, width=RESNET_WIDTH):
  return resnet_cifar.ResNetCIFAR(depth, width=width, num_classes=10, rngs=nnx.Rngs(seed))


def variables(model):
  return nnx.to_pure_dict(nnx.state(model))


def assert_same_variables(a, b):
  jax.tree.map(np.testing.assert_array_equal, variables(a), variables(b))


def randomize(model, seed=0):
  """Random weights and BatchNorm statistics, so that a wrong mapping cannot go unnoticed."""
  rng = np.random.default_rng(seed)

  def draw(key, shape):
    if key.endswith("running_var"):
      return rng.uniform(0.5, 1.5, shape)
    if len(shape) == 1 and key.endswith("weight"):
      return 1.0 + 0.2 * rng.standard_normal(shape)
    if len(shape) == 1:  # biases and running means
      return 0.2 * rng.standard_normal(shape)
    return rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))

  sd = {key: draw(key, value.shape).astype(np.float32)
        for key, value in weights.export(model, "official").items()}
  weights.load(model, sd, "official")
  return model


def logits(model, images_nchw):
  model.eval()
  images = jnp.asarray(images_nchw.transpose(0, 2, 3, 1))  # NCHW -> NHWC
  return np.asarray(nnx.jit(lambda m, x: m(x))(model, images))


IMAGES = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
MODELS = [(tiny_vgg, "vgg11"), (tiny_resnet, "resnet8"),
          (lambda seed: tiny_resnet(seed, depth=14), "resnet14")]


# -- round trips -----------------------------------------------------------------------------------

@pytest.mark.parametrize("make_model", [m for m, _ in MODELS], ids=[i for _, i in MODELS])
def test_export_then_load_gives_identical_variables_and_logits(make_model):
  source, target = randomize(make_model(0)), make_model(1)
  weights.load(target, weights.export(source))  # format=None: "official", the models' default
  assert_same_variables(source, target)
  np.testing.assert_array_equal(logits(source, IMAGES), logits(target, IMAGES))


def test_load_from_safetensors_file_and_into_an_abstract_model(tmp_path):
  source = randomize(tiny_resnet())
  path = tmp_path / "resnet8.safetensors"
  safetensors.numpy.save_file(weights.export(source, "official"), path)
  target = nnx.eval_shape(tiny_resnet)
  weights.load(target, path, "official")
  assert_same_variables(source, target)


def test_exported_keys_are_the_official_names():
  sd = weights.export(tiny_vgg())  # VGG11: conv, bn, relu, pool | conv, bn, relu, pool | ...
  assert sd["feature.0.weight"].shape == (8, 3, 3, 3)
  assert sd["feature.1.running_var"].shape == (8,)
  assert sd["feature.4.weight"].shape == (16, 8, 3, 3)
  assert sd["feature.25.weight"].shape == (64, 64, 3, 3)
  assert sd["classifier.weight"].shape == (10, 64)
  sd = weights.export(tiny_resnet(depth=14))
  assert sd["conv1.weight"].shape == (4, 3, 3, 3) and sd["bn.running_mean"].shape == (4,)
  assert sd["layer1.1.conv2.weight"].shape == (4, 4, 3, 3)
  assert sd["layer2.0.downsample.0.weight"].shape == (8, 4, 1, 1)
  assert sd["layer3.0.bn3.weight"].shape == (16,)
  assert sd["linear.weight"].shape == (10, 16)
  assert not any("shortcut" in key or "layer1.0.bn3" in key for key in sd)


def test_full_size_key_sets():
  """VGG19 and ResNet32 as the official code builds them, less num_batches_tracked."""
  vgg19 = nnx.eval_shape(lambda: vgg.VGG(19, rngs=nnx.Rngs(0)))
  keys = convert.torch_keys(vgg19, formats.vgg_official(vgg19))
  assert len(keys) == 16 * 5 + 2  # 16 convs and BatchNorms, one Linear
  assert {"feature.49.weight", "feature.50.running_var", "classifier.bias"} <= set(keys)
  r32 = nnx.eval_shape(lambda: resnet_cifar.ResNetCIFAR(32, rngs=nnx.Rngs(0)))
  keys = convert.torch_keys(r32, formats.resnet_cifar_official(r32))
  assert len(keys) == 5 + 15 * 10 + 2 * 5 + 2
  assert {"layer3.4.bn2.running_var", "layer2.0.bn3.bias", "linear.weight"} <= set(keys)


# -- errors ----------------------------------------------------------------------------------------

def test_deeper_resnet_names_its_first_extra_key_and_changes_nothing():
  model = tiny_resnet()
  before = variables(model)
  with pytest.raises(ValueError, match=r"'layer1\.1\.bn1\.bias' matches nothing in the model"):
    weights.load(model, weights.export(tiny_resnet(depth=14)))
  jax.tree.map(np.testing.assert_array_equal, before, variables(model))


def test_shallower_resnet_names_the_missing_key():
  with pytest.raises(ValueError,
                     match=r"no 'layer1\.1\.bn1\.bias'; the model expects shape \(4,\)"):
    weights.load(tiny_resnet(depth=14), weights.export(tiny_resnet()))


def test_other_vgg_depth_names_the_first_key_it_lacks():
  # VGG13's feature.4 is the BatchNorm of its second conv; VGG11 has its second conv there.
  with pytest.raises(ValueError, match=r"no 'feature\.5\.bias'; the model expects shape \(16,\)"):
    weights.load(tiny_vgg(), weights.export(tiny_vgg(depth=13)))


def test_other_width_names_key_and_both_shapes():
  with pytest.raises(ValueError, match=r"'layer1\.0\.bn1\.bias' has shape \(8,\); the model "
                                       r"expects \(4,\)"):
    weights.load(tiny_resnet(), weights.export(tiny_resnet(width=8)))
  with pytest.raises(ValueError, match=r"'classifier\.weight' has shape \(10, 128\); the model "
                                       r"expects \(10, 64\)"):
    weights.load(tiny_vgg(), weights.export(tiny_vgg(width=16)))


def test_format_errors():
  with pytest.raises(ValueError, match=r"format='torchvision' is not available for VGG; accepted: "
                                       r"\['official'\]"):
    weights.export(tiny_vgg(), "torchvision")
  with pytest.raises(ValueError, match=r"format='official' is not available for ResNet; "):
    from oba_jax.models import resnet
    weights.export(resnet.ResNet((1, 1, 1, 1), resnet.BasicBlock, width=4, rngs=nnx.Rngs(0)),
                   "official")


# -- against PyTorch modules laid out as the official code's --------------------------------------

def official_vgg(depth=VGG_DEPTH, width=VGG_WIDTH, num_classes=10):
  """The official CIFAR VGG's layout: `feature` (conv, bn, relu; max-pools), AvgPool2d(2),
  `classifier`. Our own code, following its module names and order."""
  from torch import nn

  cfg = [item if item == vgg.POOL else max(1, item * width // 64) for item in vgg.CONFIGS[depth]]

  class VGG(nn.Module):
    def __init__(self):
      super().__init__()
      layers, channels = [], 3
      for item in cfg:
        if item == vgg.POOL:
          layers.append(nn.MaxPool2d(2, 2))
        else:
          layers += [nn.Conv2d(channels, item, 3, padding=1, bias=False), nn.BatchNorm2d(item),
                     nn.ReLU()]
          channels = item
      self.feature = nn.Sequential(*layers)
      self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x):
      return self.classifier(nn.functional.avg_pool2d(self.feature(x), 2).flatten(1))

  return VGG()


def official_resnet(depth=RESNET_DEPTH, width=RESNET_WIDTH, num_classes=10):
  """The official CIFAR ResNet's layout: `conv1`, `bn`, `layer1..3` of BasicBlocks (`conv1`, `bn1`,
  `conv2`, `bn2`, projection `downsample.0` + `bn3`), global average pool, `linear`."""
  from torch import nn
  from torch.nn import functional as F

  class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      self.downsample = self.bn3 = None
      if stride != 1 or cin != cout:
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False))
        self.bn3 = nn.BatchNorm2d(cout)

    def forward(self, x):
      out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
      return F.relu(out + (x if self.downsample is None else self.bn3(self.downsample(x))))

  class ResNet(nn.Module):
    def __init__(self):
      super().__init__()
      n, widths = (depth - 2) // 6, (width, 2 * width, 4 * width)
      self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
      self.bn = nn.BatchNorm2d(width)
      cin = width
      for stage, cout in enumerate(widths, 1):
        blocks = []
        for index in range(n):
          blocks.append(BasicBlock(cin, cout, 2 if stage > 1 and index == 0 else 1))
          cin = cout
        setattr(self, f"layer{stage}", nn.Sequential(*blocks))
      self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
      out = F.relu(self.bn(self.conv1(x)))
      out = self.layer3(self.layer2(self.layer1(out)))
      return self.linear(F.avg_pool2d(out, out.shape[3]).flatten(1))

  return ResNet()


def randomize_torch(module, seed=0):
  """Random weights and BatchNorm statistics, in eval mode."""
  import torch
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, tensor in module.state_dict().items():
      if name.endswith("num_batches_tracked"):
        continue
      shape = tensor.shape
      noise = torch.randn(shape, generator=generator)
      if name.endswith("running_var"):
        tensor.copy_(0.5 + torch.rand(shape, generator=generator))
      elif len(shape) == 1 and name.endswith("weight"):
        tensor.copy_(1.0 + 0.2 * noise)
      elif len(shape) == 1:
        tensor.copy_(0.2 * noise)
      else:
        tensor.copy_(noise / np.sqrt(np.prod(shape[1:])))
  return module.eval()


TORCH_PAIRS = [(official_vgg, tiny_vgg), (official_resnet, tiny_resnet),
               (lambda: official_resnet(depth=14), lambda seed=0: tiny_resnet(seed, depth=14))]
TORCH_IDS = ["vgg11", "resnet8", "resnet14"]


@pytest.mark.parametrize("wrap", [None, "net", "state_dict"])
@pytest.mark.parametrize("make_torch, make_ours", TORCH_PAIRS, ids=TORCH_IDS)
def test_official_pth_loads_with_the_same_logits(tmp_path, make_torch, make_ours, wrap):
  torch = pytest.importorskip("torch")
  reference = randomize_torch(make_torch())
  path = tmp_path / "model.pth"
  sd = reference.state_dict()
  torch.save(sd if wrap is None else {wrap: sd, "acc": 93.5, "epoch": 199}, path)
  model = make_ours()
  weights.load(model, path, "official")
  with torch.no_grad():
    expected = reference(torch.from_numpy(IMAGES)).numpy()
  assert np.abs(expected).max() > 0.1  # not vacuous
  np.testing.assert_allclose(logits(model, IMAGES), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("make_torch, make_ours", TORCH_PAIRS, ids=TORCH_IDS)
def test_export_loads_into_the_official_layout_with_the_same_logits(make_torch, make_ours):
  torch = pytest.importorskip("torch")
  model = randomize(make_ours(), seed=3)
  reference = make_torch()
  reference.load_state_dict({key: torch.from_numpy(value)
                             for key, value in weights.export(model).items()})  # strict
  with torch.no_grad():
    expected = reference.eval()(torch.from_numpy(IMAGES)).numpy()
  assert np.abs(expected).max() > 0.1
  np.testing.assert_allclose(logits(model, IMAGES), expected, atol=1e-4, rtol=0)


def test_full_size_official_state_dicts_fit_vgg19_and_resnet32():
  pytest.importorskip("torch")
  for reference, model in [
      (official_vgg(19, 64), lambda: vgg.VGG(19, rngs=nnx.Rngs(0))),
      (official_resnet(32, 64), lambda: resnet_cifar.ResNetCIFAR(32, rngs=nnx.Rngs(0)))]:
    weights.load(nnx.eval_shape(model), reference.state_dict(), "official")  # checks every shape


def test_pth_without_a_state_dict_is_refused(tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "checkpoint.pth"
  torch.save({"model": official_resnet().state_dict(), "acc": 93.5}, path)
  with pytest.raises(ValueError, match=r"'model' holds a OrderedDict .*\['state_dict', 'net'\]"):
    weights.load(tiny_resnet(), path)
  torch.save({"net": {"conv1.weight": torch.ones(1), "acc": 93.5}}, path)
  with pytest.raises(ValueError, match=r"\['net'\] is not a state dict of tensors: 'acc' holds"):
    weights.load(tiny_resnet(), path)
