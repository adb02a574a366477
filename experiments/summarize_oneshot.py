"""Markdown table of the one-shot comparison over the seeds recorded so far.

  python experiments/summarize_oneshot.py experiments/results/oneshot_fashion_mnist_resnet20w8_seed*.json

Per criterion and target: kept MACs and accuracy after pruning and after
fine-tuning, as mean ± half the range over the seeds (the seed count is shown).
"""

import collections
import json
import sys

import numpy as np


def main(paths):
  rows = collections.defaultdict(list)
  dense = []
  for path in paths:
    with open(path) as f:
      results = json.load(f)
    dense.append(results["dense"]["accuracy"])
    for r in results["pruned"]:
      rows[(r["criterion"], r["target"])].append(r)
  spread = lambda v: f"{np.mean(v):.4f} ± {(np.max(v) - np.min(v)) / 2:.4f}"
  print(f"Dense accuracy over {len(dense)} seeds: {spread(dense)}\n")
  print("| criterion | target | seeds | kept MACs | acc. right after pruning | "
        "acc. after fine-tuning |")
  print("|---|---|---|---|---|---|")
  for (criterion, target), runs in rows.items():
    values = lambda key: [r[key] for r in runs]
    print(f"| {criterion} | {target} | {len(runs)} | {spread(values('kept_macs'))} | "
          f"{spread(values('accuracy_after_pruning'))} | {spread(values('accuracy'))} |")


if __name__ == "__main__":
  main(sys.argv[1:])
