"""The run shared by the paper's experiment CLIs: dense model, pruning, fine-tuning, results.

  data -> dense model -> for each criterion and target: prune -> fine-tune -> evaluate
       -> results.json (+ accuracy.png with more than one target)

The dense model is trained in `workdir/dense` (the `config.dense` recipe), or read
from `config.init.weights` (a torchvision / timm state dict) or from
`config.init.checkpoint` (the work directory of a `train.finetune` run, e.g. another
run's `dense`). `config.mode` picks the pruning pipeline of `oba_jax.prune`:

- "one_shot": every target starts again from the dense model (method notes §4.3);
- "iterative": decreasing targets, each pruned from the previous fine-tuned model (§4.4);
- "unstructured": a density sweep of single-weight masks (§4.5); `targets` are densities.

Each fine-tune checkpoints into `workdir/<criterion>/<target>`, so a killed run
resumes; pruning is deterministic and is recomputed. A finished criterion x target is
kept in `workdir/cells` (`cells`): a resumed run, in this workdir or in a new one the
cells were copied to, skips it. Every CLI module holds
`get_config()` (`paper_config.base_config()` with the paper's numbers) and
ends with `cli.main(get_config, pipeline.run, paper_config.HELP)`.
"""

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from oba_jax import batchnorm, data, masks, models, prune, runs, runtime, surgery, train, weights
from oba_jax.experiments import cli
from oba_jax.experiments.cells import CELLS_DIR, Cells, Drawn
from oba_jax.experiments.entries import (criterion_entries, importance_settings, prune_configs,
                                         structured_steps)
from oba_jax.experiments.paper_config import smoke_config
from oba_jax.experiments.report import (TIMING_NOTE, max_abs_pruned, measure, plot, say_step,
                                        scoring, table)
from oba_jax.delta import path_str
from oba_jax.evaluation import evaluate
from oba_jax.functional import functional

MODES = ("one_shot", "iterative", "unstructured")
RESULTS_FILE = "results.json"
PLOT_FILE = "accuracy.png"


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError (or FileNotFoundError) naming the first bad setting; reads no data."""
  choices = (("model", config.model, models.MODELS), ("mode", config.mode, MODES),
             ("dataset", config.dataset, data.DATASETS),
             ("prune.schedule", config.prune.schedule, ("auto", *prune.SCHEDULES)),
             ("init.format", config.init.format, (None, "official", "torchvision", "timm")))
  for name, value, accepted in choices:
    if value not in accepted:
      raise ValueError(
          f"{name}={value!r} is not supported; accepted: {sorted(accepted, key=str)}.")
  names = criterion_entries(config)
  kind = "density" if config.mode == "unstructured" else "kept-FLOPs ratio"
  targets = tuple(config.targets)
  for target in targets:
    if not isinstance(target, (int, float)) or not 0 < target <= 1:
      raise ValueError(f"target={target!r} in targets={targets} must be a {kind} in (0, 1].")
  if not targets or (config.mode != "one_shot" and list(targets) != sorted(set(targets))[::-1]):
    raise ValueError(f"targets={targets} must be non-empty, and strictly decreasing in mode "
                     f"{config.mode!r}.")
  for name in names:  # every pruning setting, checked by building the configs
    prune_configs(config, name)
  cli.check_data_format(config)
  for name, path in (("data_dir", config.data_dir), ("init.checkpoint", config.init.checkpoint)):
    if path is not None and not os.path.isdir(path):
      raise FileNotFoundError(f"{name} {path!r} is not a directory.")
  if config.init.weights is not None and not os.path.isfile(config.init.weights):
    raise FileNotFoundError(f"init.weights {config.init.weights!r} is not a file.")
  given = [n for n in ("weights", "checkpoint") if config.init[n] is not None]
  if len(given) > 1:
    raise ValueError("give at most one of init.weights and init.checkpoint, got both.")
  if not given and not (config.dense.steps or config.dense.epochs or config.smoke):
    raise ValueError("dense.epochs=0: give the dense model as init.weights or init.checkpoint.")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the experiment of `config` in `workdir`; returns (and writes) its results.

  `results.json` also records the XLA compilations of the run (`runtime.Compilations`).
  """
  with runtime.Compilations() as compiled:
    results = _run(config, workdir)
  results["compilations"] = compiled.summary()
  results["breakdown"] = breakdown(results)
  cli.write_json(os.path.join(workdir, RESULTS_FILE), results)
  return results


