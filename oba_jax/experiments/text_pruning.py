"""Structured pruning of a pretrained transformer on WordNet text, shared by the text CLIs.

A `Task` says what is model-specific (the model, its batches, its task loss, its held-out metric);
`run_task` does the rest, the same way for every task:

  dense eval on the held-out split
  -> for every calibration seed and criterion: mean per-parameter scores over `calibration_batches`
     batches (`criteria.importance` of the criterion on the task loss), reduced per group
     (`structure.group_scores`) and cached in the workdir (scores/<criterion>_seed<s>.npz)
  -> for every kept-params target: `plan.select` -> `masks.apply` -> `surgery.compact`
     -> held-out metric (cached: runs/<criterion>_seed<s>_<target>.json) of the masked model,
     which the compacted one equals (the largest difference on a held-out batch is recorded),
     or of the compacted model itself with `eval_compacted`
  -> with a `Task.recover` (recovery fine-tuning): the compacted model recovered (resumable in
     recovery/<criterion>_seed<s>_<target>/) and evaluated again (cached:
     recovered/<criterion>_seed<s>_<target>.json); the row gets `after_recovery` (the metrics)
     and `recovery_seconds`. The dense model gets the same recovery once per calibration seed
     (recovered/dense_seed<s>.json; results.json's `dense_recovered`): recovery on calibration
     text also adapts a model to that text, so a recovered model is compared with the dense
     model recovered alike, not with the dense model as it was
  -> with a `Task.export`: the final model (recovered, else compacted) of the runs it wants, and
     the dense one, written in deployment formats and checked in their clients (cached:
     export/<criterion>_seed<s>_<target>.json), then compared across files (export/compare.json);
     results.json gets `export`
  -> results.json and <metric>.png (metric vs kept fraction, one line per criterion).

Each row records the scoring wall time of its criterion and seed (`scoring_seconds`) and the
process's peak resident memory when it was made (`peak_rss_bytes`, a running maximum).

Cost per criterion is measured once (seed of the first run) as the steady-state time of one
jitted scoring step over that of one jitted gradient of the same loss on the same batch, and the
peak memory of the "oba" scoring step as XLA's compiled memory analysis (arguments + outputs +
temporaries) next to the process's peak resident memory.

Every stage writes its result before the next starts, so a killed run resumes where it stopped.
Scores use a task loss (next-token cross-entropy, in-batch InfoNCE), never self-distillation:
at the dense weights a distillation loss has zero gradient and H = GGN, so OBA's scores vanish.
"""

import dataclasses
import functools
import os
import resource
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from oba_jax import criteria, estimate, files, masks, plan, runtime, structure, surgery
from oba_jax.data import wordnet
from oba_jax.experiments import cli, text_report
from oba_jax.functional import Objective, functional
from oba_jax.validate import check_choice

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Task:
  """What one text-pruning experiment is about.

  Attributes:
    model: the dense NNX model.
    example_inputs: inputs for tracing (shapes of one batch).
    ignore: parameter path prefixes never pruned.
    objective: `objective(apply_fn) -> Objective`, the task loss on a batch.
    calibration: `calibration(seed) -> list of batches` for scoring.
    evaluate: `evaluate(model) -> {metric: value}` on the held-out split.
    metric: the metric plotted; `higher_is_better` says which way is good.
    info: anything to record in results.json (model facts, data sizes).
    inputs: {name: `files.fingerprint` or description} of the weights and text read, the
      workdir's identity besides the config (`cli.claim_workdir`).
    recover: `recover(compacted, seed, workdir, desc) -> (model, info)`: recovery
      fine-tuning of a pruned model (resuming from `workdir`), or None for none.
    frozen: `frozen(traced structure) -> names` of groups no plan may prune (e.g. those an
      export format cannot lose), or None.
    export: the deployment files of some runs (`Export`), or None.
  """

  model: nnx.Module
  example_inputs: tuple
  ignore: tuple[str, ...]
  objective: Callable[[Callable], Objective]
  calibration: Callable[[int], list]
  evaluate: Callable[[nnx.Module], dict]
  metric: str
  higher_is_better: bool
  info: dict
  inputs: dict
  recover: Callable[[nnx.Module, int, str, str], tuple[nnx.Module, dict]] | None = None
  frozen: Callable[[structure.Structure], frozenset[str]] | None = None
  export: "Export | None" = None

  def frozen_groups(self, traced: structure.Structure) -> frozenset[str]:
    return frozenset() if self.frozen is None else self.frozen(traced)


