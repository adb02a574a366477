"""Paired comparison of criteria over seeds: each criterion's difference to a baseline.

Within one seed every criterion starts from the same dense model, reads the same
importance (or calibration) batches and fine-tunes on the same data order, so the
seed's own luck cancels in the difference `metric(criterion) - metric(baseline)`.
Over n seeds the mean difference gets a Student-t interval (n - 1 degrees of freedom);
a difference is called significant when its interval excludes zero. Rows are the
pipeline's `results["pruned"]` entries (with the run's seed added) or a text run's
`results["runs"]`: dicts with "criterion", "target", "seed" and the metric.
"""

import collections
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
from scipy import stats


def pipeline_rows(results: Iterable[dict]) -> list[dict]:
  """The pruned rows of several pipeline `results.json` (one per seed), each with its seed."""
  return [dict(row, seed=r["config"]["seed"]) for r in results for row in r["pruned"]]


def budget_rows(rows: Iterable[dict]) -> list[dict]:
  """Pipeline rows as one row per fine-tuning budget: "budget" 0 is right after pruning
  (`accuracy_after_pruning`), then every step of the row's `accuracy_at_steps`."""
  out = []
  for row in rows:
    curve = {0: row["accuracy_after_pruning"],
             **{int(step): acc for step, acc in row.get("accuracy_at_steps", {}).items()}}
    out += [{"criterion": row["criterion"], "target": row["target"], "seed": row["seed"],
             "budget": budget, "accuracy": acc} for budget, acc in sorted(curve.items())]
  return out


def paired_differences(rows: Sequence[dict], metric: str, *, baseline: str = "magnitude",
                       level: float = 0.95, power: float = 0.8,
                       missing_seeds: bool = False) -> list[dict]:
  """Per (criterion, target): the mean of `metric`, and its paired difference to `baseline`.

  Returns one dict per criterion other than the baseline and target: "criterion",
  "target", "n" (seeds), "mean", "baseline_mean", "difference" (mean over seeds of
  the per-seed difference), "low"/"high" (its `level` t-interval; NaN with one
  seed), "significant", and "detectable": the smallest true difference the design
  would call significant with probability `power`, (t_{level} + t_{power}) s / sqrt(n)
  from the differences' own spread s (NaN with one seed). Raises ValueError when a
  criterion and the baseline were not run on the same seeds at a target (the
  comparison would not be paired), unless `missing_seeds`: then each criterion is
  compared on the seeds both have (a criterion that could not reach a target on some
  seed); "n" and "baseline_mean" are over those seeds, and `missing` tells which.
  """
  by = collections.defaultdict(dict)
  for row in rows:
    key = (row["criterion"], row["target"])
    if row["seed"] in by[key]:
      raise ValueError(f"two rows for criterion {key[0]!r}, target {key[1]} and seed "
                       f"{row['seed']}: one run per seed.")
    by[key][row["seed"]] = float(row[metric])
  criteria = list(dict.fromkeys(c for c, _ in by))
  if baseline not in criteria:
    raise ValueError(f"baseline {baseline!r} is not among the criteria {criteria}.")
  out = []
  for (criterion, target), values in by.items():
    if criterion == baseline:
      continue
    base = by.get((baseline, target), {})
    seeds = sorted(set(values) & set(base))
    if set(values) != set(base) and not (missing_seeds and seeds):
      raise ValueError(f"{criterion!r} at target {target} ran on seeds {sorted(values)} and "
                       f"the baseline {baseline!r} on {sorted(base)}: not paired.")
    d = np.asarray([values[s] - base[s] for s in seeds])
    n = len(d)
    if n > 1:
      error = d.std(ddof=1) / np.sqrt(n)
      half = stats.t.ppf(0.5 + level / 2, n - 1) * error
      detectable = half + stats.t.ppf(power, n - 1) * error
    else:
      half = detectable = float("nan")
    low, high = d.mean() - half, d.mean() + half
    out.append({"criterion": criterion, "target": target, "n": n,
                "mean": float(np.mean([values[s] for s in seeds])),
                "baseline_mean": float(np.mean([base[s] for s in seeds])),
                "difference": float(d.mean()), "low": float(low), "high": float(high),
                "significant": bool(n > 1 and (low > 0 or high < 0)),
                "detectable": float(detectable)})
  return out


