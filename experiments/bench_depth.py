"""Benchmark: the JAX gradient's cost against depth on XLA:CPU (issue 16, item 3).

The wide CIFAR ResNet (`ResNetCIFAR(depth, width)`, BatchNorm in training mode unless a
variant says otherwise, batch 64 of 32x32x3, float32), jitted `value_and_grad` of the
classification loss, as in bench_scores.py. For every VARIANT (XLA flags, which must be
set before JAX starts, so each variant runs in a subprocess of this script; or a model
formulation) and depth it records, in that subprocess:
  the median time of the gradient over interleaved repetitions (all depths alike),
  its time per layer (conv and dense kernels) and the ratio of that to the first depth's,
  the compiled program: fusions, instructions inside fusions (a fused instruction
    duplicated into k consumers counts k times), transposes, convolutions, copies,
    and XLA's memory analysis,
  where asked (--torch), PyTorch's gradient of the same architecture (NCHW, float32,
    BN train, `loss.backward()`) timed interleaved in the same process,
  for the profile variants, XLA:CPU's per-op time by fusion kind (a jax.profiler trace
    with --xla_cpu_enable_xprof_traceme), and with --torch PyTorch's per-op self time
    (torch.profiler) of the same step, in the same process.

  python experiments/bench_depth.py --depths 20,32,56 --reps 5 \
      --out experiments/results/bench_depth.json
  python experiments/bench_depth.py --variants default,barriers --depths 20,56 --reps 3
  python experiments/bench_depth.py --variants paired,paired_eval_bn,paired_old_emitters \
      --reps 5 --out experiments/results/bench_depth_paired_1.json

Variants: see VARIANTS. "default" is the library's model under XLA's default flags, where
XLA:CPU removes the model's optimization barriers (the program is then the same as before
the barriers were added); "barriers" keeps them (`oba_jax.runtime.keep_optimization_barriers`,
what the command-line tools do). The "paired" variants time both programs in one process
(the barriers kept through a compile option), interleaved, with PyTorch.
"""

import argparse
import collections
import datetime
import glob
import gzip
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

KEEP = "--xla_disable_hlo_passes=cse_barrier_expander"
# name: (XLA_FLAGS, model options, description)
VARIANTS = {
    "default": ("", {}, "XLA defaults (barriers dropped by XLA:CPU = the program before the fix)"),
    "barriers": (KEEP, {}, "optimization barrier after every block kept (the fix)"),
    "eval_bn": ("", {"train_bn": False}, "BatchNorm in inference mode, XLA defaults"),
    "eval_bn_barriers": (KEEP, {"train_bn": False}, "BatchNorm in inference mode, barriers kept"),
    "remat": ("", {"remat": True}, "nnx.remat (jax.checkpoint) around every block, XLA defaults"),
    "one_thread": ("--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1", {},
                   "XLA:CPU on one thread (Eigen and intra-op pool)"),
    "fast_math": ("--xla_cpu_enable_fast_math=true", {}, "XLA:CPU fast math"),
    "no_ynn": ("--xla_cpu_experimental_ynn_fusion_type=", {},
               "no YNNPACK fusions (XLA's own emitters for those ops)"),
    "no_fusion_emitters": ("--xla_cpu_use_fusion_emitters=false", {},
                           "XLA:CPU's older loop emitters instead of the fusion emitters"),
    "bf16_barriers": (KEEP, {"dtype": "bfloat16"}, "parameters and input in bfloat16, barriers kept"),
    "paired": ("", {"paired": True},
               "one process: XLA defaults and barriers kept (compile option), interleaved"),
    "paired_eval_bn": ("", {"paired": True, "train_bn": False},
                       "as paired, BatchNorm in inference mode"),
    "paired_old_emitters": ("--xla_cpu_use_fusion_emitters=false", {"paired": True},
                            "as paired, XLA:CPU's older loop emitters"),
    "profile_default": ("--xla_cpu_enable_xprof_traceme=true", {"profile": True},
                        "per-op profile, XLA defaults"),
    "profile_barriers": (KEEP + " --xla_cpu_enable_xprof_traceme=true", {"profile": True},
                         "per-op profile, barriers kept"),
}
DEFAULT_VARIANTS = ("default,barriers,eval_bn,eval_bn_barriers,remat,one_thread,fast_math,"
                    "no_ynn,no_fusion_emitters,bf16_barriers,profile_default,profile_barriers")


