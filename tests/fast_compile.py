"""XLA_FLAGS for tests that start a Python process whose programs run a few times on tiny inputs.

Compiling is nearly all of such a run's time. These are runkit.xla's ONCE settings in flag form (a child process
reads XLA_FLAGS when it starts): LLVM optimisation off, its expensive passes off, and XLA's classic CPU fusion
emitters, which compile these programs in about half the time of the newer ones. They change how fast the code
runs, not what it computes (no fast-math either way); each test compares programs compiled alike.
"""

from runkit.xla import ONCE, compiler_options

# The classic emitters' flag only where this jaxlib knows it: an unknown flag in XLA_FLAGS aborts the child process
# (jaxlib 0.12 dropped it), and runkit.xla finds out which by compiling a tiny program with it.
_CLASSIC_EMITTERS = ("xla_cpu_use_fusion_emitters" in (compiler_options(ONCE) or {}))
FAST_COMPILE_XLA_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
                          + (" --xla_cpu_use_fusion_emitters=false" if _CLASSIC_EMITTERS else ""))
