"""Oracle study: how well does each criterion predict the loss change of a removal?

For a trained model and held-out batches, each channel (head, feature: one
index of a group of `oba_jax.structure.trace`), or a random sample of them when
there are many, is removed alone: every parameter entry it owns is zeroed (its
conv's output slice, BatchNorm scale and shift, its consumers' input slices),
and the true change of the loss L(θ ⊙ m) - L(θ) is measured on those batches.
Each criterion of `oba_jax.prune.CRITERIA` gives two numbers per removal:

- its *prediction*: the criterion's scores with the delta restricted to the
  removal (δ = -θ on the zeroed entries, 0 elsewhere), summed. OBA (hessian)
  then gives ½δᵀHδ, and the Taylor terms sum to the polynomials
  T_k = Σ_{j≤k} (1/j!) dʲ/dtʲ L(θ + tδ) (reported as "T1" ... "T4"), so T2 is
  exact up to third-order terms;
- its *attribution*: the group score the pruning pipeline ranks, from scores
  with the full-removal delta (every prunable entry, the paper's setting) and
  the "paper" reduction (also "sum", each index's signed share).

Everything is computed on the same batches as the true change, so the study
measures the criteria, not sampling noise. Removals rank from least to most
harmful by the prediction (signed: a predicted gain ranks first) or by the
attribution. Reported per model and BatchNorm mode: Spearman and Pearson
correlation with the true change, the overlap of the `top_fraction` least
harmful removals by each ranking with the truly least harmful ones, R² of the
Taylor polynomials, and scatter plots.

  python -m oba_jax.experiments.oracle --workdir=/tmp/oracle
  python -m oba_jax.experiments.oracle --workdir=/tmp/o --config.models=vgg11_cifar \
      --config.bn_modes=eval --config.max_removals=64

The dense models are trained in `workdir/<model>/dense` (or reused), each study
is saved to `workdir/<model>/<bn mode>.json` as it finishes, and a killed run
resumes from there. Criteria that run the model one example at a time
("obd_fisher") are left out in training-mode BatchNorm, where each example
would be normalised by its own statistics (`prune.Criterion.per_example`).
"""

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from matplotlib import figure

from oba_jax import data, masks, models, prune, structure, train
from oba_jax.estimate import data_mesh, shard_batch
from oba_jax.experiments import cli
from oba_jax.functional import classification, functional

PyTree = Any
BN_MODES = ("eval", "train")
TAYLOR_TERMS = ("taylor", "oba", "taylor3", "taylor4")  # the k-th Taylor term, k = 1..4
RESULTS_FILE = "results.json"


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.dataset = "fashion_mnist"
  c.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.held_out_split = "test"
  c.models = "vgg11_cifar,resnet20_cifar"  # names in oba_jax.models.MODELS
  c.width = 16  # every model's first-stage width
  c.bn_modes = "eval,train"
  c.criteria = ("magnitude,random,taylor,obd_fisher,obd_hutchinson,oba,oba_residual,oba_ggn,"
                "taylor3,taylor4")  # names in oba_jax.prune.CRITERIA
  c.seed = 0
  c.dense = ml_collections.ConfigDict(dict(steps=1500, batch_size=128, learning_rate=0.1,
                                           weight_decay=5e-4))
  c.batch_size = 128  # held-out batch; training-mode BatchNorm normalises over it
  c.held_out_batches = 2
  c.max_removals = 128  # per model; a random sample when the model has more channels
  c.top_fraction = 0.2
  c.progress = True
  c.smoke = False  # a tiny run for tests: width 4, a few steps, removals and examples
  return c


