"""The one round loop: call a round function ``rounds`` times, with metrics, checkpoints and resume.

Every federated run goes through ``run_rounds``: the task runners, the central baseline, the privacy
evaluation, the seed study and the benchmarks. Checkpointing is optional (``RunDir``).

Model selection (``select``): the loop keeps the server state of the round with the best validation
score (docs/design.md, "Federated protocol"), so the model a run reports does not hang on where in
the late rounds' round-to-round spread the last round happened to land.

Resume order: the checkpoint holds the server state (parameters, model state, server optimizer
state, round, run PRNG key, key version), the selected state and the metrics so far; the caller
rebuilds the clients and the freshly initialised state (the template) deterministically from its config,
the loop restores into that template and continues at the saved round. Round r's randomness is
``fold_in(run key, r)`` (``engine.round_keys``), so a resumed run repeats exactly the rounds an
uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import time
from typing import Any, Callable, NamedTuple

import jax

from infl_jax.federated.engine import ServerState
from runkit.checkpoint import Checkpointer
from runkit.disk import DiskWriteError, disk_errors_reported
from runkit.cli import CHECKPOINT_SUBDIR, has_checkpoint, progress
from runkit.errors import TrainingDiverged, UserInputError
from runkit.metrics_log import MetricsWriter
from runkit.xla import LOOP, compiler_options

__all__ = ["RoundsResult", "RunDir", "TrainingDiverged", "jit_round", "run_rounds"]

RoundFn = Callable[[ServerState, Any, Any], tuple[ServerState, dict]]
# A round's validation score (higher is better; of equal scores the later round wins), or None where the
# round has none.
SelectFn = Callable[[dict], Any]


def jit_round(round_fn: RoundFn) -> RoundFn:
  """``round_fn`` jit-compiled for a run of many rounds (``runkit.xla``: a shorter compile on CPU)."""
  return jax.jit(round_fn, compiler_options=compiler_options(LOOP))


class RunDir(NamedTuple):
  """Where a run keeps its records: ``metrics.jsonl`` and orbax checkpoints under ``checkpoints/``."""

  workdir: pathlib.Path
  checkpoint_every: int = 5
  keep_checkpoints: int = 3
  fingerprint: dict | None = None  # settings a resume must match (runkit.config.resume_fingerprint)
  fingerprint_defaults: dict | None = None
  resume: bool = False
  learning_rate_flag: str = "--learning-rate"  # the CLI's name for the step size, in the divergence message

  def checkpointer(self) -> Checkpointer:
    return Checkpointer(pathlib.Path(self.workdir) / CHECKPOINT_SUBDIR, save_every=self.checkpoint_every,
                        keep=self.keep_checkpoints, config=self.fingerprint,
                        config_defaults=self.fingerprint_defaults, step_name="round")

  def metrics_written(self, what: str):
    """Around a write of metrics.jsonl: a full disk (or quota, or read-only file system) becomes one
    ``DiskWriteError`` line naming ``what``, the folder and the fix (``runkit.checkpoint``)."""
    return disk_errors_reported(what, self.workdir, resumable=lambda: has_checkpoint(self.workdir))


class RoundsResult(NamedTuple):
  state: ServerState  # after the last round run
  history: list[dict]  # {"round": r, **metrics} per round, the resumed ones included
  seconds: float  # wall time of the rounds run in this call
  selected: ServerState | None = None  # the best-scoring round's state (``select``); None if none was scored

  @property
  def best_or_last(self) -> ServerState:
    """The state to evaluate: the selected one where ``select`` scored a round, else the last."""
    return self.state if self.selected is None else self.selected


def _best(history: list[dict], select: SelectFn | None) -> tuple[int | None, Any]:
  scored = [(select(row), row["round"]) for row in history] if select is not None else []
  scored = [(score, r) for score, r in scored if score is not None]
  if not scored:
    return None, None
  score, r = max(scored)  # the latest of equal scores
  return r, score


def _check_finite(row: dict, done: int, run_dir: RunDir | None, checkpointer: Checkpointer | None) -> None:
  loss = row.get("train_loss")
  if loss is None or math.isfinite(loss):
    return
  kept = ""
  if checkpointer is not None and checkpointer.latest_step() is not None:
    kept = f"; the last good checkpoint (round {checkpointer.latest_step()}) is kept in {run_dir.workdir}"
  flag = run_dir.learning_rate_flag if run_dir is not None else RunDir.learning_rate_flag
  raise TrainingDiverged(f"training diverged in round {done} (train loss {loss}){kept}; lower {flag} "
                         "and start again in a new --workdir")


def _check_rounds(done: int, rounds: int, run_dir: RunDir) -> None:
  """Refuses a resume asked to stop before the rounds its checkpoint has done: it would record a run of
  ``rounds`` rounds next to a model trained for more. As many rounds as done evaluates the run again."""
  if rounds < done:
    raise UserInputError(f"the run in {run_dir.workdir} has done {done} rounds; --rounds {rounds} would go back; "
                         f"pass --rounds {done} or more (or drop --resume and choose a new --workdir)")


def run_rounds(round_fn: RoundFn, state: ServerState, clients: Any, context: Any, *, rounds: int,
               run_dir: RunDir | None = None, extra_metrics: Callable[[ServerState, int], dict] | None = None,
               should_stop: Callable[[ServerState, int], bool] | None = None,
               select: SelectFn | None = None, show_progress: bool | None = False) -> RoundsResult:
  """Runs rounds ``state.round + 1 .. rounds`` of ``round_fn(state, clients, context)``.

  ``state`` is the freshly initialised server state (with ``run_dir.resume``, the template the
  checkpoint is restored into). ``extra_metrics(state, rounds_done)`` adds e.g. validation scores to
  a round's row; ``should_stop(state, rounds_done)`` ends the loop early after that round (a
  checkpoint is forced there, so the run resumes from it). ``select(row)`` scores a round's metrics
  row (None: not scored); the best round's state comes back as ``selected``. ``show_progress`` None: a
  bar when stderr is a terminal. A NaN or infinite train loss raises ``TrainingDiverged``, leaving the
  last checkpoint as it was. A resume with fewer ``rounds`` than its checkpoint has done is refused
  before anything is written. A full disk raises ``runkit.disk.DiskWriteError``, with metrics.jsonl
  cut back to the newest complete checkpoint's round, as a resume would cut it (docs/design.md, "One
  round, step by step": checkpoints and failures).
  """
  try:
    return _run_rounds(round_fn, state, clients, context, rounds=rounds, run_dir=run_dir,
                       extra_metrics=extra_metrics, should_stop=should_stop, select=select,
                       show_progress=show_progress)
  except DiskWriteError:
    if run_dir is not None and jax.process_index() == 0:
      _cut_metrics_to_checkpoint(pathlib.Path(run_dir.workdir))
    raise


def _cut_metrics_to_checkpoint(workdir: pathlib.Path) -> None:
  """Truncates metrics.jsonl in place (a full disk has no room for a rewrite) after the rows of the rounds
  the newest complete checkpoint holds; best effort."""
  with contextlib.suppress(OSError):
    last = max((int(p.name) for p in (workdir / CHECKPOINT_SUBDIR).iterdir() if p.name.isdigit()), default=0)
    path = workdir / "metrics.jsonl"
    data, keep = path.read_bytes(), 0
    for line in data.splitlines(keepends=True):
      try:
        row = json.loads(line)
      except ValueError:
        break
      if not line.endswith(b"\n") or row.get("step", 0) > last:
        break
      keep += len(line)
    if keep < len(data):
      os.truncate(path, keep)


def _run_rounds(round_fn: RoundFn, state: ServerState, clients: Any, context: Any, *, rounds: int,
                run_dir: RunDir | None, extra_metrics: Callable[[ServerState, int], dict] | None,
                should_stop: Callable[[ServerState, int], bool] | None, select: SelectFn | None,
                show_progress: bool | None) -> RoundsResult:
  history: list[dict] = []
  checkpointer = writer = bar = None
  selected = None  # the best-scoring state so far; None until a round is scored
  try:
    if run_dir is not None:
      checkpointer = run_dir.checkpointer()
      if run_dir.resume:
        restored, extra = checkpointer.restore({"state": state._asdict(), "selected": state._asdict()})
        state = ServerState(**restored["state"])
        _check_rounds(int(state.round), rounds, run_dir)
        history = extra.get("history", [])
        if _best(history, select)[0] is not None:
          selected = ServerState(**restored["selected"])
      # One writer in a multi-process run: process 0 (docs/design.md, "Multi-host simulation").
      if jax.process_index() == 0:
        with run_dir.metrics_written("metrics.jsonl"):
          writer = MetricsWriter(run_dir.workdir, resume_from_step=int(state.round) if run_dir.resume else None)
    best_round, best_score = _best(history, select)
    start = int(state.round)
    bar = progress(range(start, rounds), total=rounds, initial=start, desc="rounds",
                   disable=None if show_progress is None else not show_progress)
    t0 = time.perf_counter()
    for r in bar:
      if r == start:  # the first call traces and compiles the round (or loads it from the compilation cache)
        bar.set_description("rounds (compiling)")
      state, round_metrics = round_fn(state, clients, context)
      if r == start:
        bar.set_description("rounds")
      done = r + 1
      row = {k: float(v) for k, v in jax.device_get(round_metrics).items()}
      _check_finite(row, done, run_dir, checkpointer)
      if extra_metrics is not None:
        row.update(extra_metrics(state, done))
      bar.set_postfix({k: f"{row[k]:.3f}" for k in ("train_loss", "val_accuracy") if k in row})
      history.append({"round": done, **row})
      score = select(row) if select is not None else None
      # Ties go to the later round: under a decaying step size it is the more settled model.
      if score is not None and (best_score is None or score >= best_score):
        best_round, best_score, selected = done, score, state
      stop = should_stop is not None and should_stop(state, done)
      if checkpointer is not None:
        if writer is not None:
          with run_dir.metrics_written(f"the metrics of round {done} to metrics.jsonl"):
            writer.write(done, row)
        # ``selected`` is the newest state when nothing is scored, so the checkpoint's layout is fixed.
        checkpointer.save(done, {"state": state._asdict(), "selected": (selected or state)._asdict()},
                          extra={"history": history, "selected_round": best_round}, force=(done == rounds or stop))
      if stop:
        break
  finally:
    if bar is not None:
      bar.close()
    try:
      if writer is not None:
        with run_dir.metrics_written("metrics.jsonl"):
          writer.close()
    finally:
      if checkpointer is not None:
        checkpointer.close()  # completes the last save (a Ctrl-C meanwhile waits for it)
  return RoundsResult(state, history, time.perf_counter() - t0, selected)
