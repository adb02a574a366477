"""Process-level JAX settings shared by the command-line tools and benchmarks, and a compile counter."""

import collections
import functools
import os
import types
from collections.abc import Callable

import jax

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "oba_jax", "jax")


# XLA:CPU's pass that removes `optimization_barrier`s (named "cse_barrier_expander").
BARRIER_EXPANDER = "cse_barrier_expander"
KEEP_BARRIERS = types.MappingProxyType({"xla_disable_hlo_passes": BARRIER_EXPANDER})


def jit(fun: Callable | None = None, **jit_kwargs) -> Callable:
  """`jax.jit` that keeps optimization barriers when it runs on XLA:CPU, with no process flag.

  The library's own programs (score accumulation, fine-tuning, evaluation, BatchNorm
  recalibration) compile through this, so a deep ResNet gets XLA:CPU's flat per-layer
  cost for a user who never called `keep_optimization_barriers` (which a user's own
  `jax.jit`s still need). The option is a per-computation compiler option; other
  backends compile as `jax.jit` does. Use as `jit(f, static_argnums=0)` or as
  `@functools.partial(jit, donate_argnums=0)`.
  """
  if fun is None:
    return functools.partial(jit, **jit_kwargs)
  on_cpu = jax.jit(fun, compiler_options=dict(KEEP_BARRIERS), **jit_kwargs)
  elsewhere = jax.jit(fun, **jit_kwargs)
  jitted = lambda: on_cpu if jax.default_backend() == "cpu" else elsewhere  # at call time

  @functools.wraps(fun)
  def call(*args, **kwargs):
    return jitted()(*args, **kwargs)

  call.lower = lambda *args, **kwargs: jitted().lower(*args, **kwargs)
  return call


def peak_bytes(compiled) -> int | None:
  """The memory a compiled program holds at once by XLA's own analysis: arguments, outputs
  and temporaries, less the outputs that alias arguments; None where the backend has no
  analysis. Deterministic, unlike a process's resident size, so costs compare across runs."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    return None
  if m is None:
    return None
  return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
             - m.alias_size_in_bytes)


def keep_optimization_barriers() -> bool:
  """Keeps `jax.lax.optimization_barrier` in XLA:CPU programs compiled by this process.

  XLA:CPU removes the barriers before fusion; then its fusion pass may duplicate a
  chain of elementwise ops into every consumer, e.g. a ResNet's residual stream,
  whose gradient then costs quadratically in depth (ResNetCIFAR puts a barrier
  after every block). Disabling that pass keeps them, and barriers emitted by
  `jax.checkpoint` too. Appends `--xla_disable_hlo_passes=cse_barrier_expander` to
  XLA_FLAGS (merged with a list already there), which XLA reads when JAX's backends
  start: call before the first computation. Returns whether the flag is in effect
  (False when the backends had started without it). The library's own programs need
  none of this: they compile through `jit`, which keeps the barriers per computation.
  """
  flags = os.environ.get("XLA_FLAGS", "").split()
  for i, flag in enumerate(flags):
    if flag.startswith("--xla_disable_hlo_passes="):
      passes = flag.split("=", 1)[1].split(",")
      if BARRIER_EXPANDER in passes:
        return True
      if _backends_started():
        return False
      flags[i] = flag + "," + BARRIER_EXPANDER
      break
  else:
    if _backends_started():
      return False
    flags.append(f"--xla_disable_hlo_passes={BARRIER_EXPANDER}")
  os.environ["XLA_FLAGS"] = " ".join(flags)
  return True


def _backends_started() -> bool:
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  return xla_bridge.backends_are_initialized()


def enable_compilation_cache(path: str | None = None) -> str:
  """Turns on JAX's persistent compilation cache (a rerun skips XLA compiles)."""
  path = path or os.environ.get("OBA_JAX_CACHE", DEFAULT_CACHE)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  return path


class Compilations:
  """Counts XLA compilations per jitted function, and their seconds, while active.

    with runtime.Compilations() as compiled:
      ...
    compiled.counts["jit(score_step)"], compiled.seconds

  A compilation is a lowering of a jitted function for new shapes, shardings or
  a new function object (JAX's in-memory cache missed); with the persistent
  cache on, XLA's own compile may then still be skipped. From `jax.monitoring`.
  """

  _LOWERING = "/jax/core/compile/jaxpr_to_mlir_module_duration"
  _PHASES = ("/jax/core/compile/jaxpr_trace_duration", _LOWERING,
             "/jax/core/compile/backend_compile_duration")

  def __init__(self):
    self.counts = collections.Counter()
    self.seconds = 0.0

  def _listen(self, event: str, duration: float, **kwargs) -> None:
    if event == self._LOWERING:
      self.counts[kwargs.get("fun_name", "?")] += 1
    if event in self._PHASES:
      self.seconds += duration

  def __enter__(self) -> "Compilations":
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc_info) -> None:
    jax.monitoring.unregister_event_duration_listener(self._listen)

  def summary(self) -> dict:
    """{"total", "seconds", the score and train steps' counts, any other function's count
    when it was compiled more than once}."""
    hot = {name: self.counts[name] for name in ("jit(score_step)", "jit(train_step)")}
    return {"total": sum(self.counts.values()), "seconds": round(self.seconds, 3), **hot,
            **{name: n for name, n in self.counts.most_common() if n > 1}}
