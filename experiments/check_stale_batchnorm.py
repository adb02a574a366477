"""Tables of `check_stale_batchnorm.sh`: accuracy right after pruning, stale against fixed.

  python experiments/check_stale_batchnorm.py WORKDIR [--out experiments/results/stale_batchnorm]

Per seed and criterion the test accuracy right after pruning (BatchNorm recalibrated at the
end) when steps 2-10 scored the dense model's statistics ("stale", the code before the fix)
and when every step scored a recalibrated model ("fixed": 10 recalibration batches, "fixed_rN":
N), then per criterion the mean over seeds of fixed - stale with a 95 % t-interval. With --out,
copies the raw results.json files there as stale_seed<k>.json, fixed_seed<k>.json, ...
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
  fixed_dirs = glob.glob(os.path.join(args.workdir, "fixed*"))
  kinds = ["stale"] + sorted(os.path.basename(d) for d in fixed_dirs)
  runs = {}
  for kind in kinds:
    for path in sorted(glob.glob(os.path.join(args.workdir, kind, "seed*", "results.json"))):
      seed = int(os.path.basename(os.path.dirname(path))[4:])
      with open(path) as f:
        runs[kind, seed] = json.load(f)
      if args.out:
        os.makedirs(args.out, exist_ok=True)
        shutil.copy(path, os.path.join(args.out, f"{kind}_seed{seed}.json"))
  fixed = [k for k in kinds[1:] if any(key[0] == k for key in runs)]
  seeds = sorted({s for _, s in runs if all((k, s) in runs for k in ["stale"] + fixed)})
  if not fixed or not seeds:
    parser.error(f"no seed of {args.workdir} has a stale and every fixed results.json")
  for k, s in runs:
    if s in seeds and runs[k, s]["dense"]["accuracy"] != runs["stale", s]["dense"]["accuracy"]:
      raise ValueError(f"seed {s}: the {k} and stale runs start from different dense models")
  accuracy = {(k, s): {r["criterion"]: r["accuracy_after_pruning"] for r in runs[k, s]["pruned"]}
              for k, s in runs}
  criteria = list(accuracy["stale", seeds[0]])
  names = " / ".join(["stale"] + fixed)
  print("| seed | dense | " + " | ".join(f"{c} {names}" for c in criteria) + " |")
  print("|---" * (len(criteria) + 2) + "|")
  for s in seeds:
    cells = [" / ".join(f"{accuracy[k, s][c]:.3f}" for k in ["stale"] + fixed) for c in criteria]
    print(f"| {s} | {runs['stale', s]['dense']['accuracy']:.4f} | " + " | ".join(cells) + " |")
  for k in fixed:
    print(f"\n{k} - stale over {len(seeds)} seeds, mean [95% CI]:")
    for c in criteria:
      d = np.array([accuracy[k, s][c] - accuracy["stale", s][c] for s in seeds])
      half = (stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
              if len(d) > 1 else float("nan"))
      print(f"  {c}: {d.mean():+.3f} [{d.mean() - half:+.3f}, {d.mean() + half:+.3f}]")

if __name__ == "__main__":
  main()
