"""Markdown tables of a text-pruning run (`smollm2_wordnet`, `minilm_wordnet` results.json).

  python experiments/summarize_text.py experiments/results/transformers/smollm2_wordnet.json
  python experiments/summarize_text.py experiments/results/transformers/minilm_wordnet.json \
      --extra mrr

Per criterion and target: the metric for each calibration seed and its mean (with
`--extra` metrics' means in parentheses); then each criterion's scoring cost in units
of one gradient with XLA's memory analysis and the process's peak memory.
"""

import argparse
import json

import numpy as np


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("results")
  parser.add_argument("--extra", default="", help="other metrics to average, comma-separated")
  args = parser.parse_args()
  with open(args.results) as f:
    r = json.load(f)
  metric, extra = r["metric"], [k for k in args.extra.split(",") if k]
  print(f"dense {metric} = {r['dense'][metric]:.4g}", {k: r["dense"][k] for k in extra}, "\n")
  targets = sorted({x["target"] for x in r["runs"]}, reverse=True)
  criteria = list(dict.fromkeys(x["criterion"] for x in r["runs"]))
  print("| criterion | " + " | ".join(f"kept {t:g}" for t in targets) + " |")
  print("|" + "---|" * (len(targets) + 1))
  for c in criteria:
    cells = []
    for t in targets:
      runs = sorted((x for x in r["runs"] if x["criterion"] == c and x["target"] == t),
                    key=lambda x: x["seed"])
      values = [x[metric] for x in runs]
      cell = " / ".join(f"{v:.4g}" for v in values)
      if len(values) > 1:
        cell += f" (mean {np.mean(values):.4g})"
      if extra:
        cell += " [" + ", ".join(f"{k} {np.mean([x[k] for x in runs]):.3f}" for k in extra) + "]"
      cells.append(cell)
    print(f"| {c} | " + " | ".join(cells) + " |")
  print("\n| criterion | × one gradient | step | gradient | XLA total / temp | peak RSS |")
  print("|---|---|---|---|---|---|")
  for c, v in r["costs"].items():
    print(f"| {c} | {v['in_gradients']:.2f} | {v['seconds']:.2f} s | "
          f"{v['gradient_seconds']:.2f} s | {v.get('xla_bytes', 0) / 2**20:.0f} / "
          f"{v.get('xla_temp_bytes', 0) / 2**20:.0f} MiB | {v['peak_rss_bytes'] / 2**30:.1f} GiB |")
  print("\nlargest |compacted - masked|:",
        max(x["max_abs_compact_minus_masked"] for x in r["runs"]))


if __name__ == "__main__":
  main()
