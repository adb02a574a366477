"""The results of a text-pruning run (`text_pruning.run_task`) as a table and a plot."""

import numpy as np

from oba_jax import files


def table(results: dict) -> str:
  """One line per run (criterion, seed, target, kept fraction, metric, and the metric after
  recovery when there was one; the dense model's recovery per seed too), then the costs."""
  metric = results["metric"]
  recovered = any("after_recovery" in r for r in results["runs"])
  after = f" {'recovered':>12s}" if recovered else ""
  lines = [f"{'criterion':16s} {'seed':>4s} {'target':>6s} {'kept':>6s} {metric:>12s}{after}",
           f"{'dense':16s} {'':>4s} {'':>6s} {1.0:6.3f} {results['dense'][metric]:12.4f}"]
  for seed, metrics in results.get("dense_recovered", {}).items():  # the recovered baseline
    lines.append(f"{'dense':16s} {int(seed):4d} {'':>6s} {1.0:6.3f} {'':>12s} "
                 f"{metrics[metric]:12.4f}")
  for r in results["runs"]:
    after = (f" {r['after_recovery'][metric]:12.4f}" if "after_recovery" in r
             else f" {'':>12s}" if recovered else "")
    lines.append(f"{r['criterion']:16s} {r['seed']:4d} {r['target']:6.3f} {r['kept_params']:6.3f} "
                 f"{r[metric]:12.4f}{after}")
  for name, c in results["costs"].items():
    lines.append(f"cost {name}: {c['in_gradients']:.2f} gradients per batch")
  return "\n".join(lines)


def plot(results: dict, path: str) -> None:
  """Metric vs kept parameter fraction: mean over seeds, bars from min to max."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  metric = results["metric"]
  fig, ax = plt.subplots(figsize=(6, 4))
  by_criterion: dict[str, dict[float, list]] = {}
  for r in results["runs"]:
    by_criterion.setdefault(r["criterion"], {}).setdefault(r["target"], []).append(
        (r["kept_params"], r[metric]))
  for name, by_target in by_criterion.items():
    xs, ys, lo, hi = [], [], [], []
    for target in sorted(by_target):
      points = np.asarray(by_target[target])
      xs.append(points[:, 0].mean())
      ys.append(points[:, 1].mean())
      lo.append(max(ys[-1] - points[:, 1].min(), 0.0))  # equal values: the mean may be off
      hi.append(max(points[:, 1].max() - ys[-1], 0.0))    # by one rounding step
    line = ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=name)
    recovered = [(t, r["after_recovery"][metric]) for r in results["runs"]
                 if r["criterion"] == name and "after_recovery" in r for t in [r["target"]]]
    if recovered:  # mean over seeds after recovery, dashed in the criterion's colour
      means = {t: np.mean([v for u, v in recovered if u == t]) for t, _ in recovered}
      targets = [t for t in sorted(by_target) if t in means]
      ax.plot([xs[sorted(by_target).index(t)] for t in targets], [means[t] for t in targets],
              ls="--", marker="x", color=line[0].get_color(), label=f"{name} recovered")
  ax.axhline(results["dense"][metric], color="k", ls="--", lw=1, label="dense")
  ax.set_xlabel("kept fraction of parameters")
  ax.set_ylabel(metric)
  if metric == "perplexity":
    ax.set_yscale("log")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  files.write_atomic(path, lambda f: fig.savefig(f, dpi=120, format="png"))
  plt.close(fig)
