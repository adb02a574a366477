"""PyTorch weight formats of oba_jax's ImageNet models, and loading and exporting them.

A format is a key-renaming table for `convert` (see there). Our ResNet names its modules as
torchvision does; our ViT differs from torchvision (fused `in_proj_weight`, `encoder.` prefixes,
`mlp.0`/`mlp.3`) and from timm (fused `qkv`, `blocks.N`, `norm1`, `cls_token`, `pos_embed`).
"""

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from oba_jax.models.resnet import ResNet
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

FORMATS = {
    ResNet: {"torchvision": RESNET_TORCHVISION},
    VisionTransformer: {"torchvision": VIT_TORCHVISION, "timm": VIT_TIMM},
}


def _renames(model: nnx.Module, format: str) -> convert.Renames:
  formats = next((table for cls, table in FORMATS.items() if isinstance(model, cls)), None)
  if formats is None:
    raise TypeError(f"No weight formats for {type(model).__name__}; accepted models: "
                    f"{[cls.__name__ for cls in FORMATS]}.")
  if format not in formats:
    raise ValueError(f"format={format!r} is not available for {type(model).__name__}; "
                     f"accepted: {sorted(formats)}.")
  return formats[format]


def load(model: nnx.Module, state_dict: Mapping[str, Any] | str | os.PathLike,
         format: str = "torchvision") -> None:
  """Overwrites `model`'s parameters and BatchNorm statistics with a PyTorch state dict's, in place.

  A ResNet stays in its current BatchNorm mode: call `model.eval()` for inference.

  Args:
    model: a `ResNet` or `VisionTransformer` of the state dict's size. It may be abstract
      (`nnx.eval_shape(lambda: resnet50(rngs=nnx.Rngs(0)))`), which skips the random init.
    state_dict: key -> array (numpy, jax or CPU torch tensors), or a file for `read_state_dict`.
    format: "torchvision", or "timm" for a ViT.

  Raises:
    ValueError: naming the first key that is missing, misshapen or unknown to the model. Every key
      is checked before anything is written.
  """
  renames = _renames(model, format)
  if isinstance(state_dict, (str, os.PathLike)):
    state_dict = read_state_dict(state_dict)
  convert.from_torch(model, state_dict, renames)


def export(model: nnx.Module, format: str = "torchvision") -> dict[str, np.ndarray]:
  """`model`'s weights as a PyTorch state dict of numpy arrays in `format`'s keys and layouts.

  Save it with `safetensors.numpy.save_file`. BatchNorm's `num_batches_tracked` counters are left
  out; PyTorch fills them in on load.
  """
  return convert.to_torch(model, _renames(model, format))
