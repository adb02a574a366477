"""Pure functions from Flax NNX modules, and the classification and next-token objectives.

`scores` works on `loss_fn(params, batch)` with `params` any pytree. For an NNX
model, `functional(model)` gives `apply_fn(params, *inputs)` and its parameters
as a plain nested dict; the model's other state (BatchNorm statistics) and its
mode (`model.train()` / `model.eval()`) are captured at that moment. In training
mode BatchNorm uses batch statistics and the running averages it would update
are discarded, so `apply_fn` stays pure.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

PyTree = Any


def flat_state(module: nnx.Module, *filters) -> dict[str, nnx.Variable]:
  """{"layers/0/attention/query/kernel": variable, ...}: `module`'s state (of `filters`, default
  all) by the slash-joined paths that pruning structures and plans name leaves with."""
  return {"/".join(map(str, path)): variable
          for path, variable in nnx.to_flat_state(nnx.state(module, *filters))}


def functional(model: nnx.Module) -> tuple[Callable[..., Any], dict]:
  """Splits an NNX module into a pure `apply_fn(params, *inputs)` and its params."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def apply_fn(params: PyTree, *inputs, **kwargs):
    return nnx.merge(graphdef, nnx.State(params), rest, copy=True)(*inputs, **kwargs)

  return apply_fn, nnx.to_pure_dict(params)


def split_pure(model: nnx.Module, *, training: bool) -> tuple[nnx.GraphDef, dict, dict]:
  """A copy of `model` in training or inference mode, split into graphdef, params, other state."""
  model = nnx.clone(model)
  model.train() if training else model.eval()
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(model_state)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


class Objective(NamedTuple):
  """The views of one loss that `scores` needs.

  loss(params, batch) == output_loss(model(params, batch), batch). When the
  model's outputs are logits with one softmax per position ([batch, ...,
  classes], a language model), `output_weights(batch) -> [batch, ...]` says how
  much each position counts in the loss (the Fisher diagonal needs it); None
  means one softmax per example, each weighing the same. Any loss alone,
  `Objective(loss_fn)`, serves every criterion that needs no split into model
  and output loss (see `criteria.Criterion.needs_model`).
  """

  loss: Callable[[PyTree, PyTree], jax.Array]
  model: Callable[[PyTree, PyTree], jax.Array] | None = None
  output_loss: Callable[[jax.Array, PyTree], jax.Array] | None = None
  output_weights: Callable[[PyTree], jax.Array] | None = None


# `objective(apply_fn)`: the loss of a model given its apply function, as an `Objective` or
# a bare `loss_fn(params, batch) -> scalar`; `classification` and `next_token` are two.
ObjectiveFn = Callable[[Callable[..., Any]], "Objective | Callable[[PyTree, PyTree], jax.Array]"]


def objective_of(objective: ObjectiveFn, apply_fn: Callable[..., Any]) -> Objective:
  """`objective(apply_fn)` as an `Objective` (a bare loss function becomes its `loss`)."""
  if not callable(objective):
    raise TypeError(f"objective={objective!r} is not a function objective(apply_fn) -> "
                    "Objective or loss_fn(params, batch), e.g. oba_jax.classification.")
  made = objective(apply_fn)
  if isinstance(made, Objective):
    return made
  if callable(made):
    return Objective(made)
  raise TypeError(f"objective(apply_fn) returned {type(made).__name__}; expected an "
                  "oba_jax.Objective or a loss_fn(params, batch) -> scalar.")


def classification(apply_fn: Callable[..., jax.Array], image_key: str = "image",
                   label_key: str = "label") -> Objective:
  """Softmax cross-entropy of `apply_fn(params, batch[image_key])` on `batch[label_key]`."""
  model = lambda params, batch: apply_fn(params, batch[image_key])
  output_loss = lambda logits, batch: softmax_cross_entropy(logits, batch[label_key])
  return Objective(lambda p, b: output_loss(model(p, b), b), model, output_loss)


def next_token(apply_fn: Callable[..., jax.Array], tokens_key: str = "tokens",
               mask_key: str = "mask") -> Objective:
  """Mean next-token cross-entropy of a language model over the unpadded targets.

  `apply_fn(params, batch[tokens_key])` returns logits [batch, length, vocab];
  `batch[mask_key]` is 1 on real tokens and 0 on padding. The logits at position
  t predict token t + 1, so `output_weights` is the target mask shifted by one
  (0 at the last position), which the Fisher diagonal needs.
  """

  def model(params, batch):
    return apply_fn(params, batch[tokens_key])

  def output_weights(batch):
    mask = batch[mask_key].astype(jnp.float32)
    return jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)

  def output_loss(logits, batch):
    logits = logits.astype(jnp.float32)
    targets = batch[tokens_key]
    weights = output_weights(batch)
    nll = optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1], targets[:, 1:])
    return (nll * weights[:, :-1]).sum() / jnp.maximum(weights.sum(), 1.0)

  return Objective(lambda p, b: output_loss(model(p, b), b), model, output_loss, output_weights)