def _smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(config.to_dict())
  config.update(width=4, batch_size=16, held_out_batches=2, max_removals=12)
  config.dense.update(steps=20, batch_size=32)
  return config


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError (or FileNotFoundError) naming the first bad setting; reads no data."""
  for key, accepted in (("models", models.MODELS), ("bn_modes", BN_MODES),
                        ("criteria", prune.CRITERIA)):
    cli.check_names(key, config[key], accepted)
  if config.dataset not in data.DATASETS:
    raise ValueError(f"dataset={config.dataset!r} is not supported; accepted: "
                     f"{sorted(data.DATASETS)}.")
  if not 0 < config.top_fraction <= 1:
    raise ValueError(f"top_fraction={config.top_fraction} must be in (0, 1].")
  for key in ("max_removals", "held_out_batches", "batch_size", "width"):
    if not isinstance(config[key], int) or config[key] < 1:
      raise ValueError(f"{key}={config[key]!r} must be a positive integer.")
  if config.data_dir is not None and not os.path.isdir(config.data_dir):
    raise FileNotFoundError(f"data_dir {config.data_dir!r} is not a directory.")


# --- the study ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Study:
  """One model's removals, their true loss changes and every criterion's view of them.

  Attributes:
    removals: (group name, index) per removal.
    true: L(θ with the removal zeroed) - L(θ), per removal.
    prediction: criterion -> its summed scores with the delta restricted to each removal.
    attribution: criterion -> reduction ("paper", "sum") -> the group score of each
      removal's index, from full-removal scores.
    loss: L(θ) on the batches.
    seconds: wall time per part ("true", "prediction", "attribution").
  """

  removals: tuple[tuple[str, int], ...]
  true: np.ndarray
  prediction: Mapping[str, np.ndarray]
  attribution: Mapping[str, Mapping[str, np.ndarray]]
  loss: float
  seconds: Mapping[str, float]

  def to_json(self) -> dict:
    lists = lambda tree: jax.tree.map(lambda a: np.asarray(a).tolist(), tree)
    return {"removals": [list(r) for r in self.removals], "true": lists(self.true),
            "prediction": lists(dict(self.prediction)),
            "attribution": lists({c: dict(v) for c, v in self.attribution.items()}),
            "loss": self.loss, "seconds": dict(self.seconds)}

  @classmethod
  def from_json(cls, value: dict) -> "Study":
    arrays = lambda tree: jax.tree.map(np.asarray, tree, is_leaf=lambda x: isinstance(x, list))
    return cls(removals=tuple((g, int(i)) for g, i in value["removals"]),
               true=np.asarray(value["true"]), prediction=arrays(value["prediction"]),
               attribution=arrays(value["attribution"]), loss=value["loss"],
               seconds=value["seconds"])


def sample_removals(groups: Sequence[structure.Group], max_removals: int,
                    seed: int) -> tuple[tuple[str, int], ...]:
  """Every (group, index), or `max_removals` of them drawn uniformly without replacement."""
  every = [(g.name, c) for g in groups for c in range(g.size)]
  if len(every) > max_removals:
    picked = np.random.default_rng(seed).choice(len(every), max_removals, replace=False)
    every = [every[i] for i in sorted(picked)]
  return tuple(every)


def removal_study(
    model: nnx.Module,
    traced: structure.Structure,
    batches: Sequence[PyTree],
    *,
    criteria: Sequence[str],
    removals: Sequence[tuple[str, int]],
    key: jax.Array,
    mesh: Mesh | None = None,
    progress: bool = False,
) -> Study:
  """True loss changes of single removals and every criterion's prediction and attribution.

  Args:
    model: the trained classifier, in the BatchNorm mode to study (not modified).
    traced: the model's groups, `structure.trace(model, example, ignore=...)`.
    batches: the held-out `{"image", "label"}` batches; all of them are read for
      every quantity (the loss is their mean).
    criteria: names in `prune.CRITERIA`.
    removals: (group name, index) pairs, e.g. from `sample_removals`.
    key: PRNG key of the random criteria.
    mesh: the device mesh the batches are split over (default: all devices).
    progress: show progress bars.
  """
  for name in criteria:
    if name not in prune.CRITERIA:
      raise ValueError(f"unknown criterion {name!r}; accepted: {sorted(prune.CRITERIA)}.")
  if not batches:
    raise ValueError("removal_study needs at least one held-out batch.")
  mesh = data_mesh() if mesh is None else mesh
  sizes = {g.name: g.size for g in traced.groups}
  for group, index in removals:
    if group not in sizes or not 0 <= index < sizes[group]:
      raise ValueError(f"removal ({group!r}, {index}) is not an index of a group of this model; "
                       f"groups and sizes: {dict(list(sizes.items())[:6])} ...")
  apply_fn, params = functional(model)
  objective = classification(apply_fn)
  params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
  sharded = [shard_batch(b, mesh) for b in batches]
  seconds = {}

  start = time.perf_counter()
  entrywise = [c for c in criteria if prune.CRITERIA[c].entrywise]
  coupled = [c for c in criteria if not prune.CRITERIA[c].entrywise]
  full_delta = jax.tree.map(jnp.negative, params)  # every entry: also BatchNorm scales
  full_scores = {c: _mean_over(sharded, jax.jit(functools.partial(_entrywise_scores, objective, c)),
                               params, full_delta, key) for c in entrywise}
  loss = float(_mean_over(sharded, jax.jit(objective.loss), params))
  true, prediction = [], {c: [] for c in criteria}
  per_removal = jax.jit(functools.partial(_removal_terms, objective, tuple(coupled)))
  for group, index in _bar(removals, progress, "removals"):
    mask = masks.from_removed(traced, {group: [index]}, params)
    removed_loss, terms = _mean_over(sharded, per_removal, params, mask, key)
    true.append(float(removed_loss) - loss)
    for c in entrywise:
      prediction[c].append(float(_masked_sum(full_scores[c], mask)))
    for c, value in zip(coupled, np.asarray(terms)):
      prediction[c].append(float(value))
  seconds["true_and_prediction"] = time.perf_counter() - start

  start = time.perf_counter()
  attribution = {}
  for c in criteria:
    scores = prune.importance(c, model, batches, num_batches=None, key=key, mesh=mesh)
    attribution[c] = {
        reduction: np.array([reduced[g][i] for g, i in removals])
        for reduction in ("paper", "sum")
        for reduced in [structure.group_scores(traced, scores, reduction=reduction)]}
  seconds["attribution"] = time.perf_counter() - start
  return Study(removals=tuple((g, int(i)) for g, i in removals), true=np.array(true),
               prediction={c: np.array(v) for c, v in prediction.items()},
               attribution=attribution, loss=loss, seconds=seconds)


def _entrywise_scores(objective, criterion, params, batch, delta, key):
  return prune.CRITERIA[criterion].score(objective, params, batch, key, delta=delta)


def _removal_terms(objective, coupled, params, batch, mask, key):
  """The loss with the removal zeroed, and each coupled criterion's restricted prediction."""
  delta = jax.tree.map(lambda p, keep: jnp.where(keep, jnp.zeros_like(p), -p), params, mask)
  removed = jax.tree.map(jnp.add, params, delta)
  terms = [_tree_sum(prune.CRITERIA[c].score(objective, params, batch, key, delta=delta))
           for c in coupled]
  return objective.loss(removed, batch), jnp.stack(terms) if terms else jnp.zeros((0,))


