"""Pruned models as Hugging Face directories that `transformers` loads (`LlamaForCausalLM`).

  export_llama_hf(pruned, "out/smollm2-pruned", tokenizer=gguf_tokenizer(path),
                  source_config={**config, **gguf_settings(path)}, dtype="bfloat16")
  model, config = load_llama_hf("out/smollm2-pruned")   # the inverse, without torch

The directory holds `config.json`, `model.safetensors` (Hugging Face tensor names, weights
[out, in]), `generation_config.json` when token ids are known, and, given a tokenizer,
`tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json`, so that
`LlamaForCausalLM.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)` work.

`LlamaForCausalLM` has one width per model: the same query heads, kv heads and SwiGLU units in
every layer, and one head size. A model whose layers differ in width is refused (select the plan
with `plan.select(..., scope="uniform")`), as is one whose head size changed (rotary pairs or
value features removed: freeze those groups). Queries and keys are permuted per head from the
interleaved rotary pairs of `oba_jax.models.Llama` (pair i = features (2i, 2i + 1), GGUF's
layout) to Hugging Face's rotate-half layout (feature i pairs with i + head_dim / 2).

Writes are whole or nothing: the files go into a hidden directory next to `directory`, which is
renamed into place; an existing `directory` gets the new files one by one, each replaced
atomically (weights first, `config.json` last), and keeps any other file it held.
"""

import contextlib
import functools
import json
import os
import secrets
import shutil
import struct
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np
import safetensors.numpy

from oba_jax import files
from oba_jax.export.llama_gguf import ExportError
from oba_jax.functional import flat_state
from oba_jax.models.llama import Llama, rope_frequencies
from oba_jax.weights.fill import ArchitectureError, build

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                       "F64": np.float64}
# Keys of a `source_config` besides `Llama`'s keyword arguments: copied into config.json.
HF_SETTINGS = ("max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
               "chat_template")
_LLAMA_KEYS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "ffn_dim",
               "head_dim", "rope_theta", "norm_eps", "tie_embeddings")
_BLOCK = {  # our leaf under layers/{i}/ -> Hugging Face name under model.layers.{i}.
    "attn_norm/scale": "input_layernorm.weight",
    "attn/q_proj/kernel": "self_attn.q_proj.weight",
    "attn/k_proj/kernel": "self_attn.k_proj.weight",
    "attn/v_proj/kernel": "self_attn.v_proj.weight",
    "attn/o_proj/kernel": "self_attn.o_proj.weight",
    "mlp_norm/scale": "post_attention_layernorm.weight",
    "mlp/gate_proj/kernel": "mlp.gate_proj.weight",
    "mlp/up_proj/kernel": "mlp.up_proj.weight",
    "mlp/down_proj/kernel": "mlp.down_proj.weight",
}
_DEFAULT_CONTEXT = 2048  # max_position_embeddings when the source does not say


def to_rotate_half(weight: np.ndarray, heads: int) -> np.ndarray:
  """[heads * head_dim, in] rows from interleaved pairs (2i, 2i + 1) to rotate-half (i, i + d/2).

  Row 2i + t of a head becomes row t * head_dim / 2 + i, the inverse of llama.cpp's permutation
  of Hugging Face query/key weights into GGUF.
  """
  rows, cols = weight.shape
  return weight.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def to_interleaved(weight: np.ndarray, heads: int) -> np.ndarray:
  """The inverse of `to_rotate_half`."""
  rows, cols = weight.shape
  return weight.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _value(variable) -> np.ndarray:
  return np.asarray(variable[...])


