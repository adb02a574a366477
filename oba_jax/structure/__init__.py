"""Structured pruning: groups of coupled slices traced from the jaxpr, and their scores."""

from oba_jax.structure.groups import Cost, Group, Member, Structure, Term

__all__ = ["Cost", "Group", "Member", "Structure", "Term"]
