"""The text-pruning CLIs in smoke mode (tiny random models, no downloads): results, plot, resume."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from oba_jax.data import wordnet
from oba_jax.experiments import minilm_wordnet, smollm2_wordnet, text_report
from oba_jax.files import DamagedFileError


def _run(module, workdir, **overrides):
  config = module.get_config()
  config.smoke = True
  config.progress = False
  config.criteria = "random,activation_norm,oba"
  for key, value in overrides.items():
    config[key] = value
  return module.run(config, str(workdir))


@pytest.mark.parametrize("module,metric", [(smollm2_wordnet, "perplexity"),
                                           (minilm_wordnet, "recall_at_1")])
def test_smoke_run_writes_results_and_resumes(tmp_path, module, metric):
  results = _run(module, tmp_path)
  assert results["metric"] == metric
  assert {r["criterion"] for r in results["runs"]} == {"random", "activation_norm", "oba"}
  for r in results["runs"]:
    assert r["kept_params"] <= r["target"] + 1e-9
    assert r["max_abs_compact_minus_masked"] < 1e-4  # the compacted model is the masked one
  assert os.path.exists(tmp_path / f"{metric}.png")
  with open(tmp_path / "results.json") as f:
    assert json.load(f)["dense"][metric] == results["dense"][metric]
  stamps = {p: os.path.getmtime(tmp_path / "runs" / p) for p in os.listdir(tmp_path / "runs")}
  again = _run(module, tmp_path)  # resumes: nothing recomputed
  assert {p: os.path.getmtime(tmp_path / "runs" / p) for p in stamps} == stamps
  assert [r[metric] for r in again["runs"]] == [r[metric] for r in results["runs"]]


def test_bad_settings_fail_before_work(tmp_path):
  with pytest.raises(ValueError, match="unknown"):
    _run(smollm2_wordnet, tmp_path / "a", criteria="oba,nonsense")
  with pytest.raises(ValueError, match="targets"):
    _run(minilm_wordnet, tmp_path / "b", targets="0.9,1.5")
  with pytest.raises(ValueError, match="prune"):
    _run(smollm2_wordnet, tmp_path / "c", prune="embeddings")
  with pytest.raises(ValueError, match="DATAxMODEL"):
    _run(smollm2_wordnet, tmp_path / "d", mesh="2by4")
  with pytest.raises(ValueError, match="must be 1, the number of devices"):
    _run(smollm2_wordnet, tmp_path / "e", mesh="2x4")
  with pytest.raises(ValueError, match="one example at a time"):
    _run(minilm_wordnet, tmp_path / "f", criteria="obd_fisher")
  for name in "adef":
    assert not os.path.exists(tmp_path / name)


def test_smoke_run_on_a_2d_mesh_scores_like_one_device(tmp_path):
  # The pod recipe of the README: 8 devices as data 2 x model 4, parameters split over "model".
  from test_estimate import worker_env
  runs = {}
  for name, mesh, devices in (("one", "", 1), ("pod", "2x4", 8)):
    workdir = tmp_path / name
    subprocess.run(
        [sys.executable, "-m", "oba_jax.experiments.smollm2_wordnet", f"--workdir={workdir}",
         "--config.smoke=True", "--config.progress=False", f"--config.mesh={mesh}",
         "--config.criteria=taylor,obd_fisher,oba"],
        env=worker_env(devices), check=True, timeout=600, capture_output=True)
    runs[name] = {f: np.load(workdir / "scores" / f) for f in os.listdir(workdir / "scores")}
  assert runs["one"].keys() == runs["pod"].keys() and len(runs["one"]) == 3
  for f, one in runs["one"].items():
    for group in one.files:
      if group != "__seconds__":
        # float32 sums in another order: relative to the group's largest score.
        np.testing.assert_allclose(runs["pod"][f][group], one[group], rtol=1e-4,
                                   atol=1e-5 * np.abs(one[group]).max(), err_msg=f"{f} {group}")


# --- reliability probes (issue 26) -------------------------------------------------------------

needs_wordnet = pytest.mark.skipif(not wordnet.available(), reason="wordnet-base is not installed")


def _no_wordnet(monkeypatch, tmp_path):
  """Points the WordNet loader at an empty directory, as on a machine without wordnet-base."""
  monkeypatch.setenv("OBA_WORDNET_DIR", str(tmp_path / "no_wordnet"))
  assert not wordnet.available()


def test_settings_that_need_the_model_are_checked_before_the_workdir_is_claimed(tmp_path):
  with pytest.raises(ValueError, match=r"max_ratio=1.5: .* in \[0, 1\]"):
    _run(smollm2_wordnet, tmp_path / "a", max_ratio=1.5)
  with pytest.raises(ValueError, match=r"calibration_texts='banana': unknown \['banana'\]"):
    _run(smollm2_wordnet, tmp_path / "b", calibration_texts="banana")
  for name in "ab":  # nothing written, nothing locked: no config.json to refuse a rerun
    assert not os.path.exists(tmp_path / name / "config.json")
  results = _run(smollm2_wordnet, tmp_path / "a", criteria="random")
  assert len(results["runs"]) == 2  # the corrected rerun


@needs_wordnet
def test_an_unreachable_target_is_refused_before_the_workdir_is_claimed(tmp_path):
  _tiny_minilm_dir(tmp_path / "model", seed=0)  # smoke mode sets its own targets
  settings = dict(TINY_MINILM, model_dir=str(tmp_path / "model"))
  with pytest.raises(ValueError, match=r"KeptParams\(ratio=0.1\) cannot be reached: the "
                     r"smallest kept params ratio within max_ratio=0.9.* is 0\.\d+"):
    _run(minilm_wordnet, tmp_path / "run", **{**settings, "targets": "0.9,0.1"})
  assert not os.path.exists(tmp_path / "run" / "config.json")  # nothing done, nothing claimed
  assert not os.path.exists(tmp_path / "run" / "dense.json")
  results = _run(minilm_wordnet, tmp_path / "run", **settings)
  assert [r["target"] for r in results["runs"]] == [0.9]  # the corrected rerun


@pytest.mark.parametrize("mesh", ["", "8x1"])
def test_batches_the_mesh_does_not_divide_are_refused_before_the_claim(tmp_path, mesh):
  from test_estimate import worker_env
  out = subprocess.run(
      [sys.executable, "-m", "oba_jax.experiments.smollm2_wordnet", f"--workdir={tmp_path}",
       "--config.smoke=True", "--config.progress=False", f"--config.mesh={mesh}"],
      env=worker_env(8), capture_output=True, text=True, timeout=600)
  assert out.returncode == 2, out.stderr
  assert "ValueError: batch_size=4 gives calibration batches of [4] rows, which the 8 devices" \
      in out.stderr and "Traceback" not in out.stderr
  assert not os.path.exists(tmp_path / "config.json")


def test_smollm2_smoke_runs_without_wordnet_and_a_damaged_score_file_is_named(
    tmp_path, monkeypatch):
  _no_wordnet(monkeypatch, tmp_path)
  results = _run(smollm2_wordnet, tmp_path / "run", criteria="random,oba")
  assert results["info"]["eval_sentences"] == 8 and len(results["runs"]) == 4
  scores_file = tmp_path / "run" / "scores" / "oba_seed1.npz"
  scores_file.write_bytes(scores_file.read_bytes()[:1000])  # cut short
  for row in (tmp_path / "run" / "runs").glob("oba_*"):
    row.unlink()
  with pytest.raises(DamagedFileError, match=f"{scores_file} \\(cached group scores\\) cannot be "
                     "read .* delete it to recompute the scores"):
    _run(smollm2_wordnet, tmp_path / "run", criteria="random,oba")


@needs_wordnet
def test_a_resume_on_other_text_is_refused(tmp_path, monkeypatch):
  _no_wordnet(monkeypatch, tmp_path)
  _run(minilm_wordnet, tmp_path / "run", criteria="random")  # on the built-in sentences
  monkeypatch.delenv("OBA_WORDNET_DIR")  # WordNet installed since
  with pytest.raises(ValueError, match=r"on other inputs \(text: 'built-in smoke sentences "
                     r"\(WordNet not installed\)' then, \[.*data.adj \(\d+ bytes.*\] now\)"):
    _run(minilm_wordnet, tmp_path / "run", criteria="random")
  with open(tmp_path / "run" / "results.json") as f:
    assert json.load(f)["info"]["calibration_pairs"] < 100  # untouched


# A real (not smoke) MiniLM run, small: a tiny model directory is added as model_dir.
TINY_MINILM = dict(smoke=False, batch_size=4, max_tokens=16, eval_pairs=16, calibration_batches=1,
                   calibration_seeds="1", targets="0.9", criteria="random", measure_cost=False)


def _tiny_minilm_dir(directory, seed):
  """A Hugging Face BERT directory of a tiny random model with a WordPiece tokenizer."""
  tokenizers = pytest.importorskip("tokenizers")
  from flax import nnx
  from test_transformer_weights import BERT, _bert_state_dict, _write_bert
  from oba_jax.models import Bert
  _write_bert(directory, _bert_state_dict(Bert(**BERT, rngs=nnx.Rngs(seed))))
  words = ["[PAD]", "[UNK]", "a", "the", "of", "to", "an", "or", "and", "in", "is", "that"]
  tokenizer = tokenizers.Tokenizer(tokenizers.models.WordPiece(
      {w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
  tokenizer.normalizer = tokenizers.normalizers.Lowercase()
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tokenizer.save(str(directory / "tokenizer.json"))


@needs_wordnet
def test_a_resume_on_replaced_weights_is_refused(tmp_path):
  model_dir = tmp_path / "model"
  _tiny_minilm_dir(model_dir, seed=0)
  settings = dict(TINY_MINILM, model_dir=str(model_dir))
  first = _run(minilm_wordnet, tmp_path / "run", **settings)
  _tiny_minilm_dir(model_dir, seed=1)  # another model at the same path
  with pytest.raises(ValueError, match=r"on other inputs \(weights model.safetensors: "
                     r"\S+model.safetensors \(\d+ bytes, \w+\) then, \S+ \(\d+ bytes, \w+\) now"):
    _run(minilm_wordnet, tmp_path / "run", **settings)
  with open(tmp_path / "run" / "dense.json") as f:
    assert json.load(f)["recall_at_1"] == first["dense"]["recall_at_1"]  # untouched


def _mount_tmpfs(path, size):
  if os.geteuid() != 0:
    pytest.skip("mounting a small tmpfs needs root")
  path.mkdir(exist_ok=True)
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                        capture_output=True)
  if done.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")


def test_a_full_disk_is_one_paragraph_naming_the_workdir_and_the_rerun_finishes(tmp_path):
  disk = tmp_path / "disk"
  _mount_tmpfs(disk, "48k")
  try:
    command = [sys.executable, "-m", "oba_jax.experiments.smollm2_wordnet",
               f"--workdir={disk / 'run'}", "--config.smoke=True", "--config.progress=False",
               "--config.criteria=random,oba"]
    full = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert full.returncode == 2, full.stderr
    assert full.stderr.strip().startswith(
        "smollm2_wordnet.py: DiskFullError: [Errno 28] no space left on the disk holding "
        f"{disk / 'run'}") and "Traceback" not in full.stderr, full.stderr
    left = [os.path.join(d, f) for d, _, names in os.walk(disk) for f in names]
    assert not [f for f in left if f.endswith(".tmp")], left
    subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    with open(disk / "run" / "results.json") as f:
      assert len(json.load(f)["runs"]) == 4
  finally:
    subprocess.run(["umount", str(disk)], check=False)


def _run_flat(workdir, **overrides):
  config = smollm2_wordnet.get_config()
  config.update(smoke=True, progress=False)
  config.update_from_flattened_dict(overrides)
  return smollm2_wordnet.run(config, str(workdir))


EXPORT = {"keep_head_size": True, "scope": "uniform", "export.formats": "gguf,hf",
          "export.reps": 1, "export.generate": 4, "export.sequences": 2}


def test_smollm2_smoke_preset_packs_both_corpora_recovers_exports_and_resumes(tmp_path):
  results = _run_flat(tmp_path, preset="issue23", criteria="random", **EXPORT)
  assert results["config"]["sequence_length"] == 16  # the preset, shrunk by smoke mode
  assert results["info"]["held_out_sequences"] == {"wordnet": 8, "python_docs": 8}
  assert results["dense"]["tokens_python_docs"] == 8 * 15 >= 120
  for row in results["runs"]:
    assert {"perplexity_wordnet", "perplexity_python_docs", "peak_rss_bytes"} <= row.keys()
    after = row["after_recovery"]
    assert row["recovery_seconds"] > 0 and row["recovery"]["mode"] == "lora"
    assert after["perplexity"] == after["perplexity_wordnet"] != row["perplexity"]
  table = text_report.table(results)
  assert "recovered" in table.splitlines()[0]
  _check_export(results)
  stamps = {f"{d}/{p}": os.path.getmtime(tmp_path / d / p)
            for d in ("recovered", "export") for p in os.listdir(tmp_path / d)}
  seeds = results["config"]["calibration_seeds"].split(",")
  assert sorted(results["dense_recovered"]) == sorted(seeds)  # the baseline of the recovered
  for after in results["dense_recovered"].values():
    assert after["perplexity"] != results["dense"]["perplexity"]
  assert len([p for p in stamps if p.startswith("recovered/")]) == len(results["runs"]) + len(
      seeds)
  again = _run_flat(tmp_path, preset="issue23", criteria="random", **EXPORT)  # nothing recomputed
  assert {p: os.path.getmtime(tmp_path / p) for p in stamps} == stamps
  assert [r["after_recovery"] for r in again["runs"]] == [r["after_recovery"]
                                                          for r in results["runs"]]
  assert again["export"] == results["export"]
  assert again["dense_recovered"] == results["dense_recovered"]


def _check_export(results):
  """The exported files hold the run's models: the GGUF file and the Hugging Face directory of
  each give the same logits, of the recovered (uniformly pruned) model's size; the clients, when
  installed, compute oba_jax's logits."""
  import jax.numpy as jnp

  from oba_jax.export import load_llama_hf
  from oba_jax.weights import llama_gguf
  files = results["export"]["files"]
  assert set(files) == {"dense", "random_seed1_0.9", "random_seed1_0.8"}
  dense = files["dense"]["params"]
  tokens = jnp.arange(3, 19)[None]
  for name, written in files.items():
    from_gguf, _ = llama_gguf.load_llama(written["gguf"]["path"])
    from_hf, config = load_llama_hf(written["hf"]["path"])
    np.testing.assert_allclose(from_hf(tokens), from_gguf(tokens), rtol=0, atol=1e-5)
    assert written["gguf"]["architecture"] == "llama"  # uniform scope: one width per model
    assert config["num_heads"] == written["gguf"]["num_heads"]
    if name != "dense":
      row = next(r for r in results["runs"] if f"random_seed1_{r['target']:g}" == name)
      assert written["params"] == pytest.approx(row["kept_params"] * dense, abs=1)
    for check in (written["gguf"]["llama_cpp_logits"], written["hf"]["transformers_logits"]):
      assert check.get("skipped") or check["max_abs_over_max_logit"] < 1e-5
  compare = results["export"]["compare"]
  prompt = list(compare["prompt"].encode("utf-8"))  # the smoke model's byte tokens
  for client in ("llama_cpp", "transformers"):
    speed = compare[f"{client}_speed"]
    if speed.get("skipped"):
      continue
    assert set(speed) == set(files)
    for name, written in files.items():  # the clients decode what oba_jax decodes greedily
      model, _ = llama_gguf.load_llama(written["gguf"]["path"])
      assert speed[name]["generated_ids"] == _greedy(model, prompt, compare["generated_tokens"])


