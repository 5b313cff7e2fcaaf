"""The one error type the data layer raises for bad input."""

from __future__ import annotations

from runkit.errors import UserInputError

__all__ = ["DataError"]


class DataError(UserInputError):
  """Bad data or bad loader arguments; the message names the problem and the fix.

  A subclass of ``UserInputError`` so ``run_cli`` prints it as one line, not a traceback.
  """


def preview(names, limit: int = 10) -> str:
  """``a, b, c, ... (+N more)``: enough names to act on without flooding the message."""
  names = [str(n) for n in names]
  head = ", ".join(names[:limit])
  return head + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")
