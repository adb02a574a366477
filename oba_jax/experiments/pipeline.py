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
resumes; pruning is deterministic and is recomputed. Every CLI module holds
`get_config()` (this module's `base_config()` with the paper's numbers) and
ends with `cli.main(get_config, pipeline.run)`.
"""

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from matplotlib import figure

from oba_jax import (criteria, data, flops, masks, models, prune, runs, runtime, surgery, train,
                     weights)
from oba_jax.experiments import cli
from oba_jax.delta import path_str
from oba_jax.evaluation import evaluate
from oba_jax.functional import functional

MODES = ("one_shot", "iterative", "unstructured")
RESULTS_FILE = "results.json"
PLOT_FILE = "accuracy.png"


def base_config() -> ml_collections.ConfigDict:
  """The settings every CLI shares; the paper's CIFAR recipes (method notes §4.2, §4.3)."""
  c = ml_collections.ConfigDict()
  c.dataset = "cifar10"
  c.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.data_format = "auto"  # one of oba_jax.data.FORMATS; auto: detected from data_dir
  c.train_split = "train"
  c.test_split = "test"
  c.model = "vgg19_cifar"  # a name in oba_jax.models.MODELS
  c.model_kwargs = ml_collections.ConfigDict()  # more models.create arguments, e.g. width
  c.seed = 0
  c.init = ml_collections.ConfigDict()
  c.init.weights = ml_collections.FieldReference(None, field_type=str)  # .pth / .safetensors
  # The state dict's layout; None: the model's own ("official" for the CIFAR models, the
  # paper code's; "torchvision" for ResNet-50 and ViT, or "timm" for a ViT).
  c.init.format = ml_collections.FieldReference(None, field_type=str)
  c.init.checkpoint = ml_collections.FieldReference(None, field_type=str)  # a finetune workdir
  # Dense pre-training when no init is given: SGD lr 0.1, wd 5e-4, 200 epochs, x0.1 at
  # epochs 60/100/150, batch 64 (§4.2). epochs=0 means: a model must come from `init`.
  c.dense = _training(epochs=200, learning_rate=0.1, weight_decay=5e-4,
                      milestones=(60 / 200, 100 / 200, 150 / 200))
  c.mode = "one_shot"  # one of MODES
  # The official OBA score is "oba_bilinear" (method notes §1.2); the baselines are §4.9's.
  c.criteria = "oba_bilinear,magnitude,taylor"  # names in oba_jax.criteria.CRITERIA
  c.targets = (0.14,)  # kept FLOPs (structured) or density (unstructured), each in (0, 1]
  c.prune = ml_collections.ConfigDict()
  c.prune.steps = 50  # S (§4.3)
  c.prune.schedule = "exponential"  # a name in oba_jax.prune.SCHEDULES
  c.prune.importance_batches = 200  # batches of importance per step (§4.3)
  c.prune.importance_batch_size = 64
  c.prune.augment = True  # training augmentation on the importance batches (§4.3)
  # Importance is collected with BatchNorm in training mode (batch statistics), as the
  # official WrappedPruner does (§2.2, §4.8); "eval" scores the inference-mode function.
  c.prune.batchnorm = "train"
  c.prune.reduction = "paper"  # per-layer signed sums, |mean|, mean over layers, /max (§1.4)
  c.prune.max_ratio = 0.95  # at most 95% of a group removed (§4.1)
  c.prune.round_to = ml_collections.FieldReference(None, field_type=int)
  c.prune.ignore = ()  # parameter path prefixes never pruned, e.g. ("conv_proj",)
  c.prune.steps_per_density = 1  # unstructured steps from one density to the next
  # Fine-tuning after pruning: SGD lr 1e-3, wd 1e-4, 150 epochs, x0.1 at 80/120, batch 64 (§4.3).
  c.finetune = _training(epochs=150, learning_rate=1e-3, weight_decay=1e-4,
                         milestones=(80 / 150, 120 / 150))
  c.finetune.enabled = True
  c.eval_batch_size = 500
  c.timing_batch = 64  # the batch of the measured inference time
  c.timing_seconds = 1.0  # measure inference at least this long (median of >= 10 passes)
  c.progress = True
  c.smoke = False  # a tiny run for tests: `smoke_model_kwargs`, a few steps and examples
  c.smoke_model_kwargs = ml_collections.ConfigDict()
  return c


