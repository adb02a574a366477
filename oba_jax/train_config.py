"""What fine-tuning optimises with: `TrainConfig`, its checks, the schedule and the optimizer.

A frozen dataclass checked when it is built (an ml_collections ConfigDict
converts with `TrainConfig(**config_dict)`); `learning_rate_schedule` and
`make_optimizer` turn it into optax objects. The loop that uses them is
`oba_jax.train` (which re-exports these names). This module imports nothing from
oba_jax but `masks` and `validate`.
"""

import collections
import dataclasses
from typing import Any

import jax.numpy as jnp
import optax

from oba_jax import masks
from oba_jax.validate import check_choice

PyTree = Any
SCHEDULES = ("multistep", "cosine")
OPTIMIZERS = ("sgd", "adamw")


def _bookkeeping(default):
  """A config field that does not change the result, so a resumed run may change it."""
  return dataclasses.field(default=default, metadata={"bookkeeping": True})


def _later(default):
  """A field added after runs were checkpointed: left out of `identity` at its default, so those
  runs (which had its default behaviour) still resume."""
  return dataclasses.field(default=default, metadata={"later": True})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How to fine-tune: the optimizer, its schedule, the run's length and its bookkeeping.

  The defaults are the paper code's fine-tuning recipe: SGD with learning rate
  1e-3, momentum 0.9, weight decay 1e-4 on all parameters, the learning rate
  times 0.1 at 50% and 75% of the run, batches of 64. Language-model recovery
  uses `optimizer="adamw"` with a warmup and the cosine schedule.

  Attributes:
    steps: the run's length in steps; or give `epochs` and `steps_per_epoch`.
    epochs: the run's length in epochs of `steps_per_epoch` steps.
    steps_per_epoch: batches per epoch (with `epochs` only).
    batch_size: examples per step, over all processes.
    learning_rate: the initial learning rate (the peak one after a warmup).
    optimizer: "sgd" (torch.optim.SGD with momentum) or "adamw" (optax.adamw).
    momentum: SGD momentum, in [0, 1) (with "sgd" only).
    weight_decay: with "sgd", the L2 coefficient added to every gradient, as
      torch.optim.SGD does; with "adamw", the decoupled decay (times the learning rate).
    betas: AdamW's (b1, b2), each in [0, 1).
    warmup_steps: steps over which the learning rate rises linearly from
      learning_rate / warmup_steps to the schedule's value (0: none).
    schedule: "multistep" (PyTorch's MultiStepLR) or "cosine" (decay to 0 at the end).
    milestones: with "multistep", where the learning rate is multiplied by
      `gamma`, as fractions of the run in (0, 1), increasing. PyTorch's epoch
      milestones m of an E-epoch run are m / E here.
    gamma: the multistep factor, in (0, 1].
    seed: seeds the model's RNG streams (dropout) at the start of the run.
    log_every: steps between records of the training loss, accuracy and learning rate.
    eval_every: steps between evaluations (None: only at the end).
    eval_at: more steps to evaluate at, e.g. (100, 300, 1000): a curve of
      accuracy against the fine-tuning budget in one run.
    checkpoint_every: steps between checkpoints (one is also written at the end).
  """

  steps: int | None = None
  epochs: int | None = None
  steps_per_epoch: int | None = None
  batch_size: int = 64
  learning_rate: float = 1e-3
  optimizer: str = _later("sgd")
  momentum: float = 0.9
  weight_decay: float = 1e-4
  betas: tuple[float, float] = _later((0.9, 0.999))
  warmup_steps: int = _later(0)
  schedule: str = "multistep"
  milestones: tuple[float, ...] = (0.5, 0.75)
  gamma: float = 0.1
  seed: int = 0
  log_every: int = _bookkeeping(50)
  eval_every: int | None = _bookkeeping(None)
  eval_at: tuple[int, ...] = _bookkeeping(())
  checkpoint_every: int = _bookkeeping(500)

  def __post_init__(self):
    object.__setattr__(self, "milestones", tuple(self.milestones))
    object.__setattr__(self, "eval_at", tuple(self.eval_at))
    object.__setattr__(self, "betas", tuple(self.betas))
    _check_config(self)

  @property
  def total_steps(self) -> int:
    return self.steps if self.steps is not None else self.epochs * self.steps_per_epoch

  def identity(self) -> dict[str, Any]:
    """The fields that determine the trained parameters (all but the bookkeeping; fields
    added later only when they differ from their default)."""
    return {
        f.name: getattr(self, f.name)
        for f in dataclasses.fields(self)
        if not f.metadata.get("bookkeeping")
        and not (f.metadata.get("later") and getattr(self, f.name) == f.default)
    }


def _check_config(config: TrainConfig) -> None:
  """Raises ValueError naming the first field out of its accepted range."""
  if (config.steps is None) == (config.epochs is None):
    raise ValueError(
        f"give exactly one of steps and epochs, got steps={config.steps}, "
        f"epochs={config.epochs}."
    )
  if (config.epochs is None) != (config.steps_per_epoch is None):
    raise ValueError(
        f"steps_per_epoch={config.steps_per_epoch} goes with epochs (and only "
        f"with it), got epochs={config.epochs}."
    )
  for name in (
      "steps",
      "epochs",
      "steps_per_epoch",
      "batch_size",
      "log_every",
      "eval_every",
      "checkpoint_every",
  ):
    value = getattr(config, name)
    if value is not None and (not isinstance(value, int) or value < 1):
      raise ValueError(f"{name}={value!r} must be a positive integer.")
  if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in config.eval_at):
    raise ValueError(f"eval_at={config.eval_at!r} must hold positive integer steps.")
  if not config.learning_rate > 0:
    raise ValueError(f"learning_rate={config.learning_rate} must be > 0.")
  if not 0 <= config.momentum < 1:
    raise ValueError(f"momentum={config.momentum} must be in [0, 1).")
  if not config.weight_decay >= 0:
    raise ValueError(f"weight_decay={config.weight_decay} must be >= 0.")
  check_choice("schedule", config.schedule, SCHEDULES)
  check_choice("optimizer", config.optimizer, OPTIMIZERS)
  if len(config.betas) != 2 or not all(0 <= b < 1 for b in config.betas):
    raise ValueError(f"betas={config.betas!r} must be two numbers in [0, 1).")
  if isinstance(config.warmup_steps, bool) or not isinstance(config.warmup_steps, int) or (
      config.warmup_steps < 0):
    raise ValueError(f"warmup_steps={config.warmup_steps!r} must be an integer >= 0.")
  fractions = config.milestones
  if not all(0 < f < 1 for f in fractions) or any(a >= b for a, b in zip(fractions, fractions[1:])):
    raise ValueError(f"milestones={fractions} must be increasing fractions of the run, in (0, 1).")
  if not 0 < config.gamma <= 1:
    raise ValueError(f"gamma={config.gamma} must be in (0, 1].")
  if not isinstance(config.seed, int) or not 0 <= config.seed < 2**32:
    raise ValueError(f"seed={config.seed!r} must be an integer in [0, 2**32).")


def learning_rate_schedule(config: TrainConfig, total_steps: int) -> optax.Schedule:
  """The learning rate at each step (counted from 0) of a `total_steps` run."""
  if total_steps < 1:
    raise ValueError(f"total_steps={total_steps} must be a positive integer.")
  if config.schedule == "cosine":
    schedule = optax.cosine_decay_schedule(config.learning_rate, total_steps)
  else:
    scales = collections.defaultdict(lambda: 1.0)  # two milestones may round to one step
    for fraction in config.milestones:
      scales[round(fraction * total_steps)] *= config.gamma
    schedule = optax.piecewise_constant_schedule(config.learning_rate, dict(scales))
  if not config.warmup_steps:
    return schedule
  warmup = config.warmup_steps
  return lambda step: schedule(step) * jnp.minimum(1.0, (step + 1) / warmup)


def make_optimizer(
    config: TrainConfig, total_steps: int, mask: PyTree | None = None
) -> optax.GradientTransformation:
  """SGD as torch.optim.SGD, or AdamW; masked entries never move.

  For SGD, adding `weight_decay * params` to the gradient before the momentum
  gives PyTorch's update: b = momentum * b + g + weight_decay * p; p -= lr * b.
  AdamW is `optax.adamw` (decoupled decay). With a mask (True = kept), the
  optimizer is wrapped in `masks.keep_pruned`.
  """
  schedule = learning_rate_schedule(config, total_steps)
  if config.optimizer == "adamw":
    b1, b2 = config.betas
    tx = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=config.weight_decay)
  else:
    tx = optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(schedule, momentum=config.momentum),
    )
  return tx if mask is None else masks.keep_pruned(tx, mask)
