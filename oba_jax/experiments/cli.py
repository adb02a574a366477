"""Command-line plumbing shared by the experiments: config flags, the work directory, results.

Each experiment module defines `get_config()` (an `ml_collections.ConfigDict`)
and `run(config, workdir)`, and ends with `cli.main(get_config, run)`:

  python -m oba_jax.experiments.<name> --workdir=/tmp/run --config.seed=1 --config.smoke=True

`--help` lists `--workdir` and every `--config.*` key with its default and the
one-line description the module gives in its `HELP` dict (`usage`). Smoke runs
given no data run on generated data (`data_format`).

A work directory belongs to one configuration and the inputs it read:
`claim_workdir` records both (config.json, inputs.json: fingerprints of the weight files
and data, `files.fingerprint`) and refuses, before any work and without touching a file,
a directory that holds a run of another configuration or of other inputs, so that cached
stages never mix with new ones. Results are written atomically with the user's umask.
"""

import ast
import atexit
import difflib
import fcntl
import json
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from oba_jax import data, files
from oba_jax.runtime import enable_compilation_cache, keep_optimization_barriers

CONFIG_FILE = "config.json"
INPUTS_FILE = "inputs.json"
LOCK_FILE = ".lock"
# Keys that do not change what a run computes, so a rerun may change them.
RUNTIME_KEYS = frozenset({"progress", "log_every", "timing_seconds"})
# Settings naming what a run reads: their fingerprints are part of the workdir's identity.
PATH_KEYS = ("data_dir", "init.weights", "init.checkpoint", "gguf", "model_dir")
# Config dicts that take any key: model constructor arguments (`models.create`).
OPEN_KEYS = ("model_kwargs", "smoke_model_kwargs")
HELP_FLAGS = ("--help", "-h", "--helpshort", "-?")
WORKDIR_HELP = ("where checkpoints, metrics and results go (required); a rerun with the same "
                "config resumes there")
# Descriptions of the data keys every CLI has.
DATA_HELP = {
    "data_dir": "where the data is: a TFDS data dir, CIFAR's cifar-10-batches-py/ or "
                "cifar-100-python/ (or a folder holding it), or ImageNet's train/ and val/ "
                "class folders; None: TFDS's default (smoke mode: generated data)",
    "data_format": f"how data_dir is read: one of {'|'.join(data.FORMATS)}; auto detects it "
                   "from what data_dir holds",
    "smoke": "a tiny run (tiny model, a few steps; generated data unless data_dir is given) "
             "that checks everything works in under a minute",
    "progress": "show progress bars",
    "seed": "seed of initialisation, data order and scoring",
    "timing_seconds": "measure inference for at least this long (median of >= 10 jitted "
                      "forward passes after a warm-up)",
}


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
  """Writes JSON atomically (`files.write_atomic`: whole or not at all, the user's umask)."""
  text = json.dumps(value, indent=1, sort_keys=True, default=str)
  files.write_atomic(path, lambda f: f.write(text.encode()))


