"""Benchmark: each criterion's cost on the real transformers, in gradients, in one process.

For SmolLM2-135M (next-token loss, one calibration batch of the issue-23 evaluation: 8 packed
sequences of 128 tokens) and all-MiniLM-L6-v2 (in-batch InfoNCE, the CLI's batch: 16 pairs of
at most 48 tokens), on real WordNet calibration batches built by the CLIs themselves
(`smollm2_wordnet.build_task`, `minilm_wordnet.build_task`), every data criterion's scoring
step is compiled as the CLIs compile it (`criteria.ModelScore` through `runtime.jit`) beside one
loss-and-gradient step, the unit. Then, per model:

- time: the median of `--reps` rounds, the programs interleaved within each round, so that
  machine noise hits them alike; reported as a multiple of the gradient's median;
- memory: XLA's memory analysis of each compiled program (`runtime.peak_bytes`), as a multiple
  of the gradient's;
- FLOPs: XLA's cost analysis of each compiled program, as a multiple of the gradient's: what
  the arithmetic alone makes a score cost, against which its time is read (a forward-over-
  reverse Hessian-vector product along an arbitrary direction costs about 2.7 gradients in
  FLOPs: each product W x of the forward pass gets a tangent dW x + W dx, and each of the
  backward pass's two products gets two tangent products; along the removal dW = -W it is
  about 2.0, `oba_jax.removal_jvp`).

A criterion named `<name>@values` (e.g. `--criteria oba,oba@values`) scores along the same
removal given as arrays (`delta=`), i.e. with `jax.jvp`'s products: the cost before the
removal was kept symbolic, measured in the same rounds.

Goal (issue 25): oba and oba_bilinear <= 2.2 gradients. `--tiny` runs the same code on the CLIs'
tiny random models (no downloads; what the tests run).

  python experiments/bench_text_scores.py --reps 3 \
      --out experiments/results/bench_text_scores.json
  python experiments/bench_text_scores.py --reps 3 \
      --criteria taylor,oba,oba@values,oba_bilinear,oba_bilinear@values \
      --out experiments/results/bench_text_scores_removal.json
"""

import argparse
import datetime
import os
import platform
import statistics
import time

import jax
from flax import nnx

from oba_jax import criteria, runtime
from oba_jax.delta import removal_delta
from oba_jax.experiments import cli, minilm_wordnet, smollm2_wordnet
from oba_jax.functional import objective_of

GOALS = {"oba": 2.2, "oba_bilinear": 2.2}
VALUES = "@values"  # suffix: the criterion along its removal given as arrays
# The CLI module of each model and the settings its benchmark batch uses.
MODELS = {
    "smollm2": (smollm2_wordnet, {"sequence_length": 128, "batch_size": 8,
                                  "held_out_tokens": 1024}),
    "minilm": (minilm_wordnet, {}),
}
TINY = {"smollm2": {"sequence_length": 16, "batch_size": 4, "held_out_tokens": 120,
                    "eval_batches": 2},
        "minilm": {"batch_size": 4, "max_tokens": 16, "eval_pairs": 16}}


def task_and_batch(name: str, tiny: bool):
  """The CLI's task for `name` (its real model, or its tiny one) and one calibration batch."""
  module, settings = MODELS[name]
  config = module.get_config()
  config.update({**settings, **(TINY[name] if tiny else {}), "smoke": tiny})
  task = module.build_task(config)
  batch = next(iter(task.calibration(1)))
  default = [c for c in cli.names(config.criteria) if criteria.CRITERIA[c].uses_data]
  return task, batch, default


def flops(compiled) -> float | None:
  """XLA's count of a compiled program's floating-point operations, None where unavailable."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    return None
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float(analysis["flops"]) if analysis and "flops" in analysis else None


def programs(task, names: list[str]) -> tuple[dict, tuple]:
  """{"grad": loss-and-gradient, criterion: its scoring step} as functions of (params, batch,
  constants), and the model's (params, constants)."""
  graphdef, param_state, rest = nnx.split(task.model, nnx.Param, ...)
  params, constants = nnx.to_pure_dict(param_state), nnx.to_pure_dict(rest)
  key = jax.random.key(0)

  def grad(p, b, c):
    apply_fn = criteria.ModelScore(names[0], graphdef, task.objective).apply_fn(c)
    return jax.value_and_grad(objective_of(task.objective, apply_fn).loss)(p, b)

  def along_values(name):
    def score(p, b, c):
      objective = objective_of(task.objective,
                               criteria.ModelScore(name, graphdef, task.objective).apply_fn(c))
      return criteria.CRITERIA[name].score(objective, p, b, key, delta=removal_delta(p))
    return score

  fns = {"grad": grad}
  for name in names:
    if name.endswith(VALUES):
      fns[name] = along_values(name[:-len(VALUES)])
    else:
      score = criteria.ModelScore(name, graphdef, task.objective)
      fns[name] = lambda p, b, c, score=score: score(p, b, key, constants=c)
  return fns, (params, constants)