def _greedy(model, prompt, count):
  import jax.numpy as jnp
  ids = list(prompt)
  for _ in range(count):
    ids.append(int(jnp.argmax(model(jnp.asarray([ids]))[0, -1])))
  return ids[len(prompt):]


@pytest.mark.parametrize("overrides, named", [
    ({"eval_corpora": "wordnet,novels"}, "eval_corpora"),
    ({"eval_corpora": "python_docs"}, "sequence_length"),
    ({"recovery.mode": "qlora"}, "recovery.mode"),
    ({"recovery.mode": "lora", "recovery.distill_weight": 2.0}, "distill_weight"),
    ({"preset": "issue99"}, "preset"),
    ({"sequence_length": 1}, "sequence_length"),
    ({"export.formats": "gguf"}, "keep_head_size"),
    ({"export.formats": "gguf,hf", "keep_head_size": True}, "scope=uniform"),
    ({"export.formats": "onnx", "keep_head_size": True}, "export.formats"),
    ({"export.formats": "gguf", "keep_head_size": True, "export.gguf_dtype": "q4_0"},
     "export.gguf_dtype"),
    ({"export.formats": "gguf", "keep_head_size": True, "export.criterion": "oba"},
     "export.criterion"),
    ({"scope": "per-layer"}, "scope"),
])
def test_smollm2_recovery_and_corpus_settings_fail_before_work(tmp_path, overrides, named):
  with pytest.raises(ValueError, match=named):
    _run_flat(tmp_path / "w", criteria="random", **overrides)
  assert not os.path.exists(tmp_path / "w")


