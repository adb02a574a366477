"""Tables of `check_stale_batchnorm.sh`: accuracy right after pruning, stale against fixed.

  python experiments/check_stale_batchnorm.py WORKDIR [--out experiments/results/stale_batchnorm]

Per seed and criterion the test accuracy right after pruning (BatchNorm recalibrated at the
end) when steps 2-10 scored the dense model's statistics ("stale", the code before the fix)
and when every step scored a recalibrated model ("fixed"), then per criterion the mean over
seeds of fixed - stale with a 95 % t-interval. With --out, copies the raw results.json files
there as stale_seed<k>.json and fixed_seed<k>.json.
"""

import argparse
import glob
import json
import os
import shutil

import numpy as np
from scipy import stats


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdir")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  runs = {}
  for kind in ("stale", "fixed"):
    for path in sorted(glob.glob(os.path.join(args.workdir, kind, "seed*", "results.json"))):
      seed = int(os.path.basename(os.path.dirname(path))[4:])
      with open(path) as f:
        runs[kind, seed] = json.load(f)
      if args.out:
        os.makedirs(args.out, exist_ok=True)
        shutil.copy(path, os.path.join(args.out, f"{kind}_seed{seed}.json"))
  seeds = sorted(s for k, s in runs if k == "fixed" and ("stale", s) in runs)
  if not seeds:
    parser.error(f"no seed of {args.workdir} has both a stale and a fixed results.json")
  for s in seeds:
    if runs["stale", s]["dense"]["accuracy"] != runs["fixed", s]["dense"]["accuracy"]:
      raise ValueError(f"seed {s}: the stale and fixed runs start from different dense models")
  accuracy = {(k, s): {r["criterion"]: r["accuracy_after_pruning"] for r in runs[k, s]["pruned"]}
              for k, s in runs}
  criteria = list(accuracy["fixed", seeds[0]])
  print("| seed | dense | " + " | ".join(f"{c} stale / fixed" for c in criteria) + " |")
  print("|---" * (len(criteria) + 2) + "|")
  for s in seeds:
    cells = [f"{accuracy['stale', s][c]:.3f} / {accuracy['fixed', s][c]:.3f}" for c in criteria]
    print(f"| {s} | {runs['fixed', s]['dense']['accuracy']:.4f} | " + " | ".join(cells) + " |")
  print(f"\nfixed - stale over {len(seeds)} seeds, mean [95% CI]:")
  for c in criteria:
    d = np.array([accuracy["fixed", s][c] - accuracy["stale", s][c] for s in seeds])
    half = (stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
            if len(d) > 1 else float("nan"))
    print(f"  {c}: {d.mean():+.3f} [{d.mean() - half:+.3f}, {d.mean() + half:+.3f}]")


if __name__ == "__main__":
  main()
