"""The one error type the data layer raises for bad input, and helpers its messages share."""

from __future__ import annotations

import difflib

from runkit.errors import UserInputError

__all__ = ["BUILTIN_NAMES", "DataError", "did_you_mean", "preview"]

# Every built-in name ``infl-train --dataset`` takes: builtin.py's classification sets, then the ones of
# multiomics.py, spatial.py and perturbation.py. Here, below all of them, so any module's message can list them.
BUILTIN_NAMES = ("proteomics", "pbmc", "pbmc_sites", "pbmc_panels", "pbmc_patients", "nutrimouse", "spatial",
                 "perturbation_sim")


class DataError(UserInputError):
  """Bad data or bad loader arguments; the message names the problem and the fix.

  A subclass of ``UserInputError`` so ``run_cli`` prints it as one line, not a traceback.
  """


def preview(names, limit: int = 10) -> str:
  """``a, b, c, ... (+N more)``: enough names to act on without flooding the message."""
  names = [str(n) for n in names]
  head = ", ".join(names[:limit])
  return head + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")


def did_you_mean(name: str, choices) -> str:
  """`` (did you mean 'x'?)`` naming the closest of ``choices`` to a mistyped ``name``, else ""."""
  close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=2)
  return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
