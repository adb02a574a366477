"""Benchmark: cost of one OBA score against one loss-and-gradient step.

Times (median over interleaved repetitions, one process) and XLA memory (from the
compiled executables' memory analysis) of, on the paper's wide CIFAR ResNet:
  grad      jax.value_and_grad(loss)                    (the unit)
  hessian   scores.oba(curvature="hessian")             target <= 2.2x grad
  ggn       scores.oba(curvature="ggn")                 target <= 3.5x grad
  residual  scores.oba(curvature="residual")            target <= 3.5x grad
  bilinear  scores.oba(curvature="bilinear")            target <= 3x grad
  taylor3   scores.taylor(order=3)                      (for information)
  hutch1    scores.obd(diag="hutchinson"), one probe    (for information)
  kron_obd  scores.kron_obd, K-FAC factors, one label   (for information)
  kron_obs  scores.kron_obs, K-FAC factors, one label   (for information)
  hessian@values, residual@values, bilinear@values: the same scores along δ given as
            arrays (`delta=`), i.e. with `jax.jvp`'s products instead of the removal's
            (`oba_jax.removal_jvp`): the cost before the removal was kept symbolic
Memory target: every score's peak <= 2.5x the gradient step's.

Over depth (`--depth 20,32,56,110`): the same at each depth in one process, and a
table of each score's cost in gradients (it should stay flat with depth) and the
gradient's own time per layer (conv and dense kernels), which would be flat if
XLA:CPU's cost were linear in depth. `--torch` (with `--train-bn`) also times PyTorch's
gradient of the same network in the same rounds (bench_depth.py's twin; its threads are
torch's default).

Every program compiles as the library's own (`runtime.jit`, which keeps optimization
barriers per computation on XLA:CPU); the run also sets the process flag
(`runtime.keep_optimization_barriers`) unless `--no-flag`, so a run with and one without it
show whether the flag still matters. Each row records its compiled program's barrier count.

  python experiments/bench_scores.py --depth 32 --batch 64 --reps 5
  python experiments/bench_scores.py --only bilinear --train-bn --reps 3 \
      --out experiments/results/bench_scores_bilinear_train.json
  python experiments/bench_scores.py --depth 20 --width 16 --only kron_obd,kron_obs --reps 5 \
      --out experiments/results/bench_scores_kfac.json
  python experiments/bench_scores.py --depth 20,32,56,110 --width 16 --only hessian,bilinear \
      --reps 5 --out experiments/results/bench_scores_depth.json
  python experiments/bench_scores.py --depth 20,56,110 --width 16 --train-bn --torch \
      --only hessian,residual,bilinear --reps 3 [--no-flag]
  python experiments/bench_scores.py --depth 20,56,110 --width 16 --train-bn --torch --reps 3 \
      --only hessian,residual,bilinear,hessian@values,residual@values,bilinear@values
"""

import argparse
import datetime
import functools
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import oba_jax
from oba_jax import scores
from oba_jax.delta import removal_delta
from oba_jax.experiments import cli
from oba_jax.models import ResNetCIFAR
from oba_jax import runtime
from oba_jax.runtime import enable_compilation_cache

TARGETS = {"hessian": 2.2, "ggn": 3.5, "residual": 3.5, "bilinear": 3.0}
MEMORY_TARGET = 2.5


def build(depth: int, width: int, batch_size: int, train_bn: bool):
  model = ResNetCIFAR(depth, width=width, num_classes=10, rngs=nnx.Rngs(0))
  model.train() if train_bn else model.eval()
  apply_fn, params = oba_jax.functional(model)
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(batch_size, 32, 32, 3)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)}
  return oba_jax.classification(apply_fn), params, batch


