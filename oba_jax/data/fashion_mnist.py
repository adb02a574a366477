"""Fashion-MNIST as a TFDS array_record dataset, built from the original IDX files.

The built-in TFDS `fashion_mnist` builder needs TensorFlow and rejects the checksums
of Debian's `dataset-fashion-mnist` files, so this builder parses the IDX `.gz`
files with numpy and stores `Tensor` features, which need no TensorFlow.
"""

import gzip
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from oba_jax import files

DEBIAN_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "OBA_FASHION_MNIST_DIR"
IDX_FILES = {  # split: (images, labels)
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def find_idx_dir(idx_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Returns the directory of the IDX files: `idx_dir`, else `$OBA_FASHION_MNIST_DIR`,
  else Debian's install location; raises `FileNotFoundError` if a file is missing."""
  directory = pathlib.Path(idx_dir or os.environ.get(ENV_VAR) or DEBIAN_DIR)
  missing = [
      name for pair in IDX_FILES.values() for name in pair if not (directory / name).is_file()
  ]
  if missing:
    raise FileNotFoundError(
        f"Fashion-MNIST IDX files {missing} not found in {directory}. "
        f"Install them with `apt-get install dataset-fashion-mnist` (into {DEBIAN_DIR}) "
        f"or set ${ENV_VAR} to a directory that holds them."
    )
  return directory


def read_idx(path: pathlib.Path) -> np.ndarray:
  """Reads a gzipped IDX file of uint8 values into an array of its declared shape."""
  data = gzip.decompress(path.read_bytes())
  if data[:3] != b"\0\0\x08":  # IDX magic: two zero bytes, then 0x08 for uint8
    raise ValueError(f"{path} is not an IDX file of uint8 values (magic {data[:4]!r}).")
  ndim = data[3]
  shape = np.frombuffer(data, ">u4", count=ndim, offset=4)
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


class FashionMnistIdx(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Fashion-MNIST (60,000 train / 10,000 test, 28x28 grey, 10 classes) from IDX files."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Built from the original IDX files."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Put the four IDX .gz files in manual_dir: `apt-get install dataset-fashion-mnist` "
      f"installs them in {DEBIAN_DIR}."
  )

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=CLASS_NAMES),
            }
        ),
        supervised_keys=("image", "label"),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
    )

  def _split_generators(self, dl_manager):
    return {
        split: self._generate_examples(dl_manager.manual_dir, *files)
        for split, files in IDX_FILES.items()
    }

  def _generate_examples(self, directory, images_file, labels_file):
    images = read_idx(directory / images_file)[..., None]
    labels = read_idx(directory / labels_file)
    for index, (image, label) in enumerate(zip(images, labels)):
      yield index, {"image": image, "label": label}


def prepare(
    data_dir: str | os.PathLike | None = None, idx_dir: str | os.PathLike | None = None
) -> FashionMnistIdx:
  """Returns the builder, writing the array_record files into `data_dir` on first use.

  Processes preparing it at once (data-parallel workers, test workers) take turns: the
  first writes the files, the others find them written (TFDS alone would collide).
  """
  builder = FashionMnistIdx(data_dir=data_dir, file_format="array_record")
  if builder.is_prepared():
    return builder
  with files.exclusive(os.path.join(builder.data_dir_root, f".{builder.name}.prepare.lock")):
    builder = FashionMnistIdx(data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
      config = tfds.download.DownloadConfig(manual_dir=find_idx_dir(idx_dir))
      builder.download_and_prepare(download_config=config)
  return builder
