"""Tests of the input pipelines: TFDS mock data for CIFAR and ImageNet, real Fashion-MNIST."""

import collections
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from oba_jax import data
from oba_jax.data import datasets, fashion_mnist, transforms

MOCK_EXAMPLES = 48


@pytest.fixture
def mock_tfds():
  """TFDS datasets of MOCK_EXAMPLES random examples with the real feature shapes."""
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    yield


@pytest.fixture(scope="session")
def fashion_mnist_dir(tmp_path_factory):
  """A TFDS data dir with Fashion-MNIST prepared from the Debian IDX files."""
  try:
    idx_dir = fashion_mnist.find_idx_dir()
  except FileNotFoundError as error:
    pytest.skip(str(error))
  data_dir = tmp_path_factory.mktemp("tfds")
  fashion_mnist.prepare(data_dir, idx_dir)
  return data_dir


def take(iterator, num_batches):
  return [next(iterator) for _ in range(num_batches)]


def stack(batches, key="image"):
  return np.concatenate([batch[key] for batch in batches])


# Transforms.


def test_random_crop_is_a_window_of_the_zero_padded_image():
  image = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
  padded = np.pad(image, ((2, 2), (2, 2), (0, 0)))
  windows = {padded[i : i + 8, j : j + 8].tobytes() for i in range(5) for j in range(5)}
  rng = np.random.default_rng(0)
  crops = [transforms.random_crop(image, rng, size=8, padding=2) for _ in range(50)]
  assert all(crop.shape == image.shape and crop.tobytes() in windows for crop in crops)
  assert len({crop.tobytes() for crop in crops}) > 10


def test_random_flip_mirrors_about_half_of_the_images():
  image = np.arange(4 * 5 * 1, dtype=np.uint8).reshape(4, 5, 1)
  rng = np.random.default_rng(0)
  flipped = [np.array_equal(transforms.random_flip(image, rng), image[:, ::-1]) for _ in range(200)]
  assert 70 < sum(flipped) < 130


@pytest.mark.parametrize("shape", [(300, 400, 3), (400, 30, 3), (7, 9, 3), (20, 20, 1)])
def test_random_resized_crop_gives_the_requested_size(shape):
  image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  crop = transforms.random_resized_crop(image, np.random.default_rng(1), size=24)
  assert crop.shape == (24, 24, shape[2]) and crop.dtype == np.uint8


def test_resize_shorter_side_then_center_crop():
  image = np.zeros((300, 500, 3), np.uint8)
  image[:, 250:] = 255  # right half white
  resized = transforms.resize_shorter_side(image, 256)
  assert resized.shape == (256, 427, 3)
  crop = transforms.center_crop(resized, 224)
  assert crop.shape == (224, 224, 3)
  assert crop[:, :100].max() == 0 and crop[:, 124:].min() == 255


def test_normalize():
  image = np.array([[[0, 255]]], np.uint8)
  np.testing.assert_allclose(transforms.normalize(image, (0.5, 0.5), (0.5, 0.25)), [[[-1.0, 2.0]]])
  assert transforms.normalize(image, (0.5, 0.5), (0.5, 0.25)).dtype == np.float32


# Mock CIFAR and ImageNet pipelines.


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_eval_batches_are_the_normalised_images(mock_tfds, name):
  spec = datasets.get_spec(name)
  batches = list(data.load(name, "test", batch_size=32, train=False))
  assert [len(batch["label"]) for batch in batches] == [32, MOCK_EXAMPLES - 32]
  images, labels = stack(batches), stack(batches, "label")
  assert images.dtype == np.float32 and images.shape == (MOCK_EXAMPLES, 32, 32, 3)
  assert labels.dtype == np.int32 and labels.max() < spec.num_classes
  source = tfds.data_source(name, split="test")
  raw = np.stack([source[i]["image"] for i in range(MOCK_EXAMPLES)])
  np.testing.assert_allclose(images * spec.std + spec.mean, raw / 255, atol=1e-5)
  assert data.dataset_info(name, "test") == data.DatasetInfo(
      MOCK_EXAMPLES, spec.num_classes, (32, 32, 3)
  )