def candidates(objective):
  split = dict(model_fn=objective.model, output_loss_fn=objective.output_loss)
  along_values = lambda score, **kw: lambda p, b: score(
      objective.loss, p, b, delta=removal_delta(p), **kw)
  return {
      "grad": lambda p, b: jax.value_and_grad(objective.loss)(p, b),
      "hessian": functools.partial(scores.oba, objective.loss),
      "ggn": functools.partial(scores.oba, objective.loss, curvature="ggn", **split),
      "residual": functools.partial(scores.oba, objective.loss, curvature="residual", **split),
      "bilinear": functools.partial(scores.oba, objective.loss, curvature="bilinear"),
      "taylor3": functools.partial(scores.taylor, objective.loss, order=3),
      "hutch1": functools.partial(scores.obd, objective.loss, key=jax.random.key(0)),
      "kron_obd": functools.partial(scores.kron_obd, objective.loss, key=jax.random.key(0),
                                    model_fn=objective.model),
      "kron_obs": functools.partial(scores.kron_obs, objective.loss, key=jax.random.key(0),
                                    model_fn=objective.model),
      "hessian@values": along_values(scores.oba),
      "residual@values": along_values(scores.oba, curvature="residual", **split),
      "bilinear@values": along_values(scores.oba, curvature="bilinear"),
  }


def measure(depth: int, args) -> dict:
  """Compiles every candidate at `depth`, times them interleaved; the record of that depth."""
  objective, params, batch = build(depth, args.width, args.batch, args.train_bn)
  fns = candidates(objective)
  if args.only:
    fns = {k: v for k, v in fns.items() if k == "grad" or k in args.only.split(",")}
  compiled, memory, compile_s, barriers, flops = {}, {}, {}, {}, {}
  for name, fn in fns.items():
    start = time.perf_counter()
    compiled[name] = runtime.jit(fn).lower(params, batch).compile()
    compile_s[name] = time.perf_counter() - start
    memory[name] = runtime.peak_bytes(compiled[name])
    flops[name] = (compiled[name].cost_analysis() or {}).get("flops")
    barriers[name] = compiled[name].as_text().count("opt-barrier")
    jax.block_until_ready(compiled[name](params, batch))  # warm-up
    print(f"depth {depth}: compiled {name:9s} in {compile_s[name]:5.1f} s, peak XLA memory "
          f"{memory[name] / 2**20:8.1f} MiB", flush=True)

  torch_step = torch_info = None
  if args.torch:  # PyTorch's gradient of the same network, in this process (bench_depth's twin)
    from bench_depth import torch_gradient  # pylint: disable=g-import-not-at-top
    made = torch_gradient(depth, args.width, (np.asarray(batch["image"]),
                                              np.asarray(batch["label"])))
    if made is None:
      print("--torch: PyTorch is not installed (pip install torch==2.13.0); skipped", flush=True)
    else:
      torch_step, torch_info = made[0], {"version": made[1], "threads": made[2]}
  times = {name: [] for name in fns}
  torch_times = []
  for rep in range(args.reps):
    for name, fn in compiled.items():  # interleaved, so machine noise hits all alike
      start = time.perf_counter()
      jax.block_until_ready(fn(params, batch))
      times[name].append(time.perf_counter() - start)
    if torch_step is not None:
      start = time.perf_counter()
      torch_step()
      torch_times.append(time.perf_counter() - start)
    print(f"round {rep + 1}/{args.reps}: " + ", ".join(
        f"{n} {t[-1]:.3f}s" for n, t in times.items()), flush=True)

  median = {name: statistics.median(t) for name, t in times.items()}
  rows = []
  print(f"\n{'score':15s} {'median s':>9s} {'x grad':>7s} {'target':>7s} {'mem x grad':>10s} "
        f"{'FLOPs x grad':>12s}")
  for name in fns:
    ratio, mem_ratio = median[name] / median["grad"], memory[name] / memory["grad"]
    target = TARGETS.get(name)
    ok = "" if target is None else ("ok" if ratio <= target and mem_ratio <= MEMORY_TARGET
                                    else "MISSED")
    flops_ratio = flops[name] / flops["grad"] if flops[name] and flops["grad"] else None
    print(f"{name:15s} {median[name]:9.3f} {ratio:7.2f} {target or '':>7} {mem_ratio:10.2f} "
          f"{flops_ratio or float('nan'):12.2f} {ok}")
    rows.append({"score": name, "median_s": median[name], "times_s": times[name],
                 "ratio_to_grad": ratio, "target_ratio": target, "peak_bytes": memory[name],
                 "memory_ratio_to_grad": mem_ratio, "compile_s": compile_s[name],
                 "flops": flops[name], "flops_ratio_to_grad": flops_ratio,
                 "optimization_barriers": barriers[name]})
  num_params = sum(x.size for x in jax.tree.leaves(params))
  layers = sum(1 for path, _ in jax.tree_util.tree_leaves_with_path(params)
               if "kernel" in jax.tree_util.keystr(path))
  record = {"model": f"wide ResNet-{depth} (width {args.width}), {num_params} params, "
                     f"BN {'train' if args.train_bn else 'eval'}",
            "depth": depth, "layers": layers,
            "grad_s_per_layer": median["grad"] / layers, "rows": rows}
  if torch_times:
    record["torch"] = {**torch_info, "median_s": statistics.median(torch_times),
                       "times_s": torch_times,
                       "jax_grad_over_torch": median["grad"] / statistics.median(torch_times)}
    print(f"PyTorch gradient {record['torch']['median_s']:.3f} s: JAX's gradient is "
          f"{record['torch']['jax_grad_over_torch']:.2f}x it", flush=True)
  return record