def missing(rows: Sequence[dict], *, baseline: str = "magnitude") -> list[str]:
  """One line per (criterion, target) that lacks a seed the baseline has, or the other way:
  what `paired_differences(..., missing_seeds=True)` compared without. Those seeds are not
  a random sample (a rule may fail to reach the target on the hard cases): report them."""
  seeds = collections.defaultdict(set)
  for row in rows:
    seeds[(row["criterion"], row["target"])].add(row["seed"])
  lines = []
  for (criterion, target), own in sorted(seeds.items()):
    base = seeds.get((baseline, target), set())
    if criterion != baseline and own != base:
      lines.append(f"{criterion} at {target:g}: no row on seeds {sorted(base - own)}"
                   + (f", the baseline none on {sorted(own - base)}" if own - base else ""))
  return lines


def markdown(rows: Sequence[dict], metric: str, baseline: str, *,
             higher_is_better: bool = True) -> str:
  """A table: criterion, target, n, mean, difference to the baseline [interval], significance."""
  lines = [f"| criterion | target | n | {metric} | − {baseline} (95% CI) | significant |",
           "|---|---|---|---|---|---|"]
  for r in sorted(rows, key=lambda r: (-r["target"], r["criterion"])):
    better = (r["difference"] > 0) == higher_is_better
    mark = ("**yes, better**" if better else "**yes, worse**") if r["significant"] else "no"
    lines.append(f"| {r['criterion']} | {r['target']:g} | {r['n']} | {r['mean']:.4f} | "
                 f"{r['difference']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}] | {mark} |")
  return "\n".join(lines)


def wide_markdown(rows: Sequence[dict], baseline: str, *, higher_is_better: bool = True,
                  digits: int = 3, value: Callable[[float], str] | None = None,
                  difference: Callable[[float], str] | None = None,
                  reference: Mapping[str, float] | None = None) -> str:
  """`paired_differences` rows as one line per criterion and one column per target.

  The baseline's line holds its means; every other cell "mean (difference [low, high])",
  bold with ▲ when significantly better than the baseline, ▼ when significantly worse.
  `value` and `difference` format them (default: `digits` decimals, the difference signed;
  e.g. exp and a ratio for a log-perplexity); `reference` adds a first line per
  {name: value} that holds at every target (a dense model's).
  """
  targets = sorted({r["target"] for r in rows}, reverse=True)
  criteria = list(dict.fromkeys(r["criterion"] for r in rows))
  cell = {(r["criterion"], r["target"]): r for r in rows}
  baseline_mean = {r["target"]: r["baseline_mean"]  # over all its seeds: the row of most seeds
                   for r in sorted(rows, key=lambda r: r["n"])}
  f = value or (lambda x: f"{x:.{digits}f}")
  s = difference or (lambda x: f"{x:+.{digits}f}")
  lines = [f"| criterion | {' | '.join(f'kept {t:g}' for t in targets)} |",
           "|---" * (len(targets) + 1) + "|"]
  lines += [f"| {name} | {' | '.join(f(x) for _ in targets)} |"
            for name, x in (reference or {}).items()]
  lines.append(f"| {baseline} | {' | '.join(f(baseline_mean[t]) for t in targets)} |")
  for criterion in criteria:
    cells = []
    for t in targets:
      r = cell.get((criterion, t))
      if r is None:
        cells.append("")
        continue
      text = f"{f(r['mean'])} ({s(r['difference'])} [{s(r['low'])}, {s(r['high'])}])"
      if r["significant"]:
        better = (r["difference"] > 0) == higher_is_better
        text = f"**{text}** {'▲' if better else '▼'}"
      cells.append(text)
    lines.append(f"| {criterion} | {' | '.join(cells)} |")
  return "\n".join(lines)
