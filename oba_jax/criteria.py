"""Pruning criteria by name: what each scores, and their mean over batches for any model.

`CRITERIA` maps a name to a `Criterion`: the scoring function of a model's
parameters under an objective and the flags that say how to use it (whether it
reads data, whether its entries are independent, whether it runs one example at
a time). Every pruning pipeline, CLI and study picks criteria here by name;
`importance` is their common entry point, on an NNX model or a function
`apply_fn(params, *inputs)`, with any objective. The scores themselves are
`oba_jax.scores`; this module only names and adapts them. It must not import
the pipelines (`prune`) or anything above them.
"""

import dataclasses
import functools
import types
from collections.abc import Callable, Iterable
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from oba_jax import scores
from oba_jax.activation_norm import activation_norm
from oba_jax.delta import Prunable, Removal, prunable_mask, weights_and_scales
from oba_jax.functional import Objective, ObjectiveFn, classification, objective_of
from oba_jax.validate import check_choice, check_count

PyTree = Any
BATCHNORM_MODES = ("train", "eval")  # batch statistics, running statistics


@dataclasses.dataclass(frozen=True)
class Criterion:
  """How a named criterion scores the parameters of a classifier.

  Attributes:
    score: `score(objective, params, batch, key, delta=None) -> pytree like
      params`; `delta` is the removal it predicts (default: every prunable entry,
      `oba_jax.delta.removal_delta`).
    uses_data: False when the score ignores the batch (magnitude, random): it
      is computed once, reading no batches.
    entrywise: True when entry i of the score depends on δᵢ alone (magnitude,
      first-order Taylor, OBD's diagonal), so the prediction for removing any
      subset is the sum of its entries under the full-removal delta. Scores with
      a full curvature (OBA) or higher Taylor orders couple the entries.
    per_example: True when the score needs each example's own gradients (the
      Fisher diagonal runs the model one example at a time, the K-FAC factors
      read them from one backward pass of the batch), which needs inference-mode
      normalisation: with batch statistics the examples would interact.
    official_schedule: the schedule the official code pairs with it
      (`oba_jax.procedure`): "exponential" for OBA and FastOBA, "linear" for
      every baseline (method notes §1.5, pitfall P12).
    official_prunable: what the official code scores the criterion on, when that is not
      the default kernels and biases: magnitude averages the L1 norms of the convs' and
      dense layers' slices with BatchNorm's |γ| and leaves biases out
      (`delta.weights_and_scales`). The official step rule uses it unless the caller
      passes `prunable=`.
    needs_model: True when the score needs the objective's split into model
      outputs and output loss (GGN, Fisher, K-FAC), not the loss alone.
  """

  score: Callable[..., PyTree]
  uses_data: bool = True
  entrywise: bool = False
  per_example: bool = False
  official_schedule: str = "linear"
  official_prunable: Callable[[str, Any], bool] | None = None
  needs_model: bool = False


def _magnitude(objective, params, batch, key, delta=None):
  del objective, batch, key  # scores the weights alone
  return scores.magnitude(params, delta=delta)


def _random(objective, params, batch, key, delta=None):
  del objective, batch  # scores at random, on the entries that `delta` moves
  if isinstance(delta, Removal):
    moved = delta.mask
  else:
    moved = None if delta is None else jax.tree.map(lambda d: d != 0, delta)
  return scores.random(key, params, prunable=moved)


def _taylor(objective, params, batch, key, delta=None, *, order):
  del key  # deterministic
  return scores.taylor(objective.loss, params, batch, order=order, delta=delta)


def _obd(objective, params, batch, key, delta=None, *, diag):
  return scores.obd(objective.loss, params, batch, key=key, diag=diag, delta=delta,
                    model_fn=objective.model, output_weights=objective.output_weights)


def _oba(objective, params, batch, key, delta=None, *, curvature):
  del key  # deterministic
  return scores.oba(
      objective.loss,
      params,
      batch,
      delta=delta,
      curvature=curvature,
      model_fn=objective.model,
      output_loss_fn=objective.output_loss,
  )


def _activation_norm(objective, params, batch, key, delta=None):
  del key  # deterministic
  return activation_norm(objective.loss, params, batch, delta=delta)


def _kron(objective, params, batch, key, delta=None, *, saliency):
  return saliency(objective.loss, params, batch, key=key, model_fn=objective.model, delta=delta)


def _oba_t12(objective, params, batch, key, delta=None):
  del key  # deterministic
  return scores.oba(objective.loss, params, batch, delta=delta, curvature="hessian",
                    first_order=True)


_OBA_FAMILY = dict(official_schedule="exponential")  # OBA and FastOBA (Taylor orders >= 2)

