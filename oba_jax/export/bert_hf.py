"""Pruned BERT encoders as Hugging Face `BertModel` directories (sentence-transformers too).

  frozen = attention_groups(structure, model)                 # what BertModel cannot lose
  plan = plan.select(structure, scores, target=..., frozen=frozen, scope="uniform")
  small = surgery.compact(model, plan)
  export_bert_hf(small, "out/minilm-pruned", source=minilm_path())

`BertModel` (transformers 5) computes the head size as hidden_size / num_attention_heads and
gives every layer one `intermediate_size`, and it no longer removes heads after loading
(`pruned_heads` is gone). So an exportable plan keeps the attention whole (heads, their features
and the hidden width: `attention_groups` names the groups that touch an attention projection)
and removes the same number of feed-forward units in every layer (`scope="uniform"`). Anything
else is refused by name before a file is written.

With `source` (the directory the dense model was read from, e.g. all-MiniLM-L6-v2's), the
export starts from its `config.json`, carries over the pooler weights it holds (`Bert` does not
use them; pruning never changes them) and copies its tokenizer and sentence-transformers files
(`COPIED`), so `BertModel.from_pretrained`, `AutoTokenizer` and `SentenceTransformer` load the
directory. Writes are whole or nothing (`huggingface.write_directory`).
"""

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import safetensors.numpy
from flax import nnx

from oba_jax.export.huggingface import DTYPES, check_arguments, json_bytes, write_directory
from oba_jax.export.llama_gguf import ExportError
from oba_jax.functional import flat_state
from oba_jax.models.bert import Bert
from oba_jax.models.vit import MultiHeadAttention
from oba_jax.structure.groups import Structure
from oba_jax.weights.io import read_state_dict

# Files of a source directory copied as they are: tokenizer, sentence-transformers modules.
COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
          "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
          "1_Pooling/config.json")
_LAYER = {  # our leaf under layers/{i}/ -> Hugging Face name under encoder.layer.{i}.
    "attention/query/kernel": "attention.self.query.weight",
    "attention/query/bias": "attention.self.query.bias",
    "attention/key/kernel": "attention.self.key.weight",
    "attention/key/bias": "attention.self.key.bias",
    "attention/value/kernel": "attention.self.value.weight",
    "attention/value/bias": "attention.self.value.bias",
    "attention/out/kernel": "attention.output.dense.weight",
    "attention/out/bias": "attention.output.dense.bias",
    "attention_norm/scale": "attention.output.LayerNorm.weight",
    "attention_norm/bias": "attention.output.LayerNorm.bias",
    "intermediate/kernel": "intermediate.dense.weight",
    "intermediate/bias": "intermediate.dense.bias",
    "output/kernel": "output.dense.weight",
    "output/bias": "output.dense.bias",
    "output_norm/scale": "output.LayerNorm.weight",
    "output_norm/bias": "output.LayerNorm.bias",
}
_EMBEDDINGS = {
    "word_embeddings/embedding": "embeddings.word_embeddings.weight",
    "position_embeddings/embedding": "embeddings.position_embeddings.weight",
    "token_type_embeddings/embedding": "embeddings.token_type_embeddings.weight",
    "embeddings_norm/scale": "embeddings.LayerNorm.weight",
    "embeddings_norm/bias": "embeddings.LayerNorm.bias",
}


def attention_groups(structure: Structure, model: nnx.Module) -> frozenset[str]:
  """Names of the groups of `structure` (traced from `model`) with a member in an attention
  projection: heads, features within heads and the hidden width (which the projections read).
  Freezing them leaves the feed-forward units, all `BertModel` can lose."""
  prefixes = tuple("".join(f"{p}/" for p in path) for path, module in nnx.iter_graph(model)
                   if isinstance(module, MultiHeadAttention))
  if not prefixes:
    raise ValueError(f"{type(model).__name__} has no MultiHeadAttention: the restriction is for "
                     "oba_jax.models.Bert.")
  structure.check_model(model)
  return frozenset(g.name for g in structure.groups
                   if any(m.path.startswith(prefixes) for m in g.members))


def _flat(model: nnx.Module) -> dict[str, np.ndarray]:
  return {path: np.asarray(v.get_value()) for path, v in flat_state(model, nnx.Param).items()}


