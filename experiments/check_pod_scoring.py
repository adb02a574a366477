"""Check: SmolLM2's scores with parameters split over a data x model mesh equal one device's.

A pod job holds a model too large to replicate by splitting every parameter over a
'model' axis (FSDP-style) and each batch over a 'data' axis. This scores SmolLM2-135M
on WordNet calibration batches with each criterion twice in one process: on one
device (a 1-device mesh) and on all devices as DATA x MODEL with
`estimate.shard_params`, then compares the per-parameter scores (relative error of the
whole tree, largest error of one entry relative to the largest score), the group
scores, and the plans `plan.select` makes from them at each target.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python experiments/check_pod_scoring.py --mesh 2x4 --batches 2 \\
      --out experiments/results/transformers/pod_scoring.json
  ... --smoke   # a tiny random Llama, no weights needed
"""

import argparse
import datetime
import functools
import platform
import time

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from oba_jax import criteria, estimate, plan, structure
from oba_jax.experiments import cli, smollm2_wordnet, text_pruning
from oba_jax.functional import functional


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mesh", default="2x4", help="DATAxMODEL; the product is the device count")
  parser.add_argument("--criteria", default="taylor,obd_fisher,oba,oba_bilinear,activation_norm")
  parser.add_argument("--batches", type=int, default=2)
  parser.add_argument("--targets", default="0.95,0.9,0.85")
  parser.add_argument("--seed", type=int, default=1)
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()

  config = smollm2_wordnet.get_config()
  config.smoke = args.smoke
  config.calibration_batches = args.batches
  task = smollm2_wordnet.build_task(config)
  data, model = text_pruning.parse_mesh(args.mesh)
  one, pod = estimate.data_mesh(jax.devices()[:1]), estimate.pod_mesh(data, model)
  apply_fn, params = functional(task.model)
  objective = task.objective(apply_fn)
  sharded = estimate.shard_params(params, pod)
  traced = structure.trace(task.model, *task.example_inputs, ignore=task.ignore)
  batches = task.calibration(args.seed)
  targets = [float(t) for t in args.targets.split(",")]

  rows = {}
  for name in cli.check_names("criteria", args.criteria, criteria.CRITERIA):
    score_fn = functools.partial(criteria.CRITERIA[name].score, objective)
    key = jax.random.key(args.seed)
    out, seconds = {}, {}
    for where, p, mesh in (("one", params, one), ("pod", sharded, pod)):
      start = time.perf_counter()
      out[where] = jax.block_until_ready(estimate.accumulate(score_fn, p, batches, key=key, mesh=mesh))
      seconds[where] = time.perf_counter() - start
    host = {w: jax.device_get(out[w]) for w in out}
    a, b = ravel_pytree(host["pod"])[0], ravel_pytree(host["one"])[0]
    groups = {w: {g: np.asarray(v) for g, v in structure.group_scores(
        traced, host[w], reduction=config.reduction).items()} for w in host}
    same_plans, differing, removed_count = [], [], {}
    for target in targets:
      removed = [plan.select(traced, groups[w], target=plan.KeptParams(target),
                             max_ratio=config.max_ratio).removed for w in ("one", "pod")]
      same_plans.append(all(np.array_equal(removed[0][g], removed[1][g]) for g in removed[0]))
      # Units removed by one plan and not the other (near-ties flip at float32 precision).
      differing.append(sum(len(set(removed[0][g]) ^ set(removed[1][g])) for g in removed[0]))
      removed_count[str(target)] = int(sum(len(v) for v in removed[0].values()))
    split = sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(out["pod"]))
    rows[name] = {
        "relative_error": float(np.linalg.norm(a - b) / np.linalg.norm(b)),
        "max_entry_error_over_max_score": float(np.abs(a - b).max() / np.abs(b).max()),
        "group_max_relative_error": max(
            float(np.abs(groups["pod"][g] - groups["one"][g]).max()
                  / max(np.abs(groups["one"][g]).max(), 1e-30)) for g in groups["one"]),
        "same_plan_at": dict(zip(map(str, targets), same_plans)),
        "units_in_one_plan_only": dict(zip(map(str, targets), differing)),
        "units_removed": removed_count,
        "split_score_leaves": split, "seconds": seconds}
    print(name, rows[name])

  result = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or
            platform.machine(), "devices": jax.device_count(), "mesh": args.mesh,
            "split_param_leaves": sum(not x.sharding.is_fully_replicated
                                      for x in jax.tree.leaves(sharded)),
            "param_leaves": len(jax.tree.leaves(sharded)), "batches": args.batches,
            "batch_size": config.batch_size, "max_tokens": config.max_tokens,
            "model": task.info.get("model"), "criteria": rows}
  if args.out:
    cli.write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
