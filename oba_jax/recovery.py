"""Recovery fine-tuning of a pruned language model: full or LoRA, optionally distilled.

  config = recovery.RecoveryConfig(mode="lora", steps=200, learning_rate=2e-4, rank=8)
  recovered, history = recovery.recover(compacted, batches, config, workdir=..., teacher=dense)

The pruned (compacted) model is trained on calibration text with the next-token loss through
`train.finetune` (one jitted step per batch, progress bar, exact resumption from `workdir`),
with AdamW, a linear warmup and a cosine or multistep schedule:

- mode "full" trains every parameter of the compacted model (its shapes are kept);
- mode "lora" trains low-rank adapters on its 2-D kernels (`oba_jax.lora`; every 2-D parameter
  but the embedding by default) and merges them back, so the result is a plain module of the
  compacted model's structure, ready for evaluation and export.

With `distill_weight` w > 0 and a `teacher` (the dense model), the loss is
(1 - w) * next-token NLL + w * T^2 * KL(teacher || student) of the next-token distributions at
temperature T, over the unpadded positions (Minitron-style logit distillation). The teacher's
logits are computed batch by batch as the data iterator yields them (`Batches`), so they are
never all in memory.

The batches are `{"tokens", "mask"}` (e.g. `oba_jax.data.text.pack`); `Batches` cycles through
them, reshuffled each pass by the config's seed, with a position that `finetune` checkpoints.
"""

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from oba_jax import lora, train
from oba_jax.functional import functional, next_token
from oba_jax.train_config import SCHEDULES, TrainConfig
from oba_jax.validate import check_choice

PyTree = Any
MODES = ("full", "lora")


@dataclasses.dataclass(frozen=True)
class RecoveryConfig:
  """How to recover a pruned language model.

  Attributes:
    mode: "full" (every parameter) or "lora" (adapters on the 2-D kernels, merged back).
    steps: optimizer steps.
    batch_size: sequences per step.
    learning_rate: the peak learning rate (AdamW).
    schedule: "cosine" (to 0 at the end) or "multistep" (`TrainConfig`'s milestones).
    warmup_steps: linear warmup at the start.
    weight_decay: AdamW's decoupled weight decay.
    rank: the adapters' rank (mode "lora").
    alpha: the adapters' scale is alpha / rank (mode "lora").
    distill_weight: weight w in [0, 1] of the distillation term (needs a teacher).
    temperature: the distillation temperature T > 0.
    seed: orders the batches (and seeds the adapters' initialisation).
    log_every: steps between records of the training loss.
    checkpoint_every: steps between checkpoints (and one at the end).
  """

  mode: str = "lora"
  steps: int = 50
  batch_size: int = 8
  learning_rate: float = 2e-4
  schedule: str = "cosine"
  warmup_steps: int = 5
  weight_decay: float = 0.0
  rank: int = 8
  alpha: float = 16.0
  distill_weight: float = 0.0
  temperature: float = 2.0
  seed: int = 0
  log_every: int = 10
  checkpoint_every: int = 50

  def __post_init__(self):
    check_choice("mode", self.mode, MODES)
    check_choice("schedule", self.schedule, SCHEDULES)
    for name in ("steps", "batch_size", "rank", "log_every", "checkpoint_every"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"recovery {name}={value!r} must be a positive integer.")
    if not 0 <= self.distill_weight <= 1:
      raise ValueError(f"distill_weight={self.distill_weight!r} must be in [0, 1].")
    if not self.temperature > 0:
      raise ValueError(f"temperature={self.temperature!r} must be > 0.")
    if not self.alpha > 0:
      raise ValueError(f"alpha={self.alpha!r} must be > 0.")
    self.train_config()  # the optimizer's fields are checked there

  def train_config(self) -> TrainConfig:
    """The `TrainConfig` of the run: AdamW with this config's schedule and length."""
    return TrainConfig(steps=self.steps, batch_size=self.batch_size, optimizer="adamw",
                       learning_rate=self.learning_rate, schedule=self.schedule,
                       warmup_steps=self.warmup_steps, weight_decay=self.weight_decay,
                       seed=self.seed, log_every=self.log_every,
                       checkpoint_every=self.checkpoint_every)

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def lm_loss(distill_weight: float = 0.0, temperature: float = 2.0) -> train.Loss:
  """The `train.Loss` of recovery: next-token NLL, mixed with logit distillation when
  `distill_weight` > 0 (the batch then carries "teacher_logits")."""

  def fn(model, batch):
    objective = next_token(lambda _, tokens: model(tokens))
    logits = objective.model(None, batch).astype(jnp.float32)
    nll = objective.output_loss(logits, batch)
    if not distill_weight:
      return nll, {"nll": nll}
    kl = distillation(logits, batch["teacher_logits"], objective.output_weights(batch),
                      temperature)
    return (1 - distill_weight) * nll + distill_weight * kl, {"nll": nll, "kl": kl}

  return train.Loss(fn, ("nll", "kl") if distill_weight else ("nll",))


