"""What the benchmark scripts under benchmarks/ share: progress, the machine, timing, errors, the report.

A benchmark prints one JSON object on stdout (progress goes to stderr) and writes the same object
to ``--out`` after every section, so a run cut short by an error, a time limit, Ctrl-C or SIGTERM
still leaves what it had measured. A section that fails records its error string; the others go on.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import pathlib
import platform
import signal
import statistics
import sys
import time
import traceback
from typing import Any, Callable, Iterator, Sequence

import jax

__all__ = ["Report", "device_memory", "environment", "error_string", "get_logger", "is_out_of_memory",
           "median_rate", "memory_analysis", "repeat_within_budget"]


# ------------------------------------------------------------------------------------------------
# Progress on stderr.


def get_logger(name: str) -> logging.Logger:
  """A logger writing ``[name HH:MM:SS +seconds] message`` lines to stderr."""
  logger = logging.getLogger(name)
  if logger.handlers:
    return logger
  start = time.perf_counter()

  def add_elapsed(record: logging.LogRecord) -> bool:
    record.elapsed_s = time.perf_counter() - start
    return True

  handler = logging.StreamHandler(sys.stderr)
  handler.addFilter(add_elapsed)
  handler.setFormatter(logging.Formatter("[%(name)s %(asctime)s +%(elapsed_s).1fs] %(message)s", "%H:%M:%S"))
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  logger.propagate = False  # a caller's logging setup stays theirs, and no line comes out twice
  return logger


# ------------------------------------------------------------------------------------------------
# The machine.


def _version(distribution: str) -> str | None:
  try:
    return importlib.metadata.version(distribution)
  except importlib.metadata.PackageNotFoundError:
    return None


def environment() -> dict[str, Any]:
  """Versions, JAX backend and devices, host CPU and the XLA settings that change timings."""
  devices = jax.devices()
  return {
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jaxlib": _version("jaxlib"),
      "flax": _version("flax"),
      "optax": _version("optax"),
      "backend": jax.default_backend(),
      "devices": [str(d) for d in devices],
      "device_kind": devices[0].device_kind,
      "device_count": len(devices),
      "cpu": platform.processor() or platform.machine(),
      "cpu_count": os.cpu_count(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "xla_python_client_preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
      "jax_default_matmul_precision": str(jax.config.jax_default_matmul_precision),
  }


# ------------------------------------------------------------------------------------------------
# Timing.


def median_rate(times: Sequence[float], unit: str = "round") -> dict[str, Any]:
  """``seconds_per_<unit>`` (the median), ``<unit>s_per_s`` and all ``times_s``."""
  seconds = statistics.median(times)
  return {f"seconds_per_{unit}": seconds, f"{unit}s_per_s": 1.0 / seconds, "times_s": list(times)}


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
  """Median seconds of ``repeats`` calls of ``fn`` (each waited for with ``jax.block_until_ready``), after one
  untimed call that compiles it."""
  jax.block_until_ready(fn())
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    seconds.append(time.perf_counter() - start)
  return statistics.median(seconds)


def repeat_within_budget(run: Callable[[], Any], *, max_repeats: int, budget_s: float,
                         min_repeats: int = 1) -> list[float]:
  """Seconds of each call of ``run``: ``min_repeats`` calls, then more until ``max_repeats`` or until
  ``budget_s`` has passed since the first. ``run`` must return only once its work is done (synced)."""
  times: list[float] = []
  started = time.perf_counter()
  while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - started < budget_s):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  return times


# ------------------------------------------------------------------------------------------------
# Errors and memory.


def error_string(error: BaseException) -> str:
  return f"{type(error).__name__}: {error}"[:2000]


def is_out_of_memory(error: BaseException) -> bool:
  text = str(error).lower()
  return "resource_exhausted" in text or "out of memory" in text or "oom" in type(error).__name__.lower()


def device_memory() -> dict[str, int] | None:
  """The first device's allocator figures (``peak_bytes_in_use`` is the process-wide peak); None on CPU."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # noqa: BLE001 - not every backend keeps them
    return None
  if not stats:
    return None
  return {k: int(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit") if k in stats}


def memory_analysis(compiled: jax.stages.Compiled) -> dict[str, int] | None:
  """XLA's buffer sizes of a compiled function (``temp_size_in_bytes``: its scratch memory;
  ``peak_memory_in_bytes``, where this jaxlib reports it, its peak from XLA's buffer assignment)."""
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend reports it
    return None
  if analysis is None:
    return None
  names = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
           "generated_code_size_in_bytes", "peak_memory_in_bytes")
  return {name: int(getattr(analysis, name)) for name in names if hasattr(analysis, name)}


# ------------------------------------------------------------------------------------------------
# The report.


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
  """A killed run (a job's time limit sends SIGTERM) unwinds like Ctrl-C, so its report still comes out."""
  def interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")

  try:
    previous = signal.signal(signal.SIGTERM, interrupt)
  except ValueError:  # not the main thread: signals stay as they are
    previous = None
  try:
    yield
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)


class Report:
  """The JSON a benchmark builds in ``data``: saved to ``out`` after every section, printed at the end.

  Errors go to ``data["errors"]`` as ``{"section", "error"}`` entries; a subclass keeps another
  layout by overriding ``record_error`` (and the total's key by ``seconds_key``).
  """

  seconds_key = "total_seconds"

  def __init__(self, name: str, data: dict[str, Any], out: str | os.PathLike | None = None):
    self.log = get_logger(name)
    self.data: dict[str, Any] = {"benchmark": name, "errors": [], **data}
    self.out = None if out is None else pathlib.Path(out)
    self.start = time.perf_counter()

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def record_error(self, where: str, text: str, trace: str) -> None:
    del trace  # the log has it
    self.data["errors"].append({"section": where, "error": text})

  def error(self, where: str, error: BaseException) -> str:
    """Logs and records ``error`` raised in section ``where``; returns its error string."""
    text = error_string(error)
    self.log.error("%s failed: %s", where, text, exc_info=error)
    self.record_error(where, text, "".join(traceback.format_exception(error, limit=8)))
    return text

  def attempt(self, where: str, measure: Callable[[], dict]) -> dict:
    """``measure()``, or ``{"error": ...}`` if it raises; the report is saved either way."""
    try:
      return measure()
    except Exception as e:  # noqa: BLE001 - one failing section must not cost the others
      return {"error": self.error(where, e)}
    finally:
      self.save()

  def save(self) -> None:
    """Writes the JSON to ``out`` (a whole file or none: written aside, then renamed)."""
    self.data[self.seconds_key] = self.elapsed()
    if self.out is None:
      return
    try:
      self.out.parent.mkdir(parents=True, exist_ok=True)
      partial = self.out.with_name(self.out.name + ".tmp")
      partial.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
      partial.replace(self.out)
    except OSError as e:
      self.log.error("could not write %s: %s", self.out, e)

  def run(self, body: Callable[[], None], summarize: Callable[[], None] | None = None) -> dict[str, Any]:
    """Runs ``body``, then ``summarize``, whatever happens in between (an error, Ctrl-C, SIGTERM:
    each is recorded), then saves the report and prints it on stdout."""
    with _sigterm_as_interrupt():
      try:
        body()
      except BaseException as e:  # noqa: BLE001 - the JSON must come out whatever happened
        self.error("run", e)
      finally:
        if summarize is not None:
          try:
            summarize()
          except Exception as e:  # noqa: BLE001
            self.error("summary", e)
        self.save()
        print(json.dumps(self.data, indent=2, default=str), flush=True)
    return self.data
