"""Small fine-tuning and evaluation problems for test_train.py, also run in subprocesses.

python train_worker.py finetune WORKDIR OUT [DELAY]     fine-tunes TinyNet, saves OUT.npz
python train_worker.py evaluate OUT                     evaluates a ResNet, saves OUT.json
python train_worker.py distributed WORKDIR OUT PROCESS_ID NUM_PROCESSES PORT
    both, as one of NUM_PROCESSES jax.distributed processes, each feeding its own part
    of every batch (evaluation: uneven parts, one process has a batch more)

DELAY (seconds) slows every training batch, so that a test can kill the run
in the middle. Set XLA_FLAGS (--xla_force_host_platform_device_count=N)
before starting for N local devices.
"""

import json
import sys
import time

import jax
import numpy as np
from flax import nnx

from oba_jax import train
from oba_jax.evaluation import evaluate
from oba_jax.runtime import enable_compilation_cache

NUM_CLASSES = 3
IMAGE_SHAPE = (6, 6, 1)
CONFIG = train.TrainConfig(
    steps=24, batch_size=8, learning_rate=0.1, milestones=(0.5,), log_every=2, checkpoint_every=4
)


class SyntheticBatches:
  """Endless batches of noisy images of fixed class templates; batch i depends on (seed, i).

  Has the `get_state`/`set_state` of a resumable data iterator.
  """

  def __init__(
      self, batch_size: int, seed: int = 0, delay: float = 0.0, part: tuple[int, int] = (0, 1)
  ):
    """`part` = (i, n): yield the i-th of n equal parts of each batch (one process's share)."""
    self.batch_size, self.seed, self.delay, self.part, self.index = (
        batch_size,
        seed,
        delay,
        part,
        0,
    )
    self.templates = np.random.default_rng(0).normal(size=(NUM_CLASSES, *IMAGE_SHAPE))

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    time.sleep(self.delay)
    rng = np.random.default_rng([self.seed, self.index])
    self.index += 1
    labels = rng.integers(0, NUM_CLASSES, self.batch_size)
    noise = rng.normal(size=(self.batch_size, *IMAGE_SHAPE))
    index, count = self.part
    rows = slice(index * self.batch_size // count, (index + 1) * self.batch_size // count)
    return {
        "image": (self.templates[labels] + noise).astype(np.float32)[rows],
        "label": labels.astype(np.int32)[rows],
    }

  def get_state(self) -> dict:
    return {"index": self.index}

  def set_state(self, state: dict) -> None:
    self.index = state["index"]


class TinyNet(nnx.Module):
  """Conv, BatchNorm, dropout and a classifier: batch statistics and an RNG stream to carry."""

  def __init__(self, width: int = 4, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(IMAGE_SHAPE[-1], width, (3, 3), rngs=rngs)
    self.norm = nnx.BatchNorm(width, rngs=rngs)
    self.dropout = nnx.Dropout(0.2, rngs=rngs)
    self.classifier = nnx.Linear(width, NUM_CLASSES, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.dropout(nnx.relu(self.norm(self.conv(x))))
    return self.classifier(x.mean(axis=(1, 2)))


def finetune(
    workdir: str,
    delay: float = 0.0,
    part: tuple[int, int] = (0, 1),
    config: train.TrainConfig = CONFIG,
):
  """Fine-tunes a fresh TinyNet in `workdir`; returns the model, its history and its data."""
  batches = SyntheticBatches(config.batch_size, delay=delay, part=part)
  model, history = train.finetune(
      TinyNet(rngs=nnx.Rngs(0)), batches, config, workdir=workdir, progress=False
  )
  return model, history, batches


def flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
  """The model's params and other state as {path: array}, for comparisons and npz files."""
  state = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.RngKey)))
  return {
      jax.tree_util.keystr(path): np.asarray(leaf)
      for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
  }


def eval_problem(part: tuple[int, int] = (0, 1)):
  """A ResNet and batches of its 29 evaluation examples, and all the examples.

  One process: batches of 12, 12 and 5 (none a multiple of 8). Part i of 2:
  17 examples in batches of 6, 6, 5 for i = 0; 12 in batches of 6, 6 for i = 1.
  """
  from oba_jax.models import ResNetCIFAR

  model = ResNetCIFAR(8, width=4, in_channels=1, num_classes=NUM_CLASSES, rngs=nnx.Rngs(0))
  data = next(SyntheticBatches(29, seed=1))
  index, count = part
  start, stop, size = {1: (0, 29, 12), 2: [(0, 17, 6), (17, 29, 6)][index]}[count]
  batches = [
      {key: value[begin : min(begin + size, stop)] for key, value in data.items()}
      for begin in range(start, stop, size)
  ]
  return model, batches, data


def save_evaluation(model: nnx.Module, batches: list[dict], out: str) -> None:
  with open(out + ".json", "w") as f:
    json.dump({"devices": jax.device_count(), **evaluate(model, batches)}, f)


def main(argv):
  enable_compilation_cache()
  command, args = argv[0], argv[1:]
  if command == "finetune":
    workdir, out, *delay = args
    model = finetune(workdir, delay=float(delay[0]) if delay else 0.0)[0]
    np.savez(out + ".npz", **flat_params(model))
  elif command == "evaluate":
    save_evaluation(*eval_problem()[:2], args[0])
  elif command == "distributed":
    workdir, out, process_id, count, port = args
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        f"127.0.0.1:{port}", num_processes=int(count), process_id=int(process_id)
    )
    part = (int(process_id), int(count))
    np.savez(out + ".npz", **flat_params(finetune(workdir, part=part)[0]))
    save_evaluation(*eval_problem(part)[:2], out)
  else:
    raise SystemExit(__doc__)


if __name__ == "__main__":
  main(sys.argv[1:])