def _rope_theta(inv_freq: np.ndarray, head_dim: int, given: float | None) -> float:
  """The rotary base whose frequencies are `inv_freq`: `given` (checked) or solved from them."""
  if given is None:
    if inv_freq.size < 2:
      raise ExportError("the model has one rotary pair per head, whose frequency (1) does not "
                        "determine rope_theta; pass source_config={'rope_theta': ...}.")
    theta = float(np.float64(inv_freq[1]) ** (-head_dim / 2))
    given = float(round(theta)) if np.allclose(
        rope_frequencies(head_dim, round(theta)), inv_freq, rtol=1e-6, atol=0) else theta
  if not np.allclose(rope_frequencies(head_dim, given), inv_freq, rtol=1e-5, atol=0):
    raise ExportError(f"the model's rotary frequencies are not those of rope_theta={given} and "
                      f"head size {head_dim} (theta^(-2i/{head_dim})): a variant (scaled or "
                      "partial rotary embeddings) that LlamaForCausalLM's config cannot state.")
  return given


def check_arguments(model, kind: type, exporter: str, dtype: str) -> None:
  """Raises ExportError unless `model` is a `kind`, ValueError for a dtype not in `DTYPES`."""
  if not isinstance(model, kind):
    raise ExportError(f"{exporter} exports an oba_jax.models.{kind.__name__}; got a "
                      f"{type(model).__module__}.{type(model).__name__}.")
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r}; accepted: {sorted(DTYPES)}.")


def _check_source_config(source_config: Mapping[str, Any] | None) -> dict[str, Any]:
  source = dict(source_config or {})
  unknown = sorted(set(source) - set(_LLAMA_KEYS) - set(HF_SETTINGS))
  if unknown:
    raise ValueError(f"source_config has unknown keys {unknown}; accepted: Llama's keyword "
                     f"arguments {list(_LLAMA_KEYS)} and {list(HF_SETTINGS)}.")
  return source


