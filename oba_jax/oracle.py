"""Removal studies: how well does each criterion predict the loss change of a removal?

For a trained model and held-out batches, each given removal (one index of a
group of `oba_jax.structure.trace`: a channel, head or feature) is made alone:
every parameter entry it owns is zeroed (its conv's output slice, BatchNorm
scale and shift, its consumers' input slices), and the true change of the loss
L(θ ⊙ m) - L(θ) is measured on those batches. Each criterion of
`oba_jax.criteria.CRITERIA` gives two numbers per removal:

- its *prediction*: the criterion's scores with the delta restricted to the
  removal (δ = -θ on the zeroed entries, 0 elsewhere), summed. OBA (hessian)
  then gives ½δᵀHδ, and the Taylor terms sum to the polynomials
  T_k = Σ_{j≤k} (1/j!) dʲ/dtʲ L(θ + tδ) (reported as "T1" ... "T4"), so T2 is
  exact up to third-order terms;
- its *attribution*: the group score the pruning pipeline ranks, from scores
  with the full-removal delta (every prunable entry, the paper's setting) and
  the "paper" reduction (also "sum", each index's signed share).

Everything is computed on the same batches as the true change, so a study
measures the criteria, not sampling noise. `summarize` reports, per ranking, the
Spearman and Pearson correlation with the true change, the overlap of the
least harmful removals, and R² of the Taylor polynomials.

This module computes and measures; the CLI that trains models, saves studies
and plots them is `oba_jax.experiments.oracle`; this module must not import it (or train).
"""

import dataclasses
import functools
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from oba_jax import masks, structure
from oba_jax.criteria import CRITERIA, importance
from oba_jax.estimate import data_mesh, shard_batch, tree_add
from oba_jax.functional import classification, functional

PyTree = Any
TAYLOR_TERMS = ("taylor", "oba", "taylor3", "taylor4")  # the k-th Taylor term, k = 1..4


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
    criteria: names in `CRITERIA`.
    removals: (group name, index) pairs, e.g. from `sample_removals`.
    key: PRNG key of the random criteria.
    mesh: the device mesh the batches are split over (default: all devices).
    progress: show progress bars.
  """
  for name in criteria:
    if name not in CRITERIA:
      raise ValueError(f"unknown criterion {name!r}; accepted: {sorted(CRITERIA)}.")
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
  entrywise = [c for c in criteria if CRITERIA[c].entrywise]
  coupled = [c for c in criteria if not CRITERIA[c].entrywise]
  full_delta = jax.tree.map(jnp.negative, params)  # every entry: also BatchNorm scales
  full_scores = {
      c: _mean_over(sharded, mesh, jax.jit(functools.partial(_entrywise_scores, objective, c)),
                    params, full_delta, key) for c in entrywise}
  loss = float(_mean_over(sharded, mesh, jax.jit(objective.loss), params))
  true, prediction = [], {c: [] for c in criteria}
  per_removal = jax.jit(functools.partial(_removal_terms, objective, tuple(coupled)))
  for group, index in _bar(removals, progress, "removals"):
    mask = masks.from_removed(traced, {group: [index]}, params)
    removed_loss, terms = _mean_over(sharded, mesh, per_removal, params, mask, key)
    true.append(float(removed_loss) - loss)
    for c in entrywise:
      prediction[c].append(float(_masked_sum(full_scores[c], mask)))
    for c, value in zip(coupled, np.asarray(terms)):
      prediction[c].append(float(value))
  seconds["true_and_prediction"] = time.perf_counter() - start

  start = time.perf_counter()
  attribution = {}
  for c in criteria:
    scores = importance(c, model, batches, num_batches=None, key=key, mesh=mesh)
    attribution[c] = {
        reduction: np.array([reduced[g][i] for g, i in removals])
        for reduction in ("paper", "sum")
        for reduced in [structure.group_scores(traced, scores, reduction=reduction)]}
  seconds["attribution"] = time.perf_counter() - start
  return Study(removals=tuple((g, int(i)) for g, i in removals), true=np.array(true),
               prediction={c: np.array(v) for c, v in prediction.items()},
               attribution=attribution, loss=loss, seconds=seconds)


def _entrywise_scores(objective, criterion, params, batch, delta, key):
  return CRITERIA[criterion].score(objective, params, batch, key, delta=delta)


def _removal_terms(objective, coupled, params, batch, mask, key):
  """The loss with the removal zeroed, and each coupled criterion's restricted prediction."""
  delta = jax.tree.map(lambda p, keep: jnp.where(keep, jnp.zeros_like(p), -p), params, mask)
  removed = jax.tree.map(jnp.add, params, delta)
  terms = [_tree_sum(CRITERIA[c].score(objective, params, batch, key, delta=delta))
           for c in coupled]
  return objective.loss(removed, batch), jnp.stack(terms) if terms else jnp.zeros((0,))


def _mean_over(batches, mesh, fn, params, *args):
  """The mean of `fn(params, batch, *args)` over the batches (the key folded per batch).

  Not `scores.accumulate`: that jits a new step on every call, and this runs once
  per removal with the same jitted `fn`. Like it, it sets the mesh (exact
  per-example criteria) and keeps the devices in step with the host: each batch
  is waited for, as the sums here are small (`estimate.pace` says why).
  """
  total = None
  for i, batch in enumerate(batches):
    call_args = [jax.random.fold_in(a, i) if _is_key(a) else a for a in args]
    with jax.set_mesh(mesh):
      value = fn(params, batch, *call_args)
      total = value if total is None else tree_add(total, value)
    jax.block_until_ready(total)
  return _tree_scale(total, 1 / len(batches))


@jax.jit
def _tree_scale(tree, factor):
  return jax.tree.map(lambda x: x * factor, tree)


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
  """The items in the order of `CRITERIA`, however the mapping was built or read."""
  return [(c, by_criterion[c]) for c in CRITERIA if c in by_criterion]
