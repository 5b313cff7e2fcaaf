"""Orbax's own reports of a failed checkpoint read or write (logs with tracebacks from its threads, reports
of the work it abandoned), dropped while a ``runkit.checkpoint.Checkpointer`` is open or after a failure:
each failure reaches the Checkpointer as an exception, which says it in one line (docs/design.md, "One
round, step by step": checkpoints and failures)."""

from __future__ import annotations

import contextlib
import gc
import inspect
import logging
import os
import sys
import warnings

__all__ = ["Noise", "abandoned_reads_muted", "failed_work_muted", "install_noise_filters", "orbax_logs_muted"]


@contextlib.contextmanager
def orbax_logs_muted():
  """Orbax logs (through absl) the files it cannot read; restore turns those into one CheckpointError."""
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    absl_logger.setLevel(level)


class Noise:
  """Whether orbax's reports of failures are dropped: while a Checkpointer is open, and after a failed read or
  write for the rest of the process. Every failure orbax reports (logged by its background threads, or
  reported again by the work it abandoned, during the read or write or whenever that is collected, which
  may be at exit) also reaches the Checkpointer as an exception, which says it in one line."""

  open_checkpointers = 0
  failed = False

  @classmethod
  def muted(cls) -> bool:
    return cls.open_checkpointers > 0 or cls.failed


class _OrbaxErrors(logging.Filter):
  """Drops orbax's error logs (through absl, with tracebacks)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (Noise.muted() and record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


class _AbandonedWork(logging.Filter):
  """Drops the reports of reads and writes that orbax started and abandoned once one of them failed ("Task
  exception was never retrieved", "Future exception was never retrieved", a callback for a finished
  future)."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage().split("\n", 1)[0]
    return not (Noise.muted() and (message.endswith(" exception was never retrieved")  # of a Task or a Future
                                    or message.startswith("exception calling callback for")))


def _abandoned_work_report(unraisable) -> bool:
  """Whether an unraisable exception is orbax's or TensorStore's report of work it abandoned.

  Two kinds: a read or write finishing after orbax closed its event loop reports "Event loop is closed"
  from a TensorStore thread; and a read coroutine that orbax abandoned when another read failed, closed
  when it is collected, turns the GeneratorExit it is closed with into an ``Exception`` ("Encountered error
  while reading array index", 60 lines of TensorStore spec each: hundreds of lines after one failed
  restore)."""
  error = unraisable.exc_value
  if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
    return True
  return inspect.iscoroutine(unraisable.object) and isinstance(error.__cause__ or error.__context__, GeneratorExit)


def _drop_abandoned_work_reports(hook):
  def unraisablehook(unraisable):
    if not (Noise.muted() and _abandoned_work_report(unraisable)):
      hook(unraisable)
  unraisablehook.drops_abandoned_work_reports = True
  return unraisablehook


def install_noise_filters() -> None:
  """Puts the filters in place (once per process); ``Noise`` says when they drop anything."""
  for name, noise_filter in (("absl", _OrbaxErrors), ("asyncio", _AbandonedWork),
                             ("concurrent.futures", _AbandonedWork)):
    logger = logging.getLogger(name)
    if not any(isinstance(f, noise_filter) for f in logger.filters):
      logger.addFilter(noise_filter())
  if not getattr(sys.unraisablehook, "drops_abandoned_work_reports", False):
    sys.unraisablehook = _drop_abandoned_work_reports(sys.unraisablehook)


def failed_work_muted() -> None:
  """After a failed read or write, for the rest of the process (the failure is being reported): also the
  warnings of coroutines orbax created and never started, and a collection now, so that the abandoned work
  reports while the filters are on rather than at exit."""
  Noise.failed = True
  warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
  gc.collect()


@contextlib.contextmanager
def abandoned_reads_muted():
  """While reading, and after a failed read for the rest of the process: the reads orbax started
  alongside a failed one report the failure again, during the read or whenever they are collected."""
  install_noise_filters()
  try:
    yield
  except BaseException:
    failed_work_muted()
    raise
