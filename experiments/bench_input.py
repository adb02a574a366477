"""Can the input pipelines keep up with training on this machine?

Measures, in one run, the images/second of
  * the training input pipeline alone (`oba_jax.data.load`),
  * a jitted SGD training step alone, on one batch already in memory,
  * the training loop fed by the pipeline,
for Fashion-MNIST (real data, small CNN, batch 128) and for mock ImageNet (TFDS mock
data: 500x375 JPEGs of about 100 KB, decoded by TFDS as for the real dataset, a tiny
ResNet at 224x224, batch 32), and prints pipeline/step ratios: above 1, the pipeline
is not the bottleneck.

    python experiments/bench_input.py [--data-dir DIR]
"""

import argparse
import dataclasses
import io
import tempfile
import time
from collections.abc import Callable

import jax
import numpy as np
import optax
import tensorflow_datasets as tfds
from flax import nnx
from PIL import Image

from oba_jax import data


class SmallCnn(nnx.Module):
  """CIFAR-style CNN: two 3x3 conv blocks with max-pooling, then a dense classifier."""

  def __init__(self, channels: int, num_classes: int, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(channels, 32, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(32, 64, (3, 3), rngs=rngs)
    self.dense = nnx.Linear(7 * 7 * 64, num_classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.max_pool(nnx.relu(self.conv1(x)), (2, 2), (2, 2))
    x = nnx.max_pool(nnx.relu(self.conv2(x)), (2, 2), (2, 2))
    return self.dense(x.reshape(x.shape[0], -1))


class ResidualBlock(nnx.Module):
  """Two 3x3 conv + batch-norm layers with an identity (or 1x1 projection) shortcut."""

  def __init__(self, in_channels: int, channels: int, stride: int, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(in_channels, channels, (3, 3), strides=stride, rngs=rngs)
    self.norm1 = nnx.BatchNorm(channels, rngs=rngs)
    self.conv2 = nnx.Conv(channels, channels, (3, 3), rngs=rngs)
    self.norm2 = nnx.BatchNorm(channels, rngs=rngs)
    self.project = (
        nnx.Conv(in_channels, channels, (1, 1), strides=stride, rngs=rngs)
        if stride > 1 or in_channels != channels
        else None
    )

  def __call__(self, x):
    y = nnx.relu(self.norm1(self.conv1(x)))
    y = self.norm2(self.conv2(y))
    return nnx.relu(y + (x if self.project is None else self.project(x)))


class TinyResNet(nnx.Module):
  """ImageNet-style stem (7x7/2 conv, 3x3/2 max-pool), three residual stages, 1000 classes."""

  def __init__(self, num_classes: int, rngs: nnx.Rngs, widths=(16, 32, 64)):
    self.stem = nnx.Conv(3, widths[0], (7, 7), strides=2, rngs=rngs)
    self.blocks = nnx.List(
        [
            ResidualBlock(w_in, w_out, 1 if w_in == w_out else 2, rngs)
            for w_in, w_out in zip(widths[:1] + widths[:-1], widths)
        ]
    )
    self.head = nnx.Linear(widths[-1], num_classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.max_pool(nnx.relu(self.stem(x)), (3, 3), (2, 2), padding="SAME")
    for block in self.blocks:
      x = block(x)
    return self.head(x.mean(axis=(1, 2)))


@nnx.jit
def train_step(model, optimizer, batch):
  """One SGD step on the softmax cross-entropy."""

  def loss_fn(model):
    logits = model(batch["image"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """One dataset's training input pipeline and the model it feeds."""

  title: str
  dataset: str
  batch_size: int
  make_model: Callable[[], nnx.Module]
  num_batches: int  # timed batches per measurement
  load_kwargs: dict = dataclasses.field(default_factory=dict)


def images_per_second(run: Callable[[], object], num_batches: int, batch_size: int) -> float:
  """Runs `run` once to warm up, then `num_batches` times, timed."""
  jax.block_until_ready(run())
  start = time.perf_counter()
  for _ in range(num_batches):
    result = run()
  jax.block_until_ready(result)
  return num_batches * batch_size / (time.perf_counter() - start)


def measure(benchmark: Benchmark, repeats: int = 3) -> None:
  """Prints the median pipeline, step and fed-loop rates of `benchmark` over `repeats`
  interleaved measurements (the machine is shared), and their ratios."""

  def batches():
    return data.load(
        benchmark.dataset,
        "train",
        batch_size=benchmark.batch_size,
        train=True,
        seed=0,
        **benchmark.load_kwargs,
    )

  model = benchmark.make_model()
  optimizer = nnx.Optimizer(model, optax.sgd(0.01, momentum=0.9), wrt=nnx.Param)
  pipeline_only, feed = batches(), batches()
  batch = jax.device_put(next(pipeline_only))
  runs = {
      "pipeline": lambda: next(pipeline_only),
      "step": lambda: train_step(model, optimizer, batch),
      "fed": lambda: train_step(model, optimizer, next(feed)),
  }
  rates = {name: [] for name in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      rates[name].append(images_per_second(run, benchmark.num_batches, benchmark.batch_size))
  pipeline, step, fed = (np.median(rates[name]) for name in runs)
  print(
      f"{benchmark.title}: pipeline {pipeline:,.0f} img/s, training step {step:,.0f} img/s,"
      f" pipeline/step {pipeline / step:.2f}; training fed by the pipeline "
      f"{fed:,.0f} img/s ({fed / step:.0%} of the step alone)",
      flush=True,
  )


@dataclasses.dataclass(frozen=True)
class DecodingSource:
  """`length` examples cycling over serialized `records`, which TFDS deserialises
  (and JPEG-decodes) on each read, as its ArrayRecordDataSource does."""

  features: tfds.features.FeaturesDict
  records: list[bytes]
  length: int = 100_000

  def __len__(self):
    return self.length

  def __getitem__(self, index):
    return self.features.deserialize_example_np(self.records[index % len(self.records)])


def mock_imagenet_source(builder, split, num_images: int = 64, size=(500, 375)):
  """`as_data_source` for `tfds.testing.mock_data`: ImageNet records holding random
  smooth-plus-noise JPEGs of about the size of ImageNet's (~100 KB)."""
  del split  # Every split reads the same records.
  rng = np.random.default_rng(0)

  def record(index):
    coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC))
    noisy = np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)
    jpeg = io.BytesIO()
    Image.fromarray(noisy).save(jpeg, format="JPEG", quality=90)
    return builder.info.features.serialize_example(
        {"image": jpeg.getvalue(), "label": index % 1000, "file_name": f"{index}.JPEG"}
    )

  return DecodingSource(builder.info.features, [record(index) for index in range(num_images)])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
      "--data-dir",
      help="TFDS data dir for Fashion-MNIST "
      "(default: a temporary directory, prepared from the IDX files)",
  )
  args = parser.parse_args()
  print(
      f"jax {jax.__version__} on {jax.devices()}, " f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True
  )

  with tempfile.TemporaryDirectory() as temporary_dir:
    measure(
        Benchmark(
            "Fashion-MNIST, small CNN, batch 128",
            "fashion_mnist",
            128,
            lambda: SmallCnn(1, 10, nnx.Rngs(0)),
            num_batches=40,
            load_kwargs={"data_dir": args.data_dir or temporary_dir},
        )
    )
    measure(
        Benchmark(
            "Fashion-MNIST with crop+flip, small CNN, batch 128",
            "fashion_mnist",
            128,
            lambda: SmallCnn(1, 10, nnx.Rngs(0)),
            num_batches=40,
            load_kwargs={"data_dir": args.data_dir or temporary_dir, "augment": True},
        )
    )
  with tfds.testing.mock_data(as_data_source_fn=mock_imagenet_source):
    measure(
        Benchmark(
            "Mock ImageNet 224x224, tiny ResNet, batch 32",
            "imagenet2012",
            32,
            lambda: TinyResNet(1000, nnx.Rngs(0)),
            num_batches=6,
        )
    )


if __name__ == "__main__":
  main()