def llama_hf_config(model: Llama, source_config: Mapping[str, Any] | None = None, *,
                    dtype: str = "float32") -> dict[str, Any]:
  """The `config.json` of `model` as a `LlamaForCausalLM`, or an `ExportError` saying why not.

  `source_config` is the dense source's `Llama` keyword arguments (`llama_gguf.load_llama`'s
  config: rope_theta and norm_eps are checked against the model) and optionally `HF_SETTINGS`
  (context length, token ids, chat template). The widths are the model's own.
  """
  check_arguments(model, Llama, "export_llama_hf", dtype)
  source = _check_source_config(source_config)
  embedding = _value(model.embed.embedding)
  vocab, d_model = embedding.shape
  rows = {"query heads": [], "kv heads": [], "SwiGLU units": []}
  changed = []
  eps = {float(model.norm.epsilon)}
  frequencies = []
  for i, layer in enumerate(model.layers):
    attn = layer.attn
    inv_freq = _value(attn.inv_freq)
    head_dim = 2 * inv_freq.size
    original = int(round(attn.scale ** -2))
    q, k, v = (_value(p.kernel).shape[1] for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    kv_heads = k // head_dim
    value_dim = v // kv_heads
    if head_dim != original or value_dim != original:
      changed.append(f"layer {i}: query/key head size {head_dim}, value head size {value_dim}, "
                     f"was {original}")
    rows["query heads"].append(q // head_dim)
    rows["kv heads"].append(kv_heads)
    rows["SwiGLU units"].append(_value(layer.mlp.gate_proj.kernel).shape[1])
    eps.update((float(layer.attn_norm.epsilon), float(layer.mlp_norm.epsilon)))
    frequencies.append(inv_freq)
  if changed:
    raise ExportError(
        "the head size changed (" + "; ".join(changed[:3]) + (" ..." if len(changed) > 3 else "")
        + "): LlamaForCausalLM (and llama.cpp) use one head size for queries, keys and values. "
        "Prune whole heads and kv groups only: freeze the rotary-pair and value-feature groups "
        "(plan.select(..., frozen=...)).")
  uneven = {name: widths for name, widths in rows.items() if len(set(widths)) > 1}
  if uneven:
    detail = "; ".join(f"{name} per layer {widths}" for name, widths in uneven.items())
    raise ExportError(f"the layers differ in width ({detail}): LlamaForCausalLM has one width "
                      "per model. Select the plan layer-uniform: plan.select(..., "
                      "scope='uniform').")
  if len(eps) > 1:
    raise ExportError(f"the RMSNorm epsilons differ ({sorted(eps)}); LlamaForCausalLM has one.")
  if any(not np.array_equal(f, frequencies[0]) for f in frequencies):
    raise ExportError("the layers' rotary frequencies differ; LlamaForCausalLM has one "
                      "rope_theta.")
  (norm_eps,) = eps
  if "norm_eps" in source and not np.isclose(source["norm_eps"], norm_eps, rtol=1e-6):
    raise ExportError(f"source_config norm_eps={source['norm_eps']} but the model's RMSNorm "
                      f"epsilon is {norm_eps}: another model's config?")
  head_dim = 2 * frequencies[0].size
  config = {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "hidden_size": int(d_model),
      "intermediate_size": rows["SwiGLU units"][0],
      "num_attention_heads": rows["query heads"][0],
      "num_key_value_heads": rows["kv heads"][0],
      "head_dim": head_dim,
      "num_hidden_layers": len(model.layers),
      "hidden_act": "silu",
      "rms_norm_eps": norm_eps,
      "rope_theta": _rope_theta(frequencies[0], head_dim, source.get("rope_theta")),
      "rope_scaling": None,
      "attention_bias": False,
      "attention_dropout": 0.0,
      "mlp_bias": False,
      "vocab_size": int(vocab),
      "tie_word_embeddings": model.lm_head is None,
      "max_position_embeddings": int(source.get("max_position_embeddings", _DEFAULT_CONTEXT)),
      "initializer_range": 0.02,
      "use_cache": True,
      "torch_dtype": dtype,
  }
  for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
    if source.get(key) is not None:
      config[key] = int(source[key])
  return config


def llama_hf_tensors(model: Llama, config: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """{Hugging Face name: [out, in] array in config['torch_dtype']} for `model` (see module doc)."""
  dtype = DTYPES[config["torch_dtype"]]
  heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
  out = {"model.embed_tokens.weight": _value(model.embed.embedding),
         "model.norm.weight": _value(model.norm.scale)}
  if model.lm_head is not None:
    out["lm_head.weight"] = _value(model.lm_head.kernel).T
  for i, layer in enumerate(model.layers):
    state = flat_state(layer)
    for ours, theirs in _BLOCK.items():
      value = _value(state[ours])
      if ours.endswith("/kernel"):
        value = value.T
      if ours == "attn/q_proj/kernel":
        value = to_rotate_half(value, heads)
      elif ours == "attn/k_proj/kernel":
        value = to_rotate_half(value, kv_heads)
      out[f"model.layers.{i}.{theirs}"] = value
  return {name: np.ascontiguousarray(value.astype(dtype)) for name, value in out.items()}


def _tokenizer_files(tokenizer, config: Mapping[str, Any],
                     source: Mapping[str, Any]) -> dict[str, bytes]:
  """tokenizer.json, tokenizer_config.json and special_tokens_map.json of a `tokenizers.Tokenizer`
  (a fast tokenizer: `AutoTokenizer` loads it as `PreTrainedTokenizerFast`)."""
  vocab = tokenizer.get_vocab_size(with_added_tokens=True)
  if vocab > config["vocab_size"]:
    raise ExportError(f"the tokenizer has {vocab} tokens, the model's vocabulary "
                      f"{config['vocab_size']}: another model's tokenizer?")
  special = {}
  for role in ("bos", "eos", "pad"):
    token_id = config.get(f"{role}_token_id")
    if token_id is not None:
      token = tokenizer.id_to_token(token_id)
      if token is None:
        raise ExportError(f"{role}_token_id={token_id} is not in the tokenizer's vocabulary.")
      special[f"{role}_token"] = token
  tokenizer_config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "model_max_length": config["max_position_embeddings"],
      "clean_up_tokenization_spaces": False,
      "add_bos_token": False,
      "add_eos_token": False,
      **special,
  }
  if source.get("chat_template"):
    tokenizer_config["chat_template"] = source["chat_template"]
  return {"tokenizer.json": tokenizer.to_str().encode(),
          "tokenizer_config.json": json_bytes(tokenizer_config),
          "special_tokens_map.json": json_bytes(special)}


def json_bytes(value) -> bytes:
  """`value` as indented UTF-8 JSON with a final newline, the way the Hub writes it."""
  return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode()


def write_directory(directory: str | os.PathLike, contents: Mapping[str, bytes]) -> None:
  """Writes `contents` ({relative file name: bytes}, in order) as `directory` (see the module
  doc)."""
  directory = os.path.abspath(os.fspath(directory))
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise NotADirectoryError(f"{directory} exists and is not a directory; the export writes a "
                             "directory there.")
  parent = os.path.dirname(directory)
  temporary = os.path.join(
      parent, f".{os.path.basename(directory)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
  try:
    for name, data in contents.items():
      files.write_atomic(os.path.join(temporary, name), lambda f, data=data: f.write(data))
    if not os.path.exists(directory):
      os.replace(temporary, directory)
      return
    for name in contents:
      os.makedirs(os.path.dirname(os.path.join(directory, name)), exist_ok=True)
      os.replace(os.path.join(temporary, name), os.path.join(directory, name))
  finally:
    with contextlib.suppress(OSError):
      shutil.rmtree(temporary)


def export_llama_hf(model: Llama, directory: str | os.PathLike, *, tokenizer=None,
                    source_config: Mapping[str, Any] | None = None,
                    dtype: str = "float32") -> dict[str, Any]:
  """Writes `model` as a Hugging Face `LlamaForCausalLM` directory; returns its config.json.

  Args:
    model: an `oba_jax.models.Llama`, dense or compacted by a layer-uniform plan that kept the
      head size.
    directory: created (or its files replaced; see the module doc).
    tokenizer: a `tokenizers.Tokenizer` (e.g. `llama_gguf.gguf_tokenizer`), written with the
      files `AutoTokenizer` reads; None writes no tokenizer.
    source_config: the dense source's `Llama` keyword arguments, plus any of `HF_SETTINGS`
      (`gguf_settings` reads them from a GGUF file).
    dtype: the weights' dtype in the file: "float32", "float16" or "bfloat16".

  Raises:
    ExportError: not a Llama, layers of different widths, a changed head size (named, before
      anything is written).
  """
  config = llama_hf_config(model, source_config, dtype=dtype)
  source = _check_source_config(source_config)
  tensors = llama_hf_tensors(model, config)
  contents = {"model.safetensors": safetensors.numpy.save(tensors, metadata={"format": "pt"})}
  if tokenizer is not None:
    contents.update(_tokenizer_files(tokenizer, config, source))
  tokens = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
  if tokens:
    contents["generation_config.json"] = json_bytes({**tokens, "do_sample": False})
  contents["config.json"] = json_bytes(config)
  write_directory(directory, contents)
  return config


def gguf_settings(path: str | os.PathLike) -> dict[str, Any]:
  """The `HF_SETTINGS` a Llama GGUF file states: context length, token ids, chat template."""
  from oba_jax.weights import llama_gguf
  metadata = llama_gguf.read_metadata(path)
  arch = metadata.get("general.architecture")
  found = {"max_position_embeddings": metadata.get(f"{arch}.context_length"),
           "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
           "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
           "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
           "chat_template": metadata.get("tokenizer.chat_template")}
  return {key: (value if key == "chat_template" else int(value))
          for key, value in found.items() if value is not None}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The tensors of a `.safetensors` file as numpy arrays, bfloat16 included (`ml_dtypes`)."""
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      data = f.read()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    body = memoryview(data)[8 + length:]
    out = {}
    for name, entry in header.items():
      if name == "__metadata__":
        continue
      start, end = entry["data_offsets"]
      kind = _SAFETENSORS_DTYPES.get(entry["dtype"])
      if kind is None:
        raise ValueError(f"tensor {name!r} has dtype {entry['dtype']}, not one of "
                         f"{sorted(_SAFETENSORS_DTYPES)}")
      out[name] = np.frombuffer(body[start:end], kind).reshape(entry["shape"])
    return out
  except (struct.error, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError,
          ValueError) as error:
    raise files.damaged(path, "a safetensors file", error, "It is cut short or overwritten; "
                        "export the model again.") from None


def load_llama_hf(directory: str | os.PathLike, dtype=np.float32) -> tuple[Llama, dict[str, Any]]:
  """The `Llama` of a `LlamaForCausalLM` directory (the inverse of `export_llama_hf`), and its
  `Llama` keyword arguments. Weights are cast to `dtype` (None keeps the file's).

  Raises:
    FileNotFoundError: config.json or model.safetensors missing. ArchitectureError: not a
      Llama this model holds (biases, scaled rotary embeddings, another activation).
  """
  directory = os.fspath(directory)
  config_path = os.path.join(directory, "config.json")
  weights_path = os.path.join(directory, "model.safetensors")
  for path in (config_path, weights_path):
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} is missing; a LlamaForCausalLM directory needs "
                              "config.json and model.safetensors (one shard).")
  with open(config_path, encoding="utf-8") as f:
    hf = json.load(f)
  if hf.get("model_type") != "llama":
    raise ArchitectureError(f"{config_path}: model_type {hf.get('model_type')!r} is not 'llama'.")
  unsupported = {k: hf.get(k) for k in ("attention_bias", "mlp_bias", "rope_scaling")
                 if hf.get(k)}
  if hf.get("hidden_act", "silu") != "silu":
    unsupported["hidden_act"] = hf["hidden_act"]
  if unsupported:
    raise ArchitectureError(f"{config_path}: {unsupported} are not supported by "
                            "oba_jax.models.Llama.")
  heads, d_model = hf["num_attention_heads"], hf["hidden_size"]
  config = dict(vocab_size=hf["vocab_size"], d_model=d_model, num_layers=hf["num_hidden_layers"],
                num_heads=heads, num_kv_heads=hf.get("num_key_value_heads", heads),
                ffn_dim=hf["intermediate_size"], head_dim=hf.get("head_dim") or d_model // heads,
                rope_theta=float(hf.get("rope_theta", 10000.0)),
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", True)))
  names = {"model.embed_tokens.weight": "embed/embedding", "model.norm.weight": "norm/scale",
           "lm_head.weight": "lm_head/kernel"}
  for i in range(config["num_layers"]):
    names.update({f"model.layers.{i}.{theirs}": f"layers/{i}/{ours}"
                  for ours, theirs in _BLOCK.items()})
  leaves, origin = {}, {}
  for key, value in read_safetensors(weights_path).items():
    path = names.get(key, key)
    if key.endswith("self_attn.q_proj.weight"):
      value = to_interleaved(value, config["num_heads"])
    elif key.endswith("self_attn.k_proj.weight"):
      value = to_interleaved(value, config["num_kv_heads"])
    if dtype is not None:
      value = value.astype(dtype)  # fill.build's cast skips bfloat16, which numpy calls no float
    leaves[path], origin[path] = (value.T if path.endswith("/kernel") else value), key
  if config["tie_embeddings"]:
    leaves.pop("lm_head/kernel", None)  # a tied head that was saved anyway
  inv_freq = rope_frequencies(config["head_dim"], config["rope_theta"])
  for i in range(config["num_layers"]):
    leaves[f"layers/{i}/attn/inv_freq"] = inv_freq
  model = build(functools.partial(Llama, **config), leaves, source=weights_path, names=origin)
  return model, config
