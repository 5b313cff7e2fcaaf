"""Atomic, resumable checkpoints of a training state pytree (orbax underneath).

A checkpoint holds two items: ``state`` (a pytree of arrays: parameters, optimizer
state, PRNG key data, counters) and ``meta`` (JSON: the run's config, so an
incompatible resume is refused, plus whatever JSON the caller passes as ``extra``).
Orbax writes each step into a temporary folder and renames it when complete, so a
run killed mid-save leaves the previous checkpoint intact. Saves are asynchronous: ``save`` returns once
the arrays are copied to host memory and the files are written while training goes on (a run waits for
a pending write before the next save, before reading, and on ``close``).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import pathlib
import re
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from runkit.errors import CheckpointError

__all__ = ["CheckpointError", "Checkpointer"]


def _normalise_config(config: dict | None) -> dict:
  # Round-trip through JSON so tuples/lists and numpy scalars compare equal after restore.
  return json.loads(json.dumps(config or {}, sort_keys=True, default=_json_default))


def _json_default(obj):
  if isinstance(obj, (np.generic,)):
    return obj.item()
  if isinstance(obj, pathlib.Path):
    return str(obj)
  raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _short_reason(error: Exception, limit: int = 120) -> str:
  """The end of an error's first line, where TensorStore says what is wrong (its spec dropped)."""
  lines = str(error).strip().splitlines()
  text = re.sub(r"\s*\[tensorstore_spec=.*", "", lines[0] if lines else "")
  parts, reason = text.split(": "), ""
  while parts and len(parts[-1]) + len(reason) + 2 <= limit:
    reason = parts.pop() + (": " + reason if reason else "")
  return reason or text[-limit:] or type(error).__name__


@contextlib.contextmanager
def _orbax_logs_muted():
  """Orbax logs (through absl) the files it cannot read; restore turns those into one CheckpointError."""
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    absl_logger.setLevel(level)


