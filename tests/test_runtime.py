"""oba_jax.runtime: the XLA flag that keeps optimization barriers."""

from oba_jax import runtime


def test_keep_optimization_barriers_appends_or_merges_the_flag(monkeypatch):
  monkeypatch.setattr(runtime, "_backends_started", lambda: False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
  assert runtime.keep_optimization_barriers()
  import os
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
  import os
  assert "XLA_FLAGS" not in os.environ
