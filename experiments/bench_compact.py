"""Benchmark: inference speed of a physically compacted network against the dense one.

Traces the paper's wide ResNet-32 (BatchNorm statistics calibrated on random
images, random BatchNorm scales and shifts: an untrained BatchNorm is nearly
the identity), selects a global plan at each kept-FLOPs target from random
channel scores, compacts the model, and times jitted inference of the dense
and compacted models (inference-mode BatchNorm; the weights passed as
arguments, as a served model gets them, or compiled in as constants with
`--weights constants|both`), interleaved in one process, in a new order each
round. Target: measured speed-up >= 0.8 x the MACs reduction.

`--fold` also times every model with its BatchNorms folded into the convs
(`surgery.fold_batchnorm`); a folded compacted model's speed-up is against the
folded dense one (like with like), and the folded dense one's against the
unfolded dense one. `--breakdown` measures what bounds the speed-up: each
model's convolutions timed alone (each conv of its jaxpr jitted on its own
shapes; the JSON has each conv's median time and MACs), and the rest of the
model timed alone (its jaxpr with every conv's result given as an input:
BatchNorm, ReLU, adds, pooling, the classifier), in the same interleaved rounds.

Widths are rounded to multiples of 16 by default (`--round_to 0`: as selected):
on XLA:CPU that was the fastest rounding measured (RESULTS.md, 0.79 at kept 0.5
and batch 64 against 0.75 for 8 and 0.63 unrounded), and 16 divides the
AVX-512 vector of 16 floats.

  python experiments/bench_compact.py --depth 32 --targets 0.5,0.25 --reps 7
  python experiments/bench_compact.py --fold --breakdown --batch 64 --reps 7
  python experiments/bench_compact.py --fold --weights both --batch 64 --reps 7
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
    inputs = [jax.random.normal(jax.random.key(0), v.aval.shape) for v in eqn.invars]
    seconds(fn, *inputs)  # compile
    rhs = eqn.invars[1].aval.shape
    macs = math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) // rhs[
        eqn.params["dimension_numbers"].rhs_spec[0]]
    calls.append((fn, inputs, counts[key], macs))
  return calls


def without_convs(model: nnx.Module, x) -> tuple:
  """`(jitted fn, inputs)`: the model's forward pass with every conv's result given as an input.

  Timing it measures everything but the convolutions (BatchNorm, ReLU, adds, pooling,
  the classifier) as one program, fused as XLA fuses it; the convs' operands are
  returned so that XLA keeps the work that feeds them. Parameters are arguments. Only
  top-level convs are replaced (those of the models here).
  """
  closed = jax.make_jaxpr(lambda x: model(x))(x)
  j = closed.jaxpr
  convs = [e for e in j.eqns if e.primitive.name == "conv_general_dilated"]
  results = [jax.random.normal(jax.random.key(0), e.outvars[0].aval.shape) for e in convs]
  jaxpr = j.replace(  # each conv's result an input, its operand an output (kept)
      constvars=[], invars=[*j.constvars, *j.invars, *(e.outvars[0] for e in convs)],
      outvars=[*j.outvars, *(e.invars[0] for e in convs)],
      eqns=[e for e in j.eqns if e.primitive.name != "conv_general_dilated"])
  run = jcore.jaxpr_as_fun(jcore.ClosedJaxpr(jaxpr, []))
  fn = jax.jit(lambda consts, x, results: run(*consts, x, *results))
  inputs = (list(closed.consts), x, results)
  seconds(fn, *inputs)  # compile
  return fn, inputs


def calibrate(model: nnx.Module, x, seed: int = 0) -> None:
  """Gives every BatchNorm random scales and shifts and the statistics of `x`; then eval mode.

  Freshly initialised BatchNorms (mean 0, variance 1, scale 1, shift 0) are nearly the
  identity; trained ones are not, and folding them is what is measured.
  """
  key = jax.random.key(seed)
  bns = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)]
  momenta = [bn.momentum for bn in bns]
  for bn in bns:
    key, k1, k2 = jax.random.split(key, 3)
    bn.scale.set_value(jax.random.uniform(k1, bn.scale.shape, minval=0.5, maxval=1.5))
    bn.bias.set_value(0.1 * jax.random.normal(k2, bn.bias.shape))
    bn.momentum = 0.0  # the running statistics become this batch's
  model.train()
  model(x)
  model.eval()
  for bn, momentum in zip(bns, momenta):
    bn.momentum = momentum


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
  parser.add_argument("--weights", choices=("arguments", "constants", "both"),
                      default="arguments", help="pass the weights to the jitted forward pass "
                      "(as a served model), compile them in as constants, or time both")
  parser.add_argument("--reps", type=int, default=7)
  parser.add_argument("--out", default="experiments/results/bench_compact.json")
  args = parser.parse_args()
  if args.round_to < 0:
    raise SystemExit(f"--round_to must be >= 0 (0: no rounding), got {args.round_to}.")
  enable_compilation_cache()
  load = [os.getloadavg()[0]]  # the machine is shared: record how busy it was

  model = ResNetCIFAR(args.depth, width=args.width, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (args.batch, 32, 32, 3))
  calibrate(model, jax.random.normal(jax.random.key(1), (64, 32, 32, 3)))
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

  forwards, names = {}, {}  # label -> (jitted forward, its inputs), model name
  modes = ("arguments", "constants") if args.weights == "both" else (args.weights,)
  for name, m in models.items():
    graphdef, state = nnx.split(m)
    for mode in modes:
      label = name + " const" * (mode == "constants")
      if mode == "arguments":  # as a served model: the weights are inputs
        forwards[label] = (jax.jit(lambda s, x, g=graphdef: nnx.merge(g, s)(x)), (state, x))
      else:  # the weights compiled in: XLA may fold and pre-pack them
        forwards[label] = (jax.jit(lambda x, g=graphdef, s=state: nnx.merge(g, s)(x)), (x,))
      names[label] = name
      seconds(forwards[label][0], *forwards[label][1])  # compile
  outputs = {label: np.asarray(fn(*inputs)) for label, (fn, inputs) in forwards.items()}
  # Folding must not change the outputs: the largest difference, relative to the largest logit.
  fold_error = {label: float(np.abs(out - outputs[label.replace(" folded", "")]).max()
                             / np.abs(outputs[label.replace(" folded", "")]).max())
                for label, out in outputs.items() if " folded" in label}

  convs = {name: conv_calls(m, x) for name, m in models.items()} if args.breakdown else {}
  rests = {name: without_convs(m, x) for name, m in models.items()} if args.breakdown else {}
  times = {label: [] for label in forwards}
  conv_times = {name: [] for name in convs}
  rest_times = {name: [] for name in rests}
  order, breakdown_order = list(forwards), list(convs)
  for _ in range(args.reps):  # interleaved rounds: machine noise hits every model alike;
    rng.shuffle(order)  # a new order each round: no model always runs first or last
    for label in order:
      times[label].append(seconds(forwards[label][0], *forwards[label][1]))
    rng.shuffle(breakdown_order)
    for name in breakdown_order:
      conv_times[name].append([seconds(f, *a) for f, a, _, _ in convs[name]])
      rest_times[name].append(seconds(rests[name][0], *rests[name][1]))

  load.append(os.getloadavg()[0])
  macs = {name: flops.count(m, x[:1]).macs for name, m in models.items()}
  rows = []
  print(f"{'model':22s} {'MACs/img':>13s} {'ms/batch':>9s} {'MACs x':>7s} {'speed-up':>8s} "
        f"{'ratio':>6s} {'min-ratio':>9s}" + (f" {'conv ms':>8s} {'rest ms':>8s}" * bool(convs)))
  for label, name in names.items():
    t = statistics.median(times[label])
    folded = name.endswith(" folded")
    # A compacted model against the dense one of its kind; the folded dense one against the dense.
    base = ("dense folded" if folded and name != "dense folded" else "dense") + label[len(name):]
    reduction = macs["dense"] / macs[name]
    speedup = statistics.median(times[base]) / t
    speedup_min = min(times[base]) / min(times[label])  # the least disturbed rounds
    ok = ("" if name in ("dense", "dense folded") else
          "ok" if speedup >= SPEEDUP_TARGET * reduction else "MISSED")
    per_conv = [statistics.median(ts) for ts in zip(*conv_times.get(name, []))]
    conv = sum(n * t for (_, _, n, _), t in zip(convs.get(name, []), per_conv))
    rest = statistics.median(rest_times[name]) if convs else 0.0
    extra = f" {1e3 * conv:8.1f} {1e3 * rest:8.1f}" if convs else ""
    print(f"{label:22s} {macs[name]:13,d} {1e3 * t:9.1f} {reduction:7.2f} {speedup:8.2f} "
          f"{speedup / reduction:6.2f} {speedup_min / reduction:9.2f}{extra} {ok}")
    rows.append({"model": label, "folded": folded, "baseline": base, "weights": (
                     "constants" if label.endswith(" const") else "arguments"),
                 "macs_per_image": macs[name], "median_s": t, "times_s": times[label],
                 "macs_reduction": reduction, "speedup": speedup,
                 "speedup_of_min_times": speedup_min, "fold_error": fold_error.get(label),
                 **({"conv_s": conv, "without_convs_s": rest,
                     "without_convs_times_s": rest_times[name], "convs": [
                     {"lhs": a[0].shape, "rhs": a[1].shape, "count": n, "macs": m,
                      "median_s": t} for (_, a, n, m), t in zip(convs[name], per_conv)]}
                    if convs else {})})
  record = {"benchmark": "bench_compact", "date": datetime.date.today().isoformat(),
            "args": vars(args), "device": jax.devices()[0].device_kind,
            "jax": jax.__version__, "load_average_1min": load, "rows": rows}
  print("folded - unfolded outputs, max / max |logit|:",
        ", ".join(f"{label} {e:.1e}" for label, e in fold_error.items()) or "-")
  cli.write_json(args.out, record)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
