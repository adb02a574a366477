"""Benchmark: inference speed of a physically compacted network against the dense one.

Traces the paper's wide ResNet-32, selects a global plan at each kept-FLOPs
target from random channel scores, compacts the model, and times jitted
inference (batch 64, inference-mode BatchNorm) of the dense and compacted
models, interleaved in one process. Target: measured speed-up >= 0.8 x the
MACs reduction.

  python experiments/bench_compact.py --depth 32 --targets 0.5,0.25 --reps 7
"""

import argparse
import datetime
import statistics
import time

import jax
import numpy as np
from flax import nnx

from oba_jax import flops, plan, surgery
from oba_jax.experiments import cli
from oba_jax.models import ResNetCIFAR
from oba_jax.runtime import enable_compilation_cache
from oba_jax.structure import trace

SPEEDUP_TARGET = 0.8


def median_time(fn, x, reps: int) -> list[float]:
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(x))
    times.append(time.perf_counter() - start)
  return times


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--depth", type=int, default=32)
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--targets", default="0.5,0.25")
  parser.add_argument("--round_to", type=int, default=None)
  parser.add_argument("--reps", type=int, default=7)
  parser.add_argument("--out", default="experiments/results/bench_compact.json")
  args = parser.parse_args()
  enable_compilation_cache()

  model = ResNetCIFAR(args.depth, width=args.width, rngs=nnx.Rngs(0))
  model.eval()
  x = jax.random.normal(jax.random.key(0), (args.batch, 32, 32, 3))
  structure = trace(model, x[:1])
  rng = np.random.default_rng(0)
  scores = {g.name: rng.random(g.size) for g in structure.groups}

  models = {"dense": model}
  for ratio in (float(r) for r in args.targets.split(",")):
    chosen = plan.select(structure, scores, target=plan.KeptFlops(ratio), round_to=args.round_to)
    models[f"kept {ratio}"] = surgery.compact(model, chosen)

  forwards = {}
  for name, m in models.items():
    graphdef, state = nnx.split(m)
    forwards[name] = jax.jit(lambda x, g=graphdef, s=state: nnx.merge(g, s)(x))
    jax.block_until_ready(forwards[name](x))  # compile

  times = {name: [] for name in models}
  for _ in range(args.reps):  # interleaved rounds: machine noise hits every model alike
    for name, fn in forwards.items():
      times[name] += median_time(fn, x, 1)

  dense_macs = flops.count(model, x[:1]).macs
  rows = []
  print(f"{'model':10s} {'MACs/img':>12s} {'ms/batch':>9s} {'MACs x':>7s} {'speed-up':>8s} "
        f"{'ratio':>6s}")
  for name, m in models.items():
    macs = flops.count(m, x[:1]).macs
    t = statistics.median(times[name])
    reduction = dense_macs / macs
    speedup = statistics.median(times["dense"]) / t
    ok = "" if name == "dense" else ("ok" if speedup >= SPEEDUP_TARGET * reduction else "MISSED")
    print(f"{name:10s} {macs:12,d} {1e3 * t:9.1f} {reduction:7.2f} {speedup:8.2f} "
          f"{speedup / reduction:6.2f} {ok}")
    rows.append({"model": name, "macs_per_image": macs, "median_s": t, "times_s": times[name],
                 "macs_reduction": reduction, "speedup": speedup})
  record = {"benchmark": "bench_compact", "date": datetime.date.today().isoformat(),
            "args": vars(args), "device": jax.devices()[0].device_kind,
            "jax": jax.__version__, "rows": rows}
  cli.write_json(args.out, record)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
