"""The paper's networks in Flax NNX, sized by arguments so tests can build tiny ones.

CIFAR: `VGG` (EigenDamage-style VGG19) and `ResNetCIFAR` (wide ResNet-6n+2).
ImageNet: `resnet50` (torchvision layout) and `vit_b16` (torchvision layout, separate
q/k/v/out projections, optional grouped key/value heads).
Transformers for real pretrained weights: `Llama` (decoder LM: GQA, interleaved RoPE, RMSNorm,
SwiGLU; `smollm2_135m`) and `Bert` (post-LN encoder with mean pooling; `minilm_l6`).
"""

from oba_jax.models import bert, llama, resnet, vit
from oba_jax.models.bert import Bert, minilm_l6
from oba_jax.models.llama import Llama, smollm2_135m
from oba_jax.models.resnet import (Bottleneck, ResNet, resnet18, resnet34, resnet50,
                                   resnet101, resnet152)
from oba_jax.models.registry import MODELS, arguments, check, create
from oba_jax.models.resnet_cifar import BasicBlock, ResNetCIFAR
from oba_jax.models.vgg import VGG, ConvBN
from oba_jax.models.vit import MultiHeadAttention, VisionTransformer, vit_b16

__all__ = [
    "MODELS", "BasicBlock", "Bert", "Bottleneck", "ConvBN", "Llama", "MultiHeadAttention",
    "ResNet", "ResNetCIFAR", "VGG", "VisionTransformer", "arguments", "bert", "check", "create",
    "llama",
    "minilm_l6", "resnet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "smollm2_135m", "vit", "vit_b16",
]