# One line per --config key, for --help (`cli.usage`); "*.name" describes every key "name".
HELP = {
    "dataset": "a name in oba_jax.data.DATASETS: cifar10, cifar100, imagenet2012, fashion_mnist",
    "train_split": "split to train and score on (TFDS slice syntax, e.g. train[:90%])",
    "test_split": "split to evaluate on (e.g. test, validation, test[:1000])",
    "model": "a name in oba_jax.models.MODELS",
    "model_kwargs": "more oba_jax.models.create arguments, e.g. width",
    "init.weights": "a .pth/.safetensors state dict to start from instead of dense training",
    "init.format": "layout of init.weights: official|torchvision|timm; None: the model's own",
    "init.checkpoint": "a train.finetune workdir (e.g. another run's dense/) to start from",
    "dense": "dense pre-training when no init is given (SGD, momentum 0.9, multistep)",
    "finetune": "fine-tuning after pruning (SGD, momentum 0.9, multistep)",
    "*.epochs": "training epochs (0 for dense: the model must come from init)",
    "*.steps": "training steps; overrides epochs when set",
    "*.batch_size": "examples per training step",
    "*.learning_rate": "initial SGD learning rate",
    "*.weight_decay": "L2 weight decay",
    "*.milestones": "fractions of the run where the learning rate drops x0.1",
    "finetune.enabled": "fine-tune after pruning (False: evaluate right after pruning)",
    "mode": "one_shot (each target from the dense model) | iterative | unstructured",
    "criteria": "comma-separated names in oba_jax.criteria.CRITERIA, e.g. oba_bilinear,taylor",
    "targets": "kept FLOPs (structured) or densities (unstructured), each in (0, 1]",
    "prune.steps": "S: pruning steps to the last target, re-scoring before each",
    "prune.schedule": "a name in oba_jax.prune.SCHEDULES: exponential | linear",
    "prune.importance_batches": "batches of importance collected per pruning step",
    "prune.importance_batch_size": "examples per importance batch",
    "prune.augment": "training augmentation on the importance batches",
    "prune.batchnorm": "BatchNorm mode while scoring: train (batch statistics, the paper's) "
                       "| eval",
    "prune.reduction": "group reduction: paper (normalised, the official) | sum",
    "prune.max_ratio": "at most this fraction of any group is removed",
    "prune.round_to": "keep widths a multiple of this; None: any width",
    "prune.ignore": "parameter path prefixes never pruned, e.g. conv_proj",
    "prune.steps_per_density": "unstructured steps from one density to the next",
    "eval_batch_size": "examples per evaluation batch",
    "timing_batch": "batch size of the measured inference time",
    "smoke_model_kwargs": "model_kwargs that smoke mode sets (the tiny model)",
}


def imagenet_config() -> ml_collections.ConfigDict:
  """The paper's ImageNet pruning and fine-tuning of torchvision models (method notes §4.6)."""
  c = base_config()
  c.dataset = "imagenet2012"
  c.test_split = "validation"
  c.dense.epochs = 0  # no pre-training: the dense model is init.weights (torchvision)
  c.targets = (0.51,)  # --ops_ratios default, kept FLOPs
  c.criteria = "oba_bilinear"
  c.prune.importance_batches = 350  # 350 batches of 2 per step
  c.prune.importance_batch_size = 2
  # 100 epochs, lr 1e-3, wd 1e-4, x0.1 at epochs 30/60/80, 64 images per GPU.
  c.finetune.update(epochs=100, milestones=(0.3, 0.6, 0.8))
  c.eval_batch_size = 250
  return c


