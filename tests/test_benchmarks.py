"""The benchmarks run end to end at tiny size (their figures are not checked)."""

import importlib.util
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_gpu_runs_at_tiny_size(tmp_path):
  out = tmp_path / "bench_gpu.json"
  done = subprocess.run(["bash", os.path.join(ROOT, "experiments", "bench_gpu.sh"), "--tiny",
                         "--reps", "1", "--out", str(out)], capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  record = json.loads(out.read_text())
  assert sorted(record["scores"]) == ["resnet50_b128", "resnet50_b64", "vit_b16_b64"]
  for case in record["scores"].values():
    assert sorted(case["rows"]) == ["bilinear", "ggn", "grad", "hessian", "residual"]
    assert all(row["median_s"] > 0 and row["peak_bytes"] > 0 for row in case["rows"].values())
  assert record["latency"]["kept_macs"] <= 0.5 and record["skipped"] == []
  text = json.loads((tmp_path / "bench_gpu_text.json").read_text())  # the transformers too
  assert sorted(text["models"]) == ["minilm", "smollm2"] and text["skipped"] == {}


def test_bench_text_scores_measures_every_criterion_against_the_gradient(tmp_path):
  out = tmp_path / "text.json"
  done = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "bench_text_scores.py"), "--tiny",
       "--reps", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  record = json.loads(out.read_text())
  rows = record["models"]["smollm2"]["rows"]
  assert {"grad", "oba", "oba_bilinear", "obd_fisher"} <= set(rows)
  assert "obd_fisher" not in record["models"]["minilm"]["rows"]  # the CLI's own criteria
  for row in rows.values():
    assert row["median_s"] > 0 and row["peak_bytes"] > 0 and row["ratio_to_grad"] > 0
  assert rows["grad"]["ratio_to_grad"] == 1.0 and rows["oba"]["goal"] == 2.2
  bad = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "bench_text_scores.py"), "--models",
       "gpt2"], capture_output=True, text=True, timeout=600)
  assert bad.returncode == 2 and "gpt2" in bad.stderr and "smollm2" in bad.stderr


def test_bench_scores_depth_table_runs_at_tiny_size(tmp_path):
  out = tmp_path / "depth.json"
  done = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "bench_scores.py"), "--depth", "8,14",
       "--width", "2", "--batch", "4", "--reps", "1", "--only", "hessian", "--train-bn",
       "--torch", "--out", str(out)],
      capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  record = json.loads(out.read_text())
  assert [r["depth"] for r in record["depths"]] == [8, 14]
  assert [r["layers"] for r in record["depths"]] == [10, 16]  # convs, shortcut convs, classifier
  assert "ms/layer" in done.stdout and "JAX/torch" in done.stdout
  if importlib.util.find_spec("torch") is not None:  # PyTorch's gradient in the same rounds
    assert all(r["torch"]["median_s"] > 0 for r in record["depths"])


def test_bench_smoke_times_a_smoke_run_against_the_budget():
  done = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "bench_smoke.py"),
                         "--names", "unstructured", "--rounds", "1"],
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  (row,) = [line.split() for line in done.stdout.splitlines() if "unstructured" in line]
  assert row[0] == "1" and row[2] == "0" and row[-1] in ("met", "MISSED")
  bad = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "bench_smoke.py"),
                        "--names", "quickstrat"], capture_output=True, text=True, timeout=60)
  assert bad.returncode == 2 and "unknown ['quickstrat']" in bad.stderr
