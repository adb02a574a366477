"""GPU benchmark: one gradient against each OBA curvature, peak memory, compacted latency.

What a lent accelerator should measure in a few minutes, in one process:
  - ResNet-50 at batch 64 and 128 and ViT-B/16 at batch 64 (224×224, ImageNet shapes): the
    median time of one loss-and-gradient step and of `scores.oba` with each curvature
    (hessian, ggn, residual, bilinear), as ratios to the gradient, interleaved repetitions;
  - the peak device memory of each compiled program (XLA's memory analysis);
  - the inference latency of ResNet-50 compacted to kept FLOPs 0.5 (magnitude plan, widths
    rounded to 8) against the dense one, at batch 64.
`--tiny` runs the same code on tiny models (CI proves the script works on a CPU).
`--budget` seconds stops before a case that would start after the budget, and the JSON says
which were skipped, so a short lease still returns what it measured.

  bash experiments/bench_gpu.sh                   # full sizes
  bash experiments/bench_gpu.sh --tiny --out /tmp/bench_gpu.json
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

import oba_jax
from oba_jax import criteria, models, plan, structure, surgery
from oba_jax.experiments import cli
from oba_jax.runtime import enable_compilation_cache, peak_bytes

CURVATURES = ("hessian", "ggn", "residual", "bilinear")
# (name, model, batch, model arguments, image size); tiny: the same code on small models.
CASES = {
    "full": [("resnet50_b64", "resnet50", 64, {}, 224),
             ("resnet50_b128", "resnet50", 128, {}, 224),
             ("vit_b16_b64", "vit_b16", 64, {}, 224)],
    "tiny": [("resnet50_b64", "resnet50", 4, dict(layers=(1, 1, 1, 1), width=8), 32),
             ("resnet50_b128", "resnet50", 8, dict(layers=(1, 1, 1, 1), width=8), 32),
             ("vit_b16_b64", "vit_b16", 4, dict(image_size=32, patch_size=16, hidden_dim=16,
                                                num_layers=1, num_heads=2, mlp_dim=32), 32)],
}


def batch_of(size: int, image: int, classes: int) -> dict:
  rng = np.random.default_rng(0)
  return {"image": jnp.asarray(rng.normal(size=(size, image, image, 3)), jnp.float32),
          "label": jnp.asarray(rng.integers(0, classes, size), jnp.int32)}


def median_times(fns: dict, args: tuple, reps: int) -> dict:
  """Median seconds of each compiled function, repetitions interleaved."""
  times = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def score_case(model_name: str, batch_size: int, kwargs: dict, image: int, reps: int) -> dict:
  """Gradient and every curvature on one model: seconds, ratios, peak memory, compile time."""
  model = models.create(model_name, num_classes=1000, **kwargs)
  model.eval()
  apply_fn, params = oba_jax.functional(model)
  objective = oba_jax.classification(apply_fn)
  batch = batch_of(batch_size, image, 1000)
  split = dict(model_fn=objective.model, output_loss_fn=objective.output_loss)
  fns = {"grad": lambda p, b: jax.value_and_grad(objective.loss)(p, b)}
  for curvature in CURVATURES:
    extra = split if curvature in ("ggn", "residual") else {}
    fns[curvature] = functools.partial(oba_jax.scores.oba, objective.loss, curvature=curvature,
                                       **extra)
  compiled, rows = {}, {}
  for name, fn in fns.items():
    start = time.perf_counter()
    compiled[name] = jax.jit(fn).lower(params, batch).compile()
    rows[name] = {"compile_s": time.perf_counter() - start,
                  "peak_bytes": peak_bytes(compiled[name])}
    jax.block_until_ready(compiled[name](params, batch))  # warm-up
  for name, seconds in median_times(compiled, (params, batch), reps).items():
    rows[name].update(median_s=seconds)
  for row in rows.values():
    row.update(ratio_to_grad=row["median_s"] / rows["grad"]["median_s"],
               memory_ratio_to_grad=row["peak_bytes"] / rows["grad"]["peak_bytes"])
  return {"params": sum(x.size for x in jax.tree.leaves(params)), "batch": batch_size,
          "rows": rows}


def latency_case(batch_size: int, kwargs: dict, image: int, reps: int) -> dict:
  """Dense against compacted (kept FLOPs 0.5, magnitude plan) ResNet-50 inference latency."""
  model = models.create("resnet50", num_classes=1000, **kwargs)
  model.eval()
  x = batch_of(batch_size, image, 1000)["image"]
  traced = structure.trace(model, x[:1])
  magnitude = criteria.importance("magnitude", model, (), num_batches=None,
                                  key=jax.random.key(0))
  chosen = plan.select(traced, structure.group_scores(traced, magnitude, reduction="paper"),
                       target=plan.KeptFlops(0.5), round_to=8)
  compacted = surgery.compact(model, chosen)
  forwards = {"dense": jax.jit(lambda x: model(x)), "compacted": jax.jit(lambda x: compacted(x))}
  for forward in forwards.values():
    jax.block_until_ready(forward(x))
  seconds = median_times(forwards, (x,), reps)
  macs = chosen.predicted.macs / chosen.dense.macs
  return {"batch": batch_size, "kept_macs": macs, "dense_s": seconds["dense"],
          "compacted_s": seconds["compacted"],
          "speedup": seconds["dense"] / seconds["compacted"],
          "speedup_over_mac_reduction": seconds["dense"] / seconds["compacted"] * macs}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true", help="tiny models (any machine, CI)")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--budget", type=float, default=270.0,
                      help="seconds after which no further case starts")
  parser.add_argument("--out", default="experiments/results/bench_gpu.json")
  args = parser.parse_args()
  enable_compilation_cache()
  start = time.perf_counter()
  record = {"benchmark": "bench_gpu", "date": datetime.date.today().isoformat(),
            "command": "bash experiments/bench_gpu.sh " + ("--tiny" if args.tiny else ""),
            "device": jax.devices()[0].device_kind, "platform": jax.default_backend(),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "jax": jax.__version__, "scores": {}, "skipped": []}
  cases = CASES["tiny" if args.tiny else "full"]
  work = [(name, functools.partial(score_case, model, batch, kwargs, image, args.reps))
          for name, model, batch, kwargs, image in cases]
  _, _, batch, kwargs, image = cases[0]
  work.append(("resnet50_compacted_latency",
               functools.partial(latency_case, batch, kwargs, image, args.reps)))
  for name, run in work:
    if time.perf_counter() - start > args.budget:
      record["skipped"].append(name)
      continue
    result = run()
    if name.endswith("latency"):
      record["latency"] = result
      print(f"{name}: dense {result['dense_s'] * 1e3:.2f} ms, compacted "
            f"{result['compacted_s'] * 1e3:.2f} ms at kept MACs {result['kept_macs']:.2f} "
            f"(speed-up {result['speedup']:.2f}x)", flush=True)
    else:
      record["scores"][name] = result
      for score, row in result["rows"].items():
        print(f"{name:14s} {score:9s} {row['median_s'] * 1e3:9.2f} ms  x grad "
              f"{row['ratio_to_grad']:5.2f}  memory {row['peak_bytes'] / 2**20:9.1f} MiB "
              f"(x {row['memory_ratio_to_grad']:.2f})", flush=True)
  record["wall_seconds"] = time.perf_counter() - start
  cli.write_json(args.out, record)
  print(f"wrote {args.out} ({record['wall_seconds']:.0f} s; skipped: {record['skipped'] or 'none'})")


if __name__ == "__main__":
  main()
