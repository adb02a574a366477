"""Markdown tables of a text-pruning run (`smollm2_wordnet`, `minilm_wordnet` results.json).

  python experiments/summarize_text.py experiments/results/smollm2_issue23/workdir/results.json
  python experiments/summarize_text.py experiments/results/transformers/minilm_wordnet.json \
      --extra mrr

Per criterion and target: the metric for each calibration seed and its mean (with `--extra`
metrics' means in parentheses). With several seeds, each criterion's paired difference to the
baseline (`--baseline`, magnitude) on the same calibration seeds, with a 95 % t-interval
(`oba_jax.experiments.paired`), right after pruning and, when the run recovered, after
recovery beside the dense model given the same recovery (`dense_recovered`). Perplexities are
compared in the log: a cell is the geometric-mean perplexity over seeds and its ratio to the
baseline's (x1.10: 10 % higher), bold with ▲ (better) or ▼ (worse) when the interval excludes
1; one table per held-out corpus. Then the cost of each criterion (in gradients, XLA's memory
analysis, peak memory, scoring and recovery wall time) and, when the run exported, each file's
size, its logits against oba_jax's in llama.cpp and transformers, and tokens per second.
"""

import argparse
import collections
import json
import math

import numpy as np

from oba_jax.experiments import paired

STAGES = (("pruned", "right after pruning"), ("recovered", "after recovery"))