def distillation(student: jax.Array, teacher: jax.Array, weights: jax.Array,
                 temperature: float) -> jax.Array:
  """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged with `weights` over the
  positions ([batch, length] logits' leading axes)."""
  t = jax.nn.log_softmax(teacher.astype(jnp.float32) / temperature, axis=-1)
  s = jax.nn.log_softmax(student.astype(jnp.float32) / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
  return temperature**2 * (kl * weights).sum() / jnp.maximum(weights.sum(), 1.0)


class Batches:
  """`batches` again and again, each pass in an order drawn from `seed`, with the teacher's
  logits added when a `teacher` is given; `get_state`/`set_state` make it resumable."""

  def __init__(self, batches: Sequence[dict], seed: int, teacher: nnx.Module | None = None):
    if not batches:
      raise ValueError("recovery needs at least one batch.")
    self._batches = list(batches)
    self._seed = seed
    self._position = 0
    if teacher is None:
      self._teacher = None
    else:
      apply_fn, params = functional(teacher)
      logits = jax.jit(apply_fn)
      self._teacher = lambda tokens: logits(params, tokens)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    count = len(self._batches)
    epoch, index = divmod(self._position, count)
    order = np.random.default_rng([self._seed, epoch]).permutation(count)
    batch = dict(self._batches[order[index]])
    self._position += 1
    if self._teacher is not None:
      batch["teacher_logits"] = self._teacher(jnp.asarray(batch["tokens"]))
    return batch

  def get_state(self) -> dict:
    return {"position": self._position}

  def set_state(self, state: dict) -> None:
    self._position = int(state["position"])


def recover(model: nnx.Module, batches: Sequence[dict], config: RecoveryConfig, *,
            workdir: str | os.PathLike, teacher: nnx.Module | None = None,
            progress: bool = True, desc: str = "recover",
            extra_state: dict | None = None) -> tuple[nnx.Module, list[dict]]:
  """Recovers `model` on `batches` as `config` says; resumes from `workdir` if it holds a run.

  Returns the recovered model (a plain module of `model`'s structure: LoRA adapters merged)
  and the run's records (`train.finetune`). `model` is left as it is.
  """
  if not isinstance(config, RecoveryConfig):
    raise TypeError(f"config must be a RecoveryConfig, got {type(config).__name__}.")
  if config.distill_weight and teacher is None:
    raise ValueError(f"distill_weight={config.distill_weight} needs the teacher (dense) model.")
  loss = lm_loss(config.distill_weight, config.temperature)
  data = Batches(batches, config.seed, teacher if config.distill_weight else None)
  identity = {"mode": config.mode, "rank": config.rank, "alpha": config.alpha,
              "distill_weight": config.distill_weight, "temperature": config.temperature,
              **(extra_state or {})}
  if config.mode == "full":
    trainee = model
  else:
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    adapters = lora.init(params, config.rank, jax.random.key(config.seed))
    trainee = lora.Adapted(model, adapters, config.scale)
  trained, history = train.finetune(trainee, data, config.train_config(), workdir=workdir,
                                    loss=loss, progress=progress, desc=desc,
                                    extra_state=identity)
  if config.mode == "lora":
    trained = lora.merged_model(model, lora.adapters_of(trained), config.scale)
  return trained, history


__all__ = ["MODES", "Batches", "RecoveryConfig", "distillation", "lm_loss", "recover"]
