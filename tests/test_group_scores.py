"""Per-group scores from per-parameter scores: the paper's reduction and the plain sum."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oba_jax import scores
from oba_jax.structure import Group, Member, Structure
from oba_jax.structure.reduce import NORMALISER_EPS, group_scores


def channel(path, axis, size, collection="params"):
  return Member(path, axis, 0, (size,), 0, collection)


# A 2-3-1 MLP with a BatchNorm on the hidden layer: one group of 3 hidden units.
HIDDEN = Group("hidden", 3, (
    channel("fc1/kernel", 1, 3), channel("fc1/bias", 0, 3),
    channel("bn/scale", 0, 3), channel("bn/bias", 0, 3), channel("bn/mean", 0, 3, "state"),
    channel("fc2/kernel", 0, 3)))
MLP = Structure((HIDDEN,), mac_terms=(), param_terms=())


def mlp_scores(fc2_kernel=((-1.0,), (4.0,), (0.0,))):
  return {
      "fc1": {"kernel": jnp.array([[1.0, -2.0, 0.0], [3.0, 1.0, 0.0]]),
              "bias": jnp.array([1.0, 0.0, 0.0])},
      "bn": {"scale": jnp.array([7.0, 7.0, 7.0]), "bias": jnp.zeros(3)},
      "fc2": {"kernel": jnp.array(fc2_kernel), "bias": jnp.array([5.0])},
  }


def test_paper_reduction_by_hand():
  # fc1 output slice (kernel column + bias): 1+3+1, -2+1+0, 0 -> |.| = 5, 1, 0 (signs cancel first).
  # fc2 input slice: -1, 4, 0 -> 1, 4, 0. BatchNorm contributes nothing. Mean: 3, 2.5, 0.
  got = group_scores(MLP, mlp_scores(), reduction="paper")["hidden"]
  np.testing.assert_allclose(got, np.array([3.0, 2.5, 0.0]) / (3.0 + NORMALISER_EPS))


def test_paper_reduction_skips_all_zero_layers():
  got = group_scores(MLP, mlp_scores(fc2_kernel=((0.0,),) * 3), reduction="paper")["hidden"]
  np.testing.assert_allclose(got, np.array([5.0, 1.0, 0.0]) / (5.0 + NORMALISER_EPS))


def test_paper_reduction_of_a_group_without_scores_is_zero():
  zeros = jax.tree.map(jnp.zeros_like, mlp_scores())
  np.testing.assert_array_equal(group_scores(MLP, zeros)["hidden"], np.zeros(3))


def test_sum_reduction_by_hand():
  # Every parameter entry counts, BatchNorm scale included: 5+7-1, -1+7+4, 0+7+0.
  got = group_scores(MLP, mlp_scores(), reduction="sum")["hidden"]
  np.testing.assert_allclose(got, [11.0, 10.0, 7.0])


# conv(2->4) -> BN -> conv(4->5) -> flatten (2, 2, 5) -> dense(20->3), and a square residual
# dense layer whose rows and columns are both the group `res`.
CONV = Structure((
    Group("c1", 4, (channel("conv1/kernel", 3, 4), channel("conv1/bias", 0, 4),
                    channel("bn/scale", 0, 4), channel("bn/bias", 0, 4),
                    channel("conv2/kernel", 2, 4))),
    Group("c2", 5, (channel("conv2/kernel", 3, 5), channel("conv2/bias", 0, 5),
                    Member("dense/kernel", 0, 0, (2, 2, 5), 2))),
    Group("res", 3, (channel("res/kernel", 0, 3), channel("res/kernel", 1, 3),
                     channel("res/bias", 0, 3))),
), mac_terms=(), param_terms=())
SHAPES = {"conv1": {"kernel": (3, 3, 2, 4), "bias": (4,)}, "bn": {"scale": (4,), "bias": (4,)},
          "conv2": {"kernel": (3, 3, 4, 5), "bias": (5,)},
          "dense": {"kernel": (20, 3), "bias": (3,)},
          "res": {"kernel": (3, 3), "bias": (3,)}}


def random_tree(seed=0):
  leaves, treedef = jax.tree.flatten(SHAPES, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([jax.random.normal(k, s) for k, s in zip(keys, leaves)])


def owned_entries(group, c):
  """Hand-written: the entries that removing index c of `group` removes, as boolean masks."""
  owned = jax.tree.map(lambda s: np.zeros(s, bool), SHAPES,
                       is_leaf=lambda x: isinstance(x, tuple))
  if group == "c1":
    owned["conv1"]["kernel"][..., c] = owned["conv1"]["bias"][c] = True
    owned["bn"]["scale"][c] = owned["bn"]["bias"][c] = True
    owned["conv2"]["kernel"][:, :, c, :] = True
  elif group == "c2":
    owned["conv2"]["kernel"][..., c] = owned["conv2"]["bias"][c] = True
    owned["dense"]["kernel"][c::5, :] = True  # flattened (h, w, channel): channel is minor
  else:
    owned["res"]["kernel"][c, :] = owned["res"]["kernel"][:, c] = owned["res"]["bias"][c] = True
  return owned


def test_sum_reduction_is_the_sum_over_owned_entries():
  tree = random_tree()
  got = group_scores(CONV, tree, reduction="sum")
  for group in CONV.groups:
    expected = [sum(float(jnp.sum(jnp.where(owned, s, 0.0)))
                    for s, owned in zip(jax.tree.leaves(tree),
                                        jax.tree.leaves(owned_entries(group.name, c))))
                for c in range(group.size)]
    np.testing.assert_allclose(got[group.name], expected, rtol=1e-5, atol=1e-5)


def test_sum_reduction_is_the_predicted_change_of_removing_one_channel():
  params = random_tree(1)
  x = jax.random.normal(jax.random.key(2), (8, 4, 4, 2))

  def loss(p, x):
    h = jax.lax.conv_general_dilated(x, p["conv1"]["kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jnp.tanh((h + p["conv1"]["bias"]) * p["bn"]["scale"] + p["bn"]["bias"])
    h = jax.lax.conv_general_dilated(h, p["conv2"]["kernel"], (2, 2), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jnp.tanh(h + p["conv2"]["bias"]).reshape(8, -1) @ p["dense"]["kernel"]
    h = h + p["dense"]["bias"]
    return jnp.mean((h @ p["res"]["kernel"] + p["res"]["bias"] + h) ** 2)

  for group in CONV.groups:
    for c in range(group.size):
      delta = jax.tree.map(lambda p, m: jnp.where(m, -p, 0.0), params, owned_entries(group.name, c))
      s = scores.oba(loss, params, x, delta=delta, first_order=True)
      predicted = sum(float(jnp.sum(leaf)) for leaf in jax.tree.leaves(s))
      got = group_scores(CONV, s, reduction="sum")[group.name][c]
      np.testing.assert_allclose(got, predicted, rtol=1e-4, atol=1e-6)


def test_paper_reduction_treats_rows_and_columns_as_two_layer_slices():
  tree = random_tree(3)
  kernel, bias = np.asarray(tree["res"]["kernel"]), np.asarray(tree["res"]["bias"])
  slices = [np.abs(kernel.sum(0) + bias), np.abs(kernel.sum(1))]  # [in, out]: output+bias, input
  mean = np.mean(slices, axis=0)
  np.testing.assert_allclose(group_scores(CONV, tree)["res"], mean / (mean.max() + 1e-6),
                             rtol=1e-5)


def test_scores_missing_a_member_path():
  tree = random_tree()
  del tree["conv2"]["bias"]
  with pytest.raises(ValueError, match=r"scores has no leaf 'conv2/bias' \(a member of group 'c2'"):
    group_scores(CONV, tree)


def test_scores_with_a_member_that_does_not_fit():
  tree = random_tree()
  tree["conv2"]["bias"] = jnp.zeros(4)
  with pytest.raises(ValueError, match=r"member 'conv2/bias' of group 'c2'.*shape \(4,\)"):
    group_scores(CONV, tree)


def test_non_finite_scores():
  tree = random_tree()
  tree["bn"]["scale"] = tree["bn"]["scale"].at[1].set(jnp.nan)
  with pytest.raises(FloatingPointError, match="1 of 4 values of 'bn/scale'"):
    group_scores(CONV, tree, reduction="sum")


def test_unknown_reduction():
  with pytest.raises(ValueError, match=r"reduction='max' is not supported; accepted: \['paper', "):
    group_scores(CONV, random_tree(), reduction="max")
