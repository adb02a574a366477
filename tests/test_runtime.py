"""oba_jax.runtime: the XLA flag that keeps optimization barriers, and the library's jit that
keeps them per computation."""

import os

import jax
import jax.numpy as jnp

from oba_jax import runtime


def test_keep_optimization_barriers_appends_or_merges_the_flag(monkeypatch):
  monkeypatch.setattr(runtime, "_backends_started", lambda: False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
  assert runtime.keep_optimization_barriers()
  assert os.environ["XLA_FLAGS"] == ("--xla_cpu_enable_fast_math=false "
                                     "--xla_disable_hlo_passes=cse_barrier_expander")
  assert runtime.keep_optimization_barriers()  # idempotent
  assert os.environ["XLA_FLAGS"].count("cse_barrier_expander") == 1
  monkeypatch.setenv("XLA_FLAGS", "--xla_disable_hlo_passes=foo")
  assert runtime.keep_optimization_barriers()
  assert os.environ["XLA_FLAGS"] == "--xla_disable_hlo_passes=foo,cse_barrier_expander"


def test_keep_optimization_barriers_is_refused_once_backends_started(monkeypatch):
  monkeypatch.setattr(runtime, "_backends_started", lambda: True)
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  assert not runtime.keep_optimization_barriers()
  assert "XLA_FLAGS" not in os.environ


def test_library_programs_keep_barriers_without_the_process_flag():
  """runtime.jit compiles with the barrier-keeping option; a plain jax.jit (in this process,
  whose XLA_FLAGS the test suite leaves alone) drops the barriers."""
  assert runtime.BARRIER_EXPANDER not in os.environ.get("XLA_FLAGS", "")

  def blocks(x):
    for _ in range(3):
      x = jax.lax.optimization_barrier(jnp.sin(x) + x)
    return x

  x = jnp.ones(8)
  kept = runtime.jit(blocks).lower(x).compile().as_text()
  plain = jax.jit(blocks).lower(x).compile().as_text()
  assert kept.count("opt-barrier") == 3 and "opt-barrier" not in plain
  assert float(runtime.jit(blocks)(x)[0]) == float(blocks(x)[0])
  static = runtime.jit(lambda n, x: x * n, static_argnums=0)
  assert float(static(3, x)[0]) == 3.0
