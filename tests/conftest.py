"""Shared pytest set-up: a persistent XLA compilation cache so reruns skip compiles."""

from oba_jax.runtime import enable_compilation_cache

enable_compilation_cache()