@pytest.mark.parametrize("name, shape", [("cifar10", (32, 32, 3)), ("imagenet2012", (224, 224, 3))])
def test_training_augmentation_is_deterministic_in_the_seed(mock_tfds, name, shape):
  def first_batches(seed, augment=True):
    batches = data.load(name, "train", batch_size=8, train=True, seed=seed, augment=augment)
    return stack(take(batches, 2))

  images = first_batches(seed=0)
  assert images.shape == (16, *shape) and images.dtype == np.float32
  assert np.isfinite(images).all()
  np.testing.assert_array_equal(images, first_batches(seed=0))
  assert not np.array_equal(images, first_batches(seed=1))
  assert not np.array_equal(images, first_batches(seed=0, augment=False))


def test_imagenet_eval_batches_have_the_model_input_shape(mock_tfds):
  batch = next(data.load("imagenet2012", "validation", batch_size=4, train=False))
  assert batch["image"].shape == (4, 224, 224, 3)
  assert data.dataset_info("imagenet2012", "validation").num_classes == 1000


def test_epochs_are_reshuffled(mock_tfds):
  batches = data.load("cifar10", "train", batch_size=MOCK_EXAMPLES, train=True, augment=False)
  first, second = next(batches)["image"], next(batches)["image"]
  assert not np.array_equal(first, second)
  assert sorted(map(bytes, first)) == sorted(map(bytes, second))


# Multi-host sharding and checkpointing.


def test_two_hosts_read_disjoint_halves_that_make_up_the_split(mock_tfds):
  def epoch(shard_index=None, shard_count=None):
    batches = data.load(
        "cifar10",
        "train",
        batch_size=8,
        train=True,
        num_epochs=1,
        augment=False,
        shard_index=shard_index,
        shard_count=shard_count,
    )
    return [bytes(image) for image in stack(list(batches))]

  host0, host1 = epoch(0, 2), epoch(1, 2)
  split = [
      bytes(image)
      for image in stack(list(data.load("cifar10", "train", batch_size=8, train=False)))
  ]
  assert len(host0) == len(host1) == MOCK_EXAMPLES // 2
  assert not set(host0) & set(host1)
  assert collections.Counter(host0 + host1) == collections.Counter(split)
  assert epoch() == [image for pair in zip(host0, host1) for image in pair]


def test_hosts_get_the_same_number_of_training_batches(mock_tfds):
  counts = [
      len(
          list(
              data.load(
                  "cifar10",
                  "train",
                  batch_size=5,
                  train=True,
                  num_epochs=1,
                  shard_index=index,
                  shard_count=3,
              )
          )
      )
      for index in range(3)
  ]
  assert counts == [MOCK_EXAMPLES // 15] * 3


def test_resumed_iterator_yields_the_same_batches(mock_tfds):
  def iterator():
    return data.load("imagenet2012", "train", batch_size=16, train=True, seed=3)

  uninterrupted = iterator()
  take(uninterrupted, 2)
  state = json.loads(json.dumps(uninterrupted.get_state()))
  expected = take(uninterrupted, 4)  # crosses the end of the first epoch
  resumed = iterator()
  resumed.set_state(state)
  for want, got in zip(expected, take(resumed, 4)):
    np.testing.assert_array_equal(want["image"], got["image"])
    np.testing.assert_array_equal(want["label"], got["label"])


# Bad input.


def test_unknown_dataset_lists_the_accepted_names():
  with pytest.raises(ValueError, match="'mnist'.*cifar10, cifar100, fashion_mnist, imagenet2012"):
    data.load("mnist", "train", batch_size=8, train=True)


def test_missing_data_dir_is_named(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(FileNotFoundError, match=f"data_dir '{missing}'"):
    data.load("cifar10", "train", batch_size=8, train=True, data_dir=missing)


def test_unprepared_dataset_says_how_to_prepare_it(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"not prepared in {tmp_path}.*tfds build"):
    data.dataset_info("cifar10", "train", data_dir=tmp_path)


def test_missing_idx_files_say_where_and_how(tmp_path, monkeypatch):
  how = "apt-get install dataset-fashion-mnist"
  with pytest.raises(FileNotFoundError, match=f"in {tmp_path}.*{how}"):
    data.load(
        "fashion_mnist", "train", batch_size=8, train=True, data_dir=tmp_path, manual_dir=tmp_path
    )
  monkeypatch.setenv(fashion_mnist.ENV_VAR, str(tmp_path / "env"))
  with pytest.raises(FileNotFoundError, match=f"in {tmp_path / 'env'}.*OBA_FASHION_MNIST_DIR"):
    fashion_mnist.find_idx_dir()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "batch_size=0"),
        ({"shard_index": 2, "shard_count": 2}, "shard_index=2"),
        ({"num_epochs": 1, "train": False}, "num_epochs=1"),
        ({"num_epochs": 0}, "num_epochs=0"),
        ({"seed": -1}, "seed=-1"),
    ],
)
def test_bad_arguments_are_named(mock_tfds, kwargs, message):
  with pytest.raises(ValueError, match=message):
    data.load("cifar10", "train", **{"batch_size": 8, "train": True, **kwargs})


