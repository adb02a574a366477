"""Paired tables and plots of the criteria comparison (`experiments/compare_fashion_mnist.sh`).

  python experiments/summarize_compare.py experiments/results/compare_fashion_mnist/*.json \
      [--baseline magnitude] [--plots experiments/plots]

Takes the `results.json` of every (model, seed) run, groups them by model, and prints per
model the dense accuracy over seeds, the kept MACs reached, and one wide table per metric:
each criterion's mean over seeds and its paired difference to the baseline with a 95%
t-interval (`oba_jax.experiments.paired`). Runs evaluated during fine-tuning
(`finetune.eval_at`) also get the curve: the difference at every budget with its interval
and the smallest difference the seeds could detect. Writes one plot per model of the
differences, and one of the curves.
"""

import argparse
import collections
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from oba_jax.experiments import paired

# (metric, what it is, higher is better)
_RECALIBRATED = "right after pruning (BatchNorm, if any, recalibrated)"
METRICS = (("accuracy", "test accuracy after fine-tuning", True),
           ("loss_after_pruning", f"test loss {_RECALIBRATED}", False),
           ("accuracy_after_pruning", f"test accuracy {_RECALIBRATED}", True))


def model_label(config: dict) -> str:
  """"vgg11_cifar(width=16)": the model and its arguments."""
  kwargs = ",".join(f"{k}={v}" for k, v in sorted(config["model_kwargs"].items()))
  return f"{config['model']}({kwargs})"


def summarize(runs: list[dict], baseline: str) -> tuple[str, dict]:
  """Markdown for the runs of one model, and the paired rows per metric."""
  by_seed = {}
  for r in runs:  # runs that add criteria to a seed must start from its dense model
    seed, accuracy = r["config"]["seed"], r["dense"]["accuracy"]
    if by_seed.setdefault(seed, accuracy) != accuracy:
      raise ValueError(f"two runs of seed {seed} start from different dense models (accuracy "
                       f"{by_seed[seed]} and {accuracy}): their criteria are not paired.")
  seeds = sorted(by_seed)
  dense = np.asarray([by_seed[s] for s in seeds])
  rows = paired.pipeline_rows(runs)
  kept = collections.defaultdict(list)
  for row in rows:
    kept[row["target"]].append(row["kept_macs"])
  spread = f" (sd {dense.std(ddof=1):.4f})" if len(seeds) > 1 else ""
  lines = [f"Seeds {seeds}; dense accuracy {dense.mean():.4f}{spread}; kept MACs reached: "
           + ", ".join(f"target {t:g}: {min(v):.3f}-{max(v):.3f}"
                       for t, v in sorted(kept.items(), reverse=True)), ""]
  unreachable = paired.missing(rows, baseline=baseline)
  if unreachable:  # a target the step rule could not reach on a seed: compared without it
    lines += ["Compared on fewer seeds (the target was not reached there): "
              + "; ".join(unreachable) + ".", ""]
  by_metric = {}
  for metric, what, higher in METRICS:
    table = paired.paired_differences(rows, metric, baseline=baseline, missing_seeds=True)
    by_metric[metric] = table
    lines += [f"{what} ({'higher' if higher else 'lower'} is better); mean over {len(seeds)} "
              f"seeds (paired difference to {baseline} [95% CI]):", "",
              paired.wide_markdown(table, baseline, higher_is_better=higher), ""]
  return "\n".join(lines), by_metric


def summarize_curves(runs: list[dict], baseline: str) -> tuple[str, list[dict]]:
  """Markdown of the accuracy against the fine-tuning budget, and its paired rows: per
  target, one line per criterion and one column per budget (0: right after pruning, BatchNorm
  recalibrated), each cell "difference to the baseline [95 % CI] (detectable difference)"."""
  rows = paired.budget_rows(paired.pipeline_rows(runs))
  budgets = sorted({r["budget"] for r in rows})
  table = []
  for budget in budgets:
    for r in paired.paired_differences([r for r in rows if r["budget"] == budget], "accuracy",
                                       baseline=baseline, missing_seeds=True):
      table.append(dict(r, budget=budget))
  lines = []
  for target in sorted({r["target"] for r in table}, reverse=True):
    cells = {(r["criterion"], r["budget"]): r for r in table if r["target"] == target}
    base = {r["budget"]: r["baseline_mean"] for r in sorted(cells.values(), key=lambda r: r["n"])}
    lines += [f"Kept FLOPs {target:g}: test accuracy after b fine-tuning steps; {baseline}'s "
              "mean, then each criterion's paired difference to it [95% CI] (smallest "
              "difference the seeds could detect, power 0.8):", "",
              "| criterion | " + " | ".join(f"b = {b}" for b in budgets) + " |",
              "|---" * (len(budgets) + 1) + "|",
              f"| {baseline} | " + " | ".join(f"{base[b]:.3f}" for b in budgets) + " |"]
    for criterion in dict.fromkeys(c for c, _ in cells):
      text = []
      for b in budgets:
        r = cells[(criterion, b)]
        mark = (" ▲" if r["difference"] > 0 else " ▼") if r["significant"] else ""
        text.append(f"{r['difference']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}] "
                    f"({r['detectable']:.3f}){mark}")
      lines.append(f"| {criterion} | " + " | ".join(text) + " |")
    lines.append("")
  return "\n".join(lines), table