# Criteria by name. "taylor" is the first-order term gᵢδᵢ (the paper's Taylor
# baseline, |θ·g| per channel after the reduction), "oba" the exact-Hessian OBA
# score, "oba_bilinear" the official OBA code's quantity in any BatchNorm mode
# (product terms only), "oba_residual" (H - GGN) the same on ReLU networks with
# fixed-statistics normalisation, "taylor3" and "taylor4" the third and fourth
# Taylor terms; `oba_jax.scores` defines each. "oba_t12" is the first- plus second-order Taylor
# prediction gᵢδᵢ + δᵢ(Hδ)ᵢ/2 (T1+T2), "activation_norm" the Wanda/FLAP-style |δᵢ|·‖input‖
# (`oba_jax.activation_norm`). "kron_obd" and "kron_obs" are the K-FAC baselines (Kron-OBD,
# Kron-OBS per output unit; `oba_jax.kfac`): their factors are expectations over single examples
# (one backward pass of the batch), so like "obd_fisher" they are `per_example`.
CRITERIA = types.MappingProxyType(
    dict(
        magnitude=Criterion(_magnitude, uses_data=False, entrywise=True,
                            official_prunable=weights_and_scales),
        random=Criterion(_random, uses_data=False, entrywise=True),
        taylor=Criterion(functools.partial(_taylor, order=1), entrywise=True),
        obd_fisher=Criterion(functools.partial(_obd, diag="fisher"), entrywise=True,
                             per_example=True, needs_model=True),
        obd_hutchinson=Criterion(functools.partial(_obd, diag="hutchinson"), entrywise=True),
        oba=Criterion(functools.partial(_oba, curvature="hessian"), **_OBA_FAMILY),
        oba_residual=Criterion(functools.partial(_oba, curvature="residual"), needs_model=True,
                               **_OBA_FAMILY),
        oba_ggn=Criterion(functools.partial(_oba, curvature="ggn"), needs_model=True,
                          **_OBA_FAMILY),
        oba_bilinear=Criterion(functools.partial(_oba, curvature="bilinear"), **_OBA_FAMILY),
        taylor3=Criterion(functools.partial(_taylor, order=3), **_OBA_FAMILY),
        taylor4=Criterion(functools.partial(_taylor, order=4), **_OBA_FAMILY),
        oba_t12=Criterion(_oba_t12, **_OBA_FAMILY),
        activation_norm=Criterion(_activation_norm, entrywise=True),
        kron_obd=Criterion(functools.partial(_kron, saliency=scores.kron_obd), entrywise=True,
                           per_example=True, needs_model=True),
        kron_obs=Criterion(functools.partial(_kron, saliency=scores.kron_obs), per_example=True,
                           needs_model=True),
    )
)


def importance(
    criterion: str,
    model: nnx.Module | Callable[..., Any],
    batches: Iterable[PyTree],
    *,
    num_batches: int | None,
    key: jax.Array,
    mesh: Mesh | None = None,
    progress: bool = False,
    batchnorm: str | None = None,
    params: PyTree | None = None,
    objective: ObjectiveFn = classification,
    prunable: Prunable | None = None,
) -> PyTree:
  """The mean score of `criterion` over `num_batches` batches, per parameter.

  The loss is `objective(apply_fn)` on each batch: by default the softmax
  cross-entropy of `{"image", "label"}` batches (`oba_jax.classification`); any
  other (`oba_jax.next_token`, a contrastive loss, `lambda apply_fn: loss_fn`)
  works the same. Averaged data-parallel over `mesh` by `scores.accumulate`.
  "magnitude" and "random" read no batches.

  BatchNorm is used in the model's current mode, and its running statistics are
  never updated. The official pipeline scores in training mode (`model.train()`:
  batch statistics) with the "oba_bilinear" quantity; there BatchNorm is scale
  invariant, so the sum of a conv's own scores over an output channel is about
  zero and the channel's importance comes from its consumers' input channels
  (method notes §2.8). "oba_residual" equals "oba_bilinear" only with
  inference-mode BatchNorm (`model.eval()`) on ReLU networks; in training mode
  its conv entries vanish (README, "BatchNorm mode").

  Args:
    criterion: a name in `CRITERIA`.
    model: the NNX model to score, or a function `apply_fn(params, *inputs)`
      with `params=`.
    batches: an iterable of batches; an iterator is consumed as it is read.
    num_batches: how many batches to average (None: all of them).
    key: PRNG key for the random criteria ("random", "obd_*", "kron_*").
    mesh: the device mesh of `scores.accumulate` (default: all devices).
    progress: show a progress bar.
    batchnorm: "train" (batch statistics, the official pipeline's) or "eval"
      (running statistics) to score a copy of an NNX model in that mode; None
      scores it in its current mode.
    params: the parameters, when `model` is a function.
    objective: `objective(apply_fn) -> Objective or loss_fn(params, batch)`.
    prunable: which entries the removal moves (`oba_jax.delta`): None (the
      kernel/bias naming rule), a predicate `(path, leaf) -> bool` or a mask tree.

  Returns:
    A pytree like the parameters (`oba_jax.functional(model)[1]` for NNX).
  """
  check_choice("criterion", criterion, CRITERIA)
  if num_batches is not None:
    check_count(num_batches, "num_batches")
  scorer = CRITERIA[criterion]
  if isinstance(model, nnx.Module):
    if params is not None:
      raise ValueError("params= goes with a function apply_fn(params, *inputs); an NNX model "
                       "holds its own parameters.")
    if batchnorm is not None:
      check_choice("batchnorm", batchnorm, BATCHNORM_MODES)
      model = nnx.clone(model)
      model.train() if batchnorm == "train" else model.eval()
    if scorer.per_example and uses_batch_statistics(model):
      raise ValueError(
          f"criterion {criterion!r} runs the model one example at a time, and this model has "
          "BatchNorm in training mode (batch statistics), which would normalise each example "
          "by itself. Call model.eval() before scoring with it.")
    graphdef, param_state, state = nnx.split(model, nnx.Param, ...)
    score_fn = ModelScore(criterion, graphdef, objective, prunable)
    params = nnx.to_pure_dict(param_state)
    constants = nnx.to_pure_dict(state)
    apply_fn = score_fn.apply_fn(constants)
  elif callable(model) and params is not None:
    if batchnorm is not None:
      raise ValueError(f"batchnorm={batchnorm!r} needs an NNX model; a function's normalisation "
                       "is its own.")
    score_fn, constants = FunctionScore(criterion, model, objective, prunable), None
    apply_fn = model
  else:
    raise TypeError("importance needs an nnx.Module, or a function apply_fn(params, *inputs) "
                    f"with params=; got {type(model).__name__} and params="
                    f"{type(params).__name__}.")
  views = checked_objective(criterion, objective, apply_fn)
  if not scorer.uses_data:
    return scorer.score(views, params, None, key, delta=_delta(params, prunable))
  return scores.accumulate(score_fn, params, batches, key=key, num_batches=num_batches,
                           mesh=mesh, progress=progress, constants=constants)


