import os

# Tests compare floats across code paths; keep XLA from using a different thread split per run.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
