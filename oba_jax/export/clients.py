"""Exported models in the clients users deploy with: logits agreement and tokens per second.

  agreement = llama_cpp_agreement("small.gguf", small, sequences)   # vs oba_jax's logits
  speed = llama_cpp_speed({"dense": "dense.gguf", "small": "small.gguf"}, prompt)

`llama_cpp_*` run GGUF files in llama.cpp (`llama-cpp-python`), `transformers_*` Hugging Face
directories in `transformers` (with torch): both optional (the `export` extra), imported when
called; `missing()` names the clients that are not installed. Agreement is the largest
|client - oba_jax| next-token logit over the token sequences, absolute and over the largest
|logit| (llama.cpp's KV cache in float32 for it: its default float16 cache alone moves logits by
~1e-3). Speed loads every model in this one process and decodes the same prompt greedily,
repetitions interleaved over the models, so that dense and pruned are measured in the same
conditions; the figures are medians of prompt (prefill) and decode tokens per second.
"""

import importlib.util
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

# What installs each client: llama.cpp's Python binding and transformers come with the export
# extra; torch only as the exact CPU pin (any other spec pulls CUDA).
INSTALL = {"llama_cpp": "pip install -e '.[export]' (llama-cpp-python 0.3.36)",
           "transformers": "pip install -e '.[export]' torch==2.13.0 (transformers 5.25.0)"}
_GGML_F32 = 0  # GGML_TYPE_F32, llama.cpp's KV cache type for the agreement check


def missing() -> dict[str, str]:
  """{client: what to install} for each client of `INSTALL` that is not importable."""
  modules = {"llama_cpp": ("llama_cpp",), "transformers": ("transformers", "torch")}
  return {client: INSTALL[client] for client, names in modules.items()
          if any(importlib.util.find_spec(n) is None for n in names)}


def _agreement(client_logits: Callable[[list[int]], np.ndarray], model,
               sequences: Sequence[Sequence[int]]) -> dict:
  worst, worst_relative = 0.0, 0.0
  for ids in sequences:
    ours = np.asarray(model(jnp.asarray([list(ids)]))[0], np.float32)
    difference = float(np.abs(client_logits(list(ids)) - ours).max())
    worst = max(worst, difference)
    worst_relative = max(worst_relative, difference / float(np.abs(ours).max()))
  return {"sequences": len(sequences), "max_abs": worst, "max_abs_over_max_logit": worst_relative}


def llama_cpp_agreement(path: str, model, sequences: Sequence[Sequence[int]],
                        threads: int = 2) -> dict:
  """Max |llama.cpp - `model`| next-token logits of the GGUF file `path` (float32 KV cache)."""
  import llama_cpp  # noqa: PLC0415 (optional)
  context = max(len(s) for s in sequences) + 8
  llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=context, n_threads=threads,
                        type_k=_GGML_F32, type_v=_GGML_F32, verbose=False)

  def logits(ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], np.float32)

  try:
    return {"kv_cache": "f32", **_agreement(logits, model, sequences)}
  finally:
    llm.close()


def _transformers_model(directory: str):
  import torch  # noqa: PLC0415 (optional)
  import transformers  # noqa: PLC0415 (optional)
  return torch, transformers.LlamaForCausalLM.from_pretrained(str(directory),
                                                               dtype=torch.float32).eval()


def transformers_agreement(directory: str, model, sequences: Sequence[Sequence[int]]) -> dict:
  """Max |transformers - `model`| next-token logits of the `LlamaForCausalLM` `directory`."""
  torch, hf = _transformers_model(directory)

  def logits(ids):
    with torch.no_grad():
      return hf(torch.tensor([ids])).logits[0].numpy()

  return _agreement(logits, model, sequences)