def metric_rows(results: dict, stage: str) -> list[dict]:
  """One row per run: its criterion, target, seed and numeric metrics, right after pruning
  ("pruned") or after recovery ("recovered"; runs without it are left out)."""
  rows = []
  for run in results["runs"]:
    metrics = run if stage == "pruned" else run.get("after_recovery")
    if metrics is not None:
      rows.append({**{k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                   "criterion": run["criterion"], "target": run["target"], "seed": run["seed"]})
  return rows


def compared_metrics(results: dict) -> list[tuple[str, str]]:
  """(key, label) of what is compared: each corpus's NLL for a perplexity (nll_<corpus>, or
  nll with one corpus), else the task's metric."""
  if results["metric"] != "perplexity":
    return [(results["metric"], results["metric"])]
  corpora = sorted(k[len("nll_"):] for k in results["dense"] if k.startswith("nll_"))
  return [(f"nll_{c}", f"{c} perplexity") for c in corpora] or [("nll", "perplexity")]


def per_seed_table(results: dict, extra: list[str]) -> str:
  """The metric of every run: one line per criterion, one column per target."""
  metric, runs = results["metric"], results["runs"]
  targets = sorted({x["target"] for x in runs}, reverse=True)
  lines = ["| criterion | " + " | ".join(f"kept {t:g}" for t in targets) + " |",
           "|" + "---|" * (len(targets) + 1)]
  for c in dict.fromkeys(x["criterion"] for x in runs):
    cells = []
    for t in targets:
      own = sorted((x for x in runs if x["criterion"] == c and x["target"] == t),
                   key=lambda x: x["seed"])
      values = [x[metric] for x in own]
      cell = " / ".join(f"{v:.4g}" for v in values)
      if len(values) > 1:
        cell += f" (mean {np.mean(values):.4g})"
      if extra:
        cell += " [" + ", ".join(f"{k} {np.mean([x[k] for x in own]):.3f}" for k in extra) + "]"
      cells.append(cell)
    lines.append(f"| {c} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def paired_table(rows: list[dict], key: str, baseline: str, *, log: bool,
                 reference: dict[str, float]) -> str:
  """Each criterion's mean and paired difference to `baseline` per target; `log`: `key` is a
  log-perplexity, shown as geometric-mean perplexity and ratio (lower is better).
  `reference` adds lines of fixed values (the dense model's)."""
  table = paired.paired_differences(rows, key, baseline=baseline, missing_seeds=True)
  formats = (dict(value=lambda x: f"{math.exp(x):.1f}", difference=lambda d: f"x{math.exp(d):.3f}")
             if log else dict(digits=4))
  lines = [paired.wide_markdown(table, baseline, higher_is_better=not log,
                                reference=reference, **formats)]
  missing = paired.missing(rows, baseline=baseline)
  if missing:
    lines += ["", "Compared on fewer seeds: " + "; ".join(missing) + "."]
  return "\n".join(lines)


def cost_table(results: dict) -> str:
  """Per criterion: its cost in gradients and memory (`costs`), and the mean scoring and
  recovery wall time of its runs."""
  seconds = collections.defaultdict(lambda: collections.defaultdict(list))
  for run in results["runs"]:
    seconds[run["criterion"]]["scoring"].append(run.get("scoring_seconds", float("nan")))
    if "recovery_seconds" in run:
      seconds[run["criterion"]]["recovery"].append(run["recovery_seconds"])
  mean = lambda v: f"{np.mean(v):.0f} s" if v else ""
  lines = ["| criterion | x one gradient | XLA total / temp | peak RSS | scoring | recovery |",
           "|---|---|---|---|---|---|"]
  for c, s in seconds.items():
    v = results["costs"].get(c)
    cost = (f"{v['in_gradients']:.2f} | {v.get('xla_bytes', 0) / 2**20:.0f} / "
            f"{v.get('xla_temp_bytes', 0) / 2**20:.0f} MiB | "
            f"{v['peak_rss_bytes'] / 2**30:.1f} GiB" if v else "(no data) | | ")
    lines.append(f"| {c} | {cost} | {mean(s['scoring'])} | {mean(s['recovery'])} |")
  return "\n".join(lines)


def export_table(export: dict) -> str:
  """Per exported file: parameters, GGUF and HF sizes, the largest logit difference to
  oba_jax's in each client (relative to the largest logit), and decode tokens/s."""
  speed = {client: export["compare"].get(f"{client}_speed", {})
           for client in ("llama_cpp", "transformers")}

  def error(part: dict, key: str) -> str:
    found = part.get(key, {})
    return f"{found['max_abs_over_max_logit']:.1e}" if "max_abs_over_max_logit" in found else "-"

  def rate(client: str, name: str) -> str:
    found = speed[client].get(name, {})
    return f"{found['decode_tokens_per_s']:.1f}" if "decode_tokens_per_s" in found else "-"

  lines = ["| file | params | GGUF MB | HF MB | llama.cpp logits | transformers logits | "
           "llama.cpp tok/s | transformers tok/s |", "|---|---|---|---|---|---|---|---|"]
  for name, f in export["files"].items():
    gguf, hf = f.get("gguf", {}), f.get("hf", {})
    size = lambda part: f"{part['bytes'] / 1e6:.1f}" if "bytes" in part else "-"
    lines.append(f"| {name} | {f['params']:,} | {size(gguf)} | {size(hf)} | "
                 f"{error(gguf, 'llama_cpp_logits')} | {error(hf, 'transformers_logits')} | "
                 f"{rate('llama_cpp', name)} | {rate('transformers', name)} |")
  skipped = {client: s["skipped"] for client, s in speed.items() if "skipped" in s}
  if skipped:
    lines += ["", "Not measured: " + "; ".join(f"{c}: {why}" for c, why in skipped.items())]
  return "\n".join(lines)


def summary(results: dict, *, baseline: str = "magnitude", extra: list[str] = ()) -> str:
  """The whole markdown summary of one results.json."""
  metric = results["metric"]
  dense = results["dense"]
  head = f"dense {metric} = {dense[metric]:.4g}"
  parts = [head + (f" {({k: dense[k] for k in extra})}" if extra else ""), "",
           per_seed_table(results, list(extra))]
  seeds = {run["seed"] for run in results["runs"]}
  criteria = {run["criterion"] for run in results["runs"]}
  if len(seeds) > 1 and baseline in criteria:
    recovered_dense = results.get("dense_recovered", {})
    for stage, what in STAGES:
      rows = metric_rows(results, stage)
      if not rows:
        continue
      for key, label in compared_metrics(results):
        log = key.startswith("nll")
        reference = {"dense": dense[key]}
        if stage == "recovered" and recovered_dense:
          reference["dense, recovered alike"] = float(np.mean(
              [m[key] for m in recovered_dense.values()]))
        parts += ["", f"{label} {what}, over calibration seeds {sorted(seeds)}: "
                  + ("geometric mean (ratio to " if log else "mean (difference to ")
                  + f"{baseline} [95% CI]):", "",
                  paired_table(rows, key, baseline, log=log, reference=reference)]
  if results.get("costs") is not None:
    parts += ["", cost_table(results)]
  if "export" in results:
    parts += ["", export_table(results["export"])]
  parts += ["", "largest |compacted - masked|: "
            f"{max(x['max_abs_compact_minus_masked'] for x in results['runs']):.3g}"]
  return "\n".join(parts)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("results")
  parser.add_argument("--extra", default="", help="other metrics to average, comma-separated")
  parser.add_argument("--baseline", default="magnitude")
  args = parser.parse_args()
  with open(args.results) as f:
    results = json.load(f)
  print(summary(results, baseline=args.baseline, extra=[k for k in args.extra.split(",") if k]))


if __name__ == "__main__":
  main()
