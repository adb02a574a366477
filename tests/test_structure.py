"""structure.trace: each coupling rule, the cost model, flops.count and surgery.compact."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import oba_jax
import structure_models as sm
from oba_jax import flops, masks, plan, surgery
from oba_jax.models import VGG, ResNetCIFAR, resnet50, vit, vit_b16
from oba_jax.structure import UnsupportedPrimitiveError, trace


def params_of(group, collection="params"):
  """{(path, axis): (offset, factors, position)} of a group's members."""
  return {(m.path, m.axis): (m.offset, m.factors, m.position)
          for m in group.members if m.collection == collection}


def group_with(structure, path, axis, position=0):
  for g in structure.groups:
    for m in g.members:
      if (m.path, m.axis, m.position) == (path, axis, position):
        return g
  raise AssertionError(f"no group has {path}@{axis}.{position}")


def tiny_vit(**kw):
  return vit.VisionTransformer(image_size=16, patch_size=4, hidden_dim=32, num_layers=2,
                               num_heads=4, mlp_dim=16, num_classes=3, rngs=nnx.Rngs(0), **kw)


X32 = jnp.ones((1, 32, 32, 3))
X16 = jnp.ones((1, 16, 16, 3))


# --- coupling rules -------------------------------------------------------------


def test_conv_bn_conv_chain():
  s = trace(VGG(11, width=4, rngs=nnx.Rngs(0)), X32)
  g = group_with(s, "layers/0/conv/kernel", 3)
  assert set(params_of(g)) == {("layers/0/conv/kernel", 3), ("layers/0/bn/scale", 0),
                               ("layers/0/bn/bias", 0), ("layers/2/conv/kernel", 2)}
  assert set(params_of(g, "state")) == {("layers/0/bn/mean", 0), ("layers/0/bn/var", 0)}
  assert len(s.groups) == 8  # one per conv; the classifier's outputs are never pruned


def test_residual_adds_couple_blocks_into_one_group():
  s = trace(ResNetCIFAR(14, width=4, rngs=nnx.Rngs(0)), X32)
  stage1 = group_with(s, "stem/conv/kernel", 3)
  writers = {p for (p, a) in params_of(stage1) if p.endswith("conv/kernel") and a == 3}
  assert writers == {"stem/conv/kernel", "blocks/0/conv2/conv/kernel",
                     "blocks/1/conv2/conv/kernel"}
  last = group_with(s, "blocks/5/conv2/conv/kernel", 3)
  assert ("blocks/5/shortcut/conv/kernel", 3) not in params_of(last)  # identity shortcut
  assert ("blocks/4/shortcut/conv/kernel", 3) in params_of(last)
  assert ("classifier/kernel", 0) in params_of(last)
  assert len(s.groups) == 3 + 6  # three residual streams and the inner conv of each block


def test_model_output_axis_is_never_pruned():
  s = trace(ResNetCIFAR(8, width=4, rngs=nnx.Rngs(0)), X32)
  assert all(("classifier/kernel", 1) not in params_of(g) for g in s.groups)
  assert all(("classifier/bias", 0) not in params_of(g) for g in s.groups)


def test_concatenation_offsets():
  s = trace(sm.DenseBlock(nnx.Rngs(0)), jnp.ones((1, 8, 8, 3)))
  for k, offset in enumerate((6, 10, 14)):
    g = group_with(s, f"convs/{k}/conv/kernel", 3)
    assert params_of(g)[("classifier/kernel", 0)] == (offset, (4,), 0)
    for later in range(k + 1, 3):
      assert params_of(g)[(f"convs/{later}/conv/kernel", 2)] == (offset, (4,), 0)


def test_flatten_after_conv_owns_a_block_of_features():
  s = trace(sm.ConvFlattenDense(nnx.Rngs(0)), jnp.ones((1, 6, 6, 3)))
  g = group_with(s, "conv/kernel", 3)
  assert params_of(g)[("dense/kernel", 0)] == (0, (6, 6, 4), 2)
  member = [m for m in g.members if m.path == "dense/kernel"][0]
  assert member.indices([1]).tolist() == list(range(1, 144, 4))