def checked_objective(criterion: str, objective: ObjectiveFn,
                      apply_fn: Callable[..., Any]) -> Objective:
  """`objective(apply_fn)` as an `Objective`, or a ValueError if `criterion` cannot use it."""
  views = objective_of(objective, apply_fn)
  if CRITERIA[criterion].needs_model and (views.model is None or views.output_loss is None):
    raise ValueError(
        f"criterion {criterion!r} needs the objective's model and output-loss views; "
        "objective(apply_fn) gave a loss alone. Return an oba_jax.Objective(loss, model, "
        "output_loss), or pick a criterion that needs the loss only, e.g. 'oba', 'taylor'.")
  return views


@dataclasses.dataclass(frozen=True)
class ModelScore:
  """`criterion`'s score of an NNX model of structure `graphdef`, as `accumulate` calls it.

  Hashable, with the model's other state (BatchNorm statistics) an argument
  rather than a captured value, so that one compiled step serves every model of
  these shapes: each step of a pruning schedule, masked or not, compiles nothing.
  """

  criterion: str
  graphdef: nnx.GraphDef
  objective: ObjectiveFn = classification
  prunable: Prunable | None = None

  def apply_fn(self, constants: PyTree) -> Callable[..., Any]:
    """The model's `apply_fn(params, *inputs)` with its other state `constants`."""
    return lambda p, *x: nnx.merge(self.graphdef, nnx.State(p), nnx.State(constants),
                                   copy=True)(*x)

  def __call__(self, params: PyTree, batch: PyTree, key: jax.Array | None = None, *,
               constants: PyTree) -> PyTree:
    objective = objective_of(self.objective, self.apply_fn(constants))
    return CRITERIA[self.criterion].score(objective, params, batch, key,
                                          delta=_delta(params, self.prunable))


@dataclasses.dataclass(frozen=True)
class FunctionScore:
  """`criterion`'s score of `apply_fn(params, *inputs)`, hashable like `ModelScore`."""

  criterion: str
  apply_fn: Callable[..., Any]
  objective: ObjectiveFn = classification
  prunable: Prunable | None = None

  def __call__(self, params: PyTree, batch: PyTree, key: jax.Array | None = None) -> PyTree:
    objective = objective_of(self.objective, self.apply_fn)
    return CRITERIA[self.criterion].score(objective, params, batch, key,
                                          delta=_delta(params, self.prunable))


def _delta(params: PyTree, prunable: Prunable | None) -> Removal | None:
  """The removal of the `prunable` entries, kept symbolic; None leaves the criteria's default."""
  return None if prunable is None else Removal(prunable_mask(params, prunable))


def uses_batch_statistics(model: nnx.Module) -> bool:
  """Whether a BatchNorm of `model` normalises with batch statistics (training mode)."""
  return any(isinstance(m, nnx.BatchNorm) and not m.use_running_average
             for _, m in nnx.iter_modules(model))
