import atexit
import os
import shutil
import tempfile

# Tests compare floats across code paths; keep XLA from using a different thread split per run.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")

# The CLIs keep compiled programs in a user cache folder by default; tests must not write to the real home.
# They share one throw-away folder per test process instead (per worker under pytest-xdist): most of the
# suite's time is XLA compiling the same round and epoch programs again in one CLI run after another, and
# a cached executable is the one a fresh compile would give, so no result changes.
if "INFL_JAX_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="infl-lsanet-tests-xla-")
  atexit.register(shutil.rmtree, _cache, True)
  os.environ["INFL_JAX_CACHE_DIR"] = _cache


def pytest_configure(config):
  # In-process tests (library calls, no CLI) use the same folder.
  from runkit.cli import enable_compilation_cache
  enable_compilation_cache()


def pytest_collection_modifyitems(config, items):
  # The Flower deployment (real processes, about 6 minutes, mostly waiting on Flower's polls and app processes)
  # goes first: under pytest-xdist its file then runs alongside the rest of the suite, not after it.
  items.sort(key=lambda item: item.get_closest_marker("deployment") is None)