def test_depthwise_conv_couples_expand_and_project():
  s = trace(sm.InvertedResidual(nnx.Rngs(0)), jnp.ones((1, 8, 8, 3)))
  g = group_with(s, "depthwise/kernel", 3)
  assert {("expand/conv/kernel", 3), ("depthwise/kernel", 3), ("depthwise_bn/scale", 0),
          ("project/conv/kernel", 2)} <= set(params_of(g))
  residual = group_with(s, "project/conv/kernel", 3)
  assert {("stem/conv/kernel", 3), ("expand/conv/kernel", 2),
          ("classifier/kernel", 0)} <= set(params_of(residual))


def test_attention_heads_head_dims_and_mlp_units():
  s = trace(tiny_vit(), X16, ignore=["conv_proj"])
  heads = group_with(s, "layers/0/attention/query/kernel", 1, position=0)
  assert heads.size == 4
  assert params_of(heads)[("layers/0/attention/out/kernel", 0)] == (0, (4, 8), 0)
  assert {("layers/0/attention/key/kernel", 1),
          ("layers/0/attention/value/kernel", 1)} <= set(params_of(heads))
  qk_dims = group_with(s, "layers/0/attention/query/kernel", 1, position=1)
  assert set(params_of(qk_dims)) == {(f"layers/0/attention/{n}/{l}", a) for n in ("query", "key")
                                     for l, a in (("kernel", 1), ("bias", 0))}
  v_dims = group_with(s, "layers/0/attention/value/kernel", 1, position=1)
  assert ("layers/0/attention/out/kernel", 0) in params_of(v_dims)
  mlp = group_with(s, "layers/1/fc1/kernel", 1)
  assert set(params_of(mlp)) == {("layers/1/fc1/kernel", 1), ("layers/1/fc1/bias", 0),
                                 ("layers/1/fc2/kernel", 0)}
  assert not any(g.normalized for g in s.groups)


def test_grouped_kv_heads():
  s = trace(tiny_vit(num_kv_heads=2), X16, ignore=["conv_proj"])
  kv = group_with(s, "layers/0/attention/key/kernel", 1, position=0)
  assert kv.size == 2
  # A kv head takes its two query heads with it: query axis (kv head, query in group, dim).
  assert params_of(kv)[("layers/0/attention/query/kernel", 1)] == (0, (2, 2, 8), 0)
  in_group = group_with(s, "layers/0/attention/query/kernel", 1, position=1)
  assert in_group.size == 2 and ("layers/0/attention/key/kernel", 1) not in params_of(in_group)


def test_layernorm_stream_is_flagged_normalized_and_ignore_removes_it():
  s = trace(tiny_vit(), X16)
  stream = group_with(s, "conv_proj/kernel", 3)
  assert stream.normalized
  assert {("pos_embedding", 2), ("class_token", 2), ("layers/0/ln_1/scale", 0),
          ("head/kernel", 0)} <= set(params_of(stream))
  ignored = trace(tiny_vit(), X16, ignore=["conv_proj"])
  assert all("conv_proj/kernel" not in g.member_paths() for g in ignored.groups)


def test_unsupported_primitive_names_primitive_and_parameter():
  with pytest.raises(UnsupportedPrimitiveError, match="'sort'.*'fc1/kernel'"):
    trace(sm.SortsFeatures(nnx.Rngs(0)), jnp.ones((2, 3)))
  trace(sm.SortsFeatures(nnx.Rngs(0)), jnp.ones((2, 3)), ignore=["fc1"])  # fine when ignored


def test_bad_trace_arguments():
  with pytest.raises(ValueError, match=r"ignore=\['patch'\] matches no parameter path"):
    trace(tiny_vit(), X16, ignore=["patch"])
  with pytest.raises(TypeError, match="needs an nnx.Module"):
    trace(lambda p, x: x, X16)


