"""Quickstart: structured OBA pruning on Fashion-MNIST in a few minutes on a CPU.

Trains a small wide ResNet (or reuses the one in the work directory), prunes it
to half its FLOPs with OBA and two baselines (magnitude, first-order Taylor) in
a few one-shot steps, fine-tunes each pruned model briefly, compacts it, and
prints accuracy, MACs, parameters and inference time. Every stage checkpoints
into --workdir, so a killed run resumes.

  python -m oba_jax.experiments.quickstart --workdir=/tmp/oba_quickstart
  python -m oba_jax.experiments.quickstart --workdir=/tmp/q --config.criteria=oba,magnitude

Needs Fashion-MNIST (Debian: `apt-get install dataset-fashion-mnist`); --config.smoke=True
runs on generated data without it.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections

from oba_jax import criteria, data, masks, models, prune, runtime, surgery, train
from oba_jax.evaluation import evaluate
from oba_jax.experiments import cli, report
from oba_jax.functional import functional


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.dataset = "fashion_mnist"
  c.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.data_format = "auto"  # one of oba_jax.data.FORMATS
  c.test_split = "test"
  c.model = "resnet8_cifar"
  c.width = 16
  c.seed = 0
  c.batch_size = 128
  c.dense_steps = 600
  c.dense_learning_rate = 0.1
  c.criteria = "oba,magnitude,taylor"  # names in oba_jax.criteria.CRITERIA
  c.target = 0.5  # kept FLOPs
  c.prune_steps = 5
  c.importance_batches = 8
  c.importance_batch_size = 64
  c.round_to = 4
  c.finetune_steps = 300
  c.finetune_learning_rate = 0.01
  c.timing_batch = 64
  c.timing_seconds = 1.0
  c.progress = True
  c.smoke = False  # a tiny run for tests: small model, a few steps, part of the test set
  return c


# One line per --config key, for --help.
HELP = {
    "dataset": "a name in oba_jax.data.DATASETS (fashion_mnist: Debian's dataset-fashion-mnist)",
    "test_split": "split to evaluate on (TFDS slice syntax, e.g. test[:1000])",
    "model": "a name in oba_jax.models.MODELS",
    "width": "the model's first-stage width",
    "batch_size": "examples per training step (dense and fine-tuning)",
    "dense_steps": "steps of dense training (SGD, cosine schedule)",
    "dense_learning_rate": "initial learning rate of dense training",
    "criteria": "criteria to compare: comma-separated names in oba_jax.criteria.CRITERIA",
    "target": "kept FLOPs after pruning, in (0, 1]",
    "prune_steps": "pruning steps to the target, re-scoring before each",
    "importance_batches": "batches of importance per pruning step",
    "importance_batch_size": "examples per importance batch",
    "round_to": "keep widths a multiple of this",
    "finetune_steps": "steps of fine-tuning after pruning",
    "finetune_learning_rate": "initial learning rate of fine-tuning",
    "timing_batch": "batch size of the measured inference time",
}


def _smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  return cli.smoke(config, dict(width=4, dense_steps=10, prune_steps=2, importance_batches=2,
                                importance_batch_size=16, finetune_steps=5,
                                test_split="test[:256]", batch_size=32, timing_batch=8,
                                round_to=1, data_format=cli.data_format(config),
                                timing_seconds=0.05))


def _prune_config(config: ml_collections.ConfigDict, criterion: str) -> prune.StructuredConfig:
  return prune.StructuredConfig(criterion=criterion, targets=config.target,
                                steps=config.prune_steps, num_batches=config.importance_batches,
                                round_to=config.round_to)


def _recipes(config: ml_collections.ConfigDict) -> dict[str, train.TrainConfig]:
  """The dense training and the fine-tuning, each a `train.TrainConfig` (checked when built)."""
  recipes = {}
  for stage, steps, learning_rate, weight_decay in (
      ("dense", config.dense_steps, config.dense_learning_rate, 5e-4),
      ("finetune", config.finetune_steps, config.finetune_learning_rate, 1e-4)):
    try:
      recipes[stage] = train.TrainConfig(
          steps=steps, batch_size=config.batch_size, learning_rate=learning_rate,
          weight_decay=weight_decay, schedule="cosine", seed=config.seed)
    except ValueError as error:
      raise ValueError(f"{stage}: {error}") from None
  return recipes


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the quickstart in `workdir`; returns (and writes) its results, compilations included."""
  with runtime.Compilations() as compiled:
    results = _run(config, workdir)
  results["compilations"] = compiled.summary()
  cli.write_json(os.path.join(workdir, "results.json"), results)
  return results


