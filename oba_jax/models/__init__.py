"""The paper's networks in Flax NNX, sized by arguments so tests can build tiny ones."""

from oba_jax.models.resnet_cifar import BasicBlock, ResNetCIFAR
from oba_jax.models.vgg import VGG, ConvBN

__all__ = ["VGG", "BasicBlock", "ConvBN", "ResNetCIFAR"]
