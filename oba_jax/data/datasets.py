"""The supported datasets as data: where the examples come from and how they are preprocessed."""

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow_datasets as tfds

from oba_jax.data import fashion_mnist
from oba_jax.data import transforms

PathLike = str | os.PathLike
Transform = Callable[[np.ndarray], np.ndarray]  # uint8 HWC image -> uint8 HWC image
RandomTransform = Callable[[np.ndarray, np.random.Generator], np.ndarray]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """How to read one dataset and turn its images into model inputs.

  Attributes:
    source: `(split, data_dir, manual_dir)` -> random-access sequence of
      `{"image": uint8 HWC, "label": int, ...}` examples.
    num_classes: number of labels.
    image_shape: (height, width, channels) of the preprocessed images.
    mean, std: per-channel statistics of pixels scaled to [0, 1], for normalisation.
    augment: random transforms applied in order to training images.
    eval_transforms: transforms applied in order to images otherwise (and to
      training images when augmentation is off).
    augment_by_default: whether training images are augmented unless told otherwise.
  """

  source: Callable[[str, PathLike | None, PathLike | None], Sequence[dict]]
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  augment: tuple[RandomTransform, ...]
  eval_transforms: tuple[Transform, ...] = ()
  augment_by_default: bool = True


def tfds_source(
    name: str, split: str, data_dir: PathLike | None, manual_dir: PathLike | None
) -> Sequence[dict]:
  """Opens a TFDS dataset stored as array_record. Never downloads: the dataset must
  be prepared already, or is prepared here from the files in `manual_dir` (such as
  ImageNet's tar files; TFDS's builders need TensorFlow to prepare)."""
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  if manual_dir is not None:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
  try:
    return builder.as_data_source(split)
  except KeyError as error:  # TFDS's sign that no split has been prepared.
    raise FileNotFoundError(
        f"{name} is not prepared in {builder.data_dir}. Prepare it once with "
        f"`tfds build {name} --file_format=array_record` (needs tensorflow), or pass "
        f"manual_dir=<directory with its source files>."
    ) from error


def fashion_mnist_source(
    split: str, data_dir: PathLike | None, manual_dir: PathLike | None
) -> Sequence[dict]:
  """Opens Fashion-MNIST, preparing it from the IDX files in `manual_dir` on first use."""
  return fashion_mnist.prepare(data_dir, manual_dir).as_data_source(split)


_CIFAR_AUGMENT = (
    functools.partial(transforms.random_crop, size=32, padding=4),
    transforms.random_flip,
)

DATASETS = {
    "cifar10": DatasetSpec(
        source=functools.partial(tfds_source, "cifar10"),
        num_classes=10,
        image_shape=(32, 32, 3),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2023, 0.1994, 0.2010),
        augment=_CIFAR_AUGMENT,
    ),
    "cifar100": DatasetSpec(
        source=functools.partial(tfds_source, "cifar100"),
        num_classes=100,
        image_shape=(32, 32, 3),
        mean=(0.5071, 0.4867, 0.4408),
        std=(0.2675, 0.2565, 0.2761),
        augment=_CIFAR_AUGMENT,
    ),
    "fashion_mnist": DatasetSpec(
        source=fashion_mnist_source,
        num_classes=10,
        image_shape=(28, 28, 1),
        mean=(0.2860,),
        std=(0.3530,),  # of the training images
        augment=(
            functools.partial(transforms.random_crop, size=28, padding=2),
            transforms.random_flip,
        ),
        augment_by_default=False,
    ),
    "imagenet2012": DatasetSpec(
        source=functools.partial(tfds_source, "imagenet2012"),
        num_classes=1000,
        image_shape=(224, 224, 3),
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        augment=(
            functools.partial(transforms.random_resized_crop, size=224),
            transforms.random_flip,
        ),
        eval_transforms=(
            functools.partial(transforms.resize_shorter_side, size=256),
            functools.partial(transforms.center_crop, size=224),
        ),
    ),
}


def get_spec(name: str) -> DatasetSpec:
  """Returns the spec of dataset `name`, or raises `ValueError` listing the accepted names."""
  if name not in DATASETS:
    raise ValueError(f"Unknown dataset {name!r}; accepted: {', '.join(sorted(DATASETS))}.")
  return DATASETS[name]