def transformers_bert_agreement(directory: str, model, batches: Sequence[Mapping]) -> dict:
  """Max |transformers - `model`| last hidden states of the `BertModel` `directory` over the
  unpadded tokens of `batches` ({"tokens", "mask"} arrays), absolute and over the largest."""
  import torch  # noqa: PLC0415 (optional)
  import transformers  # noqa: PLC0415 (optional)
  hf = transformers.BertModel.from_pretrained(str(directory), dtype=torch.float32).eval()
  worst, worst_relative = 0.0, 0.0
  for batch in batches:
    tokens, mask = np.asarray(batch["tokens"]), np.asarray(batch["mask"]).astype(bool)
    with torch.no_grad():
      theirs = hf(input_ids=torch.tensor(tokens, dtype=torch.long),
                  attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state.numpy()
    ours = np.asarray(model.hidden_states(jnp.asarray(tokens), jnp.asarray(mask)), np.float32)
    difference = float(np.abs(theirs[mask] - ours[mask]).max())
    worst = max(worst, difference)
    worst_relative = max(worst_relative, difference / float(np.abs(ours[mask]).max()))
  return {"batches": len(batches), "max_abs": worst, "max_abs_over_max_hidden": worst_relative}


def _interleaved(runners: Mapping[str, Callable[[], tuple[float, float, list[int]]]],
                 reps: int, prompt_tokens: int, generate: int) -> dict:
  """Median tokens/s of each runner (`() -> (prefill s, decode s, generated ids)`), round 0 a
  warm-up, the rounds interleaved over the runners."""
  rates = {name: {"prompt": [], "decode": []} for name in runners}
  generated = {}
  for rep in range(reps + 1):
    for name, run in runners.items():
      prefill, decode, generated[name] = run()
      if rep:
        rates[name]["prompt"].append(prompt_tokens / prefill)
        rates[name]["decode"].append(generate / decode)
  return {name: {"prompt_tokens_per_s": statistics.median(r["prompt"]),
                 "decode_tokens_per_s": statistics.median(r["decode"]),
                 "decode_tokens_per_s_all": r["decode"], "generated_ids": generated[name]}
          for name, r in rates.items()}


def llama_cpp_speed(paths: Mapping[str, str], prompt: Sequence[int], generate: int = 64,
                    reps: int = 5, threads: int = 2) -> dict:
  """{name: median prompt and decode tokens/s} of each GGUF file in llama.cpp (its default
  float16 KV cache), greedy decoding of `generate` tokens after `prompt` (EOS ignored)."""
  import llama_cpp  # noqa: PLC0415 (optional)
  prompt = list(prompt)
  llms = {name: llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + generate + 8,
                                n_threads=threads, n_threads_batch=threads, verbose=False)
          for name, path in paths.items()}

  def runner(llm):
    def run():
      llm.reset()
      start = time.perf_counter()
      llm.eval(prompt)
      middle = time.perf_counter()
      out = []
      for _ in range(generate):
        # Without logits_all, llama-cpp-python no longer copies logits into `llm.scores`.
        last = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(llm.n_vocab(),))
        out.append(int(np.argmax(last)))
        llm.eval([out[-1]])
      return middle - start, time.perf_counter() - middle, out
    return run

  try:
    return _interleaved({name: runner(llm) for name, llm in llms.items()}, reps, len(prompt),
                        generate)
  finally:
    for llm in llms.values():
      llm.close()


def transformers_speed(directories: Mapping[str, str], prompt: Sequence[int],
                       generate: int = 64, reps: int = 5, threads: int = 2) -> dict:
  """{name: median prompt and decode tokens/s} of each `LlamaForCausalLM` directory in
  `transformers` (float32, torch with `threads` threads, its KV cache), greedy decoding."""
  import torch  # noqa: PLC0415 (optional)
  torch.set_num_threads(threads)
  models = {name: _transformers_model(d)[1] for name, d in directories.items()}

  def runner(hf):
    def run():
      with torch.no_grad():
        start = time.perf_counter()
        out = hf(torch.tensor([list(prompt)]), use_cache=True)
        middle = time.perf_counter()
        cache, token, ids = out.cache, int(out.logits[0, -1].argmax()), []
        for _ in range(generate):
          ids.append(token)
          out = hf(torch.tensor([[token]]), cache=cache, use_cache=True)
          cache, token = out.cache, int(out.logits[0, -1].argmax())
      return middle - start, time.perf_counter() - middle, ids
    return run

  return _interleaved({name: runner(hf) for name, hf in models.items()}, reps, len(prompt),
                      generate)


__all__ = ["INSTALL", "llama_cpp_agreement", "llama_cpp_speed", "missing",
           "transformers_agreement", "transformers_bert_agreement", "transformers_speed"]