def _mean_over(batches, fn, params, *args):
  """The mean of `fn(params, batch, *args)` over the batches (the key folded per batch).

  Not `scores.accumulate`: that jits a new step on every call, and this runs once
  per removal with the same jitted `fn`.
  """
  total = None
  for i, batch in enumerate(batches):
    call_args = [jax.random.fold_in(a, i) if _is_key(a) else a for a in args]
    value = fn(params, batch, *call_args)
    total = value if total is None else jax.tree.map(jnp.add, total, value)
  return jax.tree.map(lambda t: t / len(batches), total)


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _tree_sum(tree) -> jax.Array:
  return sum(jnp.sum(x) for x in jax.tree.leaves(tree))


@jax.jit
def _masked_sum(scores, mask) -> jax.Array:
  return _tree_sum(jax.tree.map(lambda s, keep: jnp.where(keep, 0, s), scores, mask))


def _bar(items, progress: bool, desc: str):
  if not progress:
    return items
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(items, desc=desc, unit="removal")


# --- metrics --------------------------------------------------------------------


def ranks(x: np.ndarray) -> np.ndarray:
  """Ranks from 0, ties sharing their mean rank."""
  x = np.asarray(x, np.float64)
  order = np.argsort(x, kind="stable")
  r = np.empty(len(x))
  r[order] = np.arange(len(x))
  _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
  sums = np.bincount(inverse, weights=r)
  return sums[inverse] / counts[inverse]


