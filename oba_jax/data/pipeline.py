"""Grain input pipelines: shuffle, augment, shard across hosts and batch, resumably."""

import dataclasses
import functools
import os

import grain
import jax
import numpy as np

from oba_jax.data import datasets
from oba_jax.data import sources
from oba_jax.data import transforms

# Threads that prepare whole batches ahead of the training loop. A small buffer
# bounds memory (a batch of 128 ImageNet images is 77 MB); more threads do not
# help here, as the per-example work in Python holds the GIL.
DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a model and a training loop need to know about a dataset split.

  Attributes:
    num_examples: examples in the split, over all hosts.
    num_classes: number of labels.
    image_shape: (height, width, channels) of the images in the batches.
  """

  num_examples: int
  num_classes: int
  image_shape: tuple[int, int, int]


def dataset_info(
    name: str,
    split: str,
    *,
    data_dir: datasets.PathLike | None = None,
    manual_dir: datasets.PathLike | None = None,
    data_format: str = "auto",
) -> DatasetInfo:
  """Describes split `split` of dataset `name`, preparing it first if needed, as
  `load` does (see `load` for the arguments)."""
  spec = datasets.get_spec(name)
  source = open_source(name, split, data_dir, manual_dir, data_format)
  return DatasetInfo(len(source), spec.num_classes, spec.image_shape)


def load(
    name: str,
    split: str,
    *,
    batch_size: int,
    train: bool,
    seed: int = 0,
    data_dir: datasets.PathLike | None = None,
    manual_dir: datasets.PathLike | None = None,
    data_format: str = "auto",
    augment: bool | None = None,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
  """Returns an iterator over batches `{"image": float32 NHWC, "label": int32 N}`.

  Training iterators shuffle each epoch differently (deterministically from `seed`),
  repeat for `num_epochs` (forever if None) and drop the last partial batch.
  Evaluation iterators read the split once, in order, keeping a final partial batch.

  Each host reads its own shard: every `shard_count`-th example of the (shuffled,
  augmented) stream, starting at `shard_index`, so hosts see disjoint examples and
  together the whole split; the defaults are `jax.process_index()` and
  `jax.process_count()`. When training, all hosts get the same number of batches;
  when evaluating, a host may get one example fewer than another. An example's
  augmentation depends only on `seed` and its position in the stream, not on the
  sharding.

  The iterator's `get_state()` / `set_state(state)` checkpoint and resume it
  exactly (also with orbax, through `grain.checkpoint.CheckpointSave`).

  Args:
    name: one of `datasets.DATASETS`.
    split: a TFDS split, e.g. "train", "test" or "train[:90%]".
    batch_size: examples per batch on this host.
    train: whether to shuffle, repeat and drop the remainder.
    seed: seed of the shuffle and of the augmentation.
    data_dir: TFDS data directory (default: TFDS's, `~/tensorflow_datasets`), or a
      folder of CIFAR pickle files or of ImageNet class folders (see `sources`).
    manual_dir: where the source files are if the dataset must be prepared
      (ImageNet tar files; Fashion-MNIST IDX files, see `fashion_mnist.find_idx_dir`).
    data_format: one of `sources.FORMATS`: "tfds", "pickle", "folder",
      "synthetic" (generated, no files), or "auto" (detected from `data_dir`).
    augment: whether to augment the images (default: the dataset's default when
      training, no when evaluating).
    num_epochs: epochs to read when training; None repeats forever.
    shard_index, shard_count: this host's shard and the number of shards.
    read_options: grain's threading and prefetching of batches.
  """
  spec = datasets.get_spec(name)
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  _check_arguments(
      batch_size=batch_size,
      train=train,
      seed=seed,
      num_epochs=num_epochs,
      shard_index=shard_index,
      shard_count=shard_count,
  )
  source = open_source(name, split, data_dir, manual_dir, data_format)

  ds = grain.MapDataset.source(source).seed(seed)
  if train:
    ds = ds.shuffle().repeat(num_epochs)
  if augment is None:
    augment = train and spec.augment_by_default
  if augment:
    ds = ds.random_map(functools.partial(_map_image, steps=spec.augment))
  else:
    ds = ds.map(functools.partial(_map_image, steps=spec.eval_transforms))
  ds = ds.map(functools.partial(_to_model_input, mean=spec.mean, std=spec.std))
  if train:  # Drops the last partial global batch: all hosts take the same steps.
    ds = ds[: len(ds) - len(ds) % (batch_size * shard_count)]
  ds = ds[shard_index::shard_count].batch(batch_size, drop_remainder=train)
  return iter(ds.to_iter_dataset(read_options or DEFAULT_READ_OPTIONS))


def _check_arguments(*, batch_size, train, seed, num_epochs, shard_index, shard_count):
  """Raises `ValueError` naming the first argument out of its accepted range."""
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be a positive integer.")
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed={seed} must be in [0, 2**32).")
  if num_epochs is not None and not train:
    raise ValueError(
        f"num_epochs={num_epochs} applies to training only; " "evaluation reads the split once."
    )
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(
        f"num_epochs={num_epochs} must be a positive integer, " "or None to repeat forever."
    )
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count}).")


def resolve_format(name: str, data_dir, data_format: str = "auto") -> str:
  """`data_format`, or for "auto" the format of what `data_dir` holds (`sources.detect`)."""
  return sources.detect(name, data_dir) if data_format == "auto" else data_format


def open_source(name, split, data_dir=None, manual_dir=None, data_format="auto"):
  """The random-access examples of `split` in `data_format` (see `sources`).

  Checks that the given directories exist before opening the source.
  """
  spec = datasets.get_spec(name)
  if data_format not in sources.FORMATS:
    raise ValueError(f"data_format={data_format!r} is not one of {list(sources.FORMATS)}.")
  for argument, path in (("data_dir", data_dir), ("manual_dir", manual_dir)):
    if path is not None and not os.path.isdir(path):
      raise FileNotFoundError(f"{argument} {os.fspath(path)!r} is not a directory.")
  data_format = resolve_format(name, data_dir, data_format)
  if data_format == "synthetic":
    return sources.synthetic_source(split, image_shape=spec.image_shape,
                                    num_classes=spec.num_classes)
  if data_format in ("pickle", "folder") and data_dir is None:
    raise ValueError(f"data_format={data_format!r} reads data_dir, which is not given; "
                     f"data_dir may hold: {sources.layouts(name)}.")
  if data_format == "pickle":
    return sources.pickle_source(name, split, data_dir)
  if data_format == "folder":
    return sources.folder_source(split, data_dir)
  try:
    return spec.source(split, data_dir, manual_dir)
  except FileNotFoundError as error:
    if manual_dir is not None or name == "fashion_mnist":
      raise
    raise FileNotFoundError(f"{error} Without tensorflow, data_dir may hold: "
                            f"{sources.layouts(name)}.") from None


def _map_image(example: dict, *rng: np.random.Generator, steps) -> dict:
  """Applies `steps` in order to the example's image, passing them `rng` if given."""
  image = example["image"]
  for step in steps:
    image = step(image, *rng)
  return {**example, "image": image}


def _to_model_input(example: dict, mean, std) -> dict:
  """Keeps the image, normalised to float32, and the label as int32."""
  return {
      "image": transforms.normalize(example["image"], mean, std),
      "label": np.int32(example["label"]),
  }
