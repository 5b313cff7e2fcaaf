"""XLA compiler settings for programs a run compiles once, chosen for time to result on CPU.

On CPU, compiling a training step of a network with many small layers (an INFL keyed network has about a
hundred parameter leaves) takes longer than running it for a whole short run: XLA emits one LLVM kernel
per fusion and optimises each. ``compiler_options(ONCE)`` is for a program run once (parameter
initialisation): LLVM optimisation off, half the compile time, run time irrelevant. ``compiler_options(LOOP)``
is for a round or epoch run many times: LLVM level 1, a shorter compile and, on the CPUs measured
(benchmarks/infl_time_to_result.py), the same step time. Both turn off XLA's newer CPU fusion emitters
where this jaxlib has the switch: the classic emitters compile a keyed round in three quarters of the time
(8.1 s -> 6.3 s on a 200 x 10,000 file, 2 AVX2 cores) and run it as fast. Other backends keep XLA's defaults.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["LOOP", "ONCE", "compiler_options"]

ONCE = "once"
LOOP = "loop"
_CPU_LEVELS = {ONCE: 0, LOOP: 1}


def compiler_options(kind: str) -> dict | None:
  """``jax.jit(..., compiler_options=compiler_options(LOOP))``; None (XLA's defaults) off CPU."""
  if kind not in _CPU_LEVELS:
    raise ValueError(f"kind must be one of {sorted(_CPU_LEVELS)}, got {kind!r}")
  if jax.default_backend() != "cpu":
    return None
  return {"xla_backend_optimization_level": _CPU_LEVELS[kind], **_classic_fusion_emitters()}


@functools.cache
def _classic_fusion_emitters() -> dict:
  """The option that selects the classic CPU fusion emitters, or {} where this jaxlib does not know it
  (XLA rejects unknown compile options, and its flags change between releases)."""
  option = {"xla_cpu_use_fusion_emitters": False}
  try:
    jax.jit(lambda x: x + 1).lower(jnp.float32(0)).compile(compiler_options=option)
  except Exception:  # noqa: BLE001 - XLA's error type for an unknown option differs between releases
    return {}
  return option