@dataclasses.dataclass(frozen=True)
class Export:
  """How a CLI ships pruned models (`Task.export`).

  Attributes:
    wanted: `wanted(criterion, seed) -> bool`: whether the runs of this criterion and
      calibration seed are exported (every target of them; the dense model always is).
    write: `write(model, name, directory) -> dict`: writes `model` under `directory` as files
      named after `name`, checks them, and returns what it wrote and measured (JSON-able).
    compare: `compare({name: write's result}) -> dict`: what is measured across all the files at
      once (e.g. tokens per second, dense and pruned interleaved in one process).
  """

  wanted: Callable[[str, int], bool]
  write: Callable[[nnx.Module, str, str], dict]
  compare: Callable[[dict], dict]


# --help descriptions of the settings every text CLI shares (`cli.usage`).
COMMON_HELP = {
    "criteria": "comma-separated importance criteria to compare, each scored and pruned on its "
                f"own; accepted: {','.join(sorted(criteria.CRITERIA))}",
    "calibration_seeds": "comma-separated seeds; each picks and orders its own calibration "
                         "batches and gives one run per criterion and target",
    "calibration_batches": "batches whose per-parameter scores are averaged per criterion and "
                           "seed",
    "targets": "comma-separated kept fractions of the dense parameter count, each in (0, 1] and "
               "reachable within max_ratio",
    "prune": "which groups may be pruned: all, attention (heads and head features) or mlp "
             "(feed-forward units)",
    "scope": "how plans rank groups: global (one ranking over all layers), local (the same "
             "fraction of every group) or uniform (the same number removed from every layer's "
             "counterpart group, chosen by their summed scores: what a one-width export needs)",
    "reduction": "how per-parameter scores become one score per group member: one of "
                 f"{'|'.join(structure.REDUCTIONS)}",
    "max_ratio": "at most this fraction of any group is removed, in [0, 1]",
    "split_seed": "seed of the split of WordNet synsets into calibration and held-out parts "
                  "(independent of the calibration seeds)",
    "held_out": "fraction of WordNet synsets held out for evaluation, in (0, 1)",
    "measure_cost": "time each criterion's scoring step in units of one gradient, and its "
                    "memory (costs.json)",
    "mesh": "devices as DATAxMODEL, e.g. 2x4: batches split over DATA, every parameter over "
            "MODEL (FSDP-style); empty: all devices on DATA. DATA must divide batch_size",
    "eval_compacted": "evaluate the compacted model itself (one compilation per plan) instead "
                      "of the masked one, which it equals",
    "batch_size": "examples per calibration batch",
    "max_tokens": "tokens per text: longer ones are truncated, shorter ones padded",
    "smoke": "a tiny run: a tiny random model on UTF-8 bytes (no download), WordNet if "
             "installed (a few built-in sentences otherwise), a few small batches",
}


