"""Data a user already has, without TensorFlow: CIFAR pickle folders, image-class trees, and
generated data; read directly and through the paper CLIs."""

import os
import pickle

import numpy as np
import pytest

import clis
from datafiles import write_cifar_pickles, write_image_folder
from oba_jax import data
from oba_jax.data import sources
from oba_jax.experiments import pipeline, resnet50_imagenet, vgg19_cifar, vit_b16_imagenet


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("cifar")
  write_cifar_pickles(root, "cifar10")
  write_cifar_pickles(root, "cifar100", seed=1)
  return str(root)


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
  return write_image_folder(tmp_path_factory.mktemp("imagenet"))


@pytest.mark.parametrize("name, labels_key", [("cifar10", b"labels"),
                                              ("cifar100", b"fine_labels")])
def test_pickle_examples_are_the_pickled_pixels_in_hwc(cifar_dir, name, labels_key):
  with open(os.path.join(cifar_dir, sources.PICKLE_DIRS[name], sources.PICKLE_FILES[name]
                         ["test"][0]), "rb") as f:
    batch = pickle.load(f, encoding="bytes")
  source = data.open_source(name, "test", cifar_dir)  # auto: detected as pickle
  assert len(source) == 8
  for i in (0, 7):
    example = source[i]
    assert example["image"].shape == (32, 32, 3) and example["image"].dtype == np.uint8
    np.testing.assert_array_equal(example["image"][..., 1],
                                  batch[b"data"][i][1024:2048].reshape(32, 32))  # green plane
    assert example["label"] == batch[labels_key][i]


def test_pickle_splits_slices_and_the_folder_itself(cifar_dir):
  assert len(data.open_source("cifar10", "train", cifar_dir)) == 5 * 8  # data_batch_1..5
  assert len(data.open_source("cifar10", "train[:25%]", cifar_dir)) == 10
  inner = os.path.join(cifar_dir, "cifar-10-batches-py")
  last = data.open_source("cifar10", "train[-3:]", inner, data_format="pickle")
  full = data.open_source("cifar10", "train", inner)
  assert [last[i]["label"] for i in range(3)] == [full[i]["label"] for i in range(37, 40)]
  batch = next(data.load("cifar100", "train", batch_size=4, train=True, data_dir=cifar_dir))
  assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32


def test_folder_labels_are_the_sorted_class_names(imagenet_dir):
  source = data.open_source("imagenet2012", "validation", imagenet_dir)  # val/ folder
  assert len(source) == 12
  assert [source[i]["label"] for i in range(12)] == [0] * 4 + [1] * 4 + [2] * 4
  assert source[0]["image"].ndim == 3 and source[0]["image"].shape[2] == 3


@pytest.mark.parametrize("train", [True, False])
def test_folder_batches_have_the_model_input_shape(imagenet_dir, train):
  batch = next(data.load("imagenet2012", "train" if train else "validation", batch_size=4,
                         train=train, data_dir=imagenet_dir))
  assert batch["image"].shape == (4, 224, 224, 3)  # random-resized-crop / resize + center-crop


def test_synthetic_data_is_deterministic_and_of_the_real_shapes():
  for name, shape in (("cifar10", (32, 32, 3)), ("fashion_mnist", (28, 28, 1))):
    one, two = (data.open_source(name, "test[:4]", data_format="synthetic") for _ in range(2))
    assert len(one) == 4 and one[3]["image"].shape == shape
    np.testing.assert_array_equal(one[3]["image"], two[3]["image"])
  info = data.dataset_info("imagenet2012", "train", data_format="synthetic")
  assert info.image_shape == (224, 224, 3) and info.num_examples == sources.SYNTHETIC_SIZES["train"]


@pytest.mark.parametrize("call, error, message", [
    (lambda d: data.open_source("cifar10", "train", d, data_format="pickle"), FileNotFoundError,
     "holds no cifar-10-batches-py/.*cs.toronto.edu"),
    (lambda d: data.open_source("imagenet2012", "train", d, data_format="folder"),
     FileNotFoundError, "no folder for split 'train'"),
    (lambda d: data.open_source("cifar10", "train", d, data_format="zip"), ValueError,
     "data_format='zip' is not one of"),
    (lambda d: data.open_source("cifar10", "train{:3}", data_format="synthetic"), ValueError,
     "is not NAME or NAME"),
    (lambda d: data.open_source("cifar10", "train", data_format="pickle"), ValueError,
     "reads data_dir, which is not given"),
])
def test_bad_data_settings_are_named(tmp_path, call, error, message):
  with pytest.raises(error, match=message):
    call(str(tmp_path))


# Through the paper CLIs (in smoke mode: a tiny model, a few steps).


def test_vgg19_cifar_from_a_pickle_folder(cifar_dir, tmp_path):
  results = pipeline.run(clis.smoke_config(vgg19_cifar, data_dir=cifar_dir, criteria="magnitude"),
                         str(tmp_path))
  assert results["config"]["data_format"] == "auto"  # detected: pickle
  assert results["pruned"][0]["kept_macs"] <= 0.14


@pytest.mark.parametrize("module", [resnet50_imagenet, vit_b16_imagenet])
def test_imagenet_cli_smoke_from_a_jpeg_folder_tree(imagenet_dir, tmp_path, module, capsys):
  results = pipeline.run(clis.smoke_config(module, data_dir=imagenet_dir, criteria="magnitude"),
                         str(tmp_path))
  assert f"data: imagenet2012 (folder, {imagenet_dir}), 12 training examples" in (
      capsys.readouterr().out)
  assert results["pruned"][0]["kept_macs"] <= 0.51
