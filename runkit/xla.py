"""XLA compiler settings for programs a run compiles once, chosen for time to result on CPU.

On CPU, compiling a training step of a network with many small layers (an INFL keyed network has about a
hundred parameter leaves) takes longer than running it for a whole short run: XLA emits one LLVM kernel
per fusion and optimises each. ``compiler_options(ONCE)`` is for a program run once (parameter
initialisation): LLVM optimisation off, half the compile time, run time irrelevant. ``compiler_options(LOOP)``
is for a round or epoch run many times: LLVM level 1, a shorter compile and, on the CPUs measured
(benchmarks/infl_time_to_result.py), the same step time. Other backends keep XLA's defaults.
"""

from __future__ import annotations

import jax

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
  return {"xla_backend_optimization_level": _CPU_LEVELS[kind]}
