"""Weights from PyTorch: torchvision and timm state dicts into oba_jax's ResNet and ViT, the
paper's official CIFAR VGG and ResNet state dicts into `VGG` and `ResNetCIFAR`, and back.

  load(model, state_dict_or_path, format=None)  checks every key and shape, then writes
  export(model, format=None)                     -> {torch key: numpy array}
  read_state_dict(path)                          .safetensors, or .pth given torch

Formats: "torchvision" (ResNet, ViT; their default), "timm" (ViT), "official" (VGG and
ResNetCIFAR, the layout of the paper's code; their default).

Transformers (import the module; `gguf`/`tokenizers` are optional): `llama_gguf.load_llama(path)`
and `gguf_tokenizer(path)` for Llama-family GGUF files (SmolLM2), `bert_safetensors.load_bert(dir)`
and `bert_tokenizer(dir)` for Hugging Face BERT directories (MiniLM); `fill.build` checks leaves.

Modules: `io` reads files, `convert` translates given a key-renaming table, `formats` holds the
tables. Nothing here imports torch unless a `.pth` file is read.
"""

from oba_jax.weights.formats import export, load
from oba_jax.weights.io import read_state_dict

__all__ = ["export", "load", "read_state_dict"]
