"""Benchmark: what bounding the programs in flight (`estimate.pace`) costs.

On several CPU devices a Python loop over jitted steps waits for every
MAX_IN_FLIGHT-th step, so that XLA:CPU's collectives never see a long queue (they
abort the process otherwise); on one device, GPUs and TPUs it never waits. This
measures the price of the wait on `scores.accumulate` of the first-order Taylor
score (the cheapest data criterion, where a host round trip weighs most) and on
`train.finetune`, each with the bound and with it lifted (a bound of 10**9),
interleaved, median of the repetitions, in one process.

  python experiments/bench_pace.py --batches 48 --reps 5
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python experiments/bench_pace.py
"""

import argparse
import datetime
import functools
import platform
import statistics
import tempfile
import time

import jax
import numpy as np
from flax import nnx

import oba_jax
from oba_jax import estimate, scores, train
from oba_jax.experiments import cli
from oba_jax.models import ResNetCIFAR


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", type=int, default=64)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--width", type=int, default=8)
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--out", default=None, help="write the figures as JSON here")
  args = parser.parse_args()

  model = ResNetCIFAR(20, width=args.width, in_channels=1, num_classes=10, rngs=nnx.Rngs(0))
  model.eval()
  apply_fn, params = oba_jax.functional(model)
  objective = oba_jax.classification(apply_fn)
  rng = np.random.default_rng(0)
  batches = [{"image": rng.normal(size=(args.batch, 28, 28, 1)).astype(np.float32),
              "label": rng.integers(0, 10, args.batch).astype(np.int32)}
             for _ in range(args.batches)]
  score_fn = functools.partial(scores.taylor, objective.loss, order=1)
  recipe = train.TrainConfig(steps=args.batches, batch_size=args.batch, log_every=args.batches,
                             checkpoint_every=args.batches)

  def accumulate():
    jax.block_until_ready(scores.accumulate(score_fn, params, batches))

  def finetune():
    with tempfile.TemporaryDirectory() as workdir:
      train.finetune(model, batches, recipe, workdir=workdir, progress=False)

  bounded = estimate.MAX_IN_FLIGHT
  times = {f"{name}/{mode}": [] for name in ("accumulate", "finetune")
           for mode in ("bounded", "unbounded")}
  for rep in range(args.reps + 1):  # the first round compiles
    for name, fn in (("accumulate", accumulate), ("finetune", finetune)):
      for mode, limit in (("bounded", bounded), ("unbounded", 10**9)):
        estimate.MAX_IN_FLIGHT = limit
        start = time.perf_counter()
        fn()
        if rep:
          times[f"{name}/{mode}"].append(time.perf_counter() - start)
  estimate.MAX_IN_FLIGHT = bounded

  result = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or
            platform.machine(), "devices": jax.device_count(), "max_in_flight": bounded,
            "args": vars(args), "median_seconds": {k: statistics.median(v)
                                                   for k, v in times.items()}}
  for name in ("accumulate", "finetune"):
    ratio = result["median_seconds"][f"{name}/bounded"] / result["median_seconds"][
        f"{name}/unbounded"]
    result[f"{name}_bounded_over_unbounded"] = ratio
    print(f"{name}: bounded {result['median_seconds'][f'{name}/bounded']:.3f} s, unbounded "
          f"{result['median_seconds'][f'{name}/unbounded']:.3f} s, ratio {ratio:.3f}")
  if args.out:
    cli.write_json(args.out, result)


if __name__ == "__main__":
  main()
