"""A `oba_jax.models.Llama`, dense or pruned and compacted, as a GGUF file that llama.cpp runs.

  summary = export_gguf(small, "small.gguf", source=llama_gguf.smollm2_path(), dtype="f32")

The architecture is `llama` when every layer has the same head counts and FFN size: llama.cpp's
`llama` builds every layer with layer 0's widths. Otherwise it is `deci` (llama.cpp's DeciLM /
Nemotron-NAS), which reads `attention.head_count`, `attention.head_count_kv` and
`feed_forward_length` as one int32 per layer and otherwise computes as `llama` does (same tensor
names, interleaved rotary pairs, RMSNorm, SwiGLU). Both have one head size for the model, written
as `attention.key_length` = `value_length` = `rope.dimension_count`; a model whose heads changed
size (rotary pairs or value features removed: freeze `oba_jax.export.head_size_groups`) is
refused, as is a layer without KV heads (llama.cpp's `deci` reads 0 as linear attention) or FFN
units, and anything but a `Llama`. Every refusal comes before anything is written.

Metadata: `general.*` and `tokenizer.*` are copied from `source` (a GGUF file of the model before
pruning, e.g. SmolLM2's), as is `<arch>.context_length`; the sizes, the rotary base (read off the
model's `inv_freq`) and the RMSNorm epsilon come from the model. A source key under its
architecture's prefix that this exporter does not write (rope scaling, experts, ...) is refused
by name: the file would compute something else than the model. Without a source the file has no
tokenizer (oba_jax loads it; llama.cpp needs one) and `context_length` must be given.

Tensors: kernels are transposed back to GGUF's [out, in] (ggml's ne reversed). `dtype` "f32"
writes everything in float32; "f16" and "q8_0" write the matrices (embedding included, as
llama.cpp's converter does) in that type and the norms in float32, which llama.cpp needs. Q8_0
quantizes rows in blocks of 32: for it, each layer's FFN is padded with zero units up to a
multiple of 32 (exact: silu(0) * 0 = 0, and the zero rows of `ffn_down` add nothing), and any other
matrix whose rows are not a multiple of 32 long (attention outputs of heads * head size not
divisible by 32) is written in f16 instead; the summary lists both. Embeddings tied to the head
(as in SmolLM2) give no `output.weight`. The file is written atomically.
"""

import collections
import os
from typing import Any

import numpy as np
from flax import nnx

from oba_jax import files
from oba_jax.models.llama import Llama, rope_frequencies
from oba_jax.weights.llama_gguf import BLOCK_TENSORS, gguf_reader

DTYPES = ("f32", "f16", "q8_0")
ARCHITECTURES = ("llama", "deci")
# Keys under the architecture's prefix: written from the model, or (context_length) carried over.
_SIZE_KEYS = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
              "attention.head_count_kv", "attention.key_length", "attention.value_length",
              "rope.dimension_count", "rope.freq_base", "attention.layer_norm_rms_epsilon",
              "vocab_size")
_CARRIED_KEYS = ("context_length",)
# General keys that describe the source file itself, not the exported one.
_DROPPED_GENERAL = ("general.architecture", "general.file_type", "general.quantization_version",
                    "general.alignment", "general.size_label")
_Q8_BLOCK = 32


class ExportError(ValueError):
  """A model (or source file) that the target format cannot hold; says what and why."""


