"""Writes that fail for want of space, quota or write access, told in one line naming what and where
(docs/design.md, "One round, step by step": checkpoints and failures)."""

from __future__ import annotations

import contextlib
import errno
import os
import re

from runkit.errors import CheckpointError

__all__ = ["DiskWriteError", "disk_error", "disk_errors_reported", "disk_write_message", "error_chain"]


def error_chain(error: BaseException):
  """``error`` and the errors it was raised from (``__cause__``, else ``__context__``), outermost first."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


_DISK_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system"}
# TensorStore reports the OS error in its message: "... No space left on device [os_error_code='28']".
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


class DiskWriteError(CheckpointError):
  """A run's records (a checkpoint, metrics.jsonl, summary.json) could not be written: the disk is full,
  the quota spent or the file system read-only."""


def disk_error(error: BaseException) -> int | None:
  """The errno (ENOSPC, EDQUOT or EROFS) behind ``error`` or the errors it was raised from, else None."""
  for cause in error_chain(error):
    if isinstance(cause, OSError) and cause.errno in _DISK_ERRNOS:
      return cause.errno
    text = str(cause)
    found = _OS_ERROR_CODE.search(text)
    if found and int(found.group(1)) in _DISK_ERRNOS:
      return int(found.group(1))
    for code in _DISK_ERRNOS:
      if os.strerror(code) in text:
        return code
  return None


def disk_write_message(code: int, what: str, folder, *, resumable: bool) -> str:
  """The one line of a failed write: what could not be written where, and what to do, in the CLI's words."""
  if code == errno.EROFS:
    fix = "make it writable (or move the run folder to a writable disk)"
  else:
    fix = "free space (or move the run folder to a disk with room)"
  then = "then rerun with --resume" if resumable else "then run again (or choose another --workdir)"
  return f"{_DISK_ERRNOS[code]} writing {what} in {folder}; {fix}, {then}"


@contextlib.contextmanager
def disk_errors_reported(what: str, folder, *, resumable, on_failure=None):
  """Turns a write that fails for want of space, quota or write access into one ``DiskWriteError``;
  other errors pass unchanged. ``resumable``: a callable saying whether the run can then be resumed
  (it holds a complete checkpoint), asked only on failure; ``on_failure``: a callable run first, before
  ``resumable`` is asked (e.g. to remove what the failed write left)."""
  try:
    yield
  except Exception as e:
    code = disk_error(e)
    if code is None:
      raise
    if on_failure is not None:
      on_failure()
    raise DiskWriteError(disk_write_message(code, what, folder, resumable=resumable())) from e
