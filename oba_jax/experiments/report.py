"""What a pruning run reports: progress lines, accuracy, counts, inference time, table, plot.

Shared by the paper CLIs (`pipeline`) and the quickstart. Inference time is the median of
repeated jitted forward passes with its spread (`timing`), so that a reader can tell a real
speed-up from machine noise.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from matplotlib import figure

from oba_jax import flops, runtime
from oba_jax.evaluation import evaluate
from oba_jax.experiments import cli


def measure(masked_model, compacted, test, example, timing_input,
            timing_seconds: float = 1.0) -> dict:
  """Accuracy of the masked and compacted models, counts and inference time of the compacted.

  `test()` returns a fresh iterator over the evaluation batches.
  """
  masked_eval = evaluate(masked_model, test())
  compacted_eval = evaluate(compacted, test())
  count = flops.count(compacted, example)
  return {"accuracy": masked_eval["accuracy"], "loss": masked_eval["loss"],
          "compacted_accuracy": compacted_eval["accuracy"], "macs": count.macs,
          "params": count.params,
          **timing(compacted, timing_input, min_seconds=timing_seconds)}


# Printed under every table that shows inference times.
TIMING_NOTE = ("(ms/batch: median of >= 10 jitted forward passes of a batch of {batch}, "
               "measured for >= {seconds:g} s after a warm-up; 'spread' is their interquartile "
               "range over the median: on a shared machine, differences within it are noise)")


def timing(model: nnx.Module, x: jax.Array, *, min_reps: int = 10,
           min_seconds: float = 1.0) -> dict:
  """Inference time: the median of at least `min_reps` jitted forward passes after a warm-up,
  repeated for at least `min_seconds`; with the repetitions and their relative spread (IQR)."""
  forward = runtime.jit(lambda x: model(x))
  jax.block_until_ready(forward(x))
  times, begin = [], time.perf_counter()
  while len(times) < min_reps or (time.perf_counter() - begin < min_seconds
                                  and len(times) < 10_000):
    start = time.perf_counter()
    jax.block_until_ready(forward(x))
    times.append(time.perf_counter() - start)
  median = float(np.median(times))
  low, high = np.percentile(times, [25, 75])
  return {"inference_seconds": median, "inference_reps": len(times),
          "inference_spread": float((high - low) / median)}


def inference_seconds(model: nnx.Module, x: jax.Array, reps: int = 10) -> float:
  """Median time of `reps` jitted forward passes after a warm-up."""
  return timing(model, x, min_reps=reps, min_seconds=0.0)["inference_seconds"]


def max_abs_pruned(params, mask) -> float:
  """The largest |weight| among the pruned entries (0.0 when masking holds)."""
  values = [jnp.max(jnp.abs(jnp.where(m, 0.0, p)), initial=0.0)
            for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask))]
  return float(max(values, default=0.0))


def plot(results: dict, path: str) -> None:
  """Accuracy after fine-tuning against kept FLOPs (or density), one line per criterion."""
  x_key = "density" if results["mode"] == "unstructured" else "kept_macs"
  fig = figure.Figure(figsize=(5, 3.5))
  ax = fig.subplots()
  for criterion in dict.fromkeys(r["criterion"] for r in results["pruned"]):
    rows = [r for r in results["pruned"] if r["criterion"] == criterion]
    ax.plot([r[x_key] for r in rows], [r["accuracy"] for r in rows], "o-", label=criterion)
  ax.axhline(results["dense"]["accuracy"], color="gray", linestyle="--", label="dense")
  ax.set(xlabel="density" if x_key == "density" else "kept FLOPs", ylabel="test accuracy")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def table(results: dict) -> str:
  """The results as a text table, one line per row."""
  lines = [f"{'criterion':12s} {'target':>6s} {'acc pruned':>10s} {'acc tuned':>9s} "
           f"{'kept MACs':>9s} {'params':>11s} {'ms/batch':>8s} {'spread':>6s}"]
  for r in [results["dense"], *results["pruned"]]:
    lines.append(
        f"{r['criterion']:12s} {r.get('target', 1.0):6.3f} "
        f"{r.get('accuracy_after_pruning', float('nan')):10.4f} {r['accuracy']:9.4f} "
        f"{r.get('kept_macs', 1.0):9.3f} {r['params']:11,d} {1e3 * r['inference_seconds']:8.2f} "
        f"{r.get('inference_spread', float('nan')):6.0%}")
  return "\n".join(lines)


def scoring(batches, criterion: str, num_batches: int, total_steps: int, progress: bool,
            where: str = ""):
  """`batches`, saying "scoring <criterion>, step k/<total_steps>" as each step begins.

  With `progress`, each step's batches are counted by a progress bar of that label.
  """
  batches = iter(batches)
  for step in range(1, total_steps + 1):
    label = f"scoring {criterion}{where}, step {step}/{total_steps}"
    if not progress:
      cli.say(label)
    bar = _bar(num_batches, label, progress)
    for index in range(num_batches):
      batch = next(batches, None)
      if batch is None:
        bar.close()
        return
      bar.update()
      if index == num_batches - 1:
        bar.close()
      yield batch
  yield from batches  # more than planned: no labels


def _bar(total: int, label: str, enabled: bool):
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, desc=label, unit="batch", disable=not enabled)


def say_step(record, *_) -> None:
  cli.say(f"  step {record.step + 1}: kept FLOPs {record.kept_macs:.3f}, params "
          f"{record.kept_params:.3f} ({record.seconds:.1f} s)")