def export_gguf(model: Llama, path: str | os.PathLike, *, source: str | os.PathLike | None = None,
                dtype: str = "f32", context_length: int | None = None) -> dict[str, Any]:
  """Writes `model` to `path` as a GGUF file (see the module doc); returns what was written.

  Args:
    model: a concrete `oba_jax.models.Llama`, e.g. `surgery.compact`'s result.
    path: the .gguf file to write (replaced atomically).
    source: the GGUF file the model came from: its `general.*`, `tokenizer.*` and context
      length are carried over, and its head size must be the model's.
    dtype: "f32", "f16" or "q8_0" for the matrices (norms are always float32).
    context_length: overrides the source's; required without a source.

  Returns:
    {"path", "bytes", "architecture", "num_heads", "num_kv_heads", "ffn_dim" (as written, padded
     for q8_0), "head_dim", "tensor_types": {GGML type: count}, "ffn_padding": zero units added,
     "f16_fallback": [names not quantizable to q8_0]}.

  Raises:
    ExportError: a model or source the file cannot hold (named), before anything is written.
  """
  if dtype not in DTYPES:
    raise ExportError(f"dtype={dtype!r} is not one of {DTYPES}.")
  if context_length is not None and (isinstance(context_length, bool) or not isinstance(
      context_length, int) or context_length < 1):
    raise ExportError(f"context_length={context_length!r} is not a positive int.")
  if not isinstance(model, Llama):
    raise ExportError(f"export_gguf writes an oba_jax.models.Llama; got a {type(model).__name__} "
                      "(GGUF files of other architectures are not written here).")
  try:
    import gguf
  except ImportError as error:
    raise ImportError("writing GGUF files needs the `gguf` package: pip install gguf") from error
  fields = _source_fields(source) if source is not None else {}
  layout = _layout(model, fields, source)
  block = _Q8_BLOCK if dtype == "q8_0" else 1
  units = layout["ffn_dim"]
  layout["ffn_dim"] = [-(-u // block) * block for u in units]  # what the file holds
  arch = "llama" if all(len(set(layout[k])) == 1
                        for k in ("num_heads", "num_kv_heads", "ffn_dim")) else "deci"
  writer = gguf.GGUFWriter(None, arch)
  _add_metadata(gguf, writer, arch, layout, fields, source, dtype, context_length)
  types = _add_tensors(gguf, writer, model, dtype, layout["ffn_dim"])

  _write_atomic(gguf, writer, path)
  uniform = arch == "llama"
  return {"path": os.path.abspath(os.fspath(path)), "bytes": os.path.getsize(path),
          "architecture": arch, "head_dim": layout["head_dim"],
          **{k: layout[k][0] if uniform else list(layout[k])
             for k in ("num_heads", "num_kv_heads", "ffn_dim")},
          "tensor_types": dict(collections.Counter(types.values())),
          "ffn_padding": sum(layout["ffn_dim"]) - sum(units),
          "f16_fallback": sorted(n for n, t in types.items() if dtype == "q8_0" and t == "F16")}


def _source_fields(source) -> dict[str, Any]:
  """{key: (value, GGUF value types)} of the source file's metadata; refuses non-Llama files."""
  reader = gguf_reader(source)
  fields = {key: (field.contents(), list(field.types)) for key, field in reader.fields.items()
            if not key.startswith("GGUF.")}
  arch = fields.get("general.architecture", (None,))[0]
  if arch not in ARCHITECTURES:
    raise ExportError(f"source {os.fspath(source)} holds a {arch!r} model; a Llama export "
                      f"carries the metadata of one of {ARCHITECTURES}.")
  unknown = sorted(k for k in fields if k.startswith(f"{arch}.")
                   and k[len(arch) + 1:] not in _SIZE_KEYS + _CARRIED_KEYS)
  if unknown:
    raise ExportError(f"source {os.fspath(source)} has metadata {unknown[:4]} that "
                      "oba_jax.models.Llama does not compute (rope scaling, experts, ...); the "
                      "exported file would not compute the model.")
  return fields


def _layout(model: Llama, fields, source) -> dict[str, Any]:
  """Per-layer widths, head size, rotary base and epsilon of `model`, or an ExportError."""
  where = "" if source is None else f" (source {os.fspath(source)})"
  heads, kv_heads, ffn, head_dims, tables = [], [], [], set(), []
  for i, layer in enumerate(model.layers):
    attn = layer.attn
    inv_freq = np.asarray(attn.inv_freq.get_value())
    head = 2 * inv_freq.shape[0]
    built = round(attn.scale ** -2)  # the head size the attention was built with
    if head != built:
      raise ExportError(
          f"layer {i}: rotary pairs were removed (query/key head size {head}, the attention was "
          f"built with {built}); llama.cpp has one head size, rotating all of it. Freeze "
          "oba_jax.export.head_size_groups(structure, model) when selecting the plan.")
    q, k, v = (np.shape(p.kernel.get_value())[1] for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    if q % head or k % head:
      raise ExportError(f"layer {i}: query/key features {q}/{k} are not whole heads of size "
                        f"{head}.")
    kv = k // head
    if kv == 0:
      raise ExportError(f"layer {i} has no key/value heads (llama.cpp's deci reads 0 as linear "
                        "attention); keep at least one KV group per layer (min_channels >= 1).")
    value_head = v // kv
    if value_head != head or v % kv:
      raise ExportError(
          f"layer {i}: value features within heads were removed (value head size "
          f"{v / kv:g}, query/key head size {head}); llama.cpp needs them equal. Freeze "
          "oba_jax.export.head_size_groups(structure, model) when selecting the plan.")
    units = np.shape(layer.mlp.gate_proj.kernel.get_value())[1]
    if units == 0:
      raise ExportError(f"layer {i} has no FFN units; keep at least one (min_channels >= 1).")
    heads.append(q // head)
    kv_heads.append(kv)
    ffn.append(units)
    head_dims.add(head)
    tables.append(inv_freq)
  if len(head_dims) != 1:
    raise ExportError(f"the layers have head sizes {sorted(head_dims)}; GGUF holds one.")
  head = head_dims.pop()
  if fields:
    arch = fields["general.architecture"][0]
    count = fields.get(f"{arch}.attention.head_count", (None,))[0]
    first = count[0] if isinstance(count, list) else count
    d_model = fields.get(f"{arch}.embedding_length", (None,))[0]
    original = fields.get(f"{arch}.attention.key_length",
                          (d_model // first if d_model and first else None,))[0]
    if original != head:
      raise ExportError(f"the model's head size {head} is not the source's {original}{where}.")
  if any(not np.array_equal(t, tables[0]) for t in tables):
    raise ExportError("the layers rotate with different frequencies (inv_freq); GGUF holds one "
                      "rotary base.")
  theta = _rope_base(tables[0], head, fields)
  epsilons = {float(m.epsilon) for _, m in nnx.iter_graph(model) if isinstance(m, nnx.RMSNorm)}
  if len(epsilons) != 1:
    raise ExportError(f"the RMSNorms have epsilons {sorted(epsilons)}; GGUF holds one.")
  vocab, d_model = np.shape(model.embed.embedding.get_value())
  tokens = fields.get("tokenizer.ggml.tokens", (None,))[0]
  if tokens is not None and len(tokens) != vocab:
    raise ExportError(f"the model has {vocab} token embeddings, the source's tokenizer "
                      f"{len(tokens)} tokens{where}.")
  return dict(num_heads=heads, num_kv_heads=kv_heads, ffn_dim=ffn, head_dim=head,
              rope_theta=theta, norm_eps=epsilons.pop(), vocab_size=vocab, d_model=d_model)


def _rope_base(inv_freq: np.ndarray, head: int, fields) -> float:
  """The rotary base theta with inv_freq = theta^(-2i / head): the source's, else read off."""
  arch = fields.get("general.architecture", (None,))[0]
  candidates = [fields[f"{arch}.rope.freq_base"][0]] if f"{arch}.rope.freq_base" in fields else []
  if inv_freq.size > 1:
    estimate = float(inv_freq[1]) ** (-head / 2)
    candidates += [float(f"{estimate:.6g}"), estimate]
  else:
    candidates += [10000.0]  # one pair rotates with frequency 1 whatever the base
  for theta in candidates:
    if np.allclose(rope_frequencies(head, float(np.float32(theta))), inv_freq, rtol=1e-6,
                   atol=0):
      return float(theta)
  raise ExportError(f"the rotary frequencies {inv_freq[:4]} ... are not theta^(-2i/{head}) for "
                    f"any base theta (tried {candidates}); GGUF stores only the base.")


def _add_metadata(gguf, writer, arch: str, layout, fields, source, dtype, context_length) -> None:
  """General and tokenizer keys from the source, sizes from the layout, the file type."""
  source_arch = fields.get("general.architecture", (None,))[0]
  for key, (value, types) in fields.items():
    if key.startswith("general.") and key not in _DROPPED_GENERAL or key.startswith("tokenizer."):
      _add_field(gguf, writer, key, value, types)
  if context_length is None:
    context_length = fields.get(f"{source_arch}.context_length", (None,))[0]
    if context_length is None:
      raise ExportError("context_length is needed: the source has none"
                        + ("" if source is not None else " (no source given)") + ".")
  uniform = arch == "llama"

  def widths(key, values):
    if uniform:
      writer.add_uint32(f"{arch}.{key}", values[0])
    else:  # one int32 per layer, as llama.cpp's get_key_or_arr reads it
      writer.add_key_value(f"{arch}.{key}", [int(v) for v in values], gguf.GGUFValueType.ARRAY,
                           sub_type=gguf.GGUFValueType.INT32)

  writer.add_uint32(f"{arch}.context_length", int(context_length))
  writer.add_uint32(f"{arch}.block_count", len(layout["num_heads"]))
  writer.add_uint32(f"{arch}.embedding_length", int(layout["d_model"]))
  writer.add_uint32(f"{arch}.vocab_size", int(layout["vocab_size"]))
  widths("feed_forward_length", layout["ffn_dim"])
  widths("attention.head_count", layout["num_heads"])
  widths("attention.head_count_kv", layout["num_kv_heads"])
  for key in ("attention.key_length", "attention.value_length", "rope.dimension_count"):
    writer.add_uint32(f"{arch}.{key}", int(layout["head_dim"]))
  writer.add_float32(f"{arch}.rope.freq_base", layout["rope_theta"])
  writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", layout["norm_eps"])
  file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
               "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
  writer.add_file_type(int(file_type))
  if dtype == "q8_0":
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_field(gguf, writer, key: str, value, types) -> None:
  if types[0] == gguf.GGUFValueType.ARRAY:
    if len(types) != 2:
      raise ExportError(f"source metadata {key} is an array of arrays; not carried over.")
    if len(value):  # GGUF has no empty arrays
      writer.add_key_value(key, list(value), types[0], sub_type=types[1])
  else:
    writer.add_key_value(key, value, types[0])


def _add_tensors(gguf, writer, model: Llama, dtype: str, ffn_dim) -> dict[str, str]:
  """Adds every tensor (GGUF names, [out, in] matrices; FFNs padded with zero units to
  `ffn_dim`); returns {name: GGML type name}."""
  tensors = {"token_embd.weight": model.embed.embedding.get_value(),
             "output_norm.weight": model.norm.scale.get_value()}
  if model.lm_head is not None:
    tensors["output.weight"] = model.lm_head.kernel.get_value().T
  for i, layer in enumerate(model.layers):
    for name, (leaf, transpose) in BLOCK_TENSORS.items():
      node = layer
      for part in leaf.split("/"):
        node = getattr(node, part)
      value = np.asarray(node.get_value())
      if leaf.startswith("mlp/"):  # the units: axis 1 of gate/up, axis 0 of down
        axis = 0 if leaf == "mlp/down_proj/kernel" else 1
        padding = [(0, 0), (0, 0)]
        padding[axis] = (0, ffn_dim[i] - value.shape[axis])
        value = np.pad(value, padding)
      tensors[f"blk.{i}.{name}"] = value.T if transpose else value
  types = {}
  for name, value in tensors.items():
    value = np.ascontiguousarray(np.asarray(value, np.float32))
    kind = "F32" if value.ndim == 1 or dtype == "f32" else (
        "Q8_0" if dtype == "q8_0" and value.shape[-1] % _Q8_BLOCK == 0 else "F16")
    if kind == "Q8_0":
      quantized = gguf.GGMLQuantizationType.Q8_0
      writer.add_tensor(name, gguf.quants.quantize(value, quantized), raw_dtype=quantized)
    else:
      writer.add_tensor(name, value.astype(np.float16) if kind == "F16" else value)
    types[name] = kind
  return types


def byte_symbols() -> list[str]:
  """The 256 byte-level BPE symbols (GPT-2's byte-to-unicode table): printable Latin-1 bytes
  stand for themselves, the others for the code points 256, 257, ... in byte order."""
  printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
  symbols, extra = [], 0
  for byte in range(256):
    symbols.append(chr(byte) if byte in printable else chr(256 + extra))
    extra += byte not in printable
  return symbols


def byte_level_source(path: str | os.PathLike, *, head_dim: int, context_length: int,
                      name: str = "byte-level Llama") -> str:
  """Writes a metadata-only GGUF source for a model whose tokens are the 256 bytes (the CLIs'
  smoke Llama) and whose heads have `head_dim` features: GPT-2's byte-level BPE over bytes 0-254
  and one merge (two spaces) as token 255, since llama.cpp needs merges.
  `export_gguf(model, ..., source=path)` then gives a file llama.cpp loads. Returns `path`."""
  import gguf
  symbols = byte_symbols()
  writer = gguf.GGUFWriter(None, "llama")
  writer.add_name(name)
  writer.add_context_length(context_length)
  writer.add_key_length(head_dim)
  writer.add_value_length(head_dim)
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre("default")
  space = symbols[ord(" ")]
  writer.add_token_list(symbols[:255] + [space * 2])
  writer.add_token_types([1] * 256)
  writer.add_token_merges([f"{space} {space}"])
  writer.add_eos_token_id(0)

  _write_atomic(gguf, writer, path)
  return os.fspath(path)


def _write_atomic(gguf, writer, path) -> None:
  """`writer`'s file at `path`, atomically (`files.write_atomic`)."""
  def write(f):
    # The writer writes to the stream `write_atomic` opened: `open_output_file` keeps an output
    # that is already set in the EMPTY state.
    writer.fout, writer.state = [f], gguf.gguf_writer.WriterState.EMPTY
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()

  files.write_atomic(path, write)
