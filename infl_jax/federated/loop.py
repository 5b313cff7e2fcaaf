"""The one round loop: call a round function ``rounds`` times, with metrics, checkpoints and resume.

Every federated run goes through ``run_rounds``: the task runners, the central baseline, the privacy
evaluation, the seed study and the benchmarks. Checkpointing is optional (``RunDir``).

Resume order: the checkpoint holds the server state (parameters, model state, server optimizer
state, round, run PRNG key, key version) and the metrics so far; the caller rebuilds the clients
and the freshly initialised state (the template) deterministically from its config, the loop
restores into that template and continues at the saved round. Round r's randomness is
``fold_in(run key, r)`` (``engine.round_keys``), so a resumed run repeats exactly the rounds an
uninterrupted run would.
"""

from __future__ import annotations

import pathlib
import time
from typing import Any, Callable, NamedTuple

import jax

from infl_jax.federated.engine import ServerState
from runkit.checkpoint import Checkpointer
from runkit.cli import CHECKPOINT_SUBDIR, progress
from runkit.metrics_log import MetricsWriter

__all__ = ["RoundsResult", "RunDir", "run_rounds"]

RoundFn = Callable[[ServerState, Any, Any], tuple[ServerState, dict]]


class RunDir(NamedTuple):
  """Where a run keeps its records: ``metrics.jsonl`` and orbax checkpoints under ``checkpoints/``."""

  workdir: pathlib.Path
  checkpoint_every: int = 5
  keep_checkpoints: int = 3
  fingerprint: dict | None = None  # settings a resume must match (runkit.config.resume_fingerprint)
  fingerprint_defaults: dict | None = None
  resume: bool = False

  def checkpointer(self) -> Checkpointer:
    return Checkpointer(pathlib.Path(self.workdir) / CHECKPOINT_SUBDIR, save_every=self.checkpoint_every,
                        keep=self.keep_checkpoints, config=self.fingerprint,
                        config_defaults=self.fingerprint_defaults)


class RoundsResult(NamedTuple):
  state: ServerState
  history: list[dict]  # {"round": r, **metrics} per round, the resumed ones included
  seconds: float  # wall time of the rounds run in this call


def run_rounds(round_fn: RoundFn, state: ServerState, clients: Any, context: Any, *, rounds: int,
               run_dir: RunDir | None = None, extra_metrics: Callable[[ServerState, int], dict] | None = None,
               should_stop: Callable[[ServerState, int], bool] | None = None,
               show_progress: bool | None = False) -> RoundsResult:
  """Runs rounds ``state.round + 1 .. rounds`` of ``round_fn(state, clients, context)``.

  ``state`` is the freshly initialised server state (with ``run_dir.resume``, the template the
  checkpoint is restored into). ``extra_metrics(state, rounds_done)`` adds e.g. validation scores to
  a round's row; ``should_stop(state, rounds_done)`` ends the loop early after that round (a
  checkpoint is forced there, so the run resumes from it). ``show_progress`` None: a bar when stderr
  is a terminal.
  """
  history: list[dict] = []
  checkpointer = writer = None
  if run_dir is not None:
    checkpointer = run_dir.checkpointer()
    if run_dir.resume:
      restored, extra = checkpointer.restore(state._asdict())
      state = ServerState(**restored)
      history = extra.get("history", [])
    writer = MetricsWriter(run_dir.workdir, resume_from_step=int(state.round) if run_dir.resume else None)
  start = int(state.round)
  bar = progress(range(start, rounds), total=rounds, initial=start, desc="rounds",
                 disable=None if show_progress is None else not show_progress)
  t0 = time.perf_counter()
  try:
    for r in bar:
      state, round_metrics = round_fn(state, clients, context)
      done = r + 1
      row = {k: float(v) for k, v in jax.device_get(round_metrics).items()}
      if extra_metrics is not None:
        row.update(extra_metrics(state, done))
      bar.set_postfix({k: f"{row[k]:.3f}" for k in ("train_loss", "val_accuracy") if k in row})
      history.append({"round": done, **row})
      stop = should_stop is not None and should_stop(state, done)
      if writer is not None:
        writer.write(done, row)
        checkpointer.save(done, state._asdict(), extra={"history": history}, force=(done == rounds or stop))
      if stop:
        break
  finally:
    bar.close()
    if writer is not None:
      writer.close()
      checkpointer.close()
  return RoundsResult(state, history, time.perf_counter() - t0)
