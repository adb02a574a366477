"""The command-line plumbing: workdir claims and locks, clear errors, smoke mode said aloud."""

import errno
import json
import os
import re
import shutil
import stat
import subprocess
import sys

import ml_collections
import pytest

from oba_jax import files
from oba_jax.experiments import cli


def config(**values):
  return ml_collections.ConfigDict({"seed": 0, "progress": False, **values})


def test_a_config_that_produced_nothing_does_not_lock_the_workdir(tmp_path):
  cli.claim_workdir(str(tmp_path), config(data_dir="/wrong"))  # then the run failed on the data
  (tmp_path / "dense" / "checkpoints").mkdir(parents=True)  # created, never written
  cli.claim_workdir(str(tmp_path), config(data_dir="/right"))  # the corrected rerun
  with open(tmp_path / cli.CONFIG_FILE) as f:
    assert json.load(f)["data_dir"] == "/right"


@pytest.mark.parametrize("work", ["dense/checkpoints/4", "results.json"])
def test_a_config_that_produced_work_keeps_the_workdir(tmp_path, work):
  cli.claim_workdir(str(tmp_path), config(seed=0))
  path = tmp_path / work
  path.parent.mkdir(parents=True, exist_ok=True)
  path.mkdir() if "checkpoints" in work else path.write_text("{}")
  with pytest.raises(ValueError, match=r"another configuration \(differs in \['seed'\]\)"):
    cli.claim_workdir(str(tmp_path), config(seed=1))


def test_a_damaged_config_file_is_named(tmp_path):
  (tmp_path / cli.CONFIG_FILE).write_text('{"seed": 0, "progr')
  with pytest.raises(ValueError, match=r"config.json \(the workdir's recorded configuration\) is not valid JSON"):
    cli.claim_workdir(str(tmp_path), config())


def test_a_workdir_in_use_by_another_run_is_refused(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c",
       "import sys, time, ml_collections; from oba_jax.experiments import cli; "
       f"cli.claim_workdir({str(tmp_path)!r}, ml_collections.ConfigDict({{'seed': 0}})); "
       "print('held', flush=True); time.sleep(60)"],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RuntimeError, match=r"is in use by another run \(pid \d+\)"):
      cli.claim_workdir(str(tmp_path), config())
  finally:
    holder.kill()
    holder.wait()
  cli.claim_workdir(str(tmp_path), ml_collections.ConfigDict({"seed": 0}))  # free again


def test_a_read_only_workdir_is_refused_before_any_work(tmp_path, monkeypatch):
  monkeypatch.setattr(os, "access", lambda path, mode: False)  # as on a read-only mount
  with pytest.raises(PermissionError, match="is not writable"):
    cli.claim_workdir(str(tmp_path), config())
  assert os.listdir(tmp_path) == []


def test_smoke_mode_says_what_it_replaces(capsys):
  smoked = cli.smoke(config(steps=50, nested={"width": 16}), {"steps": 2, "nested.width": 16})
  assert (smoked.steps, smoked.nested.width) == (2, 16)
  assert capsys.readouterr().out.strip() == "smoke mode (a tiny run) sets steps=2 (was 50)"


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "oba_jax.experiments.quickstart", *args],
                        capture_output=True, text=True, timeout=120)


def test_a_misspelt_key_gives_the_closest_one_in_a_few_lines(tmp_path):
  out = run_cli(f"--workdir={tmp_path}", "--config.targt=0.3")
  assert out.returncode == 2
  assert "unknown setting --config.targt. Did you mean --config.target?" in out.stderr
  assert len(out.stderr.strip().splitlines()) < 5
  assert os.listdir(tmp_path) == []


def test_a_bad_value_is_one_paragraph_before_any_work(tmp_path):
  out = run_cli(f"--workdir={tmp_path}", "--config.finetune_learning_rate=-1")
  assert out.returncode == 2
  assert out.stderr.strip().endswith("ValueError: finetune: learning_rate=-1.0 must be > 0.")
  assert "Traceback" not in out.stderr and not os.path.exists(tmp_path / cli.CONFIG_FILE)