def test_preset_leaves_keys_set_by_hand():
  config = smollm2_wordnet.get_config()
  config.preset = "issue23"
  config.targets = "0.5"
  config = smollm2_wordnet.apply_preset(config)
  assert config.targets == "0.5" and config.sequence_length == 128
  assert config.recovery.mode == "lora"


@needs_wordnet
def test_minilm_exports_bert_directories_that_carry_the_tokenizer_and_match(tmp_path):
  from oba_jax.export import clients
  from oba_jax.weights import bert_safetensors
  _tiny_minilm_dir(tmp_path / "model", seed=0)
  settings = dict(TINY_MINILM, model_dir=str(tmp_path / "model"), prune="mlp", scope="uniform")

  def run(**overrides):
    config = minilm_wordnet.get_config()
    config.update(progress=False, **{**settings, **overrides})
    config.export.formats = "hf"
    return minilm_wordnet.run(config, str(tmp_path / "run"))

  with pytest.raises(ValueError, match="prune='all', scope='uniform': BertModel computes"):
    run(prune="all")
  assert not os.path.exists(tmp_path / "run" / "config.json")
  results = run()
  files = results["export"]["files"]
  assert sorted(files) == ["dense", "random_seed1_0.9"]
  widths = {}
  for name, written in files.items():
    directory = written["hf"]["path"]
    assert os.path.isfile(os.path.join(directory, "tokenizer.json")), name
    widths[name] = bert_safetensors.load_bert(directory)[1]["ffn_dim"]
    agreement = written["hf"]["transformers_hidden_states"]
    if "transformers" in clients.missing():
      assert "skipped" in agreement
    else:  # the tiny model's hidden states are O(1)
      assert agreement["max_abs"] < 1e-4, agreement
  assert widths["random_seed1_0.9"] < widths["dense"] == 12