# Settings whose batches are split over the devices (checked before the workdir is claimed).
BATCH_SIZES = ("dense.batch_size", "finetune.batch_size", "prune.importance_batch_size")


def _run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  start = time.perf_counter()
  check_config(config)
  where = dict(data_dir=config.data_dir, data_format=cli.data_format(config))
  info = cli.open_data(lambda: data.dataset_info(config.dataset, config.train_split, **where))
  _check_run(config, info)
  config = cli.start_run(workdir, config, smoke_config, BATCH_SIZES)
  stream = lambda seed, batch_size, **kw: data.load(
      config.dataset, config.train_split, batch_size=batch_size, train=True, seed=seed,
      **where, **kw)
  test = lambda: data.load(config.dataset, config.test_split, batch_size=config.eval_batch_size,
                           train=False, **where)
  cli.say(f"data: {config.dataset} ({data.resolve_format(config.dataset, **where)}"
          f"{', ' + config.data_dir if config.data_dir else ''}), {info.num_examples} training "
          f"examples of shape {info.image_shape}")
  first = cli.open_data(lambda: next(test())["image"])
  example, timing_input = jnp.asarray(first[:1]), jnp.asarray(first[:config.timing_batch])

  model = models.create(config.model, seed=config.seed, in_channels=info.image_shape[-1],
                        num_classes=info.num_classes, **config.model_kwargs.to_dict())
  dense_start = time.perf_counter()
  dense = _dense(model, config, workdir, stream, info.num_examples)
  cli.say("evaluating the dense model")
  dense_row = {"criterion": "dense", **measure(dense, dense, test, example, timing_input,
                                               config.timing_seconds),
               "wall_seconds": time.perf_counter() - dense_start}

  def finetune(masked, mask, directory, extra_state=None) -> tuple[nnx.Module, dict]:
    """The fine-tuned model (`masked` when fine-tuning is off) and the row's fine-tuning
    fields: its wall seconds and the test accuracy at `finetune.eval_at` and the end."""
    if not config.finetune.enabled:
      return masked, {"finetune_seconds": 0.0}
    tuned_start = time.perf_counter()
    recipe = _train_config(config.finetune, info.num_examples, config.seed)
    stage = f"fine-tuning {directory.replace(os.sep, ' at ')}"
    cli.say_training(stage, os.path.join(workdir, directory), recipe.total_steps)
    tuned, records = train.finetune(
        masked, stream(config.seed + 2, config.finetune.batch_size), recipe,
        workdir=os.path.join(workdir, directory), mask=mask, extra_state=extra_state,
        eval_batches=_Reread(test) if recipe.eval_at else None,
        progress=config.progress, desc=f"finetune {directory.replace(os.sep, ' ')}")
    curve = {str(r["step"]): r["eval_accuracy"] for r in records if "eval_accuracy" in r}
    return tuned, {"finetune_seconds": time.perf_counter() - tuned_start,
                   **({"accuracy_at_steps": curve} if curve else {})}

  def calibration():
    """The training batches that re-estimate BatchNorm statistics, from the first."""
    return stream(config.seed + 3, config.prune.importance_batch_size, augment=False)

  def recalibrate(masked: nnx.Module) -> nnx.Module:
    """`masked` with BatchNorm statistics of its own (stale ones make it look broken)."""
    count = config.prune.recalibration_batches
    if not count:
      return masked
    return batchnorm.recalibrate(masked, calibration(), num_batches=count)

  cells = Cells(os.path.join(workdir, CELLS_DIR), config, dense)

  def finish(row, tuned, compacted, mask) -> dict:
    """`row` with the pruned model's measurements."""
    cli.say(f"evaluating {row['criterion']} at {row['target']}")
    measured = time.perf_counter()
    row.update(measure(tuned, compacted, test, example, timing_input, config.timing_seconds),
               max_abs_pruned_weight=max_abs_pruned(functional(tuned)[1], mask))
    row["evaluate_seconds"] = row.get("evaluate_seconds", 0.0) + time.perf_counter() - measured
    row.update(kept_macs=row["macs"] / dense_row["macs"],
               kept_params=row["params"] / dense_row["params"],
               speedup=dense_row["inference_seconds"] / row["inference_seconds"])
    return row

  prune_one = _unstructured if config.mode == "unstructured" else _structured
  rows, unreachable, reused = [], [], 0
  for criterion in criterion_entries(config):
    finished = {target: cells.get(criterion, target) for target in config.targets}
    reused += sum(cell is not None for cell in finished.values())
    if None in finished.values():
      batches = Drawn(stream(config.seed + 1, config.prune.importance_batch_size,
                             augment=config.prune.augment))
      prune_one(config, criterion, dense, example, batches, test, recalibrate, finetune,
                calibration(), cells, finish)
    for target in config.targets:
      cell = cells.get(criterion, target)
      rows.extend([cell["row"]] if "row" in cell else [])
      unreachable.extend([cell["unreachable"]] if "unreachable" in cell else [])

  results = {"config": config.to_dict(), "mode": config.mode, "dense": dense_row,
             "pruned": rows, "unreachable": unreachable, "targets": list(config.targets),
             "importance": importance_settings(config), "cells_reused": reused,
             "wall_seconds": time.perf_counter() - start}
  cli.write_json(os.path.join(workdir, RESULTS_FILE), results)
  if len(config.targets) > 1:
    plot(results, os.path.join(workdir, PLOT_FILE))
  print(table(results))
  print(TIMING_NOTE.format(batch=config.timing_batch, seconds=config.timing_seconds))
  print(f"\nwrote {os.path.join(workdir, RESULTS_FILE)}")
  return results


