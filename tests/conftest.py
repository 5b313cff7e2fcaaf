import os

# Tests compare floats across code paths; keep XLA from using a different thread split per run.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
# The CLIs keep compiled programs in a user cache folder by default; tests must not write to the real home.
os.environ.setdefault("INFL_JAX_CACHE_DIR", "off")
