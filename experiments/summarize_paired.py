"""Paired comparison tables (difference to a baseline criterion, 95% t-interval over seeds).

  python experiments/summarize_paired.py RUN_SEED0/results.json RUN_SEED1/results.json ... \
      [--baseline magnitude] [--metrics accuracy,accuracy_after_pruning,loss_after_pruning]
  python experiments/summarize_paired.py experiments/results/transformers/smollm2_wordnet.json \
      --baseline taylor --metrics nll

Pipeline results (one file per seed, every criterion in each) or a text run's results
(calibration seeds inside one file). Metrics whose name holds "loss", "nll" or
"perplexity" are lower-is-better. See `oba_jax.experiments.paired`.
"""

import argparse
import json

from oba_jax.experiments import paired


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("results", nargs="+")
  parser.add_argument("--baseline", default="magnitude")
  parser.add_argument("--metrics", default="accuracy,accuracy_after_pruning,loss_after_pruning")
  args = parser.parse_args()
  rows = []
  for path in args.results:
    with open(path) as f:
      results = json.load(f)
    rows += results["runs"] if "runs" in results else paired.pipeline_rows([results])
  for metric in args.metrics.split(","):
    lower = any(word in metric for word in ("loss", "nll", "perplexity"))
    table = paired.paired_differences(rows, metric, baseline=args.baseline)
    print(f"\n{metric} ({'lower' if lower else 'higher'} is better), paired difference to "
          f"{args.baseline}:\n")
    print(paired.markdown(table, metric, args.baseline, higher_is_better=not lower))


if __name__ == "__main__":
  main()