def _run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  names = cli.check_names("criteria", config.criteria, criteria.CRITERIA)
  if not 0 < config.target <= 1:
    raise ValueError(f"target={config.target} must be a kept-FLOPs ratio in (0, 1].")
  for name in names:  # every setting is checked before the workdir is claimed
    _prune_config(config, name)
  _recipes(config)
  cli.check_data_format(config)
  where = dict(data_dir=config.data_dir, data_format=cli.data_format(config))
  info = cli.open_data(lambda: data.dataset_info(config.dataset, "train", **where))
  models.check(config.model, width=config.width, in_channels=info.image_shape[-1],
               num_classes=info.num_classes)
  config = cli.start_run(workdir, config, _smoke, ("batch_size", "importance_batch_size"))
  recipes = _recipes(config)
  stream = lambda seed, **kw: data.load(config.dataset, "train", train=True, seed=seed,
                                        **where, **kw)
  cli.say(f"data: {config.dataset} ({data.resolve_format(config.dataset, **where)}), "
          f"{info.num_examples} training examples of shape {info.image_shape}")
  test = list(data.load(config.dataset, config.test_split, batch_size=1000, train=False,
                        **where))

  model = models.create(config.model, seed=config.seed, width=config.width,
                        in_channels=info.image_shape[-1], num_classes=info.num_classes)
  cli.say_training(f"dense training of {config.model} (width {config.width})",
                   os.path.join(workdir, "dense"), config.dense_steps)
  dense, _ = train.finetune(model, stream(config.seed, batch_size=config.batch_size),
                            recipes["dense"], workdir=os.path.join(workdir, "dense"),
                            progress=config.progress, desc="dense training")
  example = test[0]["image"][:1]
  timing_input = jnp.asarray(test[0]["image"][:config.timing_batch])
  cli.say("evaluating the dense model")
  dense_row = {"criterion": "dense",
               **report.measure(dense, dense, lambda: test, example, timing_input,
                                  config.timing_seconds)}
  rows = [dense_row]

  for criterion in names:
    importance_batches = stream(config.seed + 1, batch_size=config.importance_batch_size,
                                augment=False)
    cli.say(f"pruning {criterion} to kept FLOPs {config.target} in {config.prune_steps} steps")
    result = prune.one_shot(
        dense, example, report.scoring(importance_batches, criterion, config.importance_batches,
                                       config.prune_steps, config.progress),
        _prune_config(config, criterion), key=jax.random.key(config.seed),
        callback=report.say_step)
    pruned_accuracy = evaluate(result.masked, test)["accuracy"]
    mask = masks.from_plan(result.plan.structure, result.plan, functional(result.masked)[1])
    directory = os.path.join(workdir, f"finetune_{criterion}")
    cli.say_training(f"fine-tuning {criterion}", directory, config.finetune_steps)
    tuned, _ = train.finetune(
        result.masked, stream(config.seed + 2, batch_size=config.batch_size), recipes["finetune"],
        workdir=directory, mask=mask, extra_state={"plan": result.plan.to_json()},
        progress=config.progress, desc=f"finetune {criterion}")
    compacted = surgery.compact(tuned, result.plan)
    cli.say(f"evaluating {criterion}")
    row = {"criterion": criterion, "accuracy_after_pruning": pruned_accuracy,
           **report.measure(tuned, compacted, lambda: test, example, timing_input,
                              config.timing_seconds),
           "max_abs_pruned_weight": report.max_abs_pruned(functional(tuned)[1], mask)}
    row["kept_macs"] = row["macs"] / dense_row["macs"]
    row["kept_params"] = row["params"] / dense_row["params"]
    row["speedup"] = dense_row["inference_seconds"] / row["inference_seconds"]
    rows.append(row)

  results = {"config": config.to_dict(), "dense": dense_row, "pruned": rows[1:],
             "target_kept_flops": config.target}
  cli.write_json(os.path.join(workdir, "results.json"), results)
  print(_table(rows, config.target))
  print(report.TIMING_NOTE.format(batch=config.timing_batch, seconds=config.timing_seconds))
  print(f"\nwrote {os.path.join(workdir, 'results.json')}")
  return results


def _table(rows, target) -> str:
  lines = [f"{'criterion':10s} {'acc pruned':>10s} {'acc tuned':>9s} {'MACs':>12s} "
           f"{'kept':>5s} {'params':>9s} {'ms/batch':>8s} {'spread':>6s} {'speed-up':>8s}"]
  for r in rows:
    lines.append(
        f"{r['criterion']:10s} {r.get('accuracy_after_pruning', float('nan')):10.4f} "
        f"{r['accuracy']:9.4f} {r['macs']:12,d} {r.get('kept_macs', 1.0):5.2f} "
        f"{r['params']:9,d} {1e3 * r['inference_seconds']:8.2f} "
        f"{r.get('inference_spread', float('nan')):6.0%} {r.get('speedup', 1.0):8.2f}")
  lines.append(f"(target: kept FLOPs <= {target}; 'acc tuned' is after fine-tuning)")
  return "\n".join(lines)


if __name__ == "__main__":
  cli.main(get_config, run, HELP)