def _training(*, epochs, learning_rate, weight_decay, milestones) -> ml_collections.ConfigDict:
  """An SGD recipe (momentum 0.9, multistep schedule); `steps`, if set, overrides `epochs`."""
  return ml_collections.ConfigDict(dict(
      epochs=epochs, steps=ml_collections.FieldReference(None, field_type=int), batch_size=64,
      learning_rate=learning_rate, weight_decay=weight_decay, milestones=milestones))


def _smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A few steps on a few examples with the CLI's tiny model; criteria left at the CIFAR
  default are cut to its first two, more than two targets to the first and the last (a
  smoke run then fits in a minute on 2 cores)."""
  subset = {"prune.steps_per_density": 1}
  if config.criteria == base_config().criteria:
    subset["criteria"] = ",".join(cli.names(config.criteria)[:2])
  if len(config.targets) > 2:  # the first and the last
    subset["targets"] = (config.targets[0], config.targets[-1])
  return cli.smoke(config, {**subset,
      **{f"model_kwargs.{k}": v for k, v in config.smoke_model_kwargs.to_dict().items()},
      "data_format": cli.data_format(config), "timing_seconds": 0.05,
      "test_split": f"{config.test_split}[:32]", "eval_batch_size": 16, "timing_batch": 4,
      "dense.steps": 4, "dense.batch_size": 8, "finetune.steps": 3, "finetune.batch_size": 8,
      "prune.steps": 2, "prune.importance_batches": 2, "prune.importance_batch_size": 8})


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError (or FileNotFoundError) naming the first bad setting; reads no data."""
  choices = (("model", config.model, models.MODELS), ("mode", config.mode, MODES),
             ("dataset", config.dataset, data.DATASETS),
             ("prune.schedule", config.prune.schedule, prune.SCHEDULES),
             ("init.format", config.init.format, (None, "official", "torchvision", "timm")))
  for name, value, accepted in choices:
    if value not in accepted:
      raise ValueError(
          f"{name}={value!r} is not supported; accepted: {sorted(accepted, key=str)}.")
  names = cli.check_names("criteria", config.criteria, criteria.CRITERIA)
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
  cli.write_json(os.path.join(workdir, RESULTS_FILE), results)
  return results


def _run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  start = time.perf_counter()
  check_config(config)
  where = dict(data_dir=config.data_dir, data_format=cli.data_format(config))
  info = cli.open_data(lambda: data.dataset_info(config.dataset, config.train_split, **where))
  _check_run(config, info)
  cli.claim_workdir(workdir, config)
  if config.smoke:
    config = _smoke(config)
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

  def finetune(masked, mask, directory, extra_state=None) -> tuple[nnx.Module, float]:
    """The fine-tuned model (`masked` when fine-tuning is off) and the wall seconds it took."""
    if not config.finetune.enabled:
      return masked, 0.0
    tuned_start = time.perf_counter()
    recipe = _train_config(config.finetune, info.num_examples, config.seed)
    stage = f"fine-tuning {directory.replace(os.sep, ' at ')}"
    cli.say_training(stage, os.path.join(workdir, directory), recipe.total_steps)
    tuned, _ = train.finetune(
        masked, stream(config.seed + 2, config.finetune.batch_size), recipe,
        workdir=os.path.join(workdir, directory), mask=mask, extra_state=extra_state,
        progress=config.progress, desc=f"finetune {directory.replace(os.sep, ' ')}")
    return tuned, time.perf_counter() - tuned_start

  prune_one = _unstructured if config.mode == "unstructured" else _structured
  rows = []
  for criterion in cli.names(config.criteria):
    batches = stream(config.seed + 1, config.prune.importance_batch_size,
                     augment=config.prune.augment)
    for row, tuned, compacted, mask in prune_one(config, criterion, dense, example, batches,
                                                  test, finetune):
      cli.say(f"evaluating {criterion} at {row['target']}")
      row.update(measure(tuned, compacted, test, example, timing_input, config.timing_seconds),
                 max_abs_pruned_weight=max_abs_pruned(functional(tuned)[1], mask))
      row.update(kept_macs=row["macs"] / dense_row["macs"],
                 kept_params=row["params"] / dense_row["params"],
                 speedup=dense_row["inference_seconds"] / row["inference_seconds"])
      rows.append(row)

  results = {"config": config.to_dict(), "mode": config.mode, "dense": dense_row,
             "pruned": rows, "targets": list(config.targets),
             "importance": importance_settings(config), "wall_seconds": time.perf_counter() - start}
  cli.write_json(os.path.join(workdir, RESULTS_FILE), results)
  if len(config.targets) > 1:
    plot(results, os.path.join(workdir, PLOT_FILE))
  print(table(results))
  print(TIMING_NOTE.format(batch=config.timing_batch, seconds=config.timing_seconds))
  print(f"\nwrote {os.path.join(workdir, RESULTS_FILE)}")
  return results