def start_run(workdir: str, config: ml_collections.ConfigDict,
              smoke: Callable[[ml_collections.ConfigDict], ml_collections.ConfigDict],
              batch_sizes: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  """The config to run (`smoke(config)` in smoke mode), once its `batch_sizes` (dotted keys)
  are checked against the devices and `workdir` is claimed for `config` as given."""
  run_config = smoke(config) if config.get("smoke") else config
  check_batch_sizes(run_config, batch_sizes)
  claim_workdir(workdir, config)
  return run_config


def check_batch_sizes(config: ml_collections.ConfigDict, keys: tuple[str, ...]) -> None:
  """Raises a ValueError naming the batch-size settings (dotted `keys`) that this process's
  devices do not divide: every batch is split over them (`estimate.shard_batch`)."""
  devices = jax.local_device_count()
  flat = dict(_flat_items(config.to_dict()))
  bad = [f"{key}={flat[key]}" for key in keys if flat[key] % devices]
  if bad:
    raise ValueError(f"{', '.join(bad)}: batches are split over the {devices} devices, so "
                     f"batch sizes must be multiples of {devices}; change them, or the "
                     "number of devices (XLA_FLAGS=--xla_force_host_platform_device_count=N "
                     "on CPU).")


def claim_workdir(workdir: str, config: ml_collections.ConfigDict,
                  inputs: Mapping[str, Any] | None = None) -> None:
  """Records `config` and `inputs` in `workdir` and locks it for this process, or raises
  saying why not.

  `inputs` are {name: what the run read}, JSON-able: a `files.fingerprint` of each weight
  file and data source (or a description, such as "generated data"). Every setting must
  have been checked before (nothing the run can still refuse may come after the claim).
  Refused, before anything is written: a workdir that is a file or not writable, one that
  another run holds (a lock for this process's lifetime), and one that holds a checkpoint
  or a result of another configuration or of other inputs (compared by content: the same
  file at another path, as in a copied workdir or another environment, is the same input).
  A workdir whose recorded
  configuration never produced a checkpoint or a result (a run that failed on a bad
  setting or missing data) is taken over.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir={workdir} is a file, not a directory; give a directory (a "
                     "new one is created).")
  os.makedirs(workdir, exist_ok=True)
  if not os.access(workdir, os.W_OK):
    raise PermissionError(f"workdir {workdir!r} is not writable; a run writes its checkpoints "
                          "and results there. Use another --workdir, or copy this one.")
  _lock(workdir)
  files.remove_leftovers(workdir)  # of killed writes; the lock makes them no one else's
  wanted = comparable(config.to_dict())
  inputs = json.loads(json.dumps({**path_inputs(config), **(inputs or {})}, default=str))
  path, inputs_path = os.path.join(workdir, CONFIG_FILE), os.path.join(workdir, INPUTS_FILE)
  if os.path.exists(path):
    found = comparable(read_json(path, what="the workdir's recorded configuration"))
    recorded = (read_json(inputs_path, what="fingerprints of the inputs the workdir's run "
                          "read") if os.path.exists(inputs_path) else inputs)
    changed = sorted(k for k in set(recorded) | set(inputs)
                     if _content(recorded.get(k)) != _content(inputs.get(k)))
    if found == wanted and not changed:
      write_json(inputs_path, inputs)
      return
    differing = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
    if _holds_work(workdir) and differing:
      raise ValueError(
          f"workdir {workdir!r} holds a run of another configuration (differs in "
          f"{differing[:6]}); use a new --workdir, or the same config to resume. Nothing was "
          "changed.")
    if _holds_work(workdir):
      said = "; ".join(_change(k, recorded.get(k), inputs.get(k)) for k in changed[:4])
      raise ValueError(
          f"workdir {workdir!r} holds a run of this configuration on other inputs ({said}); "
          "its cached stages would mix with results of the new inputs. Use a new --workdir, "
          f"or delete {workdir} to start over. Nothing was changed.")
    print(f"workdir {workdir}: its earlier run produced nothing (differs in "
          f"{(differing + changed)[:6]}); this run takes it over.")
  write_json(inputs_path, inputs)
  write_json(path, config.to_dict())


def path_inputs(config: ml_collections.ConfigDict) -> dict[str, dict]:
  """{key: `files.fingerprint`} of the files and directories the config's `PATH_KEYS` name
  (the data, initial weights or checkpoint a run reads), for those that are set. A TFDS
  `data_dir` holding a folder named after the config's `dataset` counts by that folder only
  (other data sets prepared there later do not change what this run read)."""
  flat = dict(_flat_items(config.to_dict()))
  paths = {key: flat[key] for key in PATH_KEYS if flat.get(key) and os.path.exists(flat[key])}
  own = os.path.join(paths.get("data_dir", ""), str(flat.get("dataset")))
  if "data_dir" in paths and flat.get("dataset") and os.path.isdir(own):
    paths["data_dir"] = own
  return {key: files.fingerprint(path) for key, path in paths.items()}


def _content(value: Any) -> Any:
  """An input's identity: its fingerprint without the path of a file or directory whose
  digest it holds, so that a workdir copied to another machine, or weights installed in
  another environment, resume; what they hold still has to be the same."""
  if not isinstance(value, dict):
    return value
  located = "sha256" in value or "names_and_sizes" in value
  return {k: _content(v) for k, v in value.items() if not (located and k == "path")}


def _change(name: str, before: Any, now: Any) -> str:
  """'<name>: <before> then, <now> now', down to the files that differ in groups of them."""
  if isinstance(before, dict) and isinstance(now, dict) and "path" not in before | now:
    keys = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    return "; ".join(_change(f"{name} {k}", before.get(k), now.get(k)) for k in keys[:3])
  return f"{name}: {_short(before)} then, {_short(now)} now"


def _short(value: Any) -> str:
  """An input's fingerprint in a few words: its path, size and the start of its digest."""
  if not isinstance(value, dict):
    return repr(value)
  if "path" not in value:  # a group of fingerprints, e.g. the files of a model directory
    return "[" + ", ".join(_short(v) for v in value.values()) + "]"
  digest = value.get("sha256") or value.get("names_and_sizes") or ""
  return f"{value.get('path')} ({value.get('size')} bytes, {digest[:12]})"


def read_json(path: str, *, what: str = "this file") -> Any:
  """The JSON in `path`, or a ValueError naming the file when it is not JSON."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise files.DamagedFileError(f"{path} ({what}) is not valid JSON ({error}); it was "
                                 "damaged. Delete it to recompute what it held.") from None


_LOCKS: dict[str, Any] = {}  # workdir -> its open lock file, held until the process ends


@atexit.register
def _release_locks() -> None:
  """Closes the lock files at exit (the OS would release them; this says it on purpose)."""
  while _LOCKS:
    _LOCKS.popitem()[1].close()


def _lock(workdir: str) -> None:
  """Takes `workdir/.lock` for this process, or raises if another process holds it."""
  key = os.path.realpath(workdir)
  if key in _LOCKS:
    return
  handle = open(os.path.join(workdir, LOCK_FILE), "a+")
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    handle.seek(0)
    holder = handle.read().strip() or "another process"
    handle.close()
    raise RuntimeError(f"workdir {workdir!r} is in use by another run ({holder}); wait for it "
                       "to finish, or use another --workdir.") from None
  handle.seek(0)
  handle.truncate()
  handle.write(f"pid {os.getpid()}\n")
  handle.flush()
  _LOCKS[key] = handle


def _holds_work(workdir: str) -> bool:
  """Whether `workdir` holds a checkpoint step or a JSON result besides the config."""
  for directory, subdirectories, names in os.walk(workdir):
    if os.path.basename(directory) == "checkpoints" and any(d.isdigit() for d in subdirectories):
      return True
    own = (os.path.join(workdir, CONFIG_FILE), os.path.join(workdir, INPUTS_FILE))
    if any(f.endswith(".json") and os.path.join(directory, f) not in own for f in names):
      return True
  return False


def smoke(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with the smoke-mode values of `overrides` (dotted keys), said aloud.

  Smoke mode is a tiny run; it replaces these settings whatever they were, and
  prints the ones it changed so that nobody mistakes a smoke result for theirs.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  changed = []
  for key, value in overrides.items():
    *parents, name = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    before = node.get(name)
    if before != value:
      changed.append(f"{key}={value!r} (was {before!r})")
    node[name] = value
  if changed:
    print("smoke mode (a tiny run) sets " + ", ".join(changed))
  return config


def data_format(config: ml_collections.ConfigDict) -> str:
  """The format a run reads: "synthetic" for a smoke run given no data_dir, else its own."""
  if config.get("smoke") and config.data_dir is None and config.data_format == "auto":
    return "synthetic"
  return config.data_format


def check_data_format(config: ml_collections.ConfigDict) -> None:
  if config.data_format not in data.FORMATS:
    raise ValueError(f"data_format={config.data_format!r} is not one of {list(data.FORMATS)}.")


def open_data(read: Callable[[], Any]) -> Any:
  """`read()`, with a missing-data error saying which settings to give."""
  try:
    return read()
  except FileNotFoundError as error:
    raise FileNotFoundError(
        f"{error} Give --config.data_dir=DIR (--config.data_format={'|'.join(data.FORMATS)}), "
        "or --config.smoke=True to try the run on generated data.") from None


def say(text: str) -> None:
  """Prints one line saying what the run does now (between progress bars)."""
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  tqdm.write(text)


def latest_step(directory: str) -> int:
  """The latest checkpoint step of a `train.finetune` run in `directory` (0: none)."""
  checkpoints = os.path.join(directory, "checkpoints")
  if not os.path.isdir(checkpoints):
    return 0
  return max((int(d) for d in os.listdir(checkpoints) if d.isdigit()), default=0)


def say_training(stage: str, directory: str, total: int) -> None:
  """"<stage>: N steps", or where a resumed run restarts, or that it finished earlier."""
  step = latest_step(directory)
  if step >= total:
    say(f"{stage}: finished earlier (step {step}), restored from step {step}")
  elif step:
    say(f"{stage}: restored from step {step}, {total - step} of {total} steps to go")
  else:
    say(f"{stage}: {total} steps")


def usage(get_config: Callable[[], ml_collections.ConfigDict], help: dict[str, str],
          doc: str | None = None) -> str:
  """The --help text: what the job does, --workdir, and every --config key with its default."""
  program = sys.modules.get(get_config.__module__)
  name = getattr(program, "__spec__", None)
  name = name.name if name else os.path.basename(sys.argv[0])
  doc = doc if doc is not None else (program.__doc__ or "") if program else ""
  lines = [f"usage: python -m {name} --workdir=DIR [--config.KEY=VALUE ...]", ""]
  lines += [doc.strip().split("\n\n")[0], ""] if doc.strip() else []
  lines += [f"  --workdir: {WORKDIR_HELP}", "", "settings (--config.KEY=VALUE; default shown):"]
  for key, value in _flat_items(get_config().to_dict()):
    default = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else value
    lines.append(f"  --config.{key}={default}")
    lines.append(f"      {describe(key, help)}")
  lines += ["", "Lists are comma-separated: --config.targets=0.5,0.3. A value of None is "
            "unset.", "Set OBA_JAX_TRACEBACK=1 to see tracebacks of errors."]
  return "\n".join(lines)


def describe(key: str, help: dict[str, str]) -> str:
  """The description of dotted `key`: its own, else "*.<last part>"'s, else its parent's."""
  help = {**DATA_HELP, **help}
  parts = key.split(".")
  candidates = [key, "*." + parts[-1]] + [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]
  return next((help[c] for c in candidates if c in help), "(no description)")


def _flat_items(tree: dict, prefix: str = ""):
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      yield from _flat_items(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def comparable(tree: dict, prefix: str = "") -> dict:
  """Flat {dotted key: JSON value} without the runtime-only keys."""
  flat = {}
  for key, value in tree.items():
    if key in RUNTIME_KEYS:
      continue
    if isinstance(value, dict):
      flat.update(comparable(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = json.loads(json.dumps(value, default=str))
  return flat


def main(get_config: Callable[[], ml_collections.ConfigDict],
         run: Callable[[ml_collections.ConfigDict, str], Any],
         help: dict[str, str] | None = None) -> None:
  """Parses --config.* and --workdir, then calls `run(config, workdir)`.

  `--help` prints `usage` (with `help`, {dotted key: one line}) and exits.

  Mistakes end in one clear paragraph, not a traceback: an unknown --config key
  (with the closest valid one), a value of the wrong type, and the ValueError,
  FileNotFoundError, PermissionError, RuntimeError, FloatingPointError or other OSError
  that `run` raises for bad settings, missing or damaged files, a diverged run or a full
  disk (named with the workdir). Set
  OBA_JAX_TRACEBACK=1 to see the traceback as well.
  """
  if any(arg in HELP_FLAGS for arg in sys.argv[1:]):
    print(usage(get_config, help or {}))
    sys.exit(0)
  config = with_open_keys(get_config(), sys.argv[1:])
  _check_config_keys(sys.argv[1:], config)
  config_flags.DEFINE_config_dict("config", config)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
  flags.mark_flag_as_required("workdir")

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    keep_optimization_barriers()
    enable_compilation_cache()
    try:
      run(flags.FLAGS.config, flags.FLAGS.workdir)
    except (ValueError, RuntimeError, FloatingPointError, OSError) as error:
      if os.environ.get("OBA_JAX_TRACEBACK"):
        raise
      if (getattr(error, "errno", None) in files.FULL_DISK
          and not isinstance(error, files.DiskFullError)):
        error = files.DiskFullError(error.errno, f"no space left on the disk holding the "
                                    f"workdir {flags.FLAGS.workdir} ({error}). Free some space "
                                    "and run the same command again; it resumes")
      _fail(f"{type(error).__name__}: {error}")

  app.run(_main)


def with_open_keys(config: ml_collections.ConfigDict,
                   argv: list[str]) -> ml_collections.ConfigDict:
  """`config` with the keys that `--config.model_kwargs.<key>=<value>` (any of `OPEN_KEYS`)
  adds: a model argument the CLI's default does not name, e.g. a ViT's `image_size`. The
  value's type is its Python literal's (28 an int, 0.1 a float, True a bool, else a string)."""
  for arg in argv:
    key, has_value, value = arg.removeprefix("--config.").partition("=")
    parent, _, name = key.partition(".")
    if (arg.startswith("--config.") and has_value and parent in OPEN_KEYS and name
        and "." not in name and parent in config and name not in config[parent]):
      try:
        config[parent][name] = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        config[parent][name] = value
  return config


def _check_config_keys(argv: list[str], config: ml_collections.ConfigDict) -> None:
  """Exits with the closest valid key when a --config.<key> on the command line is unknown."""
  known = list(_flat_keys(config.to_dict()))
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    key = arg[len("--config."):].split("=", 1)[0]
    if key in known or any(k.startswith(key + ".") for k in known):
      continue
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" Did you mean --config.{close[0]}?" if close else ""
    _fail(f"unknown setting --config.{key}.{hint} Run with --help to list every setting.")


def _flat_keys(tree: dict, prefix: str = ""):
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      yield from _flat_keys(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}"


def _fail(message: str) -> None:
  print(f"{os.path.basename(sys.argv[0]) or 'oba_jax'}: {message}", file=sys.stderr)
  sys.exit(2)
