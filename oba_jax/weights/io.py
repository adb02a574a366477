"""Reading PyTorch state dicts from files, as numpy arrays.

`.safetensors` needs only the `safetensors` package. PyTorch pickles (`.pth`, `.pt`, `.bin`) need
torch, an optional dependency imported here and nowhere else.
"""

import os
import pathlib
from collections.abc import Mapping

import numpy as np
import safetensors.numpy

from oba_jax import files

_TORCH_SUFFIXES = (".pth", ".pt", ".bin")
# Checkpoints that hold a state dict under one of these keys, next to other entries: e.g.
# EigenDamage's `{'net': net.module.state_dict(), 'acc': best_acc}`.
WRAPPER_KEYS = ("state_dict", "net")


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The tensors of a `.safetensors` file or of a PyTorch `.pth`/`.pt`/`.bin` state dict.

  Pickles are loaded with `weights_only=True` (tensors only, no code runs); their floats come back
  as float32, since numpy has no bfloat16. A pickle holding a checkpoint dict with the state dict
  under a key of `WRAPPER_KEYS` ("state_dict", "net") gives that state dict.
  """
  path = pathlib.Path(path)
  if path.suffix == ".safetensors":
    try:
      return safetensors.numpy.load_file(path)
    except Exception as error:  # SafetensorError (cut short, bad header), numpy errors
      if isinstance(error, OSError) and not os.path.isfile(path):
        raise
      raise files.damaged(path, "a safetensors file", error, "It is cut short (an "
                          "interrupted download or copy) or overwritten; use an intact "
                          "copy.") from None
  if path.suffix in _TORCH_SUFFIXES:
    return _read_torch(path)
  raise ValueError(f"Cannot read {str(path)!r}: suffix {path.suffix!r} is not one of "
                   f"{('.safetensors', *_TORCH_SUFFIXES)}.")


def _read_torch(path: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as err:
    raise ImportError(f"Reading {str(path)!r} needs PyTorch: pip install torch==2.13.0 "
                      "(or convert the file to .safetensors).") from err
  try:
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
  except (RuntimeError, EOFError, ValueError, OSError) as error:
    if isinstance(error, OSError) and not path.is_file():
      raise
    raise files.damaged(path, "a PyTorch state dict", error, "It is cut short, overwritten "
                        "or not a torch.save file; use an intact copy.") from None
  if not isinstance(state_dict, Mapping):
    raise ValueError(f"{str(path)!r} holds a {type(state_dict).__name__}, not a state dict.")
  wrapper = next((key for key in WRAPPER_KEYS if isinstance(state_dict.get(key), Mapping)), None)
  if wrapper is not None:
    state_dict = state_dict[wrapper]
  for key, value in state_dict.items():
    if not isinstance(value, torch.Tensor):
      where = f"{str(path)!r}" + (f"[{wrapper!r}]" if wrapper else "")
      raise ValueError(f"{where} is not a state dict of tensors: {key!r} holds a "
                       f"{type(value).__name__} (a training checkpoint? pass its state dict, or "
                       f"save it under one of the keys {list(WRAPPER_KEYS)}).")
  return {key: (value.float() if value.is_floating_point() else value).numpy()
          for key, value in state_dict.items()}