# Real data: Fashion-MNIST from the Debian IDX files.


def test_fashion_mnist_end_to_end(fashion_mnist_dir):
  train_info = data.dataset_info("fashion_mnist", "train", data_dir=fashion_mnist_dir)
  test_info = data.dataset_info("fashion_mnist", "test", data_dir=fashion_mnist_dir)
  assert (train_info.num_examples, test_info.num_examples) == (60_000, 10_000)
  assert train_info.num_classes == 10 and train_info.image_shape == (28, 28, 1)

  train = data.load(
      "fashion_mnist",
      "train",
      batch_size=1000,
      train=True,
      num_epochs=1,
      augment=True,
      data_dir=fashion_mnist_dir,
  )
  test = data.load(
      "fashion_mnist", "test", batch_size=1000, train=False, data_dir=fashion_mnist_dir
  )
  for batches, per_class in ((train, 6000), (test, 1000)):
    labels = [batch["label"] for batch in batches]
    assert np.bincount(np.concatenate(labels)).tolist() == [per_class] * 10
  images = stack(
      take(
          data.load(
              "fashion_mnist", "test", batch_size=2000, train=False, data_dir=fashion_mnist_dir
          ),
          1,
      )
  )
  assert images.shape == (2000, 28, 28, 1)
  assert abs(images.mean()) < 0.05 and abs(images.std() - 1) < 0.05


def _write_idx(path, array):
  """`array` (uint8) as a gzipped IDX file, the format of the Fashion-MNIST files."""
  import gzip
  header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  path.write_bytes(gzip.compress(header + np.ascontiguousarray(array, np.uint8).tobytes()))


def test_a_process_preparing_fashion_mnist_waits_for_one_already_preparing_it(tmp_path):
  """While one process holds the preparation lock, another does not write the dataset
  beside it (TFDS alone would collide: FileExistsError); it prepares once the lock is free."""
  import subprocess
  import sys
  from oba_jax import files
  rng = np.random.default_rng(0)
  for split, (images, labels) in fashion_mnist.IDX_FILES.items():
    count = 12 if split == "train" else 4
    _write_idx(tmp_path / images, rng.integers(0, 256, (count, 28, 28), dtype=np.uint8))
    _write_idx(tmp_path / labels, rng.integers(0, 10, (count,), dtype=np.uint8))
  data_dir = tmp_path / "tfds"
  builder = fashion_mnist.FashionMnistIdx(data_dir=data_dir, file_format="array_record")
  lock = os.path.join(builder.data_dir_root, f".{builder.name}.prepare.lock")
  script = ("import sys; from oba_jax.data import fashion_mnist as f; "
            "b = f.prepare(sys.argv[1], sys.argv[2]); print(b.info.splits['train'].num_examples)")
  with files.exclusive(lock):
    worker = subprocess.Popen([sys.executable, "-c", script, str(data_dir), str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    with pytest.raises(subprocess.TimeoutExpired):  # it waits for the lock (or is still starting)
      worker.wait(timeout=8)
    assert not builder.is_prepared()
  out, _ = worker.communicate(timeout=120)
  assert worker.returncode == 0 and out.split()[-1] == "12"