def importance_settings(config: ml_collections.ConfigDict) -> dict:
  """How importance was collected: what `results.json` records next to the results."""
  p = config.prune
  return {"criteria": cli.names(config.criteria), "batchnorm": p.batchnorm,
          "batches_per_step": p.importance_batches, "batch_size": p.importance_batch_size,
          "augment": p.augment, "reduction": p.reduction if config.mode != "unstructured" else None,
          "steps": p.steps if config.mode != "unstructured" else p.steps_per_density}


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


def _train_config(recipe, num_examples: int, seed: int) -> train.TrainConfig:
  """`train.TrainConfig` of a `_training` recipe."""
  per_epoch = max(1, num_examples // recipe.batch_size) if recipe.batch_size > 0 else 1
  length = (dict(steps=recipe.steps) if recipe.steps else
            dict(epochs=recipe.epochs, steps_per_epoch=per_epoch))
  return train.TrainConfig(**length, batch_size=recipe.batch_size,
                           learning_rate=recipe.learning_rate,
                           weight_decay=recipe.weight_decay, schedule="multistep",
                           milestones=tuple(recipe.milestones), seed=seed)


def prune_configs(config: ml_collections.ConfigDict, criterion: str) -> list:
  """The `oba_jax.prune` configs of one criterion: one per target in mode "one_shot", else one.

  Building them checks every pruning setting, so `check_config` calls it too.
  """
  p = config.prune
  if config.mode == "unstructured":
    return [prune.UnstructuredConfig(
        criterion=criterion, densities=tuple(config.targets),
        steps_per_density=p.steps_per_density, num_batches=p.importance_batches,
        batchnorm=p.batchnorm)]
  structured = lambda targets: prune.StructuredConfig(
      criterion=criterion, targets=targets, steps=p.steps, schedule=p.schedule,
      reduction=p.reduction, max_ratio=p.max_ratio, round_to=p.round_to,
      ignore=tuple(p.ignore), num_batches=p.importance_batches, batchnorm=p.batchnorm)
  if config.mode == "iterative":
    return [structured(tuple(config.targets))]
  return [structured(target) for target in config.targets]


def scoring(batches, criterion: str, num_batches: int, total_steps: int, progress: bool,
            where: str = ""):
  """`batches`, saying "scoring <criterion>, step k/<total_steps>" as each step begins.

  With `progress`, each step's batches are counted by a progress bar of that label.
  """
  batches = iter(batches)
  for step in range(1, total_steps + 1):
    label = f"scoring {criterion}{where}, step {step}/{total_steps}"
    if not progress:
      cli.say(label)
    bar = _bar(num_batches, label, progress)
    for index in range(num_batches):
      batch = next(batches, None)
      if batch is None:
        bar.close()
        return
      bar.update()
      if index == num_batches - 1:
        bar.close()
      yield batch
  yield from batches  # more than planned: no labels


def _bar(total: int, label: str, enabled: bool):
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, desc=label, unit="batch", disable=not enabled)


