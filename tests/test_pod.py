"""Pod-shaped scoring: parameters split over a 2-D data x model mesh give the single-device scores."""

import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import PartitionSpec

import pod_worker
from oba_jax import estimate
from test_estimate import worker_env

# float32: the sharded programs add in another order (8 devices, collectives).
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def pod_result(tmp_path_factory):
  out = tmp_path_factory.mktemp("pod") / "pod.npz"
  subprocess.run([sys.executable, pod_worker.__file__, str(out), "2", "4"], env=worker_env(8),
                 check=True, timeout=900)
  with np.load(out) as f:
    return {k: f[k] for k in f.files}


@pytest.mark.parametrize("criterion", pod_worker.CRITERIA)
def test_scores_with_parameters_split_over_a_2d_mesh_equal_one_device(pod_result, criterion):
  assert int(pod_result["devices"]) == 8 and int(pod_result["split_leaves"]) > 0
  pod, one = pod_result[f"{criterion}/pod"], pod_result[f"{criterion}/one"]
  assert np.linalg.norm(pod - one) <= TOLERANCE * np.linalg.norm(one)
  assert bool(pod_result[f"{criterion}/kept_sharding"])  # scores split like the parameters
  assert int(pod_result[f"{criterion}/compilations"]) == 1  # one compile for all batches


def test_shard_params_splits_the_largest_divisible_dimension(pod_result):
  assert str(pod_result["spec/wide"]) == str(PartitionSpec(None, "model"))
  assert str(pod_result["spec/square"]) == str(PartitionSpec("model", None))  # ties: the first
  assert str(pod_result["spec/odd"]) == str(PartitionSpec(None))  # 3 does not split over 4


def test_pod_mesh_and_shard_params_errors():
  with pytest.raises(ValueError, match="data=3 x model=2 devices needs 6"):
    estimate.pod_mesh(3, 2)
  mesh = estimate.pod_mesh(1, 1)
  with pytest.raises(ValueError, match="axis='fsdp' is not an axis"):
    estimate.shard_params({"w": np.ones((2, 2))}, mesh, axis="fsdp")
  # On an axis of size 1 every leaf is whole (replicated).
  leaf = estimate.shard_params({"w": np.ones((4, 6))}, mesh)["w"]
  assert leaf.sharding.spec == PartitionSpec(None, None)