# ----------------------------------------------------------------------------- worker side

def build(depth, width, batch_size, train_bn=True, remat=False, dtype="float32"):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  import oba_jax
  from oba_jax.models import ResNetCIFAR
  from oba_jax.models import resnet_cifar

  model = ResNetCIFAR(depth, width=width, num_classes=10, rngs=nnx.Rngs(0))
  if remat:  # a checkpointed call of every block (experiment only)
    def call(self, x):
      x = self.stem(x)
      for block in self.blocks:
        x = jax.lax.optimization_barrier(nnx.remat(lambda b, y: b(y))(block, x))
      return self.classifier(jnp.mean(x, axis=(1, 2)))
    resnet_cifar.ResNetCIFAR.__call__ = call
  model.train() if train_bn else model.eval()
  apply_fn, params = oba_jax.functional(model)
  rng = np.random.default_rng(0)
  image = rng.normal(size=(batch_size, 32, 32, 3)).astype(np.float32)
  labels = rng.integers(0, 10, batch_size)
  batch = {"image": jnp.asarray(image), "label": jnp.asarray(labels, jnp.int32)}
  if dtype != "float32":
    params = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                          else x, params)
    batch = {"image": batch["image"].astype(dtype), "label": batch["label"]}
  return oba_jax.classification(apply_fn), params, batch, (image, labels)


def hlo_stats(compiled) -> dict:
  """Counts in the optimized program's entry computation, and XLA's memory analysis."""
  text = compiled.as_text()
  bodies = {m.group(1).lstrip("%"): m.group(2).count("\n") + 1
            for m in re.finditer(r"^(%?[\w.\-]+) [^\n]*\{\n(.*?)\n\}", text, re.S | re.M)}
  entry = re.search(r"^ENTRY [^\n]*\{\n(.*?)\n\}", text, re.S | re.M).group(1)
  kinds = collections.defaultdict(lambda: [0, 0])
  ops = collections.Counter()
  for line in entry.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w\-]+?)(?:\.\d+)? = \S+ ([\w\-]+)\(", line)
    if not m:
      continue
    ops[m.group(2)] += 1
    call = re.search(r"calls=%?([\w.\-]+)", line)
    if m.group(2) == "fusion" and call:
      kinds[m.group(1)][0] += 1
      kinds[m.group(1)][1] += bodies[call.group(1)]
  mem = compiled.memory_analysis()
  return {"entry_instructions": sum(ops.values()), "fusions": ops["fusion"],
          "fused_instructions": sum(v[1] for v in kinds.values()),
          "convolutions_unfused": ops["convolution"], "copies": ops["copy"],
          "transpose_fusions": kinds["transpose_copy_fusion"][0],
          "transpose_fused_instructions": kinds["transpose_copy_fusion"][1],
          "by_fusion_kind": {k: {"count": v[0], "instructions": v[1]} for k, v in
                             sorted(kinds.items(), key=lambda kv: -kv[1][1])},
          "opt_barriers": ops["opt-barrier"],
          "temp_mib": mem.temp_size_in_bytes / 2**20,
          "argument_mib": mem.argument_size_in_bytes / 2**20,
          "output_mib": mem.output_size_in_bytes / 2**20}


def torch_gradient(depth, width, data):
  """PyTorch's gradient of the same architecture (NCHW, BN train); None without torch."""
  try:
    import torch
    import torch.nn.functional as F
    from torch import nn
  except ImportError:
    return None

  class ConvBN(nn.Module):
    def __init__(self, cin, cout, k=3, stride=1, relu=True):
      super().__init__()
      self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
      self.bn = nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1)
      self.relu = relu

    def forward(self, x):
      y = self.bn(self.conv(x))
      return F.relu(y) if self.relu else y

  class Block(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1, self.conv2 = ConvBN(cin, cout, stride=stride), ConvBN(cout, cout, relu=False)
      self.shortcut = (ConvBN(cin, cout, k=1, stride=stride, relu=False)
                       if stride != 1 or cin != cout else None)

    def forward(self, x):
      s = x if self.shortcut is None else self.shortcut(x)
      return F.relu(self.conv2(self.conv1(x)) + s)

  class Net(nn.Module):
    def __init__(self):
      super().__init__()
      n = (depth - 2) // 6
      self.stem, blocks, c = ConvBN(3, width), [], width
      for stage, w in enumerate((width, 2 * width, 4 * width)):
        for i in range(n):
          blocks.append(Block(c, w, 2 if stage > 0 and i == 0 else 1))
          c = w
      self.blocks, self.fc = nn.Sequential(*blocks), nn.Linear(c, 10)

    def forward(self, x):
      return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))

  torch.manual_seed(0)
  net = Net().train()
  x = torch.from_numpy(data[0]).permute(0, 3, 1, 2).contiguous()
  y = torch.from_numpy(data[1].astype("int64"))

  def step():
    for p in net.parameters():
      p.grad = None
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    return loss

  step()
  return step, torch.__version__, torch.get_num_threads()


