"""Command-line plumbing shared by ``infl-train`` and ``lsanet-train``."""

from __future__ import annotations

import pathlib
import sys
from typing import Callable, Sequence

from runkit.errors import CheckpointError, UserInputError

__all__ = ["CHECKPOINT_SUBDIR", "prepare_workdir", "progress", "run_cli"]

CHECKPOINT_SUBDIR = "checkpoints"


def run_cli(main_fn: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
  """Runs ``main_fn(argv)``; user errors print one clear line and exit with status 2, not a traceback."""
  try:
    main_fn(argv)
  except (UserInputError, CheckpointError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted: rerun with --resume to continue from the last checkpoint", file=sys.stderr)
    return 130
  return 0


def prepare_workdir(workdir, *, resume: bool, create: bool = True) -> pathlib.Path:
  """Checks the run folder (refuses to mix a new run into an old one, or to resume nothing) and creates
  it unless ``create`` is False (for a caller that creates it only once its inputs have loaded)."""
  workdir = pathlib.Path(workdir).expanduser()
  ckpt_dir = workdir / CHECKPOINT_SUBDIR
  has_run = ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir())
  if resume and not has_run:
    raise UserInputError(f"--resume given but {workdir} holds no checkpoint; drop --resume to start a new run there")
  if not resume and has_run:
    raise UserInputError(f"{workdir} already holds a run; pass --resume to continue it, or choose another --workdir")
  if create:
    workdir.mkdir(parents=True, exist_ok=True)
  return workdir


def progress(iterable=None, *, total=None, desc: str = "", initial: int = 0, disable: bool | None = None):
  """A tqdm bar (hidden when stderr is not a terminal unless forced) with ``set_postfix`` for metrics."""
  from tqdm.auto import tqdm

  return tqdm(iterable, total=total, desc=desc, initial=initial, disable=disable, dynamic_ncols=True, leave=True)
