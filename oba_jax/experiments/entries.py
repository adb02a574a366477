"""A comparison's criterion entries and the pruning configs they stand for.

An entry of `config.criteria` is a criterion name, optionally with "@option"s that
override one pruning setting for that entry alone ("oba@sum", "oba_bilinear@train",
"taylor@per_cost"); `prune_configs` turns an entry into `oba_jax.prune` configs, which
checks every pruning setting, and `importance_settings` is what `results.json` records
of them. Used by `pipeline`; imports nothing of the experiments package but `cli`.
"""

import ml_collections

from oba_jax import criteria, procedure, prune, structure
from oba_jax.experiments import cli


def criterion_entries(config: ml_collections.ConfigDict) -> list[str]:
  """The entries of `config.criteria`, checked: each a name in `criteria.CRITERIA`,
  optionally followed by "@option"s that override a pruning setting for that entry
  only (`entry_settings`): "oba,oba@sum" compares both group reductions, and
  "oba_bilinear@train" scores with batch-statistics BatchNorm, on the same dense
  model, batches and fine-tuning order. Raises ValueError naming the first bad entry."""
  entries = cli.names(config.criteria)
  cli.check_names("criteria", ",".join(e.partition("@")[0] for e in entries) or config.criteria,
                  criteria.CRITERIA)
  for entry in entries:
    entry_settings(config, entry)
  if len(set(entries)) < len(entries):
    raise ValueError(f"criteria={config.criteria!r} names a criterion twice.")
  return entries


def entry_settings(config: ml_collections.ConfigDict, entry: str) -> tuple[str, dict]:
  """The criterion of an entry and its pruning settings: `prune.batchnorm`, `reduction`,
  `procedure` and `ranking`, each replaced by an "@option" of the entry that names one of
  its values (`ENTRY_OPTIONS`; all but the BatchNorm mode in the structured modes only)."""
  name, *options = entry.split("@")
  p = config.prune
  settings = {"reduction": p.reduction, "batchnorm": p.batchnorm, "procedure": p.procedure,
              "ranking": p.ranking}
  structured = config.mode != "unstructured"
  for option in options:
    setting = next((key for key, accepted, anywhere in ENTRY_OPTIONS
                    if option in accepted and (anywhere or structured)), None)
    if setting is None:
      raise ValueError(
          f"criteria: {entry!r} has option {option!r}; accepted: "
          + ", ".join(f"a {key} {list(accepted)}" for key, accepted, _ in ENTRY_OPTIONS)
          + f" (all but the BatchNorm mode in structured modes only; mode={config.mode!r}).")
    settings[setting] = option
  return name, settings


# The "@option"s of a criterion entry: (setting, accepted values, also in unstructured mode).
ENTRY_OPTIONS = (("batchnorm", criteria.BATCHNORM_MODES, True),
                 ("reduction", structure.REDUCTIONS, False),
                 ("procedure", procedure.PROCEDURES, False),
                 ("ranking", procedure.RANKINGS, False))


def prune_configs(config: ml_collections.ConfigDict, entry: str) -> list:
  """The `oba_jax.prune` configs of one criterion entry ("name", or with "@option"s): one
  per target in mode "one_shot", else one.

  Building them checks every pruning setting, so `check_config` calls it too.
  """
  p = config.prune
  criterion, settings = entry_settings(config, entry)
  if config.mode == "unstructured":
    return [prune.UnstructuredConfig(
        criterion=criterion, densities=tuple(config.targets),
        steps_per_density=p.steps_per_density, num_batches=p.importance_batches,
        batchnorm=settings["batchnorm"], recalibration_batches=p.recalibration_batches)]
  structured = lambda targets: prune.StructuredConfig(
      criterion=criterion, targets=targets, steps=p.steps,
      schedule=None if p.schedule == "auto" else p.schedule, procedure=settings["procedure"],
      ranking=settings["ranking"], reduction=settings["reduction"], scope=p.scope,
      max_ratio=p.max_ratio, round_to=p.round_to, ignore=tuple(p.ignore),
      num_batches=p.importance_batches, batchnorm=settings["batchnorm"],
      recalibration_batches=p.recalibration_batches)
  if config.mode == "iterative":
    return [structured(tuple(config.targets))]
  return [structured(target) for target in config.targets]


def structured_steps(settings: prune.StructuredConfig) -> int:
  """How many scoring steps `oba_jax.prune` takes to reach the targets in turn (for labels;
  the official procedure's schedule length is the most it takes)."""
  if settings.procedure == "official":
    return settings.steps
  targets = [t.ratio for t in settings.targets]
  ratios = prune.SCHEDULES[settings.schedule_name](targets[-1], settings.steps)
  count, above = 0, 1.0
  for target in targets:
    count += sum(target < r < above for r in ratios) + 1
    above = target
  return count


def importance_settings(config: ml_collections.ConfigDict) -> dict:
  """How importance was collected: what `results.json` records next to the results."""
  p = config.prune
  entries = criterion_entries(config)
  structured = config.mode != "unstructured"
  return {"criteria": entries, "batchnorm": p.batchnorm,
          "per_criterion": {e: entry_settings(config, e)[1] for e in entries if "@" in e},
          "recalibration_batches": p.recalibration_batches,
          "procedure": p.procedure if structured else None,
          "schedule": p.schedule if structured else None,
          "ranking": p.ranking if structured else None,
          "scope": p.scope if structured else None,
          "batches_per_step": p.importance_batches, "batch_size": p.importance_batch_size,
          "augment": p.augment, "reduction": p.reduction if structured else None,
          "steps": p.steps if structured else p.steps_per_density}
