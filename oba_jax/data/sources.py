"""Data a user already has, without TensorFlow, and generated data for smoke runs.

`data_format` picks where examples come from (`FORMATS`):

- "tfds": a prepared TFDS array_record dataset (`data_dir` is the TFDS data dir);
- "pickle": CIFAR's Python version, the folder `cifar-10-batches-py` (data_batch_1..5,
  test_batch) or `cifar-100-python` (train, test; fine labels), or a folder holding it;
- "folder": one sub-folder per class in each split folder, `train/<class>/*.JPEG` and
  `val/<class>/*.JPEG` (ImageNet's usual layout); labels are the sorted class names of
  `train/`, as torchvision's ImageFolder numbers them; JPEGs are decoded in grain's
  read threads;
- "synthetic": generated images of the dataset's shape, labels in its range; needs no
  files (the smoke runs use it);
- "auto": what `data_dir` holds (`detect`); without `data_dir`, "tfds".

Splits accept TFDS's slice syntax in every format: "train", "test[:32]", "train[:90%]".
"""

import functools
import os
import pickle
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image

FORMATS = ("auto", "tfds", "pickle", "folder", "synthetic")
# The folder each dataset's pickle files come in, and its split files.
PICKLE_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
PICKLE_FILES = {
    "cifar10": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
    "cifar100": {"train": ["train"], "test": ["test"]},
}
# Split name -> the folder names that hold it in the "folder" layout, in order of preference.
FOLDER_SPLITS = {"train": ("train",), "validation": ("val", "validation"),
                 "test": ("test", "val", "validation")}
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
# Examples per split of the "synthetic" format.
SYNTHETIC_SIZES = {"train": 512}
SYNTHETIC_DEFAULT_SIZE = 256


def layouts(name: str) -> str:
  """What `data_dir` may hold for dataset `name`, in words (for errors and --help)."""
  accepted = [f"a TFDS data dir where `{name}` is prepared (data_format=tfds)"]
  if name in PICKLE_DIRS:
    accepted.insert(0, f"{PICKLE_DIRS[name]}/ from https://www.cs.toronto.edu/~kriz/cifar.html "
                       "(the Python version), or a folder holding it (data_format=pickle)")
  if name == "imagenet2012":
    accepted.insert(0, "train/<class>/*.JPEG and val/<class>/*.JPEG, one folder per class "
                       "(data_format=folder)")
  return "; or ".join(accepted)


def detect(name: str, data_dir: str | os.PathLike | None) -> str:
  """The format of what `data_dir` holds for dataset `name`: "pickle", "folder" or "tfds"."""
  if data_dir is None:
    return "tfds"
  if name in PICKLE_DIRS and _pickle_dir(name, data_dir) is not None:
    return "pickle"
  if os.path.isdir(os.path.join(data_dir, "train")) and name not in PICKLE_DIRS:
    return "folder"
  return "tfds"


def pickle_source(name: str, split: str, data_dir: str | os.PathLike) -> Sequence[dict]:
  """CIFAR-10/100's Python pickle files as `{"image": uint8 HWC, "label": int}` examples."""
  if name not in PICKLE_FILES:
    raise ValueError(f"data_format=pickle holds CIFAR only ({sorted(PICKLE_FILES)}), not {name!r}.")
  directory = _pickle_dir(name, data_dir)
  if directory is None:
    raise FileNotFoundError(f"data_dir {os.fspath(data_dir)!r} holds no {PICKLE_DIRS[name]}/ "
                            f"(data_format=pickle); data_dir may hold: {layouts(name)}.")
  base, start, stop = _parse_split(split, tuple(PICKLE_FILES[name]))
  images, labels = _read_pickles(directory, tuple(PICKLE_FILES[name][base]))
  return ArraySource(images, labels, *_bounds(start, stop, len(labels)))


def folder_source(split: str, data_dir: str | os.PathLike) -> Sequence[dict]:
  """A class-per-folder image tree; images are decoded when an example is read."""
  base, start, stop = _parse_split(split, tuple(FOLDER_SPLITS))
  split_dir = next((os.path.join(data_dir, d) for d in FOLDER_SPLITS[base]
                    if os.path.isdir(os.path.join(data_dir, d))), None)
  if split_dir is None:
    raise FileNotFoundError(
        f"data_dir {os.fspath(data_dir)!r} has no folder for split {base!r} (looked for "
        f"{', '.join(FOLDER_SPLITS[base])}); data_format=folder wants "
        "train/<class>/*.JPEG and val/<class>/*.JPEG.")
  classes = _classes(os.path.join(data_dir, "train") if os.path.isdir(
      os.path.join(data_dir, "train")) else split_dir)
  files = _image_files(split_dir, classes)
  if not files:
    raise FileNotFoundError(f"{split_dir} holds no {'/'.join(IMAGE_EXTENSIONS)} images in "
                            "class folders.")
  return FolderSource(files[slice(*_bounds(start, stop, len(files)))])