def add_common_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The settings every text-pruning CLI shares."""
  c.criteria = ("random,magnitude,taylor,activation_norm,obd_fisher,oba,oba_residual,"
                "oba_bilinear,oba_t12")
  c.calibration_seeds = "1,2"  # comma-separated; each picks its own calibration batches
  c.calibration_batches = 8  # N batches averaged per criterion and seed
  c.targets = "0.95,0.9,0.85"  # kept fractions of the dense parameter count
  c.prune = "all"  # "all", "attention" or "mlp": which groups may be pruned
  c.scope = "global"  # plan.SCOPES
  c.reduction = "paper"  # structure.REDUCTIONS
  c.max_ratio = 0.9  # at most this fraction of a group goes
  c.split_seed = 0  # the held-out split (independent of the calibration seeds)
  c.held_out = 0.2  # fraction of WordNet synsets held out
  c.measure_cost = True  # time each criterion in units of one gradient
  # Devices as DATAxMODEL, e.g. "2x4": batches split over DATA and every parameter over MODEL
  # (FSDP-style, as a pod job holds a model too large to replicate); empty: all on DATA.
  c.mesh = ""
  # Evaluate the compacted model itself (one compilation per plan) rather than the masked one
  # (same shapes as the dense model, so its compilation is reused). Either way the compacted
  # model is built and compared with the masked one on a held-out batch.
  c.eval_compacted = False
  c.progress = True
  c.smoke = False
  return c


def check_export_criterion(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError unless `export.criterion` is empty or one of `criteria`."""
  if config.export.criterion and config.export.criterion not in cli.names(config.criteria):
    raise ValueError(f"export.criterion={config.export.criterion!r} is not one of criteria="
                     f"{config.criteria!r}.")


def check_common(config: ml_collections.ConfigDict) -> dict:
  """The parsed lists, or a ValueError naming the bad setting (before any work)."""
  names = cli.check_names("criteria", config.criteria, criteria.CRITERIA)
  try:
    seeds = [int(s) for s in cli.names(config.calibration_seeds)]
    targets = [float(t) for t in cli.names(config.targets)]
  except ValueError:
    raise ValueError(f"calibration_seeds={config.calibration_seeds!r} and "
                     f"targets={config.targets!r} must be comma-separated numbers.") from None
  if not seeds:
    raise ValueError("calibration_seeds is empty.")
  if not targets or any(not 0 < t <= 1 for t in targets):
    raise ValueError(f"targets={config.targets!r}: kept-params fractions in (0, 1].")
  if config.prune not in ("all", "attention", "mlp"):
    raise ValueError(f"prune={config.prune!r}; accepted: 'all', 'attention', 'mlp'.")
  check_choice("scope", config.scope, plan.SCOPES)
  if config.reduction not in structure.REDUCTIONS:
    raise ValueError(f"reduction={config.reduction!r}; accepted: {structure.REDUCTIONS}.")
  if config.calibration_batches < 1:
    raise ValueError(f"calibration_batches={config.calibration_batches} must be >= 1.")
  if not 0 <= config.max_ratio <= 1:
    raise ValueError(f"max_ratio={config.max_ratio!r}: the largest fraction of a group that "
                     "may go, a number in [0, 1].")
  return dict(criteria=names, seeds=seeds, targets=sorted(targets, reverse=True),
              mesh=parse_mesh(config.mesh))


def parse_mesh(text: str) -> tuple[int, int] | None:
  """"DATAxMODEL" -> (data, model) sizes whose product is the device count; "" -> None."""
  if not text:
    return None
  try:
    data, model = (int(n) for n in text.lower().split("x"))
  except ValueError:
    raise ValueError(f"mesh={text!r}: write DATAxMODEL, e.g. '2x4', or leave it empty.") from None
  if data < 1 or model < 1 or data * model != jax.device_count():
    raise ValueError(f"mesh={text!r}: DATA x MODEL must be {jax.device_count()}, the number of "
                     "devices (XLA_FLAGS=--xla_force_host_platform_device_count=N for N CPU "
                     "devices).")
  return data, model

