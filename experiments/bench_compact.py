"""Benchmark: inference speed of a physically compacted network against the dense one.

Traces the paper's wide ResNet-32, selects a global plan at each kept-FLOPs
target from random channel scores, compacts the model, and times jitted
inference (inference-mode BatchNorm) of the dense and compacted models,
interleaved in one process. Target: measured speed-up >= 0.8 x the MACs
reduction.

`--fold` also times every model with its BatchNorms folded into the convs
(`surgery.fold_batchnorm`); a folded compacted model's speed-up is against the
folded dense one (like with like), and the folded dense one's against the
unfolded dense one. `--breakdown` measures what bounds the speed-up: each
model's convolutions timed alone (each conv of its jaxpr jitted on its own
shapes, in the same interleaved rounds; the JSON has each conv's median time
and MACs), so that total - convs is the time of everything else (BatchNorm,
ReLU, adds, pooling, the classifier, dispatch).

Widths are rounded to multiples of 16 by default (`--round_to 0`: as selected):
on XLA:CPU that was the fastest rounding measured (RESULTS.md, 0.79 at kept 0.5
and batch 64 against 0.75 for 8 and 0.63 unrounded), and 16 divides the
AVX-512 vector of 16 floats.

  python experiments/bench_compact.py --depth 32 --targets 0.5,0.25 --reps 7
  python experiments/bench_compact.py --fold --breakdown --batch 64 --reps 5
"""

import argparse
import datetime
import math
import os
import statistics
import time

import jax
import numpy as np
from flax import nnx
from jax.extend import core as jcore

from oba_jax import flops, plan, surgery
from oba_jax.experiments import cli
from oba_jax.models import ResNetCIFAR
from oba_jax.runtime import enable_compilation_cache
from oba_jax.structure import trace

SPEEDUP_TARGET = 0.8