def structured_steps(schedule: str, steps: int, targets) -> int:
  """How many scoring steps `oba_jax.prune` takes to reach `targets` in turn (for labels)."""
  ratios = prune.SCHEDULES[schedule](targets[-1], steps)
  count, above = 0, 1.0
  for target in targets:
    count += sum(target < r < above for r in ratios) + 1
    above = target
  return count


def say_step(record, *_) -> None:
  cli.say(f"  step {record.step + 1}: kept FLOPs {record.kept_macs:.3f}, params "
          f"{record.kept_params:.3f} ({record.seconds:.1f} s)")


def _structured(config, criterion, dense, example, batches, test, finetune):
  """Yields (row, fine-tuned masked model, its compaction, mask) per target."""
  p = config.prune
  runtime = dict(key=jax.random.key(config.seed), callback=say_step)
  pruned = {}  # target -> accuracy right after pruning, and seconds of fine-tuning

  def tune(masked, plan, target):
    mask = masks.from_plan(plan.structure, plan, functional(masked)[1])
    accuracy = evaluate(masked, test())["accuracy"]
    tuned, seconds = finetune(masked, mask, os.path.join(criterion, str(target)),
                              {"plan": plan.to_json()})
    pruned[target] = {"accuracy_after_pruning": accuracy, "finetune_seconds": seconds}
    return tuned, mask

  if config.mode == "iterative":
    targets = iter(config.targets)
    masks_by_target = {}

    def tune_next(masked, plan):
      target = next(targets)
      tuned, masks_by_target[target] = tune(masked, plan, target)
      return tuned

    (settings,) = prune_configs(config, criterion)
    cli.say(f"pruning {criterion} iteratively to kept FLOPs {', '.join(map(str, config.targets))}")
    batches = scoring(batches, criterion, p.importance_batches,
                      structured_steps(p.schedule, p.steps, config.targets), config.progress)
    results = prune.iterative(dense, example, batches, settings, finetune=tune_next, **runtime)
    for target, result in zip(config.targets, results):
      yield (_structured_row(criterion, target, result, pruned[target]), result.masked,
             result.compacted, masks_by_target[target])
    return
  for target, settings in zip(config.targets, prune_configs(config, criterion)):
    cli.say(f"pruning {criterion} to kept FLOPs {target} in {p.steps} steps")
    result = prune.one_shot(dense, example, scoring(batches, criterion, p.importance_batches,
                                                    p.steps, config.progress, f" to {target}"),
                            settings, **runtime)
    tuned, mask = tune(result.masked, result.plan, target)
    yield (_structured_row(criterion, target, result, pruned[target]), tuned,
           surgery.compact(tuned, result.plan), mask)


def _structured_row(criterion, target, result, pruned) -> dict:
  return {"criterion": criterion, "target": target, **pruned,
          "prune_seconds": sum(step.seconds for step in result.history)}


def _unstructured(config, criterion, dense, example, batches, test, finetune):
  """Yields (row, fine-tuned masked model, the same, mask) per density."""
  del example  # masks keep the shapes: nothing to trace
  (settings,) = prune_configs(config, criterion)
  p = config.prune
  cli.say(f"pruning {criterion} unstructured to densities {', '.join(map(str, config.targets))}")
  batches = scoring(batches, criterion, p.importance_batches,
                    p.steps_per_density * len(config.targets), config.progress)
  say_density = lambda record, *_: cli.say(
      f"  step {record.step + 1}: density {record.density:.3f} ({record.seconds:.1f} s)")
  results = prune.unstructured(dense, batches, settings, key=jax.random.key(config.seed),
                               callback=say_density)
  for result in results:
    row = {"criterion": criterion, "target": result.density,
           "density": 1.0 - masks.sparsity(result.mask).total,
           "accuracy_after_pruning": evaluate(result.masked, test())["accuracy"],
           "prune_seconds": sum(step.seconds for step in result.history)}
    tuned, row["finetune_seconds"] = finetune(result.masked, result.mask,
                                              os.path.join(criterion, str(result.density)))
    yield row, tuned, tuned, result.mask


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