def test_plain_function_with_params():
  apply_fn, params = oba_jax.functional(VGG(11, width=4, rngs=nnx.Rngs(0)))
  s = trace(apply_fn, X32, params=params)
  assert len(s.groups) == 8


# --- cost model and flops.count -------------------------------------------------


@pytest.mark.parametrize("ctor, size, expected, tolerance", [
    (lambda: resnet50(rngs=nnx.Rngs(0)), 224, 4.1e9, 0.01),          # torchvision ResNet-50
    (lambda: vit_b16(rngs=nnx.Rngs(0)), 224, 17.6e9, 0.01),          # ViT-B/16 with attention
    (lambda: VGG(19, rngs=nnx.Rngs(0)), 32, 399e6, 0.01),            # paper, thop
    (lambda: ResNetCIFAR(32, rngs=nnx.Rngs(0)), 32, 1.106e9, 0.01),  # paper, thop
])
def test_macs_of_reference_models(ctor, size, expected, tolerance):
  model = nnx.eval_shape(ctor)
  count = flops.count(model, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  assert abs(count.macs - expected) / expected <= tolerance
  assert count.params == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_attention_matmuls_are_counted():
  count = flops.count(tiny_vit(), X16)
  tokens, dim = 17, 32
  assert count.macs_per_layer["dot_general of activations"] == 2 * 2 * tokens * tokens * dim


def test_cost_polynomial_in_group_widths():
  s = trace(VGG(11, width=4, rngs=nnx.Rngs(0)), X32)
  first = group_with(s, "layers/0/conv/kernel", 3)
  dense = s.cost()
  narrower = s.cost({first.name: first.size - 1})
  # The first conv (3 -> 4 channels at 32x32, 3x3) and the second (4 -> 8 at 16x16) lose 1/4.
  assert dense.macs - narrower.macs == 32 * 32 * 9 * 3 + 16 * 16 * 9 * 8
  assert dense.params - narrower.params == 9 * 3 + 2 + 9 * 8


# --- compaction -----------------------------------------------------------------

MODELS = {
    "vgg19": (lambda: VGG(19, width=8, rngs=nnx.Rngs(0)), X32, ()),
    "resnet20": (lambda: ResNetCIFAR(20, width=8, rngs=nnx.Rngs(0)), X32, ()),
    "resnet32": (lambda: ResNetCIFAR(32, width=4, rngs=nnx.Rngs(0)), X32, ()),
    "resnet56": (lambda: ResNetCIFAR(56, width=4, rngs=nnx.Rngs(0)), X32, ()),
    "resnet50": (lambda: resnet50(width=8, num_classes=10, rngs=nnx.Rngs(0)), X32, ()),
    "vit": (tiny_vit, X16, ("conv_proj",)),
    "vit_gqa": (lambda: tiny_vit(num_kv_heads=2), X16, ("conv_proj",)),
    "densenet_block": (lambda: sm.DenseBlock(nnx.Rngs(0)), jnp.ones((2, 8, 8, 3)), ()),
    "mobilenet_block": (lambda: sm.InvertedResidual(nnx.Rngs(0)), jnp.ones((2, 8, 8, 3)), ()),
}


def random_plan(structure, ratio=0.5, seed=0):
  rng = np.random.default_rng(seed)
  scores = {g.name: rng.random(g.size) for g in structure.groups}
  return plan.select(structure, scores, target=plan.KeptFlops(ratio))


def built(name):
  ctor, x, ignore = MODELS[name]
  model = ctor()
  model.eval()
  x = jax.random.normal(jax.random.key(1), x.shape)
  return model, x, trace(model, x, ignore=ignore)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_compacted_equals_masked_and_counts_match(name):
  model, x, s = built(name)
  chosen = random_plan(s)
  apply_fn, params = oba_jax.functional(model)
  expected = apply_fn(masks.apply_plan(params, s, chosen), x)
  small = surgery.compact(model, chosen)
  got = small(x)
  assert float(jnp.linalg.norm(got - expected) / jnp.linalg.norm(expected)) <= 1e-5
  small_fn, small_params = surgery.compact_fn(apply_fn, params, chosen)
  got_fn = jax.jit(small_fn)(small_params, x)
  assert float(jnp.linalg.norm(got_fn - expected) / jnp.linalg.norm(expected)) <= 1e-5
  np.testing.assert_array_equal(masks.apply(model, chosen)(x), expected)
  counted = flops.count(small, x)
  assert (counted.macs, counted.params) == (chosen.predicted.macs, chosen.predicted.params)
  assert counted.macs <= 0.5 * s.cost().macs


def test_compaction_leaves_the_dense_model_alone():
  model, _, s = built("resnet20")
  before = jax.tree.map(jnp.copy, nnx.state(model))
  surgery.compact(model, random_plan(s))
  assert all(jnp.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(before), jax.tree.leaves(nnx.state(model))))


