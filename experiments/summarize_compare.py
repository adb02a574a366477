"""Paired tables and plots of the criteria comparison (`experiments/compare_fashion_mnist.sh`).

  python experiments/summarize_compare.py experiments/results/compare_fashion_mnist/*.json \
      [--baseline magnitude] [--plots experiments/plots]

Takes the `results.json` of every (model, seed) run, groups them by model, and prints per
model the dense accuracy over seeds, the kept MACs reached, and one wide table per metric:
each criterion's mean over seeds and its paired difference to the baseline with a 95%
t-interval (`oba_jax.experiments.paired`). Writes one plot per model of those differences.
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
  by_metric = {}
  for metric, what, higher in METRICS:
    table = paired.paired_differences(rows, metric, baseline=baseline)
    by_metric[metric] = table
    lines += [f"{what} ({'higher' if higher else 'lower'} is better); mean over {len(seeds)} "
              f"seeds (paired difference to {baseline} [95% CI]):", "",
              paired.wide_markdown(table, baseline, higher_is_better=higher), ""]
  return "\n".join(lines), by_metric


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
  parser.add_argument("--plots", default=None, help="directory for one PNG per model")
  args = parser.parse_args()
  by_model = collections.defaultdict(list)
  for path in args.results:
    with open(path) as f:
      results = json.load(f)
    by_model[model_label(results["config"])].append(results)
  for label, runs in by_model.items():
    text, by_metric = summarize(runs, args.baseline)
    print(f"\n### {label}\n\n{text}")
    if args.plots:
      name = f"compare_fashion_mnist_{runs[0]['config']['model']}.png"
      plot(label, by_metric, args.baseline, os.path.join(args.plots, name))
      print(f"plot: {os.path.join(args.plots, name)}")


if __name__ == "__main__":
  main()