def start(config: ml_collections.ConfigDict, workdir: str,
          smoke: Callable[[ml_collections.ConfigDict], ml_collections.ConfigDict],
          build_task: Callable[[ml_collections.ConfigDict], "Task"], *,
          independent_examples: bool = True):
  """Checks every setting, builds the task, checks what needs the model, then claims `workdir`.

  Nothing a run can still refuse comes after the claim: the lists (`check_common`), the
  task (model, tokenizer and text; a damaged file is named), the targets the caps can
  reach (`plan.select` on the traced model), and batches the mesh's data axis divides.
  `independent_examples=False` (an in-batch contrastive loss) refuses the criteria that
  run the model one example at a time (the Fisher diagonal). The claim records the task's
  inputs, so a resume on other weights or text is refused.
  Returns the config to run (smoke-sized with `smoke` when `config.smoke`), its
  `check_common` result, the task and its traced structure.
  """
  parsed = check_common(config)
  per_example = [n for n in parsed["criteria"] if criteria.CRITERIA[n].per_example]
  if per_example and not independent_examples:
    raise ValueError(
        f"criteria {per_example} run the model one example at a time, and this task's loss "
        "couples the examples of a batch (in-batch negatives), so it has no per-example Fisher; "
        f"accepted: {sorted(n for n, c in criteria.CRITERIA.items() if not c.per_example)}.")
  if not config.smoke and not wordnet.available():
    wordnet.directory_or_default()  # raises, saying how to install it
  claimed = config
  if config.smoke:
    config = smoke(config)
    parsed = check_common(config)
  task = build_task(config)
  traced = check_task(task, config, parsed)
  cli.claim_workdir(workdir, claimed, inputs=task.inputs)
  return config, parsed, task, traced


def check_task(task: "Task", config: ml_collections.ConfigDict, parsed: dict):
  """The traced structure of `task.model`, or a ValueError for a target the caps make
  unreachable or calibration batches the data axis of the mesh does not divide."""
  traced = structure.trace(task.model, *task.example_inputs, ignore=task.ignore)
  zeros = {g.name: np.zeros(g.size) for g in traced.groups}
  try:
    plan.select(traced, zeros, target=plan.KeptParams(min(parsed["targets"])),
                max_ratio=config.max_ratio, scope=config.scope,
                frozen=task.frozen_groups(traced))
  except ValueError as error:
    raise ValueError(f"targets={config.targets!r}: {error}") from None
  devices = parsed["mesh"][0] if parsed["mesh"] else jax.device_count()
  batch = task.calibration(parsed["seeds"][0])[0]
  rows = {np.shape(x)[0] for x in jax.tree.leaves(batch)}
  if any(r % devices for r in rows):
    raise ValueError(
        f"batch_size={config.batch_size} gives calibration batches of {sorted(rows)} rows, "
        f"which the {devices} devices of the mesh's data axis (mesh={config.mesh!r}, "
        f"{jax.device_count()} devices) do not divide; choose a batch_size that is a multiple "
        f"of {devices}, or a --config.mesh=DATAxMODEL whose DATA divides it.")
  return traced


_SMOKE_SENTENCES = [
    "The cat sat on the mat.", "A river flows to the sea.", "She reads a book every night.",
    "The sun rises in the east.", "They built a small wooden boat.", "He plays the old piano.",
    "Birds fly south in the autumn.", "The children laughed at the clown.",
    "A strong wind blew all night.", "We walked along the quiet beach.",
]


def wordnet_parts(config: ml_collections.ConfigDict):
  """(calibration, held-out) synsets of WordNet split by `config.split_seed`, and what was
  read (`wordnet.fingerprint`, for the workdir's identity); in smoke mode without WordNet
  installed, a few built-in sentences stand in for it (as nouns: any `eval_pos` with 'n')."""
  if wordnet.available() or not config.smoke:
    synsets, source = wordnet.read(), wordnet.fingerprint()
  else:
    synsets = [wordnet.Synset(f"n{i:08d}", ("word",), s.lower().rstrip("."), (s,))
               for i, s in enumerate(_SMOKE_SENTENCES * 4)]
    source = "built-in smoke sentences (WordNet not installed)"
  held_out = config.held_out if len(synsets) > 100 else 0.5
  return (*wordnet.split(synsets, held_out=held_out, split_seed=config.split_seed), source)


