"""Pruning criteria by name: what each scores, and their mean over batches for an NNX model.

`CRITERIA` maps a name to a `Criterion`: the scoring function of a classifier's
parameters and the flags that say how to use it (whether it reads data, whether
its entries are independent, whether it runs one example at a time). Every
pruning pipeline, CLI and study picks criteria here by name; `importance` is
their common entry point on an NNX model. The scores themselves are
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
from oba_jax.functional import classification, functional
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
  """

  score: Callable[..., PyTree]
  uses_data: bool = True
  entrywise: bool = False
  per_example: bool = False
  official_schedule: str = "linear"


def _magnitude(objective, params, batch, key, delta=None):
  del objective, batch, key  # scores the weights alone
  return scores.magnitude(params, delta=delta)


def _random(objective, params, batch, key, delta=None):
  del objective, batch  # scores at random, on the entries that `delta` moves
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
        magnitude=Criterion(_magnitude, uses_data=False, entrywise=True),
        random=Criterion(_random, uses_data=False, entrywise=True),
        taylor=Criterion(functools.partial(_taylor, order=1), entrywise=True),
        obd_fisher=Criterion(functools.partial(_obd, diag="fisher"), entrywise=True,
                             per_example=True),
        obd_hutchinson=Criterion(functools.partial(_obd, diag="hutchinson"), entrywise=True),
        oba=Criterion(functools.partial(_oba, curvature="hessian"), **_OBA_FAMILY),
        oba_residual=Criterion(functools.partial(_oba, curvature="residual"), **_OBA_FAMILY),
        oba_ggn=Criterion(functools.partial(_oba, curvature="ggn"), **_OBA_FAMILY),
        oba_bilinear=Criterion(functools.partial(_oba, curvature="bilinear"), **_OBA_FAMILY),
        taylor3=Criterion(functools.partial(_taylor, order=3), **_OBA_FAMILY),
        taylor4=Criterion(functools.partial(_taylor, order=4), **_OBA_FAMILY),
        oba_t12=Criterion(_oba_t12, **_OBA_FAMILY),
        activation_norm=Criterion(_activation_norm, entrywise=True),
        kron_obd=Criterion(functools.partial(_kron, saliency=scores.kron_obd), entrywise=True,
                           per_example=True),
        kron_obs=Criterion(functools.partial(_kron, saliency=scores.kron_obs), per_example=True),
    )
)


def importance(
    criterion: str,
    model: nnx.Module,
    batches: Iterable[PyTree],
    *,
    num_batches: int | None,
    key: jax.Array,
    mesh: Mesh | None = None,
    progress: bool = False,
    batchnorm: str | None = None,
) -> dict:
  """The mean score of `criterion` over `num_batches` batches, per parameter.

  The batches are `{"image", "label"}` dicts and the loss is the softmax
  cross-entropy (`oba_jax.classification`), averaged data-parallel over `mesh`
  by `scores.accumulate`. "magnitude" and "random" read no batches.

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
    model: the NNX model to score.
    batches: an iterable of batches; an iterator is consumed as it is read.
    num_batches: how many batches to average (None: all of them).
    key: PRNG key for the random criteria ("random", "obd_*", "kron_*").
    mesh: the device mesh of `scores.accumulate` (default: all devices).
    progress: show a progress bar.
    batchnorm: "train" (batch statistics, the official pipeline's) or "eval"
      (running statistics) to score a copy of the model in that mode; None
      scores it in its current mode.

  Returns:
    A nested dict like `oba_jax.functional(model)[1]`, the model's parameters.
  """
  check_choice("criterion", criterion, CRITERIA)
  if num_batches is not None:
    check_count(num_batches, "num_batches")
  scorer = CRITERIA[criterion]
  if batchnorm is not None:
    check_choice("batchnorm", batchnorm, BATCHNORM_MODES)
    model = nnx.clone(model)
    model.train() if batchnorm == "train" else model.eval()
  if scorer.per_example and uses_batch_statistics(model):
    raise ValueError(
        f"criterion {criterion!r} runs the model one example at a time, and this model has "
        "BatchNorm in training mode (batch statistics), which would normalise each example by "
        "itself. Call model.eval() before scoring with it.")
  if not scorer.uses_data:
    apply_fn, params = functional(model)
    return scorer.score(classification(apply_fn), params, None, key)
  graphdef, params, state = nnx.split(model, nnx.Param, ...)
  return scores.accumulate(
      ModelScore(criterion, graphdef),
      nnx.to_pure_dict(params),
      batches,
      key=key,
      num_batches=num_batches,
      mesh=mesh,
      progress=progress,
      constants=nnx.to_pure_dict(state),
  )


@dataclasses.dataclass(frozen=True)
class ModelScore:
  """`criterion`'s score of an NNX classifier of structure `graphdef`, as `accumulate` calls it.

  Hashable, with the model's other state (BatchNorm statistics) an argument
  rather than a captured value, so that one compiled step serves every model of
  these shapes: each step of a pruning schedule, masked or not, compiles nothing.
  """

  criterion: str
  graphdef: nnx.GraphDef

  def __call__(self, params: PyTree, batch: PyTree, key: jax.Array | None = None, *,
               constants: PyTree) -> PyTree:
    def apply_fn(p, x):
      return nnx.merge(self.graphdef, nnx.State(p), nnx.State(constants), copy=True)(x)

    return CRITERIA[self.criterion].score(classification(apply_fn), params, batch, key)


def uses_batch_statistics(model: nnx.Module) -> bool:
  """Whether a BatchNorm of `model` normalises with batch statistics (training mode)."""
  return any(isinstance(m, nnx.BatchNorm) and not m.use_running_average
             for _, m in nnx.iter_modules(model))
