"""PyTorch weight formats of oba_jax's models, and loading and exporting them.

A format is a key-renaming table for `convert` (see there), or a function building one from the
model when the torch names depend on its depth. Our ResNet names its modules as torchvision does;
our ViT differs from torchvision (fused `in_proj_weight`, `encoder.` prefixes, `mlp.0`/`mlp.3`)
and from timm (fused `qkv`, `blocks.N`, `norm1`, `cls_token`, `pos_embed`).

"official" is the layout of the paper's code (NEU-REAL/OBA, whose CIFAR VGG and ResNet are
EigenDamage's: `torch_pruning/pruner/kfac_utils/models/{vgg,resnet}.py`), as its training scripts
save it with `torch.save(model.state_dict(), path)`:
  VGG         `feature.N` (one nn.Sequential: conv, BatchNorm, ReLU per layer, one index per
              max-pool), `classifier` (one Linear).
  ResNetCIFAR `conv1`, `bn` (stem), `layer{1,2,3}.M.{conv1,bn1,conv2,bn2}`, projection shortcut
              `layerS.M.downsample.0` (1x1 conv) and `layerS.M.bn3`, `linear`.
"""

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from oba_jax.models import vgg
from oba_jax.models.resnet import ResNet
from oba_jax.models.resnet_cifar import ResNetCIFAR
from oba_jax.models.vit import VisionTransformer
from oba_jax.weights import convert
from oba_jax.weights.io import read_state_dict

RESNET_TORCHVISION = (
    (r"\.layers\.", "."),  # nnx.Sequential (stages, downsample) keeps its modules in `.layers`
)

VIT_TORCHVISION = (
    (r"^layers\.(\d+)\.", r"encoder.layers.encoder_layer_\1."),
    (r"^(pos_embedding|ln\.)", r"encoder.\1"),
    (r"\.attention\.(query|key|value)\.", ".self_attention.in_proj_"),
    (r"\.attention\.out\.", ".self_attention.out_proj."),
    (r"\.fc1\.", ".mlp.0."),
    (r"\.fc2\.", ".mlp.3."),
    (r"^head\.", "heads.head."),
)

VIT_TIMM = (
    (r"^layers\.", "blocks."),
    (r"^class_token$", "cls_token"),
    (r"^pos_embedding$", "pos_embed"),
    (r"^conv_proj\.", "patch_embed.proj."),
    (r"\.ln_(\d)\.", r".norm\1."),
    (r"^ln\.", "norm."),
    (r"\.attention\.(query|key|value)\.", ".attn.qkv."),
    (r"\.attention\.out\.", ".attn.proj."),
    (r"\.(fc\d)\.", r".mlp.\1."),
)



def vgg_official(model: vgg.VGG) -> convert.Renames:
  """The official VGG's keys: our `layers.J` (pools hold no weights) -> `feature.N`."""
  renames, index = [], 0
  for j, layer in enumerate(model.layers):
    if layer == vgg.POOL:
      index += 1
      continue
    renames += [(rf"^layers\.{j}\.conv\.", f"feature.{index}."),
                (rf"^layers\.{j}\.bn\.", f"feature.{index + 1}.")]
    index += 3  # conv, BatchNorm, ReLU
  return tuple(renames)


def resnet_cifar_official(model: ResNetCIFAR) -> convert.Renames:
  """The official CIFAR ResNet's keys: our flat `blocks.K` -> `layerS.M`, ConvBN pairs split."""
  per_stage = len(model.blocks) // 3
  blocks = tuple((rf"^blocks\.{k}\.", f"layer{k // per_stage + 1}.{k % per_stage}.")
                 for k in range(len(model.blocks)))
  return (
      (r"^stem\.conv\.", "conv1."),
      (r"^stem\.bn\.", "bn."),
      *blocks,
      (r"\.conv(\d)\.conv\.", r".conv\1."),
      (r"\.conv(\d)\.bn\.", r".bn\1."),
      (r"\.shortcut\.conv\.", ".downsample.0."),
      (r"\.shortcut\.bn\.", ".bn3."),
      (r"^classifier\.", "linear."),
  )


# Model class -> format name -> renames, or a function of the model giving them. A model's first
# format is its default.
FORMATS = {
    ResNet: {"torchvision": RESNET_TORCHVISION},
    VisionTransformer: {"torchvision": VIT_TORCHVISION, "timm": VIT_TIMM},
    vgg.VGG: {"official": vgg_official},
    ResNetCIFAR: {"official": resnet_cifar_official},
}


def _renames(model: nnx.Module, format: str | None) -> convert.Renames:
  formats = next((table for cls, table in FORMATS.items() if isinstance(model, cls)), None)
  if formats is None:
    raise TypeError(f"No weight formats for {type(model).__name__}; accepted models: "
                    f"{[cls.__name__ for cls in FORMATS]}.")
  if format is None:
    format = next(iter(formats))
  if format not in formats:
    raise ValueError(f"format={format!r} is not available for {type(model).__name__}; "
                     f"accepted: {sorted(formats)}.")
  renames = formats[format]
  return renames(model) if callable(renames) else renames


def load(model: nnx.Module, state_dict: Mapping[str, Any] | str | os.PathLike,
         format: str | None = None) -> None:
  """Overwrites `model`'s parameters and BatchNorm statistics with a PyTorch state dict's, in place.

  A model with BatchNorm stays in its current mode: call `model.eval()` for inference.

  Args:
    model: a `ResNet`, `VisionTransformer`, `VGG` or `ResNetCIFAR` of the state dict's depth and
      width. It may be abstract (`nnx.eval_shape(lambda: resnet50(rngs=nnx.Rngs(0)))`), which
      skips the random init.
    state_dict: key -> array (numpy, jax or CPU torch tensors), or a file for `read_state_dict`.
    format: "torchvision" (ResNet, ViT), "timm" (ViT) or "official" (VGG, ResNetCIFAR: the
      paper's code, see this module's docstring). None: the model's default, the first named.

  Raises:
    ValueError: naming the first key that is missing, misshapen or unknown to the model. Every key
      is checked before anything is written.
  """
  renames = _renames(model, format)
  if isinstance(state_dict, (str, os.PathLike)):
    state_dict = read_state_dict(state_dict)
  convert.from_torch(model, state_dict, renames)


def export(model: nnx.Module, format: str | None = None) -> dict[str, np.ndarray]:
  """`model`'s weights as a PyTorch state dict of numpy arrays in `format`'s keys and layouts.

  `format` is as for `load`. Save the result with `safetensors.numpy.save_file`, or as
  `{key: torch.from_numpy(value)}` with `torch.save`. BatchNorm's `num_batches_tracked` counters
  are left out; PyTorch fills them in on load.
  """
  return convert.to_torch(model, _renames(model, format))