def prune_ignore(prune: str, num_layers: int, attention: str, mlp: Sequence[str]) -> tuple:
  """Path prefixes that keep the other part fixed: `prune`="attention" fixes the MLP modules
  `layers/<i>/<mlp...>`, "mlp" the attention module `layers/<i>/<attention>`."""
  if prune == "all":
    return ()
  names = list(mlp) if prune == "attention" else [attention]
  return tuple(f"layers/{i}/{n}" for i in range(num_layers) for n in names)


def _score_fn(name: str, objective: Objective):
  return functools.partial(criteria.CRITERIA[name].score, objective)


def _group_scores_cached(path, compute) -> dict[str, np.ndarray]:
  """The group scores cached in `path`, else `compute()`'s, written there atomically."""
  if os.path.exists(path):
    try:
      with np.load(path) as f:
        return {k: f[k] for k in f.files}
    except Exception as error:  # zipfile, zlib, EOF and format errors of numpy
      raise files.damaged(path, "cached group scores", error,
                          "It was cut short or overwritten; delete it to recompute the "
                          "scores.") from None
  value = compute()
  files.write_atomic(path, lambda f: np.savez(f, **value))
  return value


def _time(fn, *args, reps: int = 3) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def measure_cost(name: str, objective: Objective, params, batch, key, mesh) -> dict:
  """Steady-state seconds of one scoring step and of one gradient on `mesh` (params as they
  lie on it); XLA's memory analysis."""
  score = _score_fn(name, objective)
  step = jax.jit(lambda p, b: score(p, b, key))
  grad = jax.jit(jax.grad(objective.loss))
  batch = estimate.shard_batch(batch, mesh)
  with jax.set_mesh(mesh):
    return _cost(step, grad, params, batch)


