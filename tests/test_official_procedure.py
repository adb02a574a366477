"""procedure="official" removes the same channels at every step as the official code's
`prune_global`, fed the same per-channel scores, on a small VGG and ResNet.

Optional: it runs the official code itself (NEU-REAL/OBA, its vendored `torch_pruning`) on the
PyTorch twins of our models (`test_official_weights`), so it needs torch 2.13, the official
checkout named by OBA_OFFICIAL_CODE, and that code's imports (`pip install easydict thop`).
"""

import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from oba_jax import procedure, structure
from oba_jax.weights import convert, formats
from tests.test_official_weights import official_resnet, official_vgg, tiny_resnet, tiny_vgg

torch = pytest.importorskip("torch", reason="the official code runs on PyTorch")
CODE = os.environ.get("OBA_OFFICIAL_CODE")
if not CODE or not os.path.isdir(os.path.join(CODE, "torch_pruning")):
  pytest.skip("set OBA_OFFICIAL_CODE to a checkout of the official OBA code (NEU-REAL/OBA)",
              allow_module_level=True)
sys.path.insert(0, CODE)
tp = pytest.importorskip("torch_pruning", reason="the official code's imports: easydict, thop")


class FixedScores:
  """An official importance: each group's scores for its current channels, from a table
  {our group name: score per original index} that the test sets before every step."""

  def __init__(self, names, kept):
    self.names, self.kept, self.table = names, kept, None

  def __call__(self, group, ch_groups=1):
    del ch_groups
    name = self.names[group[0].dep.target.module]
    return torch.tensor(self.table[name][self.kept[name]], dtype=torch.float64)


def producers(model, traced):
  """{torch module name: our group}: the layers whose output channels each group holds."""
  keys = convert.torch_keys(model, formats._renames(model, "official"))
  module_of = {"/".join(map(str, path)): key.rpartition(".")[0]
               for key, paths in keys.items() for path in paths}
  out = {}
  for g in traced.groups:
    for m in g.members:
      if m.path.endswith("kernel") and m.axis == len(traced.leaf_shapes[m.path]) - 1:
        out[module_of[m.path]] = g.name
  return out


@pytest.mark.parametrize("ours, theirs, schedule, target, max_ratio", [
    (tiny_vgg, official_vgg, "exponential", 0.3, 0.95),
    (tiny_resnet, official_resnet, "linear", 0.2, 0.95),
    (tiny_resnet, official_resnet, "exponential", 0.1, 0.6),
])
def test_same_channels_at_every_step_as_the_official_prune_global(ours, theirs, schedule, target,
                                                                  max_ratio):
  model, steps = ours(), 12
  traced = structure.trace(model, jnp.zeros((1, 32, 32, 3)))
  torch_model = theirs().eval()
  by_name = dict(torch_model.named_modules())
  groups = producers(model, traced)
  kept = {g.name: np.arange(g.size) for g in traced.groups}
  importance = FixedScores({by_name[n]: g for n, g in groups.items()}, kept)
  scheduler = getattr(tp.pruner.algorithms.scheduler, f"{schedule}_scheduler")
  pruner = tp.pruner.MetaPruner(
      torch_model, torch.zeros(1, 3, 32, 32), importance=importance, global_pruning=True,
      iterative_steps=steps, pruning_ratio=procedure.official_removed_ratio(target),
      max_pruning_ratio=max_ratio, iterative_pruning_ratio_scheduler=scheduler,
      ignored_layers=[m for m in torch_model.modules() if isinstance(m, torch.nn.Linear)])
  assert len(list(pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers))) == len(
      traced.groups)

  rng = np.random.default_rng(0)
  ratios = procedure.channel_ratios(schedule, target, steps)
  chosen, removed_any, capped_any = None, 0, False
  for step, ratio in enumerate(ratios):
    table = {g.name: rng.uniform(0.01, 1, g.size) for g in traced.groups}
    importance.table = table
    theirs_removed = {}
    pruner.current_step += 1
    for group in pruner.prune_global():
      dep, idxs = group[0].dep, group[0].idxs
      name = groups[next(n for n, m in by_name.items() if m is dep.target.module)]
      if len(idxs):  # it also yields groups that lose nothing
        theirs_removed[name] = set(kept[name][idxs].tolist())
      group.prune()
    before = {} if chosen is None else chosen.removed
    chosen = procedure.official_step(traced, table, ratio=ratio, max_ratio=max_ratio,
                                     already_removed=before)
    ours_removed = {name: set(chosen.removed[name]) - set(before.get(name, ()))
                    for name in chosen.removed}
    assert {n: r for n, r in ours_removed.items() if r} == theirs_removed, f"step {step}"
    for name, indices in theirs_removed.items():
      kept[name] = np.setdiff1d(kept[name], sorted(indices))
    removed_any += sum(map(len, theirs_removed.values()))
    capped_any |= bool(procedure.capped(traced, chosen.removed, max_ratio))
  assert removed_any > 0 and capped_any  # the cap engaged: its rule was compared too
  # The widths agree too: every torch conv has as many output channels as its group keeps.
  for module_name, name in groups.items():
    assert by_name[module_name].out_channels == chosen.kept_widths[name]