def seconds(fn, *args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def conv_calls(model: nnx.Module, x) -> list[tuple]:
  """`(jitted conv, inputs, count, MACs)` per distinct convolution of the model's forward pass.

  Timing these alone gives the model's convolution time; convolutions of the same
  shapes are compiled once and counted as often as they occur.
  """
  counts, convs = {}, {}

  def collect(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        key = (*(tuple(v.aval.shape) for v in eqn.invars), repr(sorted(eqn.params.items())))
        counts[key] = counts.get(key, 0) + 1
        convs[key] = eqn
      for sub in jcore.jaxprs_in_params(eqn.params):
        collect(sub)

  collect(jax.make_jaxpr(lambda x: model(x))(x).jaxpr)
  calls = []
  for key, eqn in convs.items():
    fn = jax.jit(lambda lhs, rhs, eqn=eqn: eqn.primitive.bind(lhs, rhs, **eqn.params))
    inputs = [np.random.default_rng(0).standard_normal(v.aval.shape, np.float32)
              for v in eqn.invars]
    seconds(fn, *inputs)  # compile
    rhs = eqn.invars[1].aval.shape
    macs = math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) // rhs[
        eqn.params["dimension_numbers"].rhs_spec[0]]
    calls.append((fn, inputs, counts[key], macs))
  return calls


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--depth", type=int, default=32)
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--targets", default="0.5,0.25")
  parser.add_argument("--round_to", type=int, default=16,
                      help="round kept widths to multiples of this (0: as selected)")
  parser.add_argument("--fold", action="store_true", help="also time BatchNorm-folded models")
  parser.add_argument("--breakdown", action="store_true",
                      help="also time each model's convolutions alone")
  parser.add_argument("--reps", type=int, default=7)
  parser.add_argument("--out", default="experiments/results/bench_compact.json")
  args = parser.parse_args()
  if args.round_to < 0:
    raise SystemExit(f"--round_to must be >= 0 (0: no rounding), got {args.round_to}.")
  enable_compilation_cache()
  load = [os.getloadavg()[0]]  # the machine is shared: record how busy it was

  model = ResNetCIFAR(args.depth, width=args.width, rngs=nnx.Rngs(0))
  model.eval()
  x = jax.random.normal(jax.random.key(0), (args.batch, 32, 32, 3))
  structure = trace(model, x[:1])
  rng = np.random.default_rng(0)
  scores = {g.name: rng.random(g.size) for g in structure.groups}

  models = {"dense": model}
  for ratio in (float(r) for r in args.targets.split(",")):
    chosen = plan.select(structure, scores, target=plan.KeptFlops(ratio),
                         round_to=args.round_to or None)
    models[f"kept {ratio}"] = surgery.compact(model, chosen)
  if args.fold:
    models |= {f"{name} folded": surgery.fold_batchnorm(m, x[:1])[0]
               for name, m in list(models.items())}

  forwards = {}
  for name, m in models.items():
    graphdef, state = nnx.split(m)
    forwards[name] = jax.jit(lambda x, g=graphdef, s=state: nnx.merge(g, s)(x))
    jax.block_until_ready(forwards[name](x))  # compile

  convs = {name: conv_calls(m, x) for name, m in models.items()} if args.breakdown else {}
  times = {name: [] for name in models}
  conv_times = {name: [] for name in convs}
  for _ in range(args.reps):  # interleaved rounds: machine noise hits every model alike
    for name, fn in forwards.items():
      times[name].append(seconds(fn, x))
      if convs:
        conv_times[name].append([seconds(f, *a) for f, a, _, _ in convs[name]])

  load.append(os.getloadavg()[0])
  dense_macs = flops.count(model, x[:1]).macs
  rows = []
  print(f"{'model':18s} {'MACs/img':>13s} {'ms/batch':>9s} {'MACs x':>7s} {'speed-up':>8s} "
        f"{'ratio':>6s} {'min-ratio':>9s}" + (f" {'conv ms':>8s} {'other ms':>8s}" * bool(convs)))
  for name, m in models.items():
    macs = flops.count(m, x[:1]).macs
    t = statistics.median(times[name])
    folded = name.endswith(" folded")
    # A compacted model against the dense one of its kind; the folded dense one against the dense.
    base = "dense folded" if folded and name != "dense folded" else "dense"
    reduction = dense_macs / macs
    speedup = statistics.median(times[base]) / t
    speedup_min = min(times[base]) / min(times[name])  # the least disturbed rounds
    ok = ("" if name in ("dense", "dense folded") else
          "ok" if speedup >= SPEEDUP_TARGET * reduction else "MISSED")
    per_conv = [statistics.median(ts) for ts in zip(*conv_times.get(name, []))]
    conv = sum(n * t for (_, _, n, _), t in zip(convs.get(name, []), per_conv))
    extra = f" {1e3 * conv:8.1f} {1e3 * (t - conv):8.1f}" if convs else ""
    print(f"{name:18s} {macs:13,d} {1e3 * t:9.1f} {reduction:7.2f} {speedup:8.2f} "
          f"{speedup / reduction:6.2f} {speedup_min / reduction:9.2f}{extra} {ok}")
    rows.append({"model": name, "folded": folded, "baseline": base, "macs_per_image": macs,
                 "median_s": t, "times_s": times[name], "macs_reduction": reduction,
                 "speedup": speedup, "speedup_of_min_times": speedup_min,
                 **({"conv_s": conv, "convs": [
                     {"lhs": a[0].shape, "rhs": a[1].shape, "count": n, "macs": macs,
                      "median_s": t} for (_, a, n, macs), t in zip(convs[name], per_conv)]}
                    if convs else {})})
  record = {"benchmark": "bench_compact", "date": datetime.date.today().isoformat(),
            "args": vars(args), "device": jax.devices()[0].device_kind,
            "jax": jax.__version__, "load_average_1min": load, "rows": rows}
  cli.write_json(args.out, record)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
