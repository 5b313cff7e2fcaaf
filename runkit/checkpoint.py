"""Atomic, resumable checkpoints of a training state pytree (orbax underneath).

A checkpoint holds two items: ``state`` (a pytree of arrays: parameters, optimizer
state, PRNG key data, counters) and ``meta`` (JSON: the run's config, so an
incompatible resume is refused, plus whatever JSON the caller passes as ``extra``).
Orbax writes each step into a temporary folder and renames it when complete, so a
run killed mid-save leaves the previous checkpoint intact. Saves are asynchronous: ``save`` returns once
the arrays are copied to host memory and the files are written while training goes on (a run waits for
a pending write before the next save, before reading, and on ``close``).

Failures are one line each (docs/design.md, "One round, step by step"): a Ctrl-C during a save is held back
until the checkpoint is complete (no half-written folder, no thread's traceback); a full disk raises
``runkit.disk.DiskWriteError``; an unreadable checkpoint raises ``CheckpointError`` with TensorStore's reason.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import re
import shutil
import signal
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from runkit.disk import disk_errors_reported, error_chain
from runkit.errors import CheckpointError
from runkit.orbax_noise import (Noise, abandoned_reads_muted, failed_work_muted, install_noise_filters,
                                orbax_logs_muted)

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
  """The end of the first line of the innermost error that says something, where TensorStore says what is
  wrong (its spec dropped). Orbax wraps TensorStore's error in one whose text is the repr of a bound method
  (``<bound method ... spec of TensorStore({``): that one says nothing."""
  for cause in reversed(list(error_chain(error))):
    lines = str(cause).strip().splitlines()
    text = re.sub(r"\s*\[tensorstore_spec=.*", "", lines[0] if lines else "")
    if not text or "<bound method" in text:
      continue
    parts, reason = text.split(": "), ""
    while parts and len(parts[-1]) + len(reason) + 2 <= limit:
      reason = parts.pop() + (": " + reason if reason else "")
    return reason or text[-limit:]
  return type(error).__name__


# --------------------------------------------------------------------------------------------
# Ctrl-C while a checkpoint is written. Orbax finishes a save in background threads; a KeyboardInterrupt
# raised inside its save or its wait for the previous one left a "*.orbax-checkpoint-tmp" folder and
# printed the threads' tracebacks (up to 131 lines). A save takes tenths of a second, so holding the
# interrupt back until it is complete costs nothing a user notices.

_DEFERRING = threading.local()


@contextlib.contextmanager
def _interrupts_deferred():
  """Holds a SIGINT back until the block ends, then delivers it (KeyboardInterrupt); a second SIGINT in
  the block is delivered at once (the user insists). Only the main thread receives signals: elsewhere,
  and where Python's handler is not installed, this changes nothing."""
  previous = signal.getsignal(signal.SIGINT)
  if (threading.current_thread() is not threading.main_thread() or getattr(_DEFERRING, "active", False)
      or not callable(previous)):
    yield
    return
  held = []

  def hold(signum, frame):
    if held:
      previous(signum, frame)
    held.append((signum, frame))

  signal.signal(signal.SIGINT, hold)
  _DEFERRING.active = True
  try:
    yield
  finally:
    _DEFERRING.active = False
    signal.signal(signal.SIGINT, previous)
  if held:
    previous(*held[0])


class Checkpointer:
  """Saves every ``save_every`` steps, keeps the newest ``keep``, restores with checks."""

  def __init__(self, directory, *, save_every: int = 1, keep: int = 3, config: dict | None = None,
               config_defaults: dict | None = None, step_name: str = "step"):
    """config: the settings a resume must match (see ``runkit.config.resume_fingerprint``);
    config_defaults: their defaults, which stand in for settings an older checkpoint does not record;
    step_name: what a step is called in messages ("round", "epoch")."""
    if save_every < 1:
      raise ValueError(f"save_every must be >= 1, got {save_every}")
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}")
    self.directory = pathlib.Path(directory).absolute()
    self.config = _normalise_config(config)
    self.config_defaults = _normalise_config(config_defaults)
    self._save_every = save_every
    self._step_name = step_name
    self._pending = None  # the step whose save orbax may still be writing in the background
    self._failed = False  # a save failed (and was reported): orbax re-raises it on close
    self._failed_step = None  # the step of that save, whose half-written folder close removes once more
    self._closed = False
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        enable_async_checkpointing=True,
    )
    # Orbax logs each unreadable step's metadata file here; restore reports that step.
    with orbax_logs_muted(), self._writing(None):
      self._manager = ocp.CheckpointManager(
          self.directory,
          options=options,
          item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
      )
    install_noise_filters()
    Noise.open_checkpointers += 1

  def save(self, step: int, state, *, extra: dict | None = None, force: bool = False) -> bool:
    """Writes ``state`` at ``step`` if it falls on the interval (or ``force``); returns whether it did.

    A Ctrl-C meanwhile takes effect once this save is under way and the previous one complete; a save
    that fails for want of space raises ``DiskWriteError`` (here or at the next save, wait or close)."""
    if not force and step % self._save_every != 0:
      return False
    meta = {"config": self.config, "extra": _normalise_config(extra)}
    with _interrupts_deferred():
      self.wait()  # a failure of the previous save is reported as that step's
      with self._writing(step):
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
      self._pending = step
    return True

  @contextlib.contextmanager
  def _writing(self, step: int | None):
    """Turns a write of ``step`` that failed for want of space, quota or write access into one
    ``DiskWriteError``, after removing what it left of the step's folder (the space it holds)."""
    what = "the checkpoint" + (f" of {self._step_name} {step}" if step is not None else "s")
    with disk_errors_reported(what, self.directory, resumable=lambda: bool(self._complete_steps()),
                              on_failure=lambda: self._write_failed(step)):
      yield

  def _write_failed(self, step: int | None) -> None:
    """After a failed write of ``step``: orbax's reports muted, and what the write left of the step's folder
    removed once orbax's threads have stopped writing into it (removed while one still wrote, under load,
    the folder came back with the files written after)."""
    self._failed = True
    failed_work_muted()
    if step is None:
      return
    self._failed_step = step
    with contextlib.suppress(Exception):  # the failure is already being reported
      self._manager.wait_until_finished()
    self._remove_partial(step)

  def _remove_partial(self, step: int) -> None:
    # wait_until_finished returns at the first error, while tensorstore's own threads may still be writing the
    # step's files (seen under load in CI: the folder came back): remove until it stays gone for 0.3 s, and
    # once more after the manager is closed (``close``).
    gone_since = None
    for _ in range(50):
      partials = list(self.directory.glob(f"{step}.orbax-checkpoint-tmp*"))
      for partial in partials:
        shutil.rmtree(partial, ignore_errors=True)
      if partials:
        gone_since = None
      elif gone_since is None:
        gone_since = time.monotonic()
      elif time.monotonic() - gone_since >= 0.3:
        return
      time.sleep(0.05)

  def _complete_steps(self) -> list[int]:
    """The steps whose folder orbax finished (renamed to the step's number), read from the folder."""
    try:
      return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())
    except OSError:
      return []

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
    return f"checkpoint {self._step_name} {step} at {self.directory / str(step)}"

  def _advice(self, step: int) -> str:
    earlier = [s for s in self.all_steps() if s < step]
    if earlier:
      return (f"delete that folder to resume from the previous checkpoint ({self._step_name} {earlier[-1]}), or "
              "start again in a new --workdir")
    return "it is the only checkpoint: delete that folder and rerun without --resume, or start again in a new --workdir"

  @contextlib.contextmanager
  def _reading(self, step: int):
    """Turns any failure to read ``step`` into one short CheckpointError naming the folder and the fix.

    Orbax and TensorStore raise many types for unreadable files, with messages of 60 lines (the whole
    TensorStore spec); orbax also logs the failure, and reads it abandoned report it again later."""
    try:
      with orbax_logs_muted(), abandoned_reads_muted():
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
      raise CheckpointError(f"checkpoint {self._step_name} {step} in {self.directory} does not fit this "
                            f"model/optimizer ({'; '.join(detail)}); resume with the settings that wrote it or use "
                            "a new --workdir")

  def wait(self) -> None:
    """Waits for a save still being written (a Ctrl-C meanwhile takes effect once it is complete)."""
    with _interrupts_deferred(), self._writing(self._pending):
      self._manager.wait_until_finished()
    self._pending = None

  def close(self) -> None:
    """Completes a pending save (``DiskWriteError`` if it fails) and closes orbax's manager."""
    if self._closed:
      return
    try:
      with _interrupts_deferred():
        try:
          self.wait()
        finally:
          try:
            self._manager.close()
          except Exception:
            if not self._failed:  # after a failed save orbax raises it again here: already reported
              raise
          if self._failed_step is not None:
            self._remove_partial(self._failed_step)
    finally:
      self._closed = True
      Noise.open_checkpointers -= 1

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