def depth_table(records: list[dict]) -> str:
  """Cost in gradients per score, and the gradient's time per layer against the first depth."""
  names = [r["score"] for r in records[0]["rows"] if r["score"] != "grad"]
  first = records[0]["grad_s_per_layer"]
  lines = [f"{'depth':>5s} {'layers':>6s} {'grad s':>7s} {'ms/layer':>8s} {'vs first':>8s} "
           f"{'torch s':>7s} {'JAX/torch':>9s} " + " ".join(f"{n:>{max(9, len(n))}s}" for n in names)]
  for r in records:
    by = {row["score"]: row for row in r["rows"]}
    torch = r.get("torch", {})
    lines.append(f"{r['depth']:5d} {r['layers']:6d} {by['grad']['median_s']:7.3f} "
                 f"{1e3 * r['grad_s_per_layer']:8.2f} {r['grad_s_per_layer'] / first:8.2f} "
                 f"{torch.get('median_s', float('nan')):7.3f} "
                 f"{torch.get('jax_grad_over_torch', float('nan')):9.2f} "
                 + " ".join(f"{by[n]['ratio_to_grad']:{max(9, len(n))}.2f}" for n in names))
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--depth", default="32", help="a depth 6n+2, or several: 20,32,56,110")
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--train-bn", action="store_true", help="batch-statistics BatchNorm")
  parser.add_argument("--only", default="", help="comma-separated subset of the candidates")
  parser.add_argument("--no-flag", action="store_true",
                      help="do not set the process flag runtime.keep_optimization_barriers()")
  parser.add_argument("--torch", action="store_true",
                      help="also time PyTorch's gradient of the same network (needs --train-bn)")
  parser.add_argument("--out", default="experiments/results/bench_scores.json")
  args = parser.parse_args()
  if args.torch and not args.train_bn:
    parser.error("--torch times PyTorch's network with BatchNorm in training mode: add --train-bn.")
  # The programs compile as the library's own do (`runtime.jit`: barriers kept per
  # computation); --no-flag leaves out the process-wide flag to show it is not needed.
  if not args.no_flag:
    runtime.keep_optimization_barriers()
  enable_compilation_cache()
  known = set(candidates(oba_jax.classification(None)))  # names only: nothing is built
  unknown = sorted(set(filter(None, args.only.split(","))) - known)
  if unknown:
    parser.error(f"--only: unknown candidates {unknown}; accepted: {sorted(known)}")
  depths = [int(d) for d in args.depth.split(",")]
  if any(d < 8 or (d - 2) % 6 for d in depths):
    parser.error(f"--depth {args.depth}: each depth must be 6n+2 with n >= 1 (8, 20, 32, ...).")

  records = [measure(depth, args) for depth in depths]
  record = {
      "benchmark": "bench_scores", "date": datetime.date.today().isoformat(),
      "command": "python experiments/bench_scores.py " + " ".join(
          f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "out"),
      "batch": args.batch, "reps": args.reps,
      "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                 f"{jax.devices()[0].device_kind}",
      "jax": jax.__version__,
  }
  if len(records) == 1:
    record.update(records[0])
  else:
    record["depths"] = records
    print("\n" + depth_table(records))
  cli.write_json(args.out, record)
  print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()
