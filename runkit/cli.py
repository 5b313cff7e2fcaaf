"""Command-line plumbing shared by ``infl-train`` and ``lsanet-train``."""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import shutil
import sys
from typing import Callable, Iterator, Sequence

from runkit.errors import CheckpointError, UserInputError

__all__ = ["CACHE_ENV", "CHECKPOINT_SUBDIR", "ArgumentParser", "add_compile_cache_argument",
           "enable_compilation_cache", "has_checkpoint", "prepare_workdir", "progress", "run_cli",
           "workdir_transaction"]

CHECKPOINT_SUBDIR = "checkpoints"
CACHE_ENV = "INFL_JAX_CACHE_DIR"
_CACHE_OFF = ("off", "0", "false", "no", "none")


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose errors are one line, ``error: <message> (see <prog> --help)``, exit status 2:
  the usage block argparse prints first hid the message among 30 lines of options."""

  def error(self, message: str):
    self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def run_cli(main_fn: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
  """Runs ``main_fn(argv)``; user errors print one clear line and exit with status 2, not a traceback."""
  try:
    main_fn(argv)
  except (UserInputError, CheckpointError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted: rerun with --resume to continue from the last checkpoint (without it if none was "
          "written yet)", file=sys.stderr)
    return 130
  return 0


def prepare_workdir(workdir, *, resume: bool, create: bool = True) -> pathlib.Path:
  """Checks the run folder (refuses to mix a new run into an old one, or to resume nothing) and creates
  it unless ``create`` is False (for a caller that creates it only once its inputs have loaded)."""
  workdir = pathlib.Path(workdir).expanduser()
  has_run = has_checkpoint(workdir)
  if resume and not has_run:
    raise UserInputError(f"--resume given but {workdir} holds no checkpoint; drop --resume to start a new run there")
  if not resume and has_run:
    raise UserInputError(f"{workdir} already holds a run; pass --resume to continue it, or choose another --workdir")
  if create:
    workdir.mkdir(parents=True, exist_ok=True)
  return workdir


def has_checkpoint(workdir) -> bool:
  """Whether ``workdir`` holds a complete checkpoint (orbax renames a step's folder to its number
  only once it is written, so a save cut short does not count)."""
  ckpt_dir = pathlib.Path(workdir).expanduser() / CHECKPOINT_SUBDIR
  return ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())


def _entries(root: pathlib.Path) -> set[str]:
  """Every path under ``root`` (relative, as text); empty when root does not exist."""
  found = set()
  for folder, dirs, files in os.walk(root):
    rel = os.path.relpath(folder, root)
    found.update(os.path.normpath(os.path.join(rel, name)) for name in dirs + files)
  return found


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  else:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(path)


def _remove_new_entries(root: pathlib.Path, before: set[str]) -> None:
  """Removes what under ``root`` is not in ``before``, descending only into folders that were there."""
  for folder, dirs, files in os.walk(root):
    rel = os.path.relpath(folder, root)
    for name in files + dirs:
      if os.path.normpath(os.path.join(rel, name)) not in before:
        _remove(os.path.join(folder, name))
    dirs[:] = [d for d in dirs if os.path.normpath(os.path.join(rel, d)) in before]


@contextlib.contextmanager
def workdir_transaction(workdir, *, files: Sequence = (), create: bool = False) -> Iterator[pathlib.Path]:
  """Undoes the writes of a run that fails before its first checkpoint, so a rerun meets the folder
  as it was (a key file left behind made the next ``--key-seed`` run refuse to start).

  On any exception, while ``workdir`` holds no checkpoint: removes every file and folder created in
  it (and the workdir, with the parents it needed, when the run created them) and gives ``files``
  (paths outside the workdir the run may create or replace, such as a key file) their former state.
  Nothing that existed before is removed. Once a checkpoint exists everything is kept: resuming
  needs the key file and the metrics. create: make the workdir on entry.
  """
  workdir = pathlib.Path(workdir).expanduser().absolute()
  created_top = None  # the highest folder of the workdir's path that does not exist yet
  for folder in (workdir, *workdir.parents):
    if folder.exists():
      break
    created_top = folder
  before = _entries(workdir)
  saved = {}  # path -> (content, mode) of a file there, None where nothing was (a folder is left alone)
  for path in map(pathlib.Path, files):
    if path.is_file():
      saved[path] = (path.read_bytes(), path.stat().st_mode)
    elif not os.path.lexists(path):
      saved[path] = None
  if create:
    workdir.mkdir(parents=True, exist_ok=True)
  try:
    yield workdir
  except BaseException:
    if not has_checkpoint(workdir):
      _undo(workdir, created_top, before, saved)
    raise


def _undo(workdir: pathlib.Path, created_top: pathlib.Path | None, before: set[str], saved: dict) -> None:
  # Best effort: a failure here must not hide the error that ended the run.
  for path, old in saved.items():
    with contextlib.suppress(OSError):
      if old is None:
        _remove(str(path))
      elif not path.is_file() or path.read_bytes() != old[0]:
        # Written with its old mode from the start: a key file must never be readable by others.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, old[1] & 0o7777)
        with os.fdopen(fd, "wb") as f:
          f.write(old[0])
  with contextlib.suppress(OSError):
    if created_top is None:
      _remove_new_entries(workdir, before)
      return
    _remove(str(workdir))
    for folder in workdir.parents:  # the parents this run created, if nothing else was put there
      if not folder.is_relative_to(created_top) or any(folder.iterdir()):
        break
      folder.rmdir()


def enable_compilation_cache(enabled: bool = True, *, min_compile_time_secs: float = 0.5) -> pathlib.Path | None:
  """Turns on JAX's persistent compilation cache, so a rerun loads the compiled steps from disk instead
  of compiling them again (tens of seconds on CPU); returns the folder, or None when it stays off.

  The folder: ``$INFL_JAX_CACHE_DIR``; else a folder already set for JAX (``JAX_COMPILATION_CACHE_DIR``);
  else ``$XDG_CACHE_HOME/infl-lsanet-jax/jax`` or ``~/.cache/infl-lsanet-jax/jax``. ``INFL_JAX_CACHE_DIR=off``
  or ``enabled=False`` leave it off. A folder that cannot be written (read-only home) leaves the cache off
  with one warning line: a cache never fails a run.
  """
  setting = os.environ.get(CACHE_ENV, "").strip()
  if not enabled or (setting and setting.lower() in _CACHE_OFF):
    return None
  import jax
  from jax.experimental.compilation_cache import compilation_cache

  current = jax.config.jax_compilation_cache_dir
  if setting:
    folder = pathlib.Path(setting).expanduser()
  elif current:
    folder = pathlib.Path(current)
  else:
    cache_home = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    folder = pathlib.Path(cache_home).expanduser() / "infl-lsanet-jax" / "jax"
  try:
    # Owner-only: JAX runs what it finds in the cache, so others must not write there.
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not os.access(folder, os.W_OK | os.X_OK):
      raise PermissionError(f"{folder} is not writable")
  except OSError as e:
    print(f"warning: compilation cache off, cannot use {folder} ({e}); set {CACHE_ENV} to a writable "
          f"folder, or to 'off'", file=sys.stderr)
    return None
  if str(folder) != current:
    jax.config.update("jax_compilation_cache_dir", str(folder))
    compilation_cache.reset_cache()  # JAX opens the cache folder once; this makes it open the new one
  # Below JAX's default of 1 s, so that CPU compiles of a few tenths of a second are kept too.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_secs)
  return folder


def add_compile_cache_argument(parser) -> None:
  """``--compile-cache/--no-compile-cache`` (read by ``enable_compilation_cache``)."""
  parser.add_argument("--compile-cache", action=argparse.BooleanOptionalAction, default=True,
                      help=f"keep compiled XLA programs on disk for the next run (folder: ${CACHE_ENV}, else "
                      "~/.cache/infl-lsanet-jax/jax; default: on)")


def progress(iterable=None, *, total=None, desc: str = "", initial: int = 0, disable: bool | None = None):
  """A tqdm bar (hidden when stderr is not a terminal unless forced) with ``set_postfix`` for metrics."""
  from tqdm.auto import tqdm

  return tqdm(iterable, total=total, desc=desc, initial=initial, disable=disable, dynamic_ncols=True, leave=True)
