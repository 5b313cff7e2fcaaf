"""metrics.jsonl (one line per round or epoch), atomically written JSON summaries and data files."""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import secrets
from typing import IO, Iterator

import numpy as np

__all__ = ["MetricsWriter", "atomic_write", "read_metrics", "to_jsonable", "write_json_atomic"]


def to_jsonable(obj):
  """Converts numpy/jax scalars and arrays to plain Python; non-finite floats become None (valid JSON)."""
  if isinstance(obj, dict):
    return {str(k): to_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_jsonable(v) for v in obj]
  if isinstance(obj, pathlib.Path):
    return str(obj)
  if hasattr(obj, "__array__") and not isinstance(obj, (str, bytes)):
    arr = np.asarray(obj)
    return to_jsonable(arr.item() if arr.ndim == 0 else arr.tolist())
  if isinstance(obj, np.generic):
    return to_jsonable(obj.item())
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


@contextlib.contextmanager
def atomic_write(path, mode: str = "w", *, fsync: bool = False) -> Iterator[IO]:
  """Yields a file opened in ``mode`` that replaces ``path`` when the block ends without error (and is
  removed when it raises), so a reader never meets a half-written file.

  The file gets the permissions a plain ``open`` gives it (0o666 less the umask). ``tempfile.mkstemp``
  made every file owner-only, so data and summaries written for a group could not be read by it. Secrets
  (INFL key files) are written by their own code, owner-only.
  """
  path = pathlib.Path(path)
  tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(fd, mode) as f:
      yield f
      f.flush()
      if fsync:
        os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def write_json_atomic(path, obj) -> None:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with atomic_write(path, "w", fsync=True) as f:
    json.dump(to_jsonable(obj), f, indent=2, sort_keys=False)
    f.write("\n")


def read_metrics(path) -> list[dict]:
  path = pathlib.Path(path)
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    line = line.strip()
    if line:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        break  # a line cut short by a kill; everything after it is unreliable
  return rows


class MetricsWriter:
  """Appends ``{"step": s, **metrics}`` lines to ``workdir/metrics.jsonl``.

  On resume the file is rewritten to hold only steps up to the checkpoint's, so a
  resumed run's log reads exactly like an uninterrupted run's.
  """

  def __init__(self, workdir, *, resume_from_step: int | None = None, filename: str = "metrics.jsonl"):
    self.path = pathlib.Path(workdir) / filename
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if resume_from_step is None:
      self.path.write_text("")
    else:
      kept = [r for r in read_metrics(self.path) if r.get("step", -1) <= resume_from_step]
      write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
    self._file = open(self.path, "a")

  def write(self, step: int, metrics: dict) -> None:
    self._file.write(json.dumps(to_jsonable({"step": int(step), **metrics})) + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def write_text_atomic(path, text: str) -> None:
  with atomic_write(path, "w") as f:
    f.write(text)
