"""Structured pruning: groups of coupled slices traced from the jaxpr, and their scores.

Modules: `atoms` (axes as products/concatenations of index spaces), `rules` (what
each primitive couples), `tracer` (the walk), `groups` (the result), `reduce`
(per-parameter scores to one score per group index), `rebuild` (the jaxpr re-run
at compacted shapes, behind `oba_jax.surgery.compact_fn`).

  structure = trace(model, example_input, ignore=("conv_proj",))
  structure.groups        # Group(name, size, members): what must be removed together
  structure.cost(kept)    # MACs and parameters for any kept widths
  group_scores(structure, per_parameter_scores, reduction="paper")  # one score per index
"""

from oba_jax.structure.atoms import UnsupportedLayoutError
from oba_jax.structure.groups import Cost, Group, Member, Structure, Term
from oba_jax.structure.rebuild import register_rewrite
from oba_jax.structure.reduce import REDUCTIONS, group_scores
from oba_jax.structure.rules import register_rule
from oba_jax.structure.tracer import UnsupportedPrimitiveError, trace

__all__ = ["REDUCTIONS", "Cost", "Group", "Member", "Structure", "Term",
           "UnsupportedLayoutError", "UnsupportedPrimitiveError", "group_scores", "register_rewrite",
           "register_rule", "trace"]