def _cost(step, grad, params, batch) -> dict:
  start = time.perf_counter()
  compiled = step.lower(params, batch).compile()
  compile_seconds = time.perf_counter() - start
  out = {"compile_seconds": compile_seconds}
  if runtime.peak_bytes(compiled) is not None:
    out["xla_bytes"] = runtime.peak_bytes(compiled)
    out["xla_temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
  out["seconds"] = _time(compiled, params, batch)
  out["gradient_seconds"] = _time(grad, params, batch)
  out["in_gradients"] = out["seconds"] / out["gradient_seconds"]
  out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return out


def run_task(config: ml_collections.ConfigDict, workdir: str, task: Task, parsed: dict,
             traced) -> dict:
  """The pipeline of the module docstring on the claimed `workdir` (`start`); returns what
  results.json holds."""
  os.makedirs(os.path.join(workdir, "scores"), exist_ok=True)
  os.makedirs(os.path.join(workdir, "runs"), exist_ok=True)
  if task.recover is not None:
    os.makedirs(os.path.join(workdir, "recovered"), exist_ok=True)
  if task.export is not None:
    os.makedirs(os.path.join(workdir, "export"), exist_ok=True)
  dense_path = os.path.join(workdir, "dense.json")
  if os.path.exists(dense_path):
    dense = cli.read_json(dense_path, what="the cached dense evaluation")
  else:
    start = time.perf_counter()
    dense = task.evaluate(task.model)
    dense["eval_seconds"] = time.perf_counter() - start
    cli.write_json(dense_path, dense)
  print(f"dense: {dense}")

  apply_fn, params = functional(task.model)
  objective = task.objective(apply_fn)
  dense_params = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  if parsed["mesh"]:
    mesh = estimate.pod_mesh(*parsed["mesh"])
    params = estimate.shard_params(params, mesh)
  else:
    mesh = estimate.data_mesh()
  costs_path = os.path.join(workdir, "costs.json")
  costs = (cli.read_json(costs_path, what="the cached costs of the criteria")
           if os.path.exists(costs_path) else {})

  rows, exported = [], {}
  if task.export is not None:
    exported["dense"] = _exported(task.export, lambda: task.model, "dense", workdir)
  dense_recovered = {}
  for seed in parsed["seeds"]:
    batches = None
    if task.recover is not None:
      dense_name = f"dense_seed{seed}"
      dense_recovered[str(seed)] = _recovered(task, dense_name, workdir, lambda: task.recover(
          task.model, seed, os.path.join(workdir, "recovery", dense_name),
          f"recover {dense_name}"))["after_recovery"]
      print(f"dense seed {seed} recovered: "
            f"{task.metric}={dense_recovered[str(seed)][task.metric]:.4f}")
    for name in parsed["criteria"]:
      key = jax.random.key(seed)
      path = os.path.join(workdir, "scores", f"{name}_seed{seed}.npz")

      def compute():
        nonlocal batches
        batches = task.calibration(seed) if batches is None else batches
        start = time.perf_counter()
        s = criteria.importance(name, apply_fn, batches, params=params, objective=task.objective,
                                num_batches=config.calibration_batches, key=key, mesh=mesh,
                                progress=config.progress)
        grouped = structure.group_scores(traced, s, reduction=config.reduction)
        seconds = time.perf_counter() - start
        grouped = {k: np.asarray(v) for k, v in grouped.items()}
        grouped["__seconds__"] = np.asarray(seconds)
        return grouped

      grouped = _group_scores_cached(path, compute)
      seconds = float(grouped.pop("__seconds__"))
      if config.measure_cost and name not in costs and criteria.CRITERIA[name].uses_data:
        batches = task.calibration(seed) if batches is None else batches
        costs[name] = measure_cost(name, objective, params, batches[0], jax.random.key(seed),
                                   mesh)
        cli.write_json(costs_path, costs)
        print(f"cost {name}: {costs[name]}")
      for target in parsed["targets"]:
        run = _Run(task, traced, grouped, target, config, seed, f"{name}_seed{seed}_{target:g}",
                   workdir)
        run_path = os.path.join(workdir, "runs", f"{run.name}.json")
        if os.path.exists(run_path):
          row = cli.read_json(run_path, what="a cached pruned evaluation")
        else:
          row = _prune_and_evaluate(task, run, config, dense_params)
          row.update(criterion=name, seed=seed, target=target, scoring_seconds=seconds,
                     peak_rss_bytes=_peak_rss_bytes())
          cli.write_json(run_path, row)
        print(f"{name} seed {seed} target {target:g}: {task.metric}={row[task.metric]:.4f} "
              f"kept_params={row['kept_params']:.4f}")
        if task.recover is not None:
          row = {**row, **_recovered(task, run.name, workdir, lambda run=run: run.recovered)}
          print(f"{name} seed {seed} target {target:g} recovered: "
                f"{task.metric}={row['after_recovery'][task.metric]:.4f}")
        if task.export is not None and task.export.wanted(name, seed):
          exported[run.name] = _exported(task.export, run.final, run.name, workdir)
        rows.append(row)

  results = {"config": config.to_dict(), "dense": dense, "runs": rows, "costs": costs,
             "info": task.info, "metric": task.metric, "dense_params": dense_params,
             "groups": {g.name: g.size for g in traced.groups}}
  if task.recover is not None:
    results["dense_recovered"] = dense_recovered
  if task.export is not None:
    results["export"] = {"files": exported, "compare": _compared(task.export, exported, workdir)}
  cli.write_json(os.path.join(workdir, "results.json"), results)
  text_report.plot(results, os.path.join(workdir, f"{task.metric}.png"))
  print(text_report.table(results))
  print(f"\nwrote {os.path.join(workdir, 'results.json')}")
  return results


def _param_count(model: nnx.Module) -> int:
  return sum(int(np.size(x)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Run:
  """One (criterion, seed, target) run: its plan and models, each built when first needed."""

  def __init__(self, task: Task, traced, group_vectors, target: float, config, seed: int,
               name: str, workdir: str):
    self.task, self.traced, self.group_vectors = task, traced, group_vectors
    self.target, self.config, self.seed, self.name = target, config, seed, name
    self.workdir = workdir

  @functools.cached_property
  def pruned(self):
    """(plan, masked model, compacted model) of the target on the group scores."""
    chosen = plan.select(self.traced, self.group_vectors, target=plan.KeptParams(self.target),
                         max_ratio=self.config.max_ratio, scope=self.config.scope,
                         frozen=self.task.frozen_groups(self.traced))
    masked = masks.apply(self.task.model, chosen)
    return chosen, masked, surgery.compact(masked, chosen)

  @functools.cached_property
  def recovered(self) -> tuple[nnx.Module, dict]:
    """`Task.recover` of the compacted model, resuming from (or finished in) its directory
    under workdir/recovery."""
    return self.task.recover(self.pruned[2], self.seed,
                             os.path.join(self.workdir, "recovery", self.name),
                             f"recover {self.name}")

  def final(self) -> nnx.Module:
    """The model the run hands over: recovered when the task recovers, else compacted."""
    if self.task.recover is None:
      return self.pruned[2]
    return self.recovered[0]


def _recovered(task: Task, name: str, workdir: str,
               recover: Callable[[], tuple[nnx.Module, dict]]) -> dict:
  """{"after_recovery": metrics, "recovery_seconds", ...} of `recover()` (a run's or the dense
  model's recovery, resuming from recovery/<name>/), cached in recovered/<name>.json."""
  path = os.path.join(workdir, "recovered", f"{name}.json")
  if os.path.exists(path):
    return cli.read_json(path, what="a cached recovered evaluation")
  start = time.perf_counter()
  model, info = recover()
  seconds = time.perf_counter() - start
  start = time.perf_counter()
  metrics = task.evaluate(model)
  result = {"after_recovery": {**metrics, "eval_seconds": time.perf_counter() - start},
            "recovery_seconds": seconds, "recovery": info,
            "recovery_peak_rss_bytes": _peak_rss_bytes()}
  cli.write_json(path, result)
  return result


def _exported(export: Export, model: Callable[[], nnx.Module], name: str, workdir: str) -> dict:
  """`export.write` of `model()` as `name`, with its parameter count and seconds, cached in
  export/<name>.json."""
  path = os.path.join(workdir, "export", f"{name}.json")
  if os.path.exists(path):
    return cli.read_json(path, what="a cached export")
  start, exported = time.perf_counter(), model()
  result = {**export.write(exported, name, os.path.join(workdir, "export")),
            "params": _param_count(exported), "export_seconds": time.perf_counter() - start}
  cli.write_json(path, result)
  return cli.read_json(path, what="a cached export")  # as a resumed run reads it


def _compared(export: Export, exported: dict, workdir: str) -> dict:
  """`export.compare` of the exported files, cached in export/compare.json for these names."""
  path = os.path.join(workdir, "export", "compare.json")
  if os.path.exists(path):
    cached = cli.read_json(path, what="the cached comparison of the exported files")
    if cached.get("names") == sorted(exported):
      return cached
  cli.write_json(path, {"names": sorted(exported), **export.compare(exported)})
  return cli.read_json(path, what="the cached comparison of the exported files")


def _prune_and_evaluate(task: Task, run: _Run, config, dense_params: int) -> dict:
  """The row of one pruned model."""
  chosen, masked, compacted = run.pruned
  masked_out = masked(*task.example_inputs)
  compact_out = compacted(*task.example_inputs)
  start = time.perf_counter()
  metrics = task.evaluate(compacted if config.eval_compacted else masked)
  params = _param_count(compacted)
  return {**metrics, "eval_seconds": time.perf_counter() - start,
          "evaluated": "compacted" if config.eval_compacted else "masked",
          "kept_params": params / dense_params,
          "kept_macs": chosen.predicted.macs / chosen.dense.macs,
          "removed": {g: len(v) for g, v in chosen.removed.items() if len(v)},
          "max_abs_compact_minus_masked": float(jnp.max(jnp.abs(compact_out - masked_out)))}
