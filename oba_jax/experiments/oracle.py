"""Oracle study CLI: each criterion's prediction of single removals against the true loss change.

Trains (or reuses) each model, then runs `oba_jax.oracle.removal_study` on a
seeded sample of its channels (heads, features) in each BatchNorm mode, and
reports the Spearman correlation of every criterion's prediction and
attribution with the true change (`oba_jax.oracle` defines them all).

  python -m oba_jax.experiments.oracle --workdir=/tmp/oracle
  python -m oba_jax.experiments.oracle --workdir=/tmp/o --config.models=vgg11_cifar \
      --config.bn_modes=eval --config.max_removals=64

The dense models are trained in `workdir/<model>/dense` (or reused), each study
is saved to `workdir/<model>/<bn mode>.json` as it finishes, and a killed run
resumes from there. Criteria that run the model one example at a time
("obd_fisher") are left out in training-mode BatchNorm, where each example
would be normalised by its own statistics (`criteria.Criterion.per_example`).
"""

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from matplotlib import figure

from oba_jax import criteria, data, models, structure, train
from oba_jax.evaluation import evaluate
from oba_jax.experiments import cli
from oba_jax.oracle import (Study, in_criteria_order, removal_study, sample_removals,
                            spearman, summarize, taylor_polynomials)

BN_MODES = ("eval", "train")
RESULTS_FILE = "results.json"


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.dataset = "fashion_mnist"
  c.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.data_format = "auto"  # one of oba_jax.data.FORMATS
  c.held_out_split = "test"
  c.models = "vgg11_cifar,resnet20_cifar"  # names in oba_jax.models.MODELS
  c.width = 16  # every model's first-stage width
  c.bn_modes = "eval,train"
  c.criteria = ("magnitude,random,taylor,obd_fisher,obd_hutchinson,oba,oba_residual,oba_ggn,"
                "taylor3,taylor4")  # names in oba_jax.criteria.CRITERIA
  c.seed = 0
  c.dense = ml_collections.ConfigDict(dict(steps=1500, batch_size=128, learning_rate=0.1,
                                           weight_decay=5e-4))
  c.batch_size = 128  # held-out batch; training-mode BatchNorm normalises over it
  c.held_out_batches = 2
  c.max_removals = 128  # per model; a random sample when the model has more channels
  c.top_fraction = 0.2
  c.progress = True
  c.smoke = False  # a tiny run for tests: width 4, a few steps, removals and examples
  return c


# One line per --config key, for --help.
HELP = {
    "dataset": "a name in oba_jax.data.DATASETS (fashion_mnist: Debian's dataset-fashion-mnist)",
    "held_out_split": "split whose loss change is measured (its first batches)",
    "models": "models to study: comma-separated names in oba_jax.models.MODELS",
    "width": "every model's first-stage width",
    "bn_modes": "BatchNorm modes to study in: eval (running statistics), train (batch)",
    "criteria": "comma-separated names in oba_jax.criteria.CRITERIA",
    "dense.steps": "steps of dense training (SGD, cosine schedule)",
    "dense.batch_size": "examples per dense training step",
    "dense.learning_rate": "initial learning rate of dense training",
    "dense.weight_decay": "L2 weight decay of dense training",
    "batch_size": "held-out batch size; training-mode BatchNorm normalises over it",
    "held_out_batches": "held-out batches the loss change is measured on",
    "max_removals": "channels removed one at a time per model (a seeded sample)",
    "top_fraction": "fraction of the largest true changes the top-k overlap looks at",
}


# What smoke mode studies when models, bn_modes or criteria are left at their defaults
# (all of them take about 6 minutes on 2 cores; this, under one).
SMOKE_SUBSET = {"models": "vgg11_cifar", "bn_modes": "eval", "criteria": "magnitude,taylor,oba"}


