"""Process-level JAX settings shared by the command-line tools and benchmarks."""

import os

import jax

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "oba_jax", "jax")


def enable_compilation_cache(path: str | None = None) -> str:
  """Turns on JAX's persistent compilation cache (a rerun skips XLA compiles)."""
  path = path or os.environ.get("OBA_JAX_CACHE", DEFAULT_CACHE)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  return path