def pearson(x: np.ndarray, y: np.ndarray) -> float:
  """Pearson correlation; NaN when either side is constant."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  x, y = x - x.mean(), y - y.mean()
  norm = math.sqrt(float(x @ x) * float(y @ y))
  return float(x @ y / norm) if norm > 0 else float("nan")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
  return pearson(ranks(x), ranks(y))


def overlap(ranking: np.ndarray, true: np.ndarray, fraction: float) -> float:
  """The share of the `fraction` lowest by `true` that are also the lowest by `ranking`."""
  k = max(1, round(fraction * len(true)))
  lowest = lambda v: set(np.argsort(np.asarray(v), kind="stable")[:k].tolist())
  return len(lowest(ranking) & lowest(true)) / k


def r_squared(prediction: np.ndarray, true: np.ndarray) -> float:
  """1 - Σ(pred - true)² / Σ(true - mean)²: how much of the true change a prediction explains."""
  residual = np.sum((np.asarray(prediction) - true) ** 2)
  spread = np.sum((true - np.mean(true)) ** 2)
  return float(1 - residual / spread) if spread > 0 else float("nan")


def taylor_polynomials(study: Study) -> dict[str, np.ndarray]:
  """T1 ... Tk: the Taylor polynomials of the true change, as far as the terms were scored."""
  polynomials, total = {}, 0.0
  for order, name in enumerate(TAYLOR_TERMS, start=1):
    if name not in study.prediction:
      break
    total = total + study.prediction[name]
    polynomials[f"T{order}"] = total
  return polynomials


def summarize(study: Study, top_fraction: float) -> list[dict]:
  """One row per ranking: its correlations with the true change and its top-k overlap."""
  rows = []

  def add(criterion, kind, values, loss_units=False):
    row = {"criterion": criterion, "kind": kind, "spearman": spearman(values, study.true),
           "pearson": pearson(values, study.true),
           "overlap": overlap(values, study.true, top_fraction)}
    if loss_units:
      row["r2"] = r_squared(values, study.true)
    rows.append(row)

  for c, values in in_criteria_order(study.prediction):
    add(c, "prediction", values)
  for name, values in taylor_polynomials(study).items():
    add(name, "prediction", values, loss_units=True)
  for c, by_reduction in in_criteria_order(study.attribution):
    for reduction in sorted(by_reduction, reverse=True):  # "sum" after "paper"
      add(c, f"attribution_{reduction}", by_reduction[reduction])
  return rows


def in_criteria_order(by_criterion: Mapping[str, Any]) -> list[tuple[str, Any]]:
  """The items in the order of `prune.CRITERIA`, however the mapping was built or read."""
  return [(c, by_criterion[c]) for c in prune.CRITERIA if c in by_criterion]


# --- the CLI --------------------------------------------------------------------


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or reuses) each model, runs the study in each BatchNorm mode, writes results."""
  start = time.perf_counter()
  check_config(config)
  info = data.dataset_info(config.dataset, "train", data_dir=config.data_dir)
  cli.claim_workdir(workdir, config)
  if config.smoke:
    config = _smoke(config)
  count = config.held_out_batches * config.batch_size
  held_out = list(data.load(config.dataset, f"{config.held_out_split}[:{count}]",
                            batch_size=config.batch_size, train=False,
                            data_dir=config.data_dir))
  example = jnp.asarray(held_out[0]["image"][:1])
  criteria = cli.names(config.criteria)
  studies = []
  for model_name in cli.names(config.models):
    dense = _dense(model_name, config, info, workdir)
    accuracy = train.evaluate(dense, held_out)["accuracy"]
    traced = structure.trace(dense, example)
    groups = traced.groups
    removals = sample_removals(groups, config.max_removals, config.seed)
    for bn_mode in cli.names(config.bn_modes):
      path = os.path.join(workdir, model_name, f"{bn_mode}.json")
      if os.path.exists(path):
        with open(path) as f:
          study = Study.from_json(json.load(f))
      else:
        model = nnx.clone(dense)
        if bn_mode == "train":
          model.train()
        else:
          model.eval()
        usable = [c for c in criteria
                  if not (prune.CRITERIA[c].per_example and prune.uses_batch_statistics(model))]
        study = removal_study(model, traced, held_out, criteria=usable, removals=removals,
                              key=jax.random.key(config.seed), progress=config.progress)
        cli.write_json(path, study.to_json())
      plot(study, f"{model_name}, BatchNorm {bn_mode}",
           os.path.join(workdir, f"{model_name}_{bn_mode}.png"))
      studies.append({"model": model_name, "bn_mode": bn_mode, "held_out_accuracy": accuracy,
                      "channels": sum(g.size for g in groups), "removals": len(removals),
                      "loss": study.loss, "seconds": dict(study.seconds),
                      "rows": summarize(study, config.top_fraction)})
  results = {"config": config.to_dict(), "studies": studies,
             "wall_seconds": time.perf_counter() - start}
  cli.write_json(os.path.join(workdir, RESULTS_FILE), results)
  print(table(results))
  print(f"\nwrote {os.path.join(workdir, RESULTS_FILE)}")
  return results


