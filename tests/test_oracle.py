"""The oracle study: true loss changes, restricted predictions, metrics and the CLI."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oba_jax import criteria, masks, models, oracle, structure
from oba_jax.evaluation import evaluate
from oba_jax.experiments import cli
from oba_jax.experiments import oracle as oracle_cli
from oba_jax.functional import classification, functional
import clis
from markers import needs_fashion_mnist

KEY = jax.random.key(0)
CRITERIA = ("magnitude", "taylor", "obd_hutchinson", "oba", "oba_ggn", "oba_residual", "taylor3")


def batches(count=2, size=8, seed=0):
  rng = np.random.default_rng(seed)
  return [{"image": rng.normal(size=(size, 8, 8, 1)).astype(np.float32),
           "label": rng.integers(0, 3, size).astype(np.int32)} for _ in range(count)]


@pytest.fixture(scope="module")
def model():
  return models.create("resnet8_cifar", width=4, in_channels=1, num_classes=3)


@pytest.fixture(scope="module")
def study(model):
  model.eval()
  traced = structure.trace(model, jnp.asarray(batches()[0]["image"][:1]))
  removals = oracle.sample_removals(traced.groups, 10, seed=0)
  return oracle.removal_study(model, traced, batches(), criteria=CRITERIA,
                              removals=removals, key=KEY)


def test_true_change_is_the_loss_of_the_model_with_the_channel_zeroed(model, study):
  found = structure.trace(model, jnp.asarray(batches()[0]["image"][:1]))
  dense_loss = evaluate(model, batches())["loss"]
  assert study.loss == pytest.approx(dense_loss, rel=1e-5)
  for (group, index), change in zip(study.removals[:4], study.true[:4]):
    removed = masks.apply(model, masks.from_removed(found, {group: [index]},
                                                    functional(model)[1]))
    assert change == pytest.approx(evaluate(removed, batches())["loss"] - dense_loss,
                                   abs=1e-5)


def test_restricted_predictions_are_the_criteria_scores_of_that_removal(model, study):
  apply_fn, params = functional(model)
  objective = classification(apply_fn)
  found = structure.trace(model, jnp.asarray(batches()[0]["image"][:1]))
  group, index = study.removals[3]
  keep = masks.from_removed(found, {group: [index]}, params)
  delta = jax.tree.map(lambda p, k: jnp.where(k, 0.0, -p), params, keep)
  for c in ("taylor", "oba", "taylor3"):
    scores = [criteria.CRITERIA[c].score(objective, params, b, KEY, delta=delta)
              for b in batches()]
    expected = np.mean([sum(float(jnp.sum(x)) for x in jax.tree.leaves(s)) for s in scores])
    assert study.prediction[c][3] == pytest.approx(expected, rel=1e-4, abs=1e-7)


def test_hessian_prediction_is_ggn_plus_residual(study):
  np.testing.assert_allclose(study.prediction["oba"],
                             study.prediction["oba_ggn"] + study.prediction["oba_residual"],
                             rtol=1e-4, atol=1e-6)


def test_first_order_prediction_equals_its_signed_attribution(study):
  # First-order scores are entrywise: the "sum" group score is the single-removal prediction
  # except for the BatchNorm entries, which the restricted delta also removes.
  assert oracle.spearman(study.prediction["taylor"], study.attribution["taylor"]["sum"]) > 0.5
  np.testing.assert_allclose(study.prediction["magnitude"] >= study.attribution["magnitude"]["sum"]
                             - 1e-6, True)


def test_attention_heads_are_removed_whole():
  vit = models.create("vit", image_size=8, patch_size=4, hidden_dim=16, num_layers=1,
                      num_heads=4, mlp_dim=16, num_classes=3, in_channels=1)
  example = jnp.asarray(batches()[0]["image"][:1])
  found = structure.trace(vit, example, ignore=("conv_proj",))
  heads = next(g for g in found.groups if g.size == 4 and any(
      m.path.endswith("attention/query/kernel") and m.position == 0 for m in g.members))
  removals = [(heads.name, 1), (heads.name, 3)]
  study = oracle.removal_study(vit, found, batches(), criteria=("taylor", "oba"),
                               removals=removals, key=KEY)
  dense_loss = evaluate(vit, batches())["loss"]
  for (group, index), change in zip(removals, study.true):
    keep = masks.from_removed(found, {group: [index]}, functional(vit)[1])
    query = np.asarray(keep["layers"][0]["attention"]["query"]["kernel"]).reshape(16, 4, 4)
    assert not query[:, index].any() and query[:, [i for i in range(4) if i != index]].all()
    removed = masks.apply(vit, keep)
    assert change == pytest.approx(evaluate(removed, batches())["loss"] - dense_loss,
                                   abs=1e-5)


def test_study_survives_json(study):
  again = oracle.Study.from_json(json.loads(json.dumps(study.to_json())))
  np.testing.assert_array_equal(again.true, study.true)
  np.testing.assert_array_equal(again.attribution["oba"]["paper"], study.attribution["oba"]["paper"])
  assert again.removals == study.removals


def test_taylor_polynomials_add_the_terms_in_order(study):
  polynomials = oracle.taylor_polynomials(study)
  assert list(polynomials) == ["T1", "T2", "T3"]  # no taylor4 among CRITERIA
  np.testing.assert_allclose(polynomials["T3"], study.prediction["taylor"]
                             + study.prediction["oba"] + study.prediction["taylor3"])


def test_bad_removals_and_criteria_are_refused_before_any_work(model):
  traced = structure.trace(model, jnp.asarray(batches()[0]["image"][:1]))
  name = traced.groups[0].name
  with pytest.raises(ValueError, match=r"removal \('nope', 0\)"):
    oracle.removal_study(model, traced, batches(), criteria=("oba",), removals=[("nope", 0)],
                         key=KEY)
  with pytest.raises(ValueError, match=rf"removal \('{name}', 999\)"):
    oracle.removal_study(model, traced, batches(), criteria=("oba",), removals=[(name, 999)],
                         key=KEY)
  with pytest.raises(ValueError, match="unknown criterion 'obs'"):
    oracle.removal_study(model, traced, batches(), criteria=("obs",), removals=[(name, 0)],
                         key=KEY)


# --- metrics --------------------------------------------------------------------


def test_ranks_share_ties():
  np.testing.assert_array_equal(oracle.ranks([3.0, 1.0, 3.0, 2.0]), [2.5, 0.0, 2.5, 1.0])


def test_correlations_against_their_definitions():
  x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
  assert oracle.spearman(x, x ** 3) == pytest.approx(1.0)
  assert oracle.pearson(x, x ** 3) < 1.0
  assert oracle.spearman(x, -x) == pytest.approx(-1.0)
  assert np.isnan(oracle.pearson(x, np.ones(5)))
  scipy_stats = pytest.importorskip("scipy.stats")
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=50), rng.normal(size=50)
  b[:10] = b[10:20]  # ties
  assert oracle.spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b).statistic)
  assert oracle.pearson(a, b) == pytest.approx(scipy_stats.pearsonr(a, b).statistic)


def test_overlap_and_r_squared():
  true = np.arange(10.0)
  assert oracle.overlap(true, true, 0.2) == 1.0
  assert oracle.overlap(-true, true, 0.2) == 0.0
  assert oracle.overlap(np.array([0, 9, 2, 3, 4, 5, 6, 7, 8, 1.0]), true, 0.2) == 0.5
  assert oracle.r_squared(true, true) == 1.0
  assert oracle.r_squared(np.full(10, true.mean()), true) == 0.0


def test_sample_removals_is_every_index_or_a_seeded_sample(model):
  groups = structure.trace(model, jnp.asarray(batches()[0]["image"][:1])).groups
  every = oracle.sample_removals(groups, 10_000, seed=0)
  assert len(every) == sum(g.size for g in groups) == len(set(every))
  sample = oracle.sample_removals(groups, 7, seed=1)
  assert len(sample) == 7 and set(sample) <= set(every)
  assert sample == oracle.sample_removals(groups, 7, seed=1)


# --- the CLI --------------------------------------------------------------------


def smoke_config(**overrides):
  return clis.smoke_config(oracle_cli, **overrides)


# Not the defaults, which smoke mode narrows to `oracle_cli.SMOKE_SUBSET`.
SMOKE_STUDY = dict(models="vgg11_cifar", bn_modes="train,eval",
                   criteria="magnitude,taylor,obd_fisher,oba,oba_residual")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("oracle"))
  config = smoke_config(**SMOKE_STUDY)
  return workdir, config, oracle_cli.run(config, workdir)


@needs_fashion_mnist
def test_cli_smoke_run_writes_a_consistent_study_and_resumes(smoke_run):
  workdir, config, results = smoke_run
  with open(os.path.join(workdir, oracle_cli.RESULTS_FILE)) as f:
    assert json.load(f)["studies"] == json.loads(json.dumps(results["studies"]))
  assert [(s["model"], s["bn_mode"]) for s in results["studies"]] == [
      ("vgg11_cifar", "train"), ("vgg11_cifar", "eval")]
  criteria = config.criteria.split(",")
  for s in results["studies"]:
    assert s["removals"] == 8 < s["channels"]
    kinds = {(r["criterion"], r["kind"]) for r in s["rows"]}
    # The per-example Fisher needs inference-mode BatchNorm; it is left out in training mode.
    usable = [c for c in criteria if not (c == "obd_fisher" and s["bn_mode"] == "train")]
    assert {(c, k) for c in usable for k in ("prediction", "attribution_paper",
                                             "attribution_sum")} == kinds - {
        (f"T{k}", "prediction") for k in (1, 2, 3, 4)}
    assert os.path.exists(os.path.join(workdir, f"vgg11_cifar_{s['bn_mode']}.png"))
  stamp = os.path.getmtime(os.path.join(workdir, "vgg11_cifar", "eval.json"))
  again = oracle_cli.run(config, workdir)  # reuses the model and the saved studies
  assert again["studies"] == results["studies"]
  assert os.path.getmtime(os.path.join(workdir, "vgg11_cifar", "eval.json")) == stamp
  with pytest.raises(ValueError, match=r"another configuration \(differs in \['seed'\]\)"):
    oracle_cli.run(smoke_config(**SMOKE_STUDY, seed=3), workdir)


@needs_fashion_mnist
def test_the_command_on_eight_devices_gives_the_same_study(smoke_run, tmp_path):
  """`python -m oba_jax.experiments.oracle` with 8 virtual devices matches 1 device.

  The run reuses the 1-device run's dense model (a copy of its workdir without the
  studies), so only the study is computed on 8 devices. Tolerance: float32 sums in
  another order; true changes within 1e-5 (losses ~1), predictions and attributions
  within 1e-3 relative or 1e-5 absolute. Not compared: the "paper" attribution of
  oba_residual in training mode, where the convs' residual scores cancel to float32
  rounding noise (README, "BatchNorm mode") and the reduction normalises that noise.
  This run aborted in XLA (SIGABRT) before programs in flight were bounded
  (`estimate.pace`), and obd_fisher differed by up to 2x before per-example work
  ran per device (`curvature.mean_over_examples`).
  """
  workdir, _, _ = smoke_run
  shutil.copy(os.path.join(workdir, cli.CONFIG_FILE), tmp_path)
  shutil.copytree(os.path.join(workdir, "vgg11_cifar", "dense"), tmp_path / "vgg11_cifar" / "dense")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "oba_jax.experiments.oracle",
                        f"--workdir={tmp_path}", "--config.smoke=True", "--config.progress=False",
                        *[f"--config.{k}={v}" for k, v in SMOKE_STUDY.items()]],
                       env=env, timeout=600, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  for mode in ("eval", "train"):
    load = lambda d: oracle.Study.from_json(json.load(open(os.path.join(d, "vgg11_cifar",
                                                                        f"{mode}.json"))))
    one, eight = load(workdir), load(str(tmp_path))
    assert eight.removals == one.removals
    np.testing.assert_allclose(eight.true, one.true, atol=1e-5, err_msg=mode)
    for c, values in one.prediction.items():
      np.testing.assert_allclose(eight.prediction[c], values, rtol=1e-3, atol=1e-5,
                                 err_msg=f"{mode} {c}")
      for reduction, attribution in one.attribution[c].items():
        if (mode, c, reduction) != ("train", "oba_residual", "paper"):
          np.testing.assert_allclose(eight.attribution[c][reduction], attribution, rtol=1e-3,
                                     atol=1e-5, err_msg=f"{mode} {c} {reduction}")


@pytest.mark.parametrize("overrides, message", [
    (dict(models="vgg11_cifar,alexnet"), r"models='vgg11_cifar,alexnet': unknown \['alexnet'\]"),
    (dict(criteria="oba,obs"), r"criteria='oba,obs': unknown \['obs'\]"),
    (dict(bn_modes="eval,test"), r"bn_modes='eval,test': unknown \['test'\]"),
    (dict(top_fraction=0.0), r"top_fraction=0.0 must be in \(0, 1\]"),
    (dict(max_removals=0), r"max_removals=0 must be a positive integer"),
    (dict(data_dir="/nonexistent/oba"), r"data_dir '/nonexistent/oba' is not a directory"),
])
def test_bad_config_is_refused_before_the_workdir_is_touched(tmp_path, overrides, message):
  error = FileNotFoundError if "data_dir" in overrides else ValueError
  with pytest.raises(error, match=message):
    oracle_cli.run(smoke_config(**overrides), str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_default_smoke_run_studies_a_subset_said_aloud(tmp_path, capsys):
  results = oracle_cli.run(smoke_config(), str(tmp_path))  # generated data, no files needed
  assert [(s["model"], s["bn_mode"]) for s in results["studies"]] == [("vgg11_cifar", "eval")]
  assert "models='vgg11_cifar' (was 'vgg11_cifar,resnet20_cifar')" in capsys.readouterr().out


@pytest.mark.slow
def test_smoke_run_of_both_models(tmp_path):
  results = oracle_cli.run(smoke_config(models="resnet20_cifar,vgg11_cifar"), str(tmp_path))
  assert {s["model"] for s in results["studies"]} == {"vgg11_cifar", "resnet20_cifar"}
  assert cli.CONFIG_FILE in os.listdir(tmp_path)