def test_model_arguments_the_default_does_not_name_are_added_with_their_type():
  base = ml_collections.ConfigDict(dict(model_kwargs=ml_collections.ConfigDict(),
                                        steps=1))
  extended = cli.with_open_keys(base, [
      "--config.model_kwargs.image_size=28", "--config.model_kwargs.scale=0.5",
      "--config.model_kwargs.norm=layer", "--config.steps=3", "--config.other.x=1"])
  assert extended.model_kwargs.to_dict() == {"image_size": 28, "scale": 0.5, "norm": "layer"}
  assert extended.steps == 1 and "other" not in extended  # only open dicts take new keys


# --- reliability probes (issue 26) -------------------------------------------------------------


def test_a_resume_on_other_inputs_is_refused_naming_them(tmp_path):
  weights = tmp_path / "model.bin"
  weights.write_bytes(b"first weights")
  workdir = str(tmp_path / "run")
  inputs = lambda: {"weights": files.fingerprint(weights), "text": "built-in sentences"}
  cli.claim_workdir(workdir, config(), inputs())
  (tmp_path / "run" / "dense.json").write_text("{}")  # a cached stage
  cli.claim_workdir(workdir, config(), inputs())  # the same inputs resume
  weights.write_bytes(b"other weights, same path")
  with pytest.raises(ValueError, match=r"on other inputs \(weights: .*model.bin \(13 bytes, "
                     r".*\) then, .*model.bin \(24 bytes.*\) now\).*Use a new --workdir"):
    cli.claim_workdir(workdir, config(), inputs())
  weights.write_bytes(b"first weights")
  with pytest.raises(ValueError, match=r"text: 'built-in sentences' then, 'WordNet' now"):
    cli.claim_workdir(workdir, config(), {**inputs(), "text": "WordNet"})


def test_a_workdir_copied_beside_a_copy_of_its_inputs_resumes(tmp_path):
  weights = tmp_path / "here" / "model.bin"
  weights.parent.mkdir()
  weights.write_bytes(b"the weights")
  workdir = tmp_path / "run"
  cli.claim_workdir(str(workdir), config(), {"weights": files.fingerprint(weights)})
  (workdir / "dense.json").write_text("{}")  # a cached stage
  moved = tmp_path / "elsewhere" / "model.bin"  # another machine, another environment
  moved.parent.mkdir()
  moved.write_bytes(b"the weights")
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns(cli.LOCK_FILE))
  cli.claim_workdir(str(copy), config(), {"weights": files.fingerprint(moved)})
  recorded = json.loads((copy / cli.INPUTS_FILE).read_text())
  assert recorded["weights"]["path"] == str(moved)  # it records where they are now
  moved.write_bytes(b"other weight")  # same size and place, other content: refused
  with pytest.raises(ValueError, match=r"on other inputs \(weights: "):
    cli.claim_workdir(str(copy), config(), {"weights": files.fingerprint(moved)})


def test_the_data_and_weights_a_config_names_are_part_of_the_identity(tmp_path):
  data = tmp_path / "data"
  data.mkdir()
  (data / "train.bin").write_bytes(b"12345")
  workdir = str(tmp_path / "run")
  cli.claim_workdir(workdir, config(data_dir=str(data)))
  (tmp_path / "run" / "results.json").write_text("{}")
  (data / "train.bin").write_bytes(b"123456")  # the data changed under the same setting
  with pytest.raises(ValueError, match=r"other inputs \(data_dir: "):
    cli.claim_workdir(workdir, config(data_dir=str(data)))


def test_only_the_data_set_of_a_shared_tfds_dir_counts(tmp_path):
  tfds_dir = tmp_path / "tensorflow_datasets"
  (tfds_dir / "fashion_mnist").mkdir(parents=True)
  (tfds_dir / "fashion_mnist" / "train.array_record").write_bytes(b"123")
  settings = config(data_dir=str(tfds_dir), dataset="fashion_mnist")
  workdir = str(tmp_path / "run")
  cli.claim_workdir(workdir, settings)
  (tmp_path / "run" / "results.json").write_text("{}")
  (tfds_dir / "cifar10").mkdir()  # another data set prepared there since
  (tfds_dir / "cifar10" / "train.array_record").write_bytes(b"4567")
  cli.claim_workdir(workdir, settings)
  (tfds_dir / "fashion_mnist" / "test.array_record").write_bytes(b"89")
  with pytest.raises(ValueError, match=r"other inputs \(data_dir: \S+fashion_mnist \(3 bytes"):
    cli.claim_workdir(workdir, settings)


