"""The text runs' summary: perplexities paired over calibration seeds, before and after
recovery, compared in the log."""

import math

import clis


def _script():
  return clis.script("summarize_text")


def _metrics(wordnet: float, docs: float) -> dict:
  return {"nll_wordnet": math.log(wordnet), "nll_python_docs": math.log(docs),
          "perplexity": wordnet, "perplexity_wordnet": wordnet, "perplexity_python_docs": docs}


def _results() -> dict:
  """Three seeds; taylor's WordNet perplexity is 1.2x magnitude's on every seed, oba's equal
  on average but not on each seed; after recovery all are halved."""
  runs = []
  for seed, wobble in zip((1, 2, 3), (0.9, 1.0, 1.1)):
    for criterion, factor in (("magnitude", 1.0), ("taylor", 1.2), ("oba", wobble)):
      base = 100.0 * (1 + seed / 10)
      runs.append({**_metrics(base * factor, 50.0), "criterion": criterion, "target": 0.9,
                   "seed": seed, "scoring_seconds": 10.0, "recovery_seconds": 60.0,
                   "max_abs_compact_minus_masked": 1e-7,
                   "after_recovery": _metrics(base * factor / 2, 40.0)})
  return {"metric": "perplexity", "dense": _metrics(80.0, 30.0), "runs": runs, "costs": {},
          "dense_recovered": {str(s): _metrics(50.0, 35.0) for s in (1, 2, 3)}}


def test_perplexities_are_compared_as_paired_ratios_per_corpus_and_stage():
  text = _script().summary(_results())
  wordnet_before, wordnet_after = [
      block for block in text.split("\n\n") if block.startswith("| criterion")
      and "| dense | 80.0 |" in block]
  assert "| magnitude | 119.7 |" in wordnet_before  # geometric mean of 110, 120, 130
  taylor = next(line for line in wordnet_before.splitlines() if line.startswith("| taylor"))
  assert "(x1.200 [x1.200, x1.200])" in taylor and "▼" in taylor  # worse on every seed
  oba = next(line for line in wordnet_before.splitlines() if line.startswith("| oba"))
  assert "▲" not in oba and "▼" not in oba  # 0.9x, 1x, 1.1x: no significant difference
  assert "| dense, recovered alike | 50.0 |" in wordnet_after
  assert "python_docs perplexity after recovery" in text
