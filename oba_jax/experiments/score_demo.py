"""Scoring demo on Fashion-MNIST: every criterion of `oba_jax.scores` on one trained model.

Trains a small wide ResNet briefly (or reuses the one in --workdir), averages
each criterion's per-parameter scores over a few batches with
`scores.accumulate`, then removes the lowest-|score| fraction of all prunable
weights (one global ranking, no fine-tuning) and reports the test accuracy and
loss. It also prints each score's cost per batch.

  python -m oba_jax.experiments.score_demo [--workdir /tmp/oba_demo] [--fractions 0.3,0.5,0.7]

Needs the Fashion-MNIST IDX files (Debian: `apt-get install dataset-fashion-mnist`,
or set OBA_FASHION_MNIST_DIR).
"""

import argparse
import itertools
import json
import os
import time

import jax
import jax.numpy as jnp
from flax import nnx

import oba_jax
from oba_jax import data, scores, train
from oba_jax.delta import prunable_mask
from oba_jax.models import ResNetCIFAR
from oba_jax.runtime import enable_compilation_cache


def evaluate(apply_fn, params, test_batches) -> tuple[float, float]:
  """Test accuracy and mean cross-entropy."""
  logits_fn = jax.jit(apply_fn)
  correct = loss = count = 0
  for batch in test_batches:
    logits = logits_fn(params, batch["image"])
    correct += int(jnp.sum(jnp.argmax(logits, -1) == batch["label"]))
    loss += float(oba_jax.softmax_cross_entropy(logits, batch["label"])) * len(batch["label"])
    count += len(batch["label"])
  return correct / count, loss / count


def prune_lowest(params, score, fraction: float):
  """Zeroes the `fraction` of prunable entries with the smallest |score| (one global ranking)."""
  mask = prunable_mask(params)
  ranked = jnp.concatenate([jnp.abs(s)[jnp.broadcast_to(m, s.shape)].ravel()
                            for s, m in zip(jax.tree.leaves(score), jax.tree.leaves(mask))])
  threshold = jnp.sort(ranked)[int(fraction * ranked.size)]
  return jax.tree.map(lambda p, s, m: jnp.where(m & (jnp.abs(s) < threshold), 0.0, p),
                      params, score, mask)


def criteria(objective):
  """Each criterion as `score_fn(params, batch, key)`."""
  loss, split = objective.loss, dict(model_fn=objective.model, output_loss_fn=objective.output_loss)
  return {
      "magnitude": lambda p, b, key: scores.magnitude(p),
      "taylor (order 1)": lambda p, b, key: scores.taylor(loss, p, b, order=1),
      "obd (fisher)": lambda p, b, key: scores.obd(loss, p, b, key=key, diag="fisher",
                                                   model_fn=objective.model),
      "obd (hutchinson)": lambda p, b, key: scores.obd(loss, p, b, key=key),
      "oba (hessian)": lambda p, b, key: scores.oba(loss, p, b),
      "oba (residual)": lambda p, b, key: scores.oba(loss, p, b, curvature="residual", **split),
      "oba (ggn)": lambda p, b, key: scores.oba(loss, p, b, curvature="ggn", **split),
      "taylor (order 3)": lambda p, b, key: scores.taylor(loss, p, b, order=3),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default=os.path.join("/tmp", "oba_score_demo"))
  parser.add_argument("--train_steps", type=int, default=600)
  parser.add_argument("--score_batches", type=int, default=8)
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--fractions", default="0.3,0.5,0.7")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  fractions = [float(f) for f in args.fractions.split(",")]
  if not all(0 < f < 1 for f in fractions):
    parser.error(f"--fractions must lie in (0, 1), got {fractions}")
  enable_compilation_cache()
  os.makedirs(args.workdir, exist_ok=True)

  print(f"training (or reusing) a dense wide ResNet-8 for {args.train_steps} steps ...",
        flush=True)
  model, _ = train.finetune(
      ResNetCIFAR(8, width=16, in_channels=1, rngs=nnx.Rngs(args.seed)),
      data.load("fashion_mnist", "train", batch_size=args.batch_size, train=True,
                seed=args.seed),
      train.TrainConfig(steps=args.train_steps, batch_size=args.batch_size, learning_rate=0.1,
                        weight_decay=0.0, schedule="cosine", seed=args.seed),
      workdir=os.path.join(args.workdir, f"dense_seed{args.seed}_steps{args.train_steps}"))
  apply_fn, params = oba_jax.functional(model)  # inference-mode BatchNorm
  objective = oba_jax.classification(apply_fn)
  test = list(data.load("fashion_mnist", "test", batch_size=1000, train=False))
  accuracy, loss = evaluate(apply_fn, params, test)
  print(f"dense model: test accuracy {accuracy:.4f}, loss {loss:.4f}\n")

  shuffled = data.load("fashion_mnist", "train", batch_size=64, train=True, augment=False,
                       seed=args.seed + 1)
  score_data = list(itertools.islice(shuffled, args.score_batches))
  header = f"{'criterion':18s} {'s/batch':>8s}" + "".join(
      f"  acc@{f:.0%} loss@{f:.0%}" for f in fractions)
  print(header)
  rows = []
  for name, score_fn in criteria(objective).items():
    key = jax.random.key(args.seed)
    scores.accumulate(score_fn, params, score_data[:1], key=key)  # compile
    start = time.perf_counter()
    score = scores.accumulate(score_fn, params, score_data, key=key)
    per_batch = (time.perf_counter() - start) / len(score_data)
    results = [evaluate(apply_fn, prune_lowest(params, score, f), test) for f in fractions]
    print(f"{name:18s} {per_batch:8.3f}" + "".join(
        f"  {a:8.4f} {l:8.3f}" for a, l in results), flush=True)
    rows.append({"criterion": name, "seconds_per_batch": per_batch,
                 "pruned": [{"fraction": f, "accuracy": a, "loss": l}
                            for f, (a, l) in zip(fractions, results)]})
  with open(os.path.join(args.workdir, "score_demo.json"), "w") as f:
    json.dump({"args": vars(args), "dense": {"accuracy": accuracy, "loss": loss},
               "criteria": rows}, f, indent=1)
  print(f"\nwrote {os.path.join(args.workdir, 'score_demo.json')}")


if __name__ == "__main__":
  main()
