"""Command-line plumbing shared by the experiments: config flags, the work directory, results.

Each experiment module defines `get_config()` (an `ml_collections.ConfigDict`)
and `run(config, workdir)`, and ends with `cli.main(get_config, run)`:

  python -m oba_jax.experiments.<name> --workdir=/tmp/run --config.seed=1 --config.smoke=True

A work directory belongs to one configuration: `claim_workdir` records it and
refuses, before any work and without touching a file, a directory that holds a
run of another configuration. Results are written atomically.
"""

import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from oba_jax.runtime import enable_compilation_cache

CONFIG_FILE = "config.json"
# Keys that do not change what a run computes, so a rerun may change them.
RUNTIME_KEYS = frozenset({"progress", "log_every"})


def names(text: str) -> list[str]:
  """The names of a comma-separated config value ("oba,magnitude"), empty ones dropped."""
  return [n for n in text.split(",") if n]


def check_names(key: str, text: str, accepted) -> list[str]:
  """`names(text)`, or a ValueError naming the unknown ones and what `key` accepts."""
  given = names(text)
  unknown = sorted(set(given) - set(accepted))
  if unknown or not given:
    raise ValueError(f"{key}={text!r}: unknown {unknown}; accepted: {sorted(accepted)}.")
  return given


def write_json(path: str, value: Any) -> None:
  """Writes JSON atomically (a temporary file renamed into place)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as f:
    json.dump(value, f, indent=1, sort_keys=True, default=str)
  os.replace(f.name, path)


def claim_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Records `config` in `workdir`, or raises if the directory holds another configuration."""
  wanted = _comparable(config.to_dict())
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    with open(path) as f:
      found = _comparable(json.load(f))
    if found != wanted:
      differing = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
      raise ValueError(
          f"workdir {workdir!r} holds a run of another configuration (differs in "
          f"{differing[:6]}); use a new --workdir, or the same config to resume. Nothing was "
          "changed.")
    return
  write_json(path, config.to_dict())


def _comparable(tree: dict, prefix: str = "") -> dict:
  """Flat {dotted key: JSON value} without the runtime-only keys."""
  flat = {}
  for key, value in tree.items():
    if key in RUNTIME_KEYS:
      continue
    if isinstance(value, dict):
      flat.update(_comparable(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = json.loads(json.dumps(value, default=str))
  return flat


def main(get_config: Callable[[], ml_collections.ConfigDict],
         run: Callable[[ml_collections.ConfigDict, str], Any]) -> None:
  """Parses --config.* and --workdir, then calls `run(config, workdir)`."""
  config_flags.DEFINE_config_dict("config", get_config())
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
  flags.mark_flag_as_required("workdir")

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    enable_compilation_cache()
    run(flags.FLAGS.config, flags.FLAGS.workdir)

  app.run(_main)