def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
  path = tmp_path / "a_file"
  path.write_text("mine")
  out = run_cli(f"--workdir={path}", "--config.smoke=True")
  assert out.returncode == 2, out.stderr
  assert out.stderr.strip().splitlines() == [
      f"quickstart.py: ValueError: --workdir={path} is a file, not a directory; give a "
      "directory (a new one is created)."]
  assert path.read_text() == "mine"


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_get_the_users_umask(tmp_path, umask):
  old = os.umask(umask)
  try:
    cli.write_json(str(tmp_path / "results.json"), {"a": 1})
    files.write_atomic(tmp_path / "scores.npz", lambda f: f.write(b"x"))
  finally:
    os.umask(old)
  for name in ("results.json", "scores.npz"):
    assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~umask


def test_a_full_disk_names_the_directory_keeps_the_old_file_and_leaves_no_temporary(
    tmp_path, monkeypatch):
  cli.write_json(str(tmp_path / "results.json"), {"old": True})

  def full(fd):  # as a full disk fails a write once the data goes out
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(os, "fsync", full)
  with pytest.raises(files.DiskFullError, match=f"no space left on the disk holding {tmp_path}"):
    cli.write_json(str(tmp_path / "results.json"), {"new": True})
  assert os.listdir(tmp_path) == ["results.json"]
  assert json.loads((tmp_path / "results.json").read_text()) == {"old": True}


def _clis():
  """Every module of oba_jax.experiments that ends in `cli.main(...)`."""
  directory = os.path.dirname(cli.__file__)
  return sorted(name[:-3] for name in os.listdir(directory) if name.endswith(".py")
                and re.search(r"\n  cli\.main\(", open(os.path.join(directory, name)).read()))


def test_every_key_of_every_cli_has_a_description():
  names = _clis()
  assert {"quickstart", "oracle", "smollm2_wordnet", "minilm_wordnet"} <= set(names)
  for name in names:
    out = subprocess.run([sys.executable, "-m", f"oba_jax.experiments.{name}", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    keys = re.findall(r"^  --config\.([\w.]+)=", out.stdout, re.M)
    assert keys, out.stdout
    undescribed = [k for k, line in zip(keys, out.stdout.split("\n  --config.")[1:])
                   if "(no description)" in line]
    assert not undescribed, f"{name}: {undescribed}"


def test_batch_sizes_the_devices_do_not_divide_are_refused_before_the_claim(tmp_path):
  from test_estimate import worker_env
  out = subprocess.run([sys.executable, "-m", "oba_jax.experiments.quickstart",
                        f"--workdir={tmp_path / 'run'}", "--config.smoke=True",
                        "--config.progress=False"],
                       capture_output=True, text=True, timeout=300, env=worker_env(3))
  assert out.returncode == 2, out.stderr
  assert out.stderr.strip().splitlines()[-1] == (
      "quickstart.py: ValueError: batch_size=32, importance_batch_size=16: batches are split "
      "over the 3 devices, so batch sizes must be multiples of 3; change them, or the number "
      "of devices (XLA_FLAGS=--xla_force_host_platform_device_count=N on CPU).")
  assert not os.path.exists(tmp_path / "run")  # not claimed: any rerun may use it


def test_temporary_files_of_a_killed_write_are_removed_when_the_workdir_is_claimed(tmp_path):
  (tmp_path / "scores").mkdir()
  left = tmp_path / "scores" / ".oba_seed1.npz.4242.0123abcd.tmp"  # a writer killed mid-write
  left.write_bytes(b"half")
  mine = tmp_path / "scores" / "notes.tmp"  # not a name the writer gives
  mine.write_text("keep")
  cli.claim_workdir(str(tmp_path), config())
  assert not left.exists() and mine.read_text() == "keep"
