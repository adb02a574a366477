"""Shared pytest set-up: a persistent XLA compilation cache so reruns skip compiles."""

import os

import jax

_CACHE = os.environ.get(
    "OBA_JAX_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "oba_jax", "jax")
)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
