"""Recovery fine-tuning of a pruned tiny Llama: LoRA adapters, full fine-tuning, distillation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from oba_jax import lora, masks, plan, recovery, structure, surgery, train
from oba_jax.functional import next_token
from oba_jax.models import Llama


def tiny_llama(seed=0):
  return Llama(vocab_size=64, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2,
               ffn_dim=24, rope_theta=10000.0, rngs=nnx.Rngs(seed))


def batches(count=4, batch=4, length=12, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    tokens = rng.integers(0, 64, (batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    mask[0, length - 3:] = 0  # some padding
    out.append({"tokens": tokens, "mask": mask})
  return out


def params_of(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def loss_of(model, data):
  objective = next_token(lambda _, tokens: model(tokens))
  return float(np.mean([objective.loss(None, jax.tree.map(jnp.asarray, b)) for b in data]))


@pytest.fixture(scope="module")
def pruned():
  """A compacted tiny Llama (kv groups, heads and SwiGLU units removed by magnitude)."""
  model = tiny_llama()
  tokens = jnp.asarray(batches(1)[0]["tokens"])
  traced = structure.trace(model, tokens, ignore=("embed",))
  scores = {g.name: np.random.default_rng(i).random(g.size) for i, g in enumerate(traced.groups)}
  chosen = plan.select(traced, scores, target=plan.KeptParams(0.8), max_ratio=0.9)
  return surgery.compact(masks.apply(model, chosen), chosen), model


def shapes(model):
  return jax.tree.map(jnp.shape, params_of(model))


def test_lora_adapters_start_at_zero_so_the_merged_model_is_the_base(pruned):
  model, _ = pruned
  params = params_of(model)
  adapters = lora.init(params, rank=2, key=jax.random.key(0))
  assert "embed/embedding" not in adapters
  assert {n.rsplit("/", 1)[-1] for n in adapters} == {"kernel"}
  assert len(adapters) == 2 * 7  # q, k, v, o, gate, up, down in each layer
  merged = lora.merge(params, adapters, scale=8.0)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), merged, params))
  tokens = jnp.asarray(batches(1)[0]["tokens"])
  adapted = lora.Adapted(model, adapters, 8.0)
  np.testing.assert_array_equal(adapted(tokens), model(tokens))


def test_lora_merge_adds_the_scaled_product():
  params = {"w": {"kernel": jnp.ones((3, 4))}, "embed": {"embedding": jnp.ones((5, 3))}}
  adapters = {"w/kernel": {"a": jnp.ones((3, 1)), "b": jnp.full((1, 4), 2.0)}}
  merged = lora.merge(params, adapters, scale=0.5)
  np.testing.assert_array_equal(merged["w"]["kernel"], jnp.full((3, 4), 2.0))
  assert lora.targets(params) == ["w/kernel"]
  with pytest.raises(ValueError, match="not parameters"):
    lora.merge(params, {"x/kernel": adapters["w/kernel"]})
  with pytest.raises(ValueError, match="rank"):
    lora.init(params, rank=0, key=jax.random.key(0))


CONFIG = dict(steps=12, batch_size=4, learning_rate=3e-2, warmup_steps=2, log_every=4,
              checkpoint_every=4)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_recovery_lowers_the_loss_and_keeps_the_compacted_shapes(tmp_path, pruned, mode):
  model, _ = pruned
  data = batches(2)
  config = recovery.RecoveryConfig(mode=mode, rank=4, **CONFIG)
  before = loss_of(model, data)
  recovered, history = recovery.recover(model, data, config, workdir=tmp_path, progress=False)
  assert loss_of(recovered, data) < before - 0.05
  assert shapes(recovered) == shapes(model)
  assert [r["step"] for r in history] == [4, 8, 12]
  assert {"loss", "nll", "lr"} <= history[-1].keys()


def test_lora_mode_trains_only_the_adapters(tmp_path, pruned):
  model, _ = pruned
  data = batches(2)
  config = recovery.RecoveryConfig(mode="lora", rank=2, **CONFIG)
  adapters = lora.init(params_of(model), rank=2, key=jax.random.key(config.seed))
  trained, _ = train.finetune(lora.Adapted(model, adapters, config.scale),
                              recovery.Batches(data, 0), config.train_config(),
                              workdir=tmp_path, loss=recovery.lm_loss(), progress=False)
  base = nnx.to_pure_dict(nnx.state(trained.base, lora.Frozen))
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), base, params_of(model)))
  assert set(nnx.to_pure_dict(nnx.state(trained, nnx.Param))) == {"adapters"}
  b = [a["b"] for a in lora.adapters_of(trained).values()]
  assert all(float(jnp.abs(x).max()) > 0 for x in b)


def test_killed_and_resumed_recovery_ends_with_the_same_parameters(tmp_path, pruned):
  model, _ = pruned
  data = batches(3)
  config = recovery.RecoveryConfig(mode="lora", rank=2, **CONFIG)
  whole, _ = recovery.recover(model, data, config, workdir=tmp_path / "whole", progress=False)

  class Killed(Exception):
    pass

  class Dies(recovery.Batches):
    def __next__(self):
      if self.get_state()["position"] == 6:
        raise Killed
      return super().__next__()

  original = recovery.Batches
  recovery.Batches = Dies
  try:
    with pytest.raises(Killed):
      recovery.recover(model, data, config, workdir=tmp_path / "resumed", progress=False)
  finally:
    recovery.Batches = original
  resumed, history = recovery.recover(model, data, config, workdir=tmp_path / "resumed",
                                      progress=False)
  assert [r["step"] for r in history] == [4, 8, 12]
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)),
                                   params_of(resumed), params_of(whole)))


def test_distillation_from_the_dense_model(tmp_path, pruned):
  model, dense = pruned
  data = batches(2)
  config = recovery.RecoveryConfig(mode="full", distill_weight=1.0, temperature=2.0, **CONFIG)
  recovered, history = recovery.recover(model, data, config, workdir=tmp_path, teacher=dense,
                                        progress=False)
  assert history[-1]["kl"] < history[0]["kl"]
  with pytest.raises(ValueError, match="teacher"):
    recovery.recover(model, data, config, workdir=tmp_path / "none", progress=False)


def test_distillation_is_zero_for_the_same_logits():
  logits = jax.random.normal(jax.random.key(0), (2, 3, 5))
  weights = jnp.ones((2, 3))
  assert float(recovery.distillation(logits, logits, weights, 2.0)) == pytest.approx(0, abs=1e-6)
  assert float(recovery.distillation(logits, -logits, weights, 2.0)) > 0


@pytest.mark.parametrize("field, value, named", [
    ("mode", "qlora", "mode"), ("steps", 0, "steps"), ("distill_weight", 1.5, "distill_weight"),
    ("rank", 0, "rank"), ("warmup_steps", -1, "warmup_steps"), ("schedule", "linear", "schedule"),
])
def test_recovery_config_names_the_bad_value(field, value, named):
  with pytest.raises(ValueError, match=named):
    recovery.RecoveryConfig(**{field: value})


def test_adamw_with_warmup():
  config = train.TrainConfig(steps=10, optimizer="adamw", learning_rate=1.0, warmup_steps=4,
                             schedule="cosine")
  schedule = train.learning_rate_schedule(config, 10)
  assert float(schedule(0)) == pytest.approx(0.25 * float(
      train.learning_rate_schedule(train.TrainConfig(steps=10, schedule="cosine",
                                                     learning_rate=1.0), 10)(0)))
  assert float(schedule(5)) < 1.0
  assert "optimizer" not in train.TrainConfig(steps=1).identity()  # old runs still resume
  assert train.TrainConfig(steps=1, optimizer="adamw").identity()["optimizer"] == "adamw"
  with pytest.raises(ValueError, match="optimizer"):
    train.TrainConfig(steps=1, optimizer="adam")