def measure(masked_model, compacted, test, example, timing_input,
            timing_seconds: float = 1.0) -> dict:
  """Accuracy of the masked and compacted models, counts and inference time of the compacted.

  `test()` returns a fresh iterator over the evaluation batches.
  """
  masked_eval = evaluate(masked_model, test())
  compacted_eval = evaluate(compacted, test())
  count = flops.count(compacted, example)
  return {"accuracy": masked_eval["accuracy"], "loss": masked_eval["loss"],
          "compacted_accuracy": compacted_eval["accuracy"], "macs": count.macs,
          "params": count.params,
          **timing(compacted, timing_input, min_seconds=timing_seconds)}


# Printed under every table that shows inference times.
TIMING_NOTE = ("(ms/batch: median of >= 10 jitted forward passes of a batch of {batch}, "
               "measured for >= {seconds:g} s after a warm-up; 'spread' is their interquartile "
               "range over the median: on a shared machine, differences within it are noise)")


def timing(model: nnx.Module, x: jax.Array, *, min_reps: int = 10,
           min_seconds: float = 1.0) -> dict:
  """Inference time: the median of at least `min_reps` jitted forward passes after a warm-up,
  repeated for at least `min_seconds`; with the repetitions and their relative spread (IQR)."""
  forward = jax.jit(lambda x: model(x))
  jax.block_until_ready(forward(x))
  times, begin = [], time.perf_counter()
  while len(times) < min_reps or (time.perf_counter() - begin < min_seconds
                                  and len(times) < 10_000):
    start = time.perf_counter()
    jax.block_until_ready(forward(x))
    times.append(time.perf_counter() - start)
  median = float(np.median(times))
  low, high = np.percentile(times, [25, 75])
  return {"inference_seconds": median, "inference_reps": len(times),
          "inference_spread": float((high - low) / median)}


def inference_seconds(model: nnx.Module, x: jax.Array, reps: int = 10) -> float:
  """Median time of `reps` jitted forward passes after a warm-up."""
  return timing(model, x, min_reps=reps, min_seconds=0.0)["inference_seconds"]


def max_abs_pruned(params, mask) -> float:
  """The largest |weight| among the pruned entries (0.0 when masking holds)."""
  values = [jnp.max(jnp.abs(jnp.where(m, 0.0, p)), initial=0.0)
            for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask))]
  return float(max(values, default=0.0))


def plot(results: dict, path: str) -> None:
  """Accuracy after fine-tuning against kept FLOPs (or density), one line per criterion."""
  x_key = "density" if results["mode"] == "unstructured" else "kept_macs"
  fig = figure.Figure(figsize=(5, 3.5))
  ax = fig.subplots()
  for criterion in dict.fromkeys(r["criterion"] for r in results["pruned"]):
    rows = [r for r in results["pruned"] if r["criterion"] == criterion]
    ax.plot([r[x_key] for r in rows], [r["accuracy"] for r in rows], "o-", label=criterion)
  ax.axhline(results["dense"]["accuracy"], color="gray", linestyle="--", label="dense")
  ax.set(xlabel="density" if x_key == "density" else "kept FLOPs", ylabel="test accuracy")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def table(results: dict) -> str:
  """The results as a text table, one line per row."""
  lines = [f"{'criterion':12s} {'target':>6s} {'acc pruned':>10s} {'acc tuned':>9s} "
           f"{'kept MACs':>9s} {'params':>11s} {'ms/batch':>8s} {'spread':>6s}"]
  for r in [results["dense"], *results["pruned"]]:
    lines.append(
        f"{r['criterion']:12s} {r.get('target', 1.0):6.3f} "
        f"{r.get('accuracy_after_pruning', float('nan')):10.4f} {r['accuracy']:9.4f} "
        f"{r.get('kept_macs', 1.0):9.3f} {r['params']:11,d} {1e3 * r['inference_seconds']:8.2f} "
        f"{r.get('inference_spread', float('nan')):6.0%}")
  return "\n".join(lines)