def _dense(model_name: str, config, info, workdir: str) -> nnx.Module:
  """The model trained for `config.dense` steps in `workdir/<model>/dense` (resumed or reused)."""
  model = models.create(model_name, seed=config.seed, width=config.width,
                        in_channels=info.image_shape[-1], num_classes=info.num_classes)
  stream = data.load(config.dataset, "train", batch_size=config.dense.batch_size, train=True,
                     seed=config.seed, data_dir=config.data_dir)
  recipe = train.TrainConfig(steps=config.dense.steps, batch_size=config.dense.batch_size,
                             learning_rate=config.dense.learning_rate,
                             weight_decay=config.dense.weight_decay, schedule="cosine",
                             seed=config.seed)
  dense, _ = train.finetune(model, stream, recipe, workdir=os.path.join(workdir, model_name,
                                                                        "dense"),
                            progress=config.progress)
  return dense


def find_row(study: dict, criterion: str, kind: str) -> dict | None:
  """The row of `criterion` and `kind` in one study of results.json, or None."""
  return next((r for r in study["rows"] if (r["criterion"], r["kind"]) == (criterion, kind)),
              None)


def table(results: dict) -> str:
  """Spearman correlation with the true change: criteria x (model, BatchNorm mode)."""
  studies = results["studies"]
  heads = [f"{s['model'].split('_')[0]}/{s['bn_mode']}" for s in studies]
  lines = [f"{'criterion':16s} {'ranking':10s} " + " ".join(f"{h:>14s}" for h in heads)]
  keys = dict.fromkeys((r["criterion"], r["kind"]) for s in studies for r in s["rows"])
  for criterion, kind in keys:
    values = []
    for s in studies:
      row = find_row(s, criterion, kind)
      values.append(f"{row['spearman']:14.3f}" if row else f"{'-':>14s}")
    label = kind.replace("attribution_", "full/")
    lines.append(f"{criterion:16s} {label:10s} " + " ".join(values))
  return "\n".join(lines)


def plot(study: Study, title: str, path: str) -> None:
  """Predicted against true loss change, one panel per prediction."""
  series = {**dict(in_criteria_order(study.prediction)), **taylor_polynomials(study)}
  columns = 4
  rows = -(-len(series) // columns)
  fig = figure.Figure(figsize=(3 * columns, 2.7 * rows))
  axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
  for ax, (name, values) in zip(axes, series.items()):
    ax.scatter(study.true, values, s=6, alpha=0.6)
    if name.startswith("T"):
      low, high = min(study.true.min(), values.min()), max(study.true.max(), values.max())
      ax.plot([low, high], [low, high], color="gray", linewidth=0.8)
    ax.set_title(f"{name}  (ρ={spearman(values, study.true):.2f})", fontsize=9)
    ax.set_xlabel("true ΔL", fontsize=8)
    ax.tick_params(labelsize=7)
  for ax in axes[len(series):]:
    ax.axis("off")
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == "__main__":
  cli.main(get_config, run)
