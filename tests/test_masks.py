"""Masks from plans and from densities, and an optimizer that keeps pruned weights at zero."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from oba_jax import masks, plan
from oba_jax.structure import Group, Member, Structure, Term


def channel(path, axis, size, collection="params"):
  return Member(path, axis, 0, (size,), 0, collection)


# conv(2->4) -> BN -> conv(4->5) -> flatten (2, 2, 5) -> dense(20->3).
STRUCTURE = Structure((
    Group("c1", 4, (channel("conv1/kernel", 3, 4), channel("conv1/bias", 0, 4),
                    channel("bn/scale", 0, 4), channel("bn/bias", 0, 4),
                    channel("bn/mean", 0, 4, "state"), channel("conv2/kernel", 2, 4))),
    Group("c2", 5, (channel("conv2/kernel", 3, 5), channel("conv2/bias", 0, 5),
                    Member("dense/kernel", 0, 0, (2, 2, 5), 2))),
), mac_terms=(Term("conv1", 288, ("c1",)), Term("conv2", 144, ("c1", "c2")),
              Term("dense", 12, ("c2",))), param_terms=())


def conv_params(seed=0):
  shapes = {"conv1": {"kernel": (3, 3, 2, 4), "bias": (4,)}, "bn": {"scale": (4,), "bias": (4,)},
            "conv2": {"kernel": (3, 3, 4, 5), "bias": (5,)},
            "dense": {"kernel": (20, 3), "bias": (3,)}}
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([jax.random.normal(k, s) for k, s in zip(keys, leaves)])


def plan_removing(structure, removed):
  removed = {g.name: tuple(removed.get(g.name, ())) for g in structure.groups}
  widths = {g.name: g.size - len(removed[g.name]) for g in structure.groups}
  return plan.Plan(removed=removed, kept_widths=widths, predicted=structure.cost(widths),
                   dense=structure.cost(), structure_fingerprint=plan.fingerprint(structure))


def test_from_plan_masks_every_member_slice():
  params = conv_params()
  mask = masks.from_plan(STRUCTURE, plan_removing(STRUCTURE, {"c1": [1], "c2": [0, 3]}), params)
  expected = jax.tree.map(lambda p: np.ones(p.shape, bool), params)
  expected["conv1"]["kernel"][..., 1] = expected["conv1"]["bias"][1] = False
  expected["bn"]["scale"][1] = expected["bn"]["bias"][1] = False
  expected["conv2"]["kernel"][:, :, 1, :] = False
  expected["conv2"]["kernel"][..., [0, 3]] = expected["conv2"]["bias"][[0, 3]] = False
  expected["dense"]["kernel"][0::5] = expected["dense"]["kernel"][3::5] = False
  jax.tree.map(np.testing.assert_array_equal, mask, expected)
  assert all(m.dtype == jnp.bool_ for m in jax.tree.leaves(mask))


def test_from_removed_is_from_plan_for_the_named_groups():
  params = conv_params()
  removed = {"c2": [0, 3]}
  jax.tree.map(np.testing.assert_array_equal, masks.from_removed(STRUCTURE, removed, params),
               masks.from_plan(STRUCTURE, plan_removing(STRUCTURE, removed), params))
  with pytest.raises(ValueError, match=r"\['c9'\] are not groups of this structure"):
    masks.from_removed(STRUCTURE, {"c9": [0]}, params)


def test_apply_zeroes_exactly_the_masked_entries():
  params = conv_params()
  p = plan_removing(STRUCTURE, {"c2": [2]})
  pruned = masks.apply_plan(params, STRUCTURE, p)
  mask = masks.from_plan(STRUCTURE, p, params)
  jax.tree.map(lambda new, old, m: np.testing.assert_array_equal(new, jnp.where(m, old, 0.0)),
               pruned, params, mask)
  assert float(jnp.abs(pruned["dense"]["kernel"][2::5]).sum()) == 0.0


def test_apply_accepts_scalar_mask_leaves():
  params = conv_params()
  mask = jax.tree.map(lambda _: True, params)
  mask["conv1"]["bias"] = False
  pruned = masks.apply(params, mask)
  assert not pruned["conv1"]["bias"].any()
  np.testing.assert_array_equal(pruned["dense"]["kernel"], params["dense"]["kernel"])


def test_plan_for_another_structure():
  other = Structure(STRUCTURE.groups[:1], (), ())
  with pytest.raises(ValueError, match="this plan was made for another structure.*'c2' is missing"):
    masks.from_plan(other, plan_removing(STRUCTURE, {"c1": [0]}), conv_params())


def test_params_without_a_member_path():
  params = conv_params()
  del params["bn"]
  with pytest.raises(ValueError, match=r"params has no leaf 'bn/scale' \(a member of group 'c1'\)"):
    masks.from_plan(STRUCTURE, plan_removing(STRUCTURE, {}), params)


def test_mask_with_another_structure():
  with pytest.raises(ValueError, match=r"mask does not have the structure of params"):
    masks.apply(conv_params(), {"conv1": True})


# --- unstructured ----------------------------------------------------------


def test_global_density_keeps_an_exact_count_with_ties():
  scores = conv_params(1)
  scores["conv2"]["kernel"] = jnp.ones((3, 3, 4, 5))  # 180 tied entries
  n = sum(np.size(s) for s in jax.tree.leaves(scores)) - 8  # BatchNorm's 8 are not prunable
  for density in (0.1, 0.3, 0.77, 1.0):
    mask = masks.global_density(scores, density)
    assert sum(int(m.sum()) for m in jax.tree.leaves(mask)) - 8 == round(density * n)
    assert mask["bn"]["scale"].all() and mask["bn"]["bias"].all()
  mask = masks.global_density(scores, plan.Density(0.3))
  tied = np.asarray(mask["conv2"]["kernel"]).ravel()
  kept = int(tied.sum())
  assert 0 < kept < tied.size and tied[:kept].all()  # ties go to the earlier entries


def test_global_density_keeps_the_largest_magnitudes():
  scores = {"a": {"kernel": jnp.array([[3.0, -0.5], [0.1, -4.0]])},
            "b": {"kernel": jnp.array([[2.0, 0.2, -1.0]])}}
  mask = masks.global_density(scores, 3 / 7)
  np.testing.assert_array_equal(mask["a"]["kernel"], [[True, False], [False, True]])
  np.testing.assert_array_equal(mask["b"]["kernel"], [[True, False, False]])


def test_layerwise_density_keeps_the_same_fraction_in_every_leaf():
  scores = conv_params(2)
  mask = masks.layerwise_density(scores, 0.25, prunable=lambda path, leaf: leaf.ndim > 1)
  for leaf, m in zip(jax.tree.leaves(scores), jax.tree.leaves(mask)):
    if leaf.ndim > 1:
      assert int(m.sum()) == round(0.25 * leaf.size)
      assert jnp.abs(leaf)[m].min() >= jnp.abs(leaf)[~m].max()
    else:
      assert m.all()


def test_density_errors():
  with pytest.raises(ValueError, match=r"Density.density=1.2 is not a number in \(0, 1\]"):
    masks.global_density(conv_params(), 1.2)
  bad = conv_params()
  bad["dense"]["bias"] = bad["dense"]["bias"].at[0].set(jnp.inf)
  with pytest.raises(FloatingPointError, match="'dense/bias'"):
    masks.layerwise_density(bad, 0.5)


def test_sparsity():
  mask = masks.global_density(conv_params(), 0.25)
  report = masks.sparsity(mask)
  assert report.total == pytest.approx(0.75, abs=1e-2)
  assert set(report.per_leaf) == {"conv1/kernel", "conv1/bias", "conv2/kernel", "conv2/bias",
                                  "dense/kernel", "dense/bias"}
  assert masks.sparsity(masks.apply(conv_params(), mask)) == report


# --- training with pruned weights ------------------------------------------


def regression_problem():
  kx, kw, k1, k2 = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(kx, (64, 4))
  y = jnp.sin(x @ jax.random.normal(kw, (4, 1)))
  params = {"fc1": {"kernel": jax.random.normal(k1, (4, 8)), "bias": jnp.full((8,), 0.1)},
            "fc2": {"kernel": jax.random.normal(k2, (8, 1)) / 3, "bias": jnp.zeros((1,))}}

  def loss(p):
    h = jnp.tanh(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    return jnp.mean((h @ p["fc2"]["kernel"] + p["fc2"]["bias"] - y) ** 2)

  return params, loss


def train(params, loss, tx, steps=100):
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return params


HIDDEN = Structure((Group("hidden", 8, (channel("fc1/kernel", 1, 8), channel("fc1/bias", 0, 8),
                                        channel("fc2/kernel", 0, 8))),), (), ())


@pytest.mark.parametrize("kind", ["plan", "density"])
def test_keep_pruned_holds_pruned_entries_at_exactly_zero(kind):
  params, loss = regression_problem()
  if kind == "plan":
    mask = masks.from_plan(HIDDEN, plan_removing(HIDDEN, {"hidden": [1, 5]}), params)
  else:
    mask = masks.global_density(params, 0.5, prunable=lambda path, leaf: True)
  start = masks.apply(params, mask)
  tx = optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.05, momentum=0.9))
  trained = train(start, loss, masks.keep_pruned(tx, mask))
  assert float(loss(trained)) < 0.5 * float(loss(start))
  for new, old, keep in zip(*map(jax.tree.leaves, (trained, start, mask))):
    assert np.all(np.asarray(new)[~np.asarray(keep)] == 0.0)
    assert np.all(np.asarray(new)[np.asarray(keep)] != np.asarray(old)[np.asarray(keep)])
  if kind == "density":  # without the wrapper, gradients revive the pruned entries
    revived = train(start, loss, tx)
    assert any(np.any(np.asarray(new)[~np.asarray(keep)] != 0.0)
               for new, keep in zip(jax.tree.leaves(revived), jax.tree.leaves(mask)))
