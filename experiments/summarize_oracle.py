"""Markdown tables of an oracle study's results.json (`python -m oba_jax.experiments.oracle`).

  python experiments/summarize_oracle.py /tmp/oracle/results.json

Prints, per ranking (prediction with the delta restricted to the removal, full-removal
attribution with the paper's reduction), a criteria x (model, BatchNorm mode) table of
Spearman correlation and top-fraction overlap with the true loss change, and a table of
the Taylor polynomials' Spearman correlation and R².
"""

import json
import sys

from oba_jax.experiments.oracle import find_row


def _cell(row: dict | None, keys: tuple[str, ...]) -> str:
  if row is None:
    return "–"
  return " / ".join("n/a" if row[k] != row[k] else f"{row[k]:.2f}" for k in keys)


def table(results: dict, kind: str, criteria: list[str], keys: tuple[str, ...]) -> str:
  studies = results["studies"]
  head = " | ".join(f"{s['model']} BN {s['bn_mode']}" for s in studies)
  lines = [f"| criterion | {head} |", "|---" * (len(studies) + 1) + "|"]
  for c in criteria:
    lines.append(f"| {c} | " + " | ".join(_cell(find_row(s, c, kind), keys) for s in studies) + " |")
  return "\n".join(lines)


def main(path: str) -> None:
  with open(path) as f:
    results = json.load(f)
  criteria = results["config"]["criteria"].split(",")
  polynomials = sorted({r["criterion"] for s in results["studies"] for r in s["rows"]
                        if r["criterion"].startswith("T")})
  for s in results["studies"]:
    print(f"- {s['model']} BN {s['bn_mode']}: held-out accuracy {s['held_out_accuracy']:.4f}, "
          f"loss {s['loss']:.4f}, {s['removals']} of {s['channels']} channels removed one at a "
          f"time, {sum(s['seconds'].values()):.0f} s")
  print(f"\nwall time {results['wall_seconds'] / 60:.1f} min\n")
  fraction = results["config"]["top_fraction"]
  for kind, title in (("prediction", "prediction for the removal (delta restricted to it)"),
                      ("attribution_paper", "full-removal attribution, paper reduction"),
                      ("attribution_sum", "full-removal attribution, signed sum")):
    print(f"Spearman / overlap of the {fraction:.0%} least harmful, {title}:\n")
    print(table(results, kind, criteria, ("spearman", "overlap")) + "\n")
  print("Taylor polynomials of the removal, Spearman / R²:\n")
  print(table(results, "prediction", polynomials, ("spearman", "r2")))


if __name__ == "__main__":
  main(*sys.argv[1:])