def plot_curves(label: str, table: list[dict], baseline: str, path: str) -> None:
  """Accuracy difference to the baseline against the fine-tuning budget, one panel per target,
  with each criterion's 95 % interval as a band (cut to [-1, 1], what an accuracy difference
  can be). The scale is symmetric-log, linear within ±0.01: right after pruning the
  differences are tenths, after fine-tuning thousandths, and both must be readable."""
  targets = sorted({r["target"] for r in table}, reverse=True)
  budgets = sorted({r["budget"] for r in table})
  position = {b: i for i, b in enumerate(budgets)}  # evenly spaced: 0, 100, 300, 1000, end
  fig, axes = plt.subplots(1, len(targets), figsize=(4.5 * len(targets), 4), sharey=True,
                           squeeze=False)
  for ax, target in zip(axes[0], targets):
    for criterion in dict.fromkeys(r["criterion"] for r in table):
      rows = sorted((r for r in table if r["target"] == target and r["criterion"] == criterion),
                    key=lambda r: r["budget"])
      x = [position[r["budget"]] for r in rows]
      line, = ax.plot(x, [r["difference"] for r in rows], marker="o", label=criterion)
      ax.fill_between(x, [max(r["low"], -1.0) for r in rows],
                      [min(r["high"], 1.0) for r in rows], color=line.get_color(), alpha=0.15)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_yscale("symlog", linthresh=0.01)
    ax.set_xticks(range(len(budgets)), [str(b) for b in budgets])
    ax.set_xlabel("fine-tuning steps")
    ax.set_title(f"kept FLOPs {target:g}", fontsize=10)
  axes[0][0].set_ylabel(f"test accuracy − {baseline}")
  axes[0][-1].legend(fontsize=7)
  fig.suptitle(f"{label}: paired difference to {baseline}, 95% CI over seeds "
               "(symmetric log scale, linear within ±0.01)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot(label: str, by_metric: dict, baseline: str, path: str) -> None:
  """Paired differences to the baseline with their intervals: metrics x targets."""
  metrics = [m for m in METRICS if m[0] in ("accuracy", "loss_after_pruning")]
  targets = sorted({r["target"] for r in by_metric["accuracy"]}, reverse=True)
  fig, axes = plt.subplots(len(metrics), len(targets), figsize=(4 * len(targets), 7),
                           sharey=True, squeeze=False)
  for i, (metric, what, higher) in enumerate(metrics):
    for j, target in enumerate(targets):
      ax = axes[i][j]
      rows = [r for r in by_metric[metric] if r["target"] == target]
      y = np.arange(len(rows))
      d = np.asarray([r["difference"] for r in rows])
      err = np.asarray([[r["difference"] - r["low"] for r in rows],
                        [r["high"] - r["difference"] for r in rows]])
      good = [(r["difference"] > 0) == higher and r["significant"] for r in rows]
      bad = [(r["difference"] > 0) != higher and r["significant"] for r in rows]
      colors = ["tab:green" if g else "tab:red" if b else "tab:gray" for g, b in zip(good, bad)]
      for k, color in enumerate(colors):
        ax.errorbar(d[k], y[k], xerr=err[:, k:k + 1], fmt="o", color=color, capsize=3)
      ax.axvline(0, color="black", lw=0.8)
      ax.set_yticks(y, [r["criterion"] for r in rows])
      ax.set_title(f"kept FLOPs {target:g}", fontsize=10)
      ax.set_xlabel(f"{metric} − {baseline}", fontsize=9)
  fig.suptitle(f"{label}\npaired difference to {baseline}, 95% CI over seeds "
               f"(green: significantly better, red: worse)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("results", nargs="+", help="results.json of (model, seed) runs")
  parser.add_argument("--baseline", default="magnitude")
  parser.add_argument("--plots", default=None, help="directory for the PNGs of each model")
  parser.add_argument("--prefix", default="compare_fashion_mnist", help="the PNGs' names")
  args = parser.parse_args()
  by_model = collections.defaultdict(list)
  for path in args.results:
    with open(path) as f:
      results = json.load(f)
    by_model[model_label(results["config"])].append(results)
  if args.plots:
    os.makedirs(args.plots, exist_ok=True)
  for label, runs in by_model.items():
    text, by_metric = summarize(runs, args.baseline)
    print(f"\n### {label}\n\n{text}")
    curves = any("accuracy_at_steps" in row for r in runs for row in r["pruned"])
    if curves:
      text, table = summarize_curves(runs, args.baseline)
      print(text)
    if args.plots:
      name = f"{args.prefix}_{runs[0]['config']['model']}.png"
      plot(label, by_metric, args.baseline, os.path.join(args.plots, name))
      print(f"plot: {os.path.join(args.plots, name)}")
      if curves:
        name = f"{args.prefix}_{runs[0]['config']['model']}_curves.png"
        plot_curves(label, table, args.baseline, os.path.join(args.plots, name))
        print(f"plot: {os.path.join(args.plots, name)}")


if __name__ == "__main__":
  main()