def measure(name: str, args) -> dict:
  task, batch, default = task_and_batch(name, args.tiny)
  names = cli.names(args.criteria) if args.criteria else default
  fns, (params, constants) = programs(task, names)
  compiled, rows = {}, {}
  for score, fn in fns.items():
    start = time.perf_counter()
    compiled[score] = runtime.jit(fn).lower(params, batch, constants).compile()
    rows[score] = {"compile_s": time.perf_counter() - start,
                   "peak_bytes": runtime.peak_bytes(compiled[score]),
                   "flops": flops(compiled[score])}
    jax.block_until_ready(compiled[score](params, batch, constants))  # warm-up
    print(f"{name}: compiled {score:14s} in {rows[score]['compile_s']:6.1f} s, XLA memory "
          f"{(rows[score]['peak_bytes'] or 0) / 2**20:8.1f} MiB", flush=True)
  times = {score: [] for score in compiled}
  for rep in range(args.reps):
    for score, fn in compiled.items():  # interleaved: noise hits every program alike
      start = time.perf_counter()
      jax.block_until_ready(fn(params, batch, constants))
      times[score].append(time.perf_counter() - start)
    print(f"{name} round {rep + 1}/{args.reps}: " + ", ".join(
        f"{s} {t[-1]:.2f}s" for s, t in times.items()), flush=True)
  unit = statistics.median(times["grad"])
  for score, row in rows.items():
    median = statistics.median(times[score])
    row.update(median_s=median, times_s=times[score], ratio_to_grad=median / unit,
               goal=GOALS.get(score))
    for key, ratio in (("peak_bytes", "memory_ratio_to_grad"), ("flops", "flops_ratio_to_grad")):
      if row[key] and rows["grad"][key]:
        row[ratio] = row[key] / rows["grad"][key]
  shapes = {k: list(v.shape) for k, v in batch.items()}
  return {"model": task.info["model"], "batch": shapes,
          "params": sum(x.size for x in jax.tree.leaves(params)), "rows": rows}


def table(record: dict) -> str:
  lines = []
  for name, result in record["models"].items():
    lines.append(f"\n{name}: {result['model']}, batch {result['batch']}")
    lines.append(f"{'criterion':15s} {'median s':>9s} {'x grad':>7s} {'goal':>5s} "
                 f"{'XLA MiB':>9s} {'mem x grad':>10s} {'FLOPs x grad':>12s}")
    for score, row in result["rows"].items():
      goal = row["goal"]
      verdict = "" if goal is None else ("met" if row["ratio_to_grad"] <= goal else "MISSED")
      lines.append(f"{score:15s} {row['median_s']:9.3f} {row['ratio_to_grad']:7.2f} "
                   f"{goal or '':>5} {(row['peak_bytes'] or 0) / 2**20:9.1f} "
                   f"{row.get('memory_ratio_to_grad', float('nan')):10.2f} "
                   f"{row.get('flops_ratio_to_grad', float('nan')):12.2f} {verdict}")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="smollm2,minilm", help="any of smollm2,minilm")
  parser.add_argument("--criteria", default="",
                      help="comma-separated criteria (default: each CLI's data criteria)")
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--tiny", action="store_true", help="the CLIs' tiny random models")
  parser.add_argument("--out", default="experiments/results/bench_text_scores.json")
  args = parser.parse_args()
  try:
    cli.check_names("models", args.models, MODELS)
    if args.criteria:
      cli.check_names("criteria", args.criteria.replace(VALUES, ""), criteria.CRITERIA)
  except ValueError as error:
    parser.error(str(error))
  if args.reps < 1:
    parser.error(f"--reps {args.reps}: at least 1.")
  runtime.enable_compilation_cache()
  load = os.getloadavg()
  record = {"benchmark": "bench_text_scores", "date": datetime.date.today().isoformat(),
            "command": "python experiments/bench_text_scores.py " + " ".join(
                f"--{k}={v}" for k, v in vars(args).items() if k != "out"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                       f"{jax.devices()[0].device_kind}",
            "jax": jax.__version__, "loadavg_before": load, "models": {}, "skipped": {}}
  for name in cli.names(args.models):
    try:
      record["models"][name] = measure(name, args)
    except FileNotFoundError as error:  # the weights or WordNet are not installed here
      record["skipped"][name] = str(error)
      print(f"{name}: skipped: {error}", flush=True)
  record["loadavg_after"] = os.getloadavg()
  print(table(record))
  cli.write_json(args.out, record)
  print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()