def synthetic_source(split: str, *, image_shape: tuple[int, int, int], num_classes: int,
                     size: int | None = None) -> Sequence[dict]:
  """Generated examples: each image is noise plus a pattern of its label, so a model can learn."""
  base, start, stop = _parse_split(split, None)
  total = size or SYNTHETIC_SIZES.get(base, SYNTHETIC_DEFAULT_SIZE)
  first, last = _bounds(start, stop, total)
  seed = sum(map(ord, base))  # train and test differ
  return SyntheticSource(tuple(image_shape), num_classes, first, last, seed)


class ArraySource:
  """Examples from in-memory uint8 images (N, H, W, C) and labels, rows [first, last)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, first: int, last: int):
    self._images, self._labels, self._first, self._len = images, labels, first, last - first

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict:
    index = self._first + _check_index(index, self._len)
    return {"image": self._images[index], "label": int(self._labels[index])}


class FolderSource:
  """Examples from (path, label) pairs; a JPEG is decoded to RGB uint8 when read."""

  def __init__(self, files: list[tuple[str, int]]):
    self._files = files

  def __len__(self) -> int:
    return len(self._files)

  def __getitem__(self, index: int) -> dict:
    path, label = self._files[_check_index(index, len(self._files))]
    with Image.open(path) as image:
      return {"image": np.asarray(image.convert("RGB")), "label": label}


class SyntheticSource:
  """Deterministic generated examples; example i depends only on the split and i."""

  def __init__(self, shape, num_classes, first, last, seed):
    self._shape, self._num_classes = shape, num_classes
    self._first, self._len, self._seed = first, last - first, seed

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict:
    index = self._first + _check_index(index, self._len)
    rng = np.random.default_rng((self._seed, index))
    label = int(rng.integers(self._num_classes))
    height, width, channels = self._shape
    # A bright band whose row depends on the label, over noise.
    image = rng.integers(0, 96, size=self._shape, dtype=np.uint8)
    row = (label * height) // self._num_classes
    image[row:row + max(1, height // self._num_classes)] += 128
    return {"image": image, "label": label}


def _check_index(index: int, length: int) -> int:
  index = int(index)
  if not 0 <= index < length:
    raise IndexError(f"example {index} out of range [0, {length}).")
  return index


_SPLIT = re.compile(r"^(\w+)(?:\[(-?\d*)(%?):(-?\d*)(%?)\])?$")


def _parse_split(split: str, accepted: tuple[str, ...] | None):
  """("train[:90%]") -> ("train", None, (90, "%")): the base split and the slice bounds."""
  match = _SPLIT.match(split.replace(" ", ""))
  if match is None:
    raise ValueError(f"split {split!r} is not NAME or NAME[start:stop] (e.g. 'test[:32]', "
                     "'train[:90%]').")
  base, start, start_pct, stop, stop_pct = match.groups()
  if accepted is not None and base not in accepted:
    raise ValueError(f"split {split!r}: unknown split {base!r}; accepted: {list(accepted)}.")
  bound = lambda text, pct: None if not text else (int(text), pct)
  return base, bound(start, start_pct), bound(stop, stop_pct)


def _bounds(start, stop, length: int) -> tuple[int, int]:
  """The [first, last) rows of a split slice over `length` examples."""
  def position(bound, default):
    if bound is None:
      return default
    value, pct = bound
    value = round(value * length / 100) if pct else value
    return min(max(value + length if value < 0 else value, 0), length)
  first, last = position(start, 0), position(stop, length)
  return first, max(first, last)


def _pickle_dir(name: str, data_dir) -> str | None:
  """The folder holding the pickle files: `data_dir` itself or its `PICKLE_DIRS[name]`."""
  for directory in (os.path.join(data_dir, PICKLE_DIRS[name]), os.fspath(data_dir)):
    if all(os.path.isfile(os.path.join(directory, f))
           for files in PICKLE_FILES[name].values() for f in files):
      return directory
  return None


@functools.lru_cache(maxsize=4)
def _read_pickles(directory: str, files: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
  """Images (N, 32, 32, 3) uint8 and labels of the pickled batches `files`."""
  images, labels = [], []
  for name in files:
    path = os.path.join(directory, name)
    with open(path, "rb") as f:
      batch = pickle.load(f, encoding="bytes")
    found = batch.get(b"labels", batch.get(b"fine_labels"))
    if b"data" not in batch or found is None:
      raise ValueError(f"{path} is not a CIFAR pickle batch (keys {sorted(batch)[:6]}).")
    images.append(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    labels.append(np.asarray(found, np.int64))
  return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def _classes(directory: str) -> list[str]:
  return sorted(d.name for d in os.scandir(directory) if d.is_dir())


def _image_files(split_dir: str, classes: list[str]) -> list[tuple[str, int]]:
  files = []
  for label, name in enumerate(classes):
    class_dir = os.path.join(split_dir, name)
    if not os.path.isdir(class_dir):
      continue
    files.extend((e.path, label) for e in sorted(os.scandir(class_dir), key=lambda e: e.name)
                 if e.name.lower().endswith(IMAGE_EXTENSIONS))
  return files