class _AbandonedReads(logging.Filter):
  """Drops the reports of reads that orbax started and abandoned once one of them failed ("Task exception
  was never retrieved", a callback for a finished future): the CheckpointError already says what failed."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage().split("\n", 1)[0]
    return not (message.endswith(" exception was never retrieved")  # of a Task or a Future
                or message.startswith("exception calling callback for"))


_ABANDONED_READS = _AbandonedReads()


def _drop_closed_loop_errors(hook):
  # A read finishing after orbax closed its event loop reports this error, from a TensorStore thread,
  # as an unraisable exception.
  def unraisablehook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
      hook(unraisable)
  unraisablehook.drops_closed_loop_errors = True
  return unraisablehook


@contextlib.contextmanager
def _abandoned_reads_muted():
  """While reading, and after a failed read for the rest of the process: the reads orbax started
  alongside a failed one report the failure again, during the read or whenever they are collected."""
  loggers = [logging.getLogger(name) for name in ("asyncio", "concurrent.futures")]
  added = [logger for logger in loggers if _ABANDONED_READS not in logger.filters]
  for logger in added:
    logger.addFilter(_ABANDONED_READS)
  hook = sys.unraisablehook
  if not getattr(hook, "drops_closed_loop_errors", False):
    sys.unraisablehook = _drop_closed_loop_errors(hook)
  try:
    yield
  except Exception:
    gc.collect()  # the abandoned tasks report when collected: now, while the filter is on
    raise
  for logger in added:
    logger.removeFilter(_ABANDONED_READS)
  sys.unraisablehook = hook


class Checkpointer:
  """Saves every ``save_every`` steps, keeps the newest ``keep``, restores with checks."""

  def __init__(self, directory, *, save_every: int = 1, keep: int = 3, config: dict | None = None,
               config_defaults: dict | None = None):
    """config: the settings a resume must match (see ``runkit.config.resume_fingerprint``);
    config_defaults: their defaults, which stand in for settings an older checkpoint does not record."""
    if save_every < 1:
      raise ValueError(f"save_every must be >= 1, got {save_every}")
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}")
    self.directory = pathlib.Path(directory).absolute()
    self.config = _normalise_config(config)
    self.config_defaults = _normalise_config(config_defaults)
    self._save_every = save_every
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        enable_async_checkpointing=True,
    )
    with _orbax_logs_muted():  # it logs each unreadable step's metadata file; restore reports that step
      self._manager = ocp.CheckpointManager(
          self.directory,
          options=options,
          item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
      )

  def save(self, step: int, state, *, extra: dict | None = None, force: bool = False) -> bool:
    """Writes ``state`` at ``step`` if it falls on the interval (or ``force``); returns whether it did."""
    if not force and step % self._save_every != 0:
      return False
    meta = {"config": self.config, "extra": _normalise_config(extra)}
    self._manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True,
    )
    return True

  def all_steps(self) -> list[int]:
    self.wait()
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    self.wait()
    return self._manager.latest_step()

  def restore(self, state_template, step: int | None = None):
    """Returns ``(state, extra)`` from ``step`` (default: the latest), checked against the template."""
    if step is None:
      step = self.latest_step()
      if step is None:
        raise CheckpointError(f"no checkpoint found in {self.directory}; start without --resume to begin a new run")
    elif step not in self.all_steps():
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; available steps: {self.all_steps()}")

    with self._reading(step):
      meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if not isinstance(meta, dict) or "config" not in meta:
      raise CheckpointError(f"{self._where(step)} was not written by this library; {self._advice(step)}")
    self._check_config(meta["config"])

    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state_template)
    self._check_structure(step, abstract)
    with self._reading(step):
      restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    return restored, meta.get("extra", {})

  def _where(self, step: int) -> str:
    return f"checkpoint step {step} at {self.directory / str(step)}"

  def _advice(self, step: int) -> str:
    earlier = [s for s in self.all_steps() if s < step]
    if earlier:
      return (f"delete that folder to resume from the previous checkpoint (step {earlier[-1]}), or start again "
              "in a new --workdir")
    return "it is the only checkpoint: delete that folder and rerun without --resume, or start again in a new --workdir"

  @contextlib.contextmanager
  def _reading(self, step: int):
    """Turns any failure to read ``step`` into one short CheckpointError naming the folder and the fix.

    Orbax and TensorStore raise many types for unreadable files, with messages of 60 lines (the whole
    TensorStore spec); orbax also logs the failure, and reads it abandoned report it again later."""
    try:
      with _orbax_logs_muted(), _abandoned_reads_muted():
        yield
    except Exception as e:
      raise CheckpointError(f"{self._where(step)} is unreadable (corrupted or incomplete: {_short_reason(e)}); "
                            f"{self._advice(step)}") from e

  def _check_config(self, saved: dict) -> None:
    saved = {**{k: v for k, v in self.config_defaults.items() if k in self.config}, **saved}
    diffs = {k: (saved.get(k), self.config.get(k))
             for k in sorted(set(saved) | set(self.config)) if saved.get(k) != self.config.get(k)}
    if diffs:
      lines = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, a, b in ((k, *v) for k, v in diffs.items()))
      raise CheckpointError(f"checkpoint in {self.directory} belongs to a run with different settings ({lines}); "
                            "resume with the original settings or use a new --workdir")

  def _check_structure(self, step: int, abstract) -> None:
    with self._reading(step):
      saved = self._manager.item_metadata(step)["state"]
    if saved is None:
      raise CheckpointError(f"{self._where(step)} has no array metadata (incomplete, or not written by this "
                            f"library); {self._advice(step)}")
    saved_tree = getattr(saved, "tree", saved)
    want = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(abstract)}
    have = {jax.tree_util.keystr(p): tuple(getattr(x, "shape", ()))
            for p, x in jax.tree_util.tree_leaves_with_path(saved_tree)}
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or unexpected or wrong:
      detail = []
      if missing:
        detail.append(f"missing {missing[:5]}")
      if unexpected:
        detail.append(f"unexpected {unexpected[:5]}")
      if wrong:
        detail.append("shape mismatch " + ", ".join(f"{k}: saved {have[k]} vs model {want[k]}" for k in wrong[:5]))
      raise CheckpointError(f"checkpoint step {step} in {self.directory} does not fit this model/optimizer "
                            f"({'; '.join(detail)}); resume with the settings that wrote it or use a new --workdir")

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
