"""Pruned models out of oba_jax, into the formats other runtimes load.

  frozen = head_size_groups(structure, model)            # groups a GGUF export cannot lose
  plan = plan.select(structure, scores, target=..., frozen=frozen)
  small = surgery.compact(model, plan)
  export_gguf(small, "small.gguf", source="SmolLM2-135M-Instruct.Q4_1.gguf", dtype="q8_0")

Exporters (each needs its format's optional package, imported when called):

- `llama_gguf.export_gguf`: a `oba_jax.models.Llama`, dense or compacted, as a GGUF file that
  llama.cpp runs: architecture `llama` when every layer has the same widths, `deci` (per-layer head
  counts and FFN sizes) otherwise; metadata and tokenizer carried over from the source file.
- `huggingface.export_llama_hf`: a `Llama` whose layers all have the same widths (select the plan
  with `plan.select(..., scope="uniform")`) as a `LlamaForCausalLM` directory that `transformers`
  loads (`config.json`, `model.safetensors`, tokenizer files); `load_llama_hf` reads one back.
- `bert_hf.export_bert_hf`: a `oba_jax.models.Bert` whose attention is whole and whose layers
  keep the same number of feed-forward units (`attention_groups` frozen, `scope="uniform"`) as a
  `BertModel` directory, with the source's tokenizer and sentence-transformers files.
- `head_size.head_size_groups`: the restriction that makes a pruned Llama exportable (llama.cpp
  has one head size per model): the groups whose removal would change it, to freeze.
"""

from oba_jax.export.bert_hf import attention_groups, export_bert_hf
from oba_jax.export.head_size import head_size_groups
from oba_jax.export.huggingface import export_llama_hf, load_llama_hf
from oba_jax.export.llama_gguf import DTYPES, ExportError, export_gguf

__all__ = ["DTYPES", "ExportError", "attention_groups", "export_bert_hf", "export_gguf",
           "export_llama_hf", "head_size_groups", "load_llama_hf"]