def breakdown(results: dict) -> dict:
  """Where a run's wall time went, in seconds and as fractions of it.

  "dense" (training or reading it, and its evaluation), "score" (importance),
  "plan" (selection and masking), "finetune", "evaluate" (after pruning, after
  fine-tuning, compaction and inference timing); "compile" is XLA's tracing,
  lowering and compiling, which happens inside the others and is not added. Unstructured
  runs count their scoring under "plan".
  """
  rows = results["pruned"]
  seconds = {
      "dense": results["dense"]["wall_seconds"],
      "score": sum(r.get("score_seconds", 0.0) for r in rows),
      "plan": sum(r["prune_seconds"] - r.get("score_seconds", 0.0) for r in rows),
      "finetune": sum(r.get("finetune_seconds", 0.0) for r in rows),
      "evaluate": sum(r.get("evaluate_seconds", 0.0) for r in rows),
      "compile": results["compilations"]["seconds"],
  }
  total = results["wall_seconds"]
  return {"total_seconds": total, "seconds": seconds,
          "fractions": {k: v / total for k, v in seconds.items()}}


def _check_run(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> None:
  """The model and both training recipes can be built: checked before any work."""
  models.check(config.model, in_channels=info.image_shape[-1], num_classes=info.num_classes,
               **config.model_kwargs.to_dict())
  trains_dense = config.init.weights is None and config.init.checkpoint is None
  for name, needed in (("dense", trains_dense), ("finetune", config.finetune.enabled)):
    if needed and not config.smoke:  # smoke mode sets the length of both
      try:
        _train_config(config[name], info.num_examples, config.seed)
      except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


def _dense(model, config, workdir, stream, num_examples) -> nnx.Module:
  """The dense model: loaded from `config.init`, or trained in `workdir/dense`."""
  if config.init.weights is not None:
    cli.say(f"dense model: {config.model} from init.weights {config.init.weights}")
    weights.load(model, config.init.weights, format=config.init.format)
    model.eval()
    return model
  if config.init.checkpoint is not None:
    cli.say(f"dense model: {config.model} from init.checkpoint {config.init.checkpoint}")
    return restore(model, config.init.checkpoint)
  recipe = _train_config(config.dense, num_examples, config.seed)
  cli.say_training(f"dense training of {config.model}", os.path.join(workdir, "dense"),
                   recipe.total_steps)
  dense, _ = train.finetune(
      model, stream(config.seed, config.dense.batch_size), recipe,
      workdir=os.path.join(workdir, "dense"), progress=config.progress, desc="dense training")
  return dense


class _Reread:
  """A collection whose every `iter()` reads the test split again from its start."""

  def __init__(self, batches):
    self.batches = batches

  def __iter__(self):
    return iter(self.batches())


def _train_config(recipe, num_examples: int, seed: int) -> train.TrainConfig:
  """`train.TrainConfig` of a `_training` recipe."""
  per_epoch = max(1, num_examples // recipe.batch_size) if recipe.batch_size > 0 else 1
  length = (dict(steps=recipe.steps) if recipe.steps else
            dict(epochs=recipe.epochs, steps_per_epoch=per_epoch))
  return train.TrainConfig(**length, batch_size=recipe.batch_size,
                           learning_rate=recipe.learning_rate,
                           weight_decay=recipe.weight_decay, schedule="multistep",
                           milestones=tuple(recipe.milestones), seed=seed,
                           eval_at=tuple(recipe.get("eval_at", ())))


def _structured(config, criterion, dense, example, batches, test, recalibrate, finetune,
                calibration, cells, finish):
  """Prunes, fine-tunes and measures (`finish`) each target's cell not yet in `cells`, and
  puts it there; a target the official step rule cannot reach with this criterion is put
  as unreachable. `batches` (a `Drawn`) skips what a finished one-shot target read.

  At each target the pruned model's BatchNorm statistics are recalibrated before it is
  evaluated ("accuracy after pruning") and fine-tuned.
  """
  p = config.prune
  runtime = dict(key=jax.random.key(config.seed), callback=say_step, calibration=calibration)
  pruned = {}  # target -> accuracy right after pruning, and seconds of fine-tuning

  def tune(masked, plan, target):
    mask = masks.from_plan(plan.structure, plan, functional(masked)[1])
    start = time.perf_counter()
    masked = recalibrate(masked)
    after = evaluate(masked, test())
    evaluate_seconds = time.perf_counter() - start
    tuned, tuning = finetune(masked, mask, os.path.join(criterion, str(target)),
                             {"plan": plan.to_json()})
    pruned[target] = {"accuracy_after_pruning": after["accuracy"],
                      "loss_after_pruning": after["loss"], **tuning,
                      "evaluate_seconds": evaluate_seconds}
    return tuned, mask

  if config.mode == "iterative":  # each target starts from the last: all are computed again
    targets = iter(config.targets)
    masks_by_target = {}

    def tune_next(masked, plan):
      target = next(targets)
      tuned, masks_by_target[target] = tune(masked, plan, target)
      return tuned

    (settings,) = prune_configs(config, criterion)
    cli.say(f"pruning {criterion} iteratively to kept FLOPs {', '.join(map(str, config.targets))}")
    batches = scoring(batches, criterion, p.importance_batches, structured_steps(settings),
                      config.progress)
    results = prune.iterative(dense, example, batches, settings, finetune=tune_next, **runtime)
    for target, result in zip(config.targets, results):
      row = finish(_structured_row(criterion, target, result, pruned[target]), result.masked,
                   result.compacted, masks_by_target[target])
      cells.put(criterion, target, {"row": row})
    return
  for target, settings in zip(config.targets, prune_configs(config, criterion)):
    cell = cells.get(criterion, target)
    if cell is not None:  # finished earlier: skip its batches, as if it had read them now
      batches.skip_to(cell["drawn"])
      continue
    cli.say(f"pruning {criterion} to kept FLOPs {target} in at most {p.steps} steps "
            f"({settings.procedure} procedure)")
    try:
      result = prune.one_shot(dense, example, scoring(batches, criterion, p.importance_batches,
                                                      p.steps, config.progress, f" to {target}"),
                              settings, **runtime)
    except prune.UnreachableTarget as error:  # an outcome of the rule: recorded, not fatal
      cli.say(f"{criterion} at {target}: {error}")
      cells.put(criterion, target, {"unreachable": {"criterion": criterion, "target": target,
                                                    "reason": str(error)}}, batches.count)
      continue
    tuned, mask = tune(result.masked, result.plan, target)
    row = finish(_structured_row(criterion, target, result, pruned[target]), tuned,
                 surgery.compact(tuned, result.plan, verify=False), mask)  # verified by one_shot
    cells.put(criterion, target, {"row": row}, batches.count)


def _structured_row(criterion, target, result, pruned) -> dict:
  history = result.history
  return {"criterion": criterion, "target": target, **pruned,
          "prune_seconds": sum(step.seconds for step in history),
          "score_seconds": sum(step.score_seconds for step in history),
          "steps": len(history), "step_kept_macs": [step.kept_macs for step in history],
          "step_recalibration_batches": sum(step.recalibration_batches for step in history)}


def _unstructured(config, criterion, dense, example, batches, test, recalibrate, finetune,
                  calibration, cells, finish):
  """Prunes, fine-tunes and measures every density (recalibrated first) and puts each cell
  in `cells` (one sweep: all are computed again when one is missing)."""
  del example  # masks keep the shapes: nothing to trace; densities are met
  (settings,) = prune_configs(config, criterion)
  p = config.prune
  cli.say(f"pruning {criterion} unstructured to densities {', '.join(map(str, config.targets))}")
  batches = scoring(batches, criterion, p.importance_batches,
                    p.steps_per_density * len(config.targets), config.progress)
  say_density = lambda record, *_: cli.say(
      f"  step {record.step + 1}: density {record.density:.3f} ({record.seconds:.1f} s)")
  results = prune.unstructured(dense, batches, settings, key=jax.random.key(config.seed),
                               callback=say_density, calibration=calibration)
  for target, result in zip(config.targets, results):
    start = time.perf_counter()
    masked = recalibrate(result.masked)
    after = evaluate(masked, test())
    row = {"criterion": criterion, "target": result.density,
           "density": 1.0 - masks.sparsity(result.mask).total,
           "accuracy_after_pruning": after["accuracy"], "loss_after_pruning": after["loss"],
           "evaluate_seconds": time.perf_counter() - start,
           "prune_seconds": sum(step.seconds for step in result.history)}
    tuned, tuning = finetune(masked, result.mask, os.path.join(criterion, str(result.density)))
    row.update(tuning)
    cells.put(criterion, target, {"row": finish(row, tuned, tuned, result.mask)})


def restore(model: nnx.Module, directory: str) -> nnx.Module:
  """`model` with the parameters and state of the latest checkpoint of a `train.finetune` run."""
  saved = runs.read_state(directory)  # on this machine's devices, whatever wrote it
  if saved is None:
    raise FileNotFoundError(f"init.checkpoint {directory!r} holds no checkpoint of "
                            f"train.finetune (no {runs.CHECKPOINT_DIR}/<step> in it).")
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  for state, name in ((params, "params"), (model_state, "model_state")):
    by_path = {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(
        saved[1][name])[0]}  # restored keys are strings ('0', not 0)
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(
        lambda p, x: _saved_like(by_path, path_str(p), x, directory), nnx.to_pure_dict(state)))
  restored = nnx.merge(graphdef, params, model_state)
  restored.eval()
  return restored


def _saved_like(by_path: dict, path: str, leaf, directory: str) -> jax.Array:
  """The saved value of `path`, or a ValueError if the model has no such leaf there."""
  saved = by_path.get(path)
  if saved is None or saved.shape != leaf.shape:
    found = "nothing" if saved is None else f"shape {saved.shape}"
    raise ValueError(f"init.checkpoint {directory!r} does not fit the model: {path!r} has "
                     f"shape {leaf.shape} in the model, {found} in the checkpoint.")
  return jnp.asarray(saved)