def _smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  defaults = get_config()
  subset = {k: v for k, v in SMOKE_SUBSET.items() if config[k] == defaults[k]}
  return cli.smoke(config, {"width": 4, "batch_size": 16, "held_out_batches": 2,
                            "max_removals": 8, "dense.steps": 10, "dense.batch_size": 32,
                            "data_format": cli.data_format(config), **subset})


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError (or FileNotFoundError) naming the first bad setting; reads no data."""
  for key, accepted in (("models", models.MODELS), ("bn_modes", BN_MODES),
                        ("criteria", criteria.CRITERIA)):
    cli.check_names(key, config[key], accepted)
  if config.dataset not in data.DATASETS:
    raise ValueError(f"dataset={config.dataset!r} is not supported; accepted: "
                     f"{sorted(data.DATASETS)}.")
  if not 0 < config.top_fraction <= 1:
    raise ValueError(f"top_fraction={config.top_fraction} must be in (0, 1].")
  for key in ("max_removals", "held_out_batches", "batch_size", "width"):
    if not isinstance(config[key], int) or config[key] < 1:
      raise ValueError(f"{key}={config[key]!r} must be a positive integer.")
  cli.check_data_format(config)
  if config.data_dir is not None and not os.path.isdir(config.data_dir):
    raise FileNotFoundError(f"data_dir {config.data_dir!r} is not a directory.")
  try:
    _recipe(config)
  except ValueError as error:
    raise ValueError(f"dense: {error}") from None


def _recipe(config: ml_collections.ConfigDict) -> train.TrainConfig:
  """How every dense model is trained."""
  return train.TrainConfig(steps=config.dense.steps, batch_size=config.dense.batch_size,
                           learning_rate=config.dense.learning_rate,
                           weight_decay=config.dense.weight_decay, schedule="cosine",
                           seed=config.seed)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or reuses) each model, runs the study in each BatchNorm mode, writes results."""
  start = time.perf_counter()
  check_config(config)
  where = dict(data_dir=config.data_dir, data_format=cli.data_format(config))
  info = cli.open_data(lambda: data.dataset_info(config.dataset, "train", **where))
  for name in cli.names(config.models):
    models.check(name, width=config.width, in_channels=info.image_shape[-1],
                 num_classes=info.num_classes)
  config = cli.start_run(workdir, config, _smoke, ("batch_size", "dense.batch_size"))
  count = config.held_out_batches * config.batch_size
  held_out = list(data.load(config.dataset, f"{config.held_out_split}[:{count}]",
                            batch_size=config.batch_size, train=False, **where))
  example = jnp.asarray(held_out[0]["image"][:1])
  criterion_names = cli.names(config.criteria)
  studies = []
  for model_name in cli.names(config.models):
    dense = _dense(model_name, config, info, workdir, where)
    accuracy = evaluate(dense, held_out)["accuracy"]
    traced = structure.trace(dense, example)
    groups = traced.groups
    removals = sample_removals(groups, config.max_removals, config.seed)
    for bn_mode in cli.names(config.bn_modes):
      path = os.path.join(workdir, model_name, f"{bn_mode}.json")
      if os.path.exists(path):
        cli.say(f"{model_name}, BatchNorm {bn_mode}: restored the finished study from {path}")
        study = Study.from_json(cli.read_json(path, what=f"the saved {bn_mode} study"))
      else:
        model = nnx.clone(dense)
        if bn_mode == "train":
          model.train()
        else:
          model.eval()
        usable = [c for c in criterion_names
                  if not (criteria.CRITERIA[c].per_example
                          and criteria.uses_batch_statistics(model))]
        cli.say(f"removal study of {model_name}, BatchNorm {bn_mode}: {len(removals)} single "
                f"removals against {len(usable)} criteria")
        study = removal_study(model, traced, held_out, criteria=usable, removals=removals,
                              key=jax.random.key(config.seed), progress=config.progress)
        cli.write_json(path, study.to_json())
      plot(study, f"{model_name}, BatchNorm {bn_mode}",
           os.path.join(workdir, f"{model_name}_{bn_mode}.png"))
      studies.append({"model": model_name, "bn_mode": bn_mode, "held_out_accuracy": accuracy,
                      "channels": sum(g.size for g in groups), "removals": len(removals),
                      "loss": study.loss, "seconds": dict(study.seconds),
                      "rows": summarize(study, config.top_fraction)})
  results = {"config": config.to_dict(), "studies": studies,
             "wall_seconds": time.perf_counter() - start}
  cli.write_json(os.path.join(workdir, RESULTS_FILE), results)
  print(table(results))
  print(f"\nwrote {os.path.join(workdir, RESULTS_FILE)}")
  return results


def _dense(model_name: str, config, info, workdir: str, where: dict) -> nnx.Module:
  """The model trained for `config.dense` steps in `workdir/<model>/dense` (resumed or reused)."""
  model = models.create(model_name, seed=config.seed, width=config.width,
                        in_channels=info.image_shape[-1], num_classes=info.num_classes)
  stream = data.load(config.dataset, "train", batch_size=config.dense.batch_size, train=True,
                     seed=config.seed, **where)
  directory = os.path.join(workdir, model_name, "dense")
  cli.say_training(f"dense training of {model_name}", directory, config.dense.steps)
  dense, _ = train.finetune(model, stream, _recipe(config), workdir=directory,
                            progress=config.progress, desc=f"dense training {model_name}")
  return dense


def find_row(study: dict, criterion: str, kind: str) -> dict | None:
  """The row of `criterion` and `kind` in one study of results.json, or None."""
  return next((r for r in study["rows"] if (r["criterion"], r["kind"]) == (criterion, kind)),
              None)


def table(results: dict) -> str:
  """Spearman correlation with the true change: criteria x (model, BatchNorm mode)."""
  studies = results["studies"]
  heads = [f"{s['model'].split('_')[0]}/{s['bn_mode']}" for s in studies]
  lines = [f"{'criterion':16s} {'ranking':10s} " + " ".join(f"{h:>14s}" for h in heads)]
  keys = dict.fromkeys((r["criterion"], r["kind"]) for s in studies for r in s["rows"])
  for criterion, kind in keys:
    values = []
    for s in studies:
      row = find_row(s, criterion, kind)
      values.append(f"{row['spearman']:14.3f}" if row else f"{'-':>14s}")
    label = kind.replace("attribution_", "full/")
    lines.append(f"{criterion:16s} {label:10s} " + " ".join(values))
  return "\n".join(lines)


def plot(study: Study, title: str, path: str) -> None:
  """Predicted against true loss change, one panel per prediction."""
  series = {**dict(in_criteria_order(study.prediction)), **taylor_polynomials(study)}
  columns = 4
  rows = -(-len(series) // columns)
  fig = figure.Figure(figsize=(3 * columns, 2.7 * rows))
  axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
  for ax, (name, values) in zip(axes, series.items()):
    ax.scatter(study.true, values, s=6, alpha=0.6)
    if name.startswith("T"):
      low, high = min(study.true.min(), values.min()), max(study.true.max(), values.max())
      ax.plot([low, high], [low, high], color="gray", linewidth=0.8)
    ax.set_title(f"{name}  (ρ={spearman(values, study.true):.2f})", fontsize=9)
    ax.set_xlabel("true ΔL", fontsize=8)
    ax.tick_params(labelsize=7)
  for ax in axes[len(series):]:
    ax.axis("off")
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == "__main__":
  cli.main(get_config, run, HELP)