def test_compacted_model_saves_restores_and_rebuilds_from_its_plan(tmp_path):
  model, x, s = built("resnet20")
  chosen = random_plan(s)
  small = surgery.compact(model, chosen)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "small", nnx.state(small))
  checkpointer.wait_until_finished()
  (tmp_path / "plan.json").write_text(chosen.to_json())

  # A new process knows only the dense architecture and the plan's JSON.
  abstract = nnx.eval_shape(MODELS["resnet20"][0])
  abstract.eval()
  saved = plan.Plan.from_json((tmp_path / "plan.json").read_text())
  rebuilt = surgery.compact(abstract, saved, trace(abstract, x))
  graphdef, state = nnx.split(rebuilt)
  restored = nnx.merge(graphdef, checkpointer.restore(tmp_path / "small", state))
  np.testing.assert_array_equal(restored(x), small(x))


def test_compaction_errors():
  model, x, s = built("resnet20")
  other = built("resnet32")[2]
  with pytest.raises(ValueError, match="belongs to another model"):
    surgery.compact(model, random_plan(other))
  with pytest.raises(ValueError, match="made for another structure"):
    surgery.compact(model, random_plan(other), s)
  with pytest.raises(ValueError, match="carries no structure"):
    surgery.compact(model, plan.Plan.from_json(random_plan(s).to_json()))
  g = s.groups[0]
  everything = dataclasses.replace(
      random_plan(s), removed={n.name: () for n in s.groups} | {g.name: tuple(range(g.size))},
      kept_widths={n.name: n.size for n in s.groups} | {g.name: 0})
  with pytest.raises(ValueError, match=f"removes all {g.size} indices"):
    surgery.compact(model, everything)


def test_oba_scores_to_a_compacted_model():
  model, x, s = built("resnet20")
  apply_fn, params = oba_jax.functional(model)
  objective = oba_jax.classification(apply_fn)
  batch = {"image": x, "label": jnp.arange(x.shape[0]) % 10}
  per_parameter = oba_jax.scores.oba(objective.loss, params, batch)
  chosen = plan.select(s, oba_jax.structure.group_scores(s, per_parameter),
                       target=plan.KeptParams(0.6))
  small = surgery.compact(model, chosen)
  assert flops.count(small, x).params <= 0.6 * s.cost().params
  np.testing.assert_allclose(small(x), masks.apply(model, chosen)(x), rtol=1e-5, atol=1e-6)


def test_parameters_the_outputs_never_read_are_not_groups():
  """An unused layer used to be offered as prunable groups (issue 13)."""

  class WithSpare(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.Linear(4, 8, rngs=rngs)
      self.b = nnx.Linear(8, 3, rngs=rngs)
      self.spare = nnx.Linear(4, 5, rngs=rngs)

    def __call__(self, x):
      return self.b(nnx.relu(self.a(x)))

  found = trace(WithSpare(nnx.Rngs(0)), jnp.ones((1, 4)))
  assert [g.name for g in found.groups] == ["a/kernel@1"]