def profile(compiled, params, batch, calls=2) -> dict:
  """Milliseconds per call of XLA:CPU's ops, summed by kind (name without its number)."""
  import jax
  jax.block_until_ready(compiled(params, batch))
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(calls):
        jax.block_until_ready(compiled(params, batch))
    trace = json.load(gzip.open(glob.glob(f"{tmp}/**/perfetto_trace.json.gz", recursive=True)[0]))
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  ms, count = collections.defaultdict(float), collections.Counter()
  wall = 0.0
  for e in events:
    if e.get("ph") != "X":
      continue
    if e["name"] == "ThunkExecutor::Execute (wait for completion)":
      wall += e["dur"] / 1e3 / calls
    if e["name"].startswith("$") or "::" in e["name"] or "Pjit" in e["name"]:
      continue
    kind = re.sub(r"\.\d+$", "", e["name"])
    ms[kind] += e["dur"] / 1e3 / calls
    count[kind] += 1
  return {"wall_ms": wall, "ops_ms": sum(ms.values()),
          "by_kind": {k: {"ms": round(v, 3), "ops": count[k] // calls}
                      for k, v in sorted(ms.items(), key=lambda kv: -kv[1])}}


def torch_profile(step, calls=2) -> dict:
  """Milliseconds per call of PyTorch's ops (self CPU time, by aten op), as `profile` for XLA."""
  import torch
  step()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    start = time.perf_counter()
    for _ in range(calls):
      step()
    wall = (time.perf_counter() - start) / calls
  by_op = {e.key: {"ms": round(e.self_cpu_time_total / 1e3 / calls, 3), "ops": e.count // calls}
           for e in prof.key_averages() if e.self_cpu_time_total > 0}
  return {"wall_ms": 1e3 * wall, "ops_ms": sum(v["ms"] for v in by_op.values()),
          "by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1]["ms"]))}


def worker(args) -> dict:
  import jax
  import numpy as np

  flags, options, _ = VARIANTS[args.worker]
  depths = [int(d) for d in args.depths.split(",")]
  use_torch = args.torch and args.worker in args.torch.split(",")
  compiled, record = {}, {}
  for depth in depths:
    objective, params, batch, data = build(depth, args.width, args.batch,
                                            options.get("train_bn", True),
                                            options.get("remat", False),
                                            options.get("dtype", "float32"))
    start = time.perf_counter()
    lowered = jax.jit(jax.value_and_grad(objective.loss)).lower(params, batch)
    fn = lowered.compile({"xla_disable_hlo_passes": "cse_barrier_expander"}
                         if options.get("paired") else None)
    compile_s = time.perf_counter() - start
    value, grads = jax.block_until_ready(fn(params, batch))
    layers = sum(1 for path, _ in jax.tree_util.tree_leaves_with_path(params)
                 if "kernel" in jax.tree_util.keystr(path))
    rec = {"depth": depth, "layers": layers, "compile_s": compile_s, "loss": float(value),
           "hlo": hlo_stats(fn), "times_s": [], "torch_times_s": []}
    if options.get("paired"):  # the same program without the barriers, in this process
      rec["default"] = {"fn": lowered.compile(), "times_s": []}
      rec["default"]["hlo"] = hlo_stats(rec["default"]["fn"])
      default_value, default_grads = rec["default"]["fn"](params, batch)
      rec["default"]["max_abs_diff_vs_barriers"] = max(
          float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
          for a, b in zip(jax.tree.leaves((value, grads)),
                          jax.tree.leaves((default_value, default_grads))))
    if options.get("dtype", "float32") != "float32":  # error against float32, same process
      ref_obj, ref_params, ref_batch, _ = build(depth, args.width, args.batch,
                                                options.get("train_bn", True))
      ref_value, ref_grads = jax.jit(jax.value_and_grad(ref_obj.loss))(ref_params, ref_batch)
      num = sum(float(np.sum((np.asarray(g, np.float32) - np.asarray(r)) ** 2))
                for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
      den = sum(float(np.sum(np.asarray(r) ** 2)) for r in jax.tree.leaves(ref_grads))
      rec["loss_float32"] = float(ref_value)
      rec["grad_relative_error_vs_float32"] = (num / den) ** 0.5
    torch_step = torch_gradient(depth, args.width, data) if use_torch else None
    if torch_step is not None:
      rec["torch_version"], rec["torch_threads"] = torch_step[1], torch_step[2]
    compiled[depth] = (fn, params, batch, torch_step and torch_step[0])
    record[depth] = rec
    print(f"[{args.worker}] depth {depth}: compiled in {compile_s:.1f} s, "
          f"{rec['hlo']['fused_instructions']} fused instructions, "
          f"temp {rec['hlo']['temp_mib']:.0f} MiB", file=sys.stderr, flush=True)

  if options.get("profile"):
    for depth, (fn, params, batch, torch_step) in compiled.items():
      record[depth]["profile"] = profile(fn, params, batch)
      record[depth]["times_s"] = [record[depth]["profile"]["wall_ms"] / 1e3]
      if torch_step is not None:  # PyTorch's ops in the same process, after XLA's
        record[depth]["torch_profile"] = torch_profile(torch_step)
        record[depth]["torch_times_s"] = [record[depth]["torch_profile"]["wall_ms"] / 1e3]
  else:
    for rep in range(args.reps):  # interleaved over depths (and PyTorch)
      for depth, (fn, params, batch, torch_step) in compiled.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(params, batch))
        record[depth]["times_s"].append(time.perf_counter() - start)
        if "default" in record[depth]:
          start = time.perf_counter()
          jax.block_until_ready(record[depth]["default"]["fn"](params, batch))
          record[depth]["default"]["times_s"].append(time.perf_counter() - start)
        if torch_step is not None:
          start = time.perf_counter()
          torch_step()
          record[depth]["torch_times_s"].append(time.perf_counter() - start)
      print(f"[{args.worker}] round {rep + 1}/{args.reps}: " + ", ".join(
          f"{d}: {r['times_s'][-1]:.3f} s" for d, r in record.items()), file=sys.stderr,
          flush=True)

  first = None
  for depth in depths:
    rec = record[depth]
    rec["grad_s"] = statistics.median(rec["times_s"])
    rec["ms_per_layer"] = 1e3 * rec["grad_s"] / rec["layers"]
    first = first or rec["ms_per_layer"]
    rec["per_layer_vs_first"] = rec["ms_per_layer"] / first
    if rec["torch_times_s"]:
      rec["torch_s"] = statistics.median(rec["torch_times_s"])
      rec["jax_over_torch"] = rec["grad_s"] / rec["torch_s"]
    if "default" in rec:
      d = rec["default"]
      del d["fn"]
      d["grad_s"] = statistics.median(d["times_s"])
      d["ms_per_layer"] = 1e3 * d["grad_s"] / rec["layers"]
      d["per_layer_vs_first"] = d["ms_per_layer"] / record[depths[0]]["default"]["ms_per_layer"]
      if rec["torch_times_s"]:
        d["jax_over_torch"] = d["grad_s"] / rec["torch_s"]
  return {"variant": args.worker, "xla_flags": flags, "options": options,
          "description": VARIANTS[args.worker][2], "jax": jax.__version__,
          "devices": str(jax.devices()), "records": [record[d] for d in depths]}


# ----------------------------------------------------------------------------- driver side

def run_variant(name, args) -> dict:
  flags = VARIANTS[name][0]
  env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip(),
             OMP_WAIT_POLICY="PASSIVE")  # PyTorch's idle OpenMP threads do not spin
  cmd = [sys.executable, __file__, "--worker", name, "--depths", args.depths,
         "--reps", str(args.reps), "--width", str(args.width), "--batch", str(args.batch),
         "--torch", args.torch]
  start = time.perf_counter()
  proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
  if proc.returncode:
    return {"variant": name, "xla_flags": flags, "error": f"exit status {proc.returncode}"}
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  result["wall_s"] = time.perf_counter() - start
  return result


def table(result) -> str:
  lines = [f"{'depth':>5s} {'layers':>6s} {'grad s':>7s} {'ms/layer':>8s} {'vs first':>8s} "
           f"{'torch s':>7s} {'JAX/torch':>9s} {'fused ins':>9s} {'transp':>6s} {'temp MiB':>8s}"]
  for r in result["records"]:
    lines.append(f"{r['depth']:5d} {r['layers']:6d} {r['grad_s']:7.3f} {r['ms_per_layer']:8.2f} "
                 f"{r['per_layer_vs_first']:8.2f} {r.get('torch_s', float('nan')):7.3f} "
                 f"{r.get('jax_over_torch', float('nan')):9.2f} "
                 f"{r['hlo']['fused_instructions']:9d} {r['hlo']['transpose_fusions']:6d} "
                 f"{r['hlo']['temp_mib']:8.1f}")
  if "default" in result["records"][0]:
    lines.append("  the same process, XLA defaults (barriers dropped):")
    for r in result["records"]:
      d = r["default"]
      lines.append(f"{r['depth']:5d} {r['layers']:6d} {d['grad_s']:7.3f} {d['ms_per_layer']:8.2f} "
                   f"{d['per_layer_vs_first']:8.2f} {r.get('torch_s', float('nan')):7.3f} "
                   f"{d.get('jax_over_torch', float('nan')):9.2f} "
                   f"{d['hlo']['fused_instructions']:9d} {d['hlo']['transpose_fusions']:6d} "
                   f"{d['hlo']['temp_mib']:8.1f}   max |diff| {d['max_abs_diff_vs_barriers']:.1e}")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--depths", default="20,32,56")
  parser.add_argument("--width", type=int, default=16)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--variants", default=DEFAULT_VARIANTS)
  parser.add_argument("--torch", default="default,barriers,paired",
                      help="variants that also time PyTorch's gradient in their process")
  parser.add_argument("--out", default=None)
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(worker(args)))
    return

  results = []
  for name in args.variants.split(","):
    result = run_variant(name, args)
    results.append(result)
    print(f"\n== {name}: {VARIANTS[name][2]}  XLA_FLAGS='{VARIANTS[name][0]}'")
    if "error" in result:
      print("   failed:", result["error"])
      continue
    print(table(result), flush=True)
    for r in result["records"]:
      if "profile" in r:
        top = list(r["profile"]["by_kind"].items())[:6]
        print(f"   depth {r['depth']}: ops {r['profile']['ops_ms']:.0f} ms/call: " + ", ".join(
            f"{k} {v['ms']:.0f} ms ({v['ops']})" for k, v in top))
      if "grad_relative_error_vs_float32" in r:
        print(f"   depth {r['depth']}: gradient relative error vs float32 "
              f"{r['grad_relative_error_vs_float32']:.2e}, loss {r['loss']:.5f} "
              f"(float32 {r['loss_float32']:.5f})")
  summary = {"command": " ".join(sys.argv), "date": datetime.datetime.now().isoformat(),
             "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                         "load_average": os.getloadavg(),
                         "processor": platform.processor()},
             "width": args.width, "batch": args.batch, "reps": args.reps, "results": results}
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(summary, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()
