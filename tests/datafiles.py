"""Small generated data folders in the layouts users have: CIFAR pickles, image-class trees."""

import os
import pickle

import numpy as np
from PIL import Image

from oba_jax.data import sources


def write_cifar_pickles(root, name: str = "cifar10", per_file: int = 8, seed: int = 0) -> str:
  """`root/<cifar-10-batches-py | cifar-100-python>` as the Python version has it; returns root."""
  rng = np.random.default_rng(seed)
  directory = os.path.join(root, sources.PICKLE_DIRS[name])
  os.makedirs(directory, exist_ok=True)
  classes = 10 if name == "cifar10" else 100
  for files in sources.PICKLE_FILES[name].values():
    for file in files:
      labels = [int(x) for x in rng.integers(classes, size=per_file)]
      batch = {b"data": rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8),
               b"filenames": [f"{i}.png".encode() for i in range(per_file)]}
      if name == "cifar10":
        batch[b"labels"] = labels
      else:
        batch.update({b"fine_labels": labels, b"coarse_labels": [x // 5 for x in labels]})
      with open(os.path.join(directory, file), "wb") as f:
        pickle.dump(batch, f)
  meta = "batches.meta" if name == "cifar10" else "meta"
  with open(os.path.join(directory, meta), "wb") as f:
    pickle.dump({b"label_names": [b"c%d" % i for i in range(classes)]}, f)
  return str(root)


def write_image_folder(root, classes: int = 3, per_class: int = 4, seed: int = 0,
                       splits=("train", "val")) -> str:
  """`root/<split>/n0000000<k>/<i>.JPEG` of assorted sizes; returns root."""
  rng = np.random.default_rng(seed)
  for split in splits:
    for k in range(classes):
      directory = os.path.join(root, split, f"n{k:08d}")
      os.makedirs(directory, exist_ok=True)
      for i in range(per_class):
        height, width = (int(x) for x in rng.integers(40, 90, size=2))
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(directory, f"{i}.JPEG"), quality=80)
  return str(root)