def bert_hf_config(model: Bert, source_config: Mapping[str, Any] | None = None, *,
                   dtype: str = "float32") -> dict[str, Any]:
  """The `config.json` of `model` as a `BertModel`, or an `ExportError` saying why not.

  `source_config` is the dense source's config.json (its other settings are kept); the sizes
  are the model's own.
  """
  check_arguments(model, Bert, "export_bert_hf", dtype)
  leaves = _flat(model)
  vocab, hidden = leaves["word_embeddings/embedding"].shape
  changed, units = [], []
  for i, layer in enumerate(model.layers):
    attention = layer.attention
    widths = {name: leaves[f"layers/{i}/attention/{name}/kernel"].shape[1]
              for name in ("query", "key", "value")}
    widths["out (input)"] = leaves[f"layers/{i}/attention/out/kernel"].shape[0]
    heads = widths["query"] // attention.head_dim
    if (set(widths.values()) != {hidden} or attention.value_head_dim != attention.head_dim
        or heads * attention.head_dim != hidden):
      changed.append(f"layer {i}: {widths}, head size {attention.head_dim}, hidden {hidden}")
    units.append(leaves[f"layers/{i}/intermediate/kernel"].shape[1])
  if changed:
    raise ExportError(
        "the attention was pruned (" + "; ".join(changed[:2]) + (" ..." if len(changed) > 2
        else "") + "): BertModel computes the head size as hidden_size / num_attention_heads, "
        "so its projections are hidden_size wide. Freeze the attention groups "
        "(plan.select(..., frozen=attention_groups(structure, model))).")
  if len(set(units)) > 1:
    raise ExportError(f"the layers differ in width (feed-forward units per layer {units}): "
                      "BertModel has one intermediate_size. Select the plan layer-uniform: "
                      "plan.select(..., scope='uniform').")
  config = dict(source_config or {})
  if config.get("model_type", "bert") != "bert":
    raise ExportError(f"source_config has model_type {config['model_type']!r}, not 'bert': "
                      "another model's config?")
  config.pop("pruned_heads", None)
  config.update({
      "architectures": ["BertModel"], "model_type": "bert", "hidden_act": "gelu",
      "position_embedding_type": "absolute", "layer_norm_eps": 1e-12,
      "vocab_size": int(vocab), "hidden_size": int(hidden),
      "num_hidden_layers": len(model.layers),
      "num_attention_heads": int(hidden // model.layers[0].attention.head_dim),
      "intermediate_size": int(units[0]),
      "max_position_embeddings": int(leaves["position_embeddings/embedding"].shape[0]),
      "type_vocab_size": int(leaves["token_type_embeddings/embedding"].shape[0]),
      "torch_dtype": dtype,
  })
  return config


def bert_hf_tensors(model: Bert, config: Mapping[str, Any],
                    extra: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
  """{Hugging Face name: array in config['torch_dtype']}: linear weights [out, in], and the
  `extra` tensors (e.g. the source's pooler) as they are."""
  leaves = _flat(model)
  out = {theirs: leaves[ours] for ours, theirs in _EMBEDDINGS.items()}
  for i in range(len(model.layers)):
    for ours, theirs in _LAYER.items():
      value = leaves[f"layers/{i}/{ours}"]
      out[f"encoder.layer.{i}.{theirs}"] = value.T if ours.endswith("/kernel") else value
  out.update(extra or {})
  dtype = DTYPES[config["torch_dtype"]]
  return {name: np.ascontiguousarray(np.asarray(v).astype(dtype)) for name, v in out.items()}


def export_bert_hf(model: Bert, directory: str | os.PathLike, *,
                   source: str | os.PathLike | None = None,
                   dtype: str = "float32") -> dict[str, Any]:
  """Writes `model` as a Hugging Face `BertModel` directory; returns its config.json.

  Args:
    model: an `oba_jax.models.Bert`, dense or compacted by a layer-uniform plan that kept the
      attention (see the module doc).
    directory: created (or its files replaced, each atomically; other files stay).
    source: the dense model's directory (config.json, model.safetensors and the `COPIED`
      files it has); None writes the weights and config alone.
    dtype: the weights' dtype in the file: "float32", "float16" or "bfloat16".

  Raises:
    ExportError: not a Bert, pruned attention, layers of different widths (named, before
      anything is written).
  """
  source_config, extra, copied = {}, {}, {}
  if source is not None:
    source = os.fspath(source)
    with open(os.path.join(source, "config.json"), encoding="utf-8") as f:
      source_config = json.load(f)
    weights = os.path.join(source, "model.safetensors")
    if os.path.exists(weights):
      extra = {k.removeprefix("bert."): v for k, v in read_state_dict(weights).items()
               if k.removeprefix("bert.").startswith("pooler.")}
    for name in COPIED:
      path = os.path.join(source, name)
      if os.path.isfile(path):
        with open(path, "rb") as f:
          copied[name] = f.read()
  config = bert_hf_config(model, source_config, dtype=dtype)
  tensors = bert_hf_tensors(model, config, extra)
  contents = {"model.safetensors": safetensors.numpy.save(tensors, metadata={"format": "pt"}),
              **copied, "config.json": json_bytes(config)}
  write_directory(directory, contents)
  return config
