"""Command-line plumbing shared by ``infl-train`` and ``lsanet-train``."""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import pathlib
import secrets
import shutil
import socket
import sys
import time
from typing import Callable, Iterator, NamedTuple, Sequence

from runkit.errors import CheckpointError, UserInputError

__all__ = ["CACHE_ENV", "CHECKPOINT_SUBDIR", "LOCK_NAME", "ArgumentParser", "WorkdirInUseError",
           "add_compile_cache_argument", "enable_compilation_cache", "has_checkpoint", "locked_run", "prepare_workdir",
           "progress", "run_cli", "workdir_transaction"]

CHECKPOINT_SUBDIR = "checkpoints"
LOCK_NAME = ".run.lock"  # in the workdir while a run holds it (docs/design.md, "Run folders")
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
  if not str(workdir).strip():  # Path("") is ".": the run would spread over the current folder
    raise UserInputError("--workdir is empty; name a folder for the run")
  workdir = pathlib.Path(workdir).expanduser()
  _check_folder_path(workdir)
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


def _check_folder_path(workdir: pathlib.Path) -> None:
  """Refuses a --workdir that is a file, or lies under one, or is a broken symbolic link."""
  for path in (workdir, *workdir.parents):
    if path.is_symlink() and not path.exists():
      raise UserInputError(f"--workdir {workdir}: {path} is a broken symbolic link (to {os.readlink(path)}); "
                           "remove it or choose another --workdir")
    if path.exists():
      if not path.is_dir():
        where = "is a file" if path == workdir else f"lies under {path}, which is a file"
        raise UserInputError(f"--workdir {workdir} {where}, not a folder; choose another --workdir")
      return


# --------------------------------------------------------------------------------------------
# The workdir lock (docs/design.md, "Run folders"): an flock on WORKDIR/.run.lock, released by the kernel
# when its process dies however it dies (a killed run's lock is taken over silently); the file names its holder.


class WorkdirInUseError(UserInputError):
  """Another run holds the workdir's lock."""


class _Lock(NamedTuple):
  fd: int
  path: pathlib.Path  # WORKDIR/.run.lock
  created_top: pathlib.Path | None  # the highest folder of the workdir's path this run created, if any


def _holder_record() -> bytes:
  return (json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                      "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n").encode()


def _holder(fd: int) -> str:
  """Who holds the lock, from its file; a holder that has just taken it may not have written yet."""
  for _ in range(20):
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
      record = json.loads(os.pread(fd, 4096, 0))
      return f"pid {record['pid']} on host {record['host']}, started {record['started']}"
    time.sleep(0.05)
  return "its process is not named in the lock file"


_CANNOT_WRITE = (errno.EACCES, errno.EPERM, errno.EROFS)  # root too: EROFS (read-only mount), EPERM (immutable)


def _same_file(fd: int, path: pathlib.Path) -> bool:
  with contextlib.suppress(OSError):
    on_disk, held = os.stat(path, follow_symlinks=False), os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)
  return False


def _flock(fd: int, shown: pathlib.Path) -> None:
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:  # a file system without locks (some cluster mounts) runs as before the lock, and says so
    if isinstance(e, BlockingIOError) or e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
      raise
    print(f"warning: --workdir {shown}: its file system offers no locks ({e.strerror}); nothing stops a second "
          "run there", file=sys.stderr)


def _lock_existing(workdir: pathlib.Path, shown: pathlib.Path) -> int | None:
  """The locked descriptor of WORKDIR/.run.lock; None when a run that ended removed it meanwhile."""
  path = workdir / LOCK_NAME
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
  except FileNotFoundError:
    return None
  except OSError as e:
    if e.errno in _CANNOT_WRITE:
      raise UserInputError(f"--workdir {shown} is not writable ({e.strerror}); make it writable or choose another "
                           "--workdir") from None
    raise
  try:
    _flock(fd, shown)
  except BlockingIOError:
    holder = _holder(fd)
    os.close(fd)
    raise WorkdirInUseError(f"--workdir {shown} is in use by another run ({holder}); wait for it to finish or "
                            "choose another --workdir") from None
  # The holder before us removes the file before it unlocks it; a lock on a file no longer at the path
  # locks nothing another run would see.
  if not _same_file(fd, path):
    os.close(fd)
    return None
  os.ftruncate(fd, 0)
  os.pwrite(fd, _holder_record(), 0)
  return fd


def _lock_new(workdir: pathlib.Path, shown: pathlib.Path) -> int | None:
  """Makes the workdir with its lock already taken, built beside it and renamed into place: no run sees it
  unlocked, so two runs that found no folder cannot both take it. None: another run made it first."""
  try:
    workdir.parent.mkdir(parents=True, exist_ok=True)
    staging = workdir.parent / f".{workdir.name}.new-{secrets.token_hex(4)}"
    staging.mkdir()
  except FileNotFoundError:
    return None  # a failed run took back a parent it had made just now: look again
  except OSError as e:
    if e.errno in _CANNOT_WRITE:
      ancestor = next(p for p in shown.parents if p.exists())
      raise UserInputError(f"cannot create --workdir {shown}: {ancestor} is not writable "
                           f"({e.strerror}); choose another --workdir") from None
    raise
  fd = os.open(staging / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
  try:
    _flock(fd, shown)
    os.write(fd, _holder_record())
    os.rename(staging, workdir)  # fails on a folder that holds anything, such as another run's lock
    return fd
  except OSError as e:
    os.close(fd)
    shutil.rmtree(staging, ignore_errors=True)
    if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
      return None
    raise


def _missing_top(workdir: pathlib.Path) -> pathlib.Path | None:
  """The highest folder of the workdir's path that does not exist yet; None when the workdir exists."""
  return None if workdir.exists() else next(p for p in (workdir, *workdir.parents) if p.parent.exists())


def _take_lock(workdir: pathlib.Path, shown: pathlib.Path) -> _Lock:
  for _ in range(100):  # each retry follows another run's change of the folder; a few at most
    _check_folder_path(shown)
    created_top = _missing_top(workdir)
    fd = _lock_existing(workdir, shown) if created_top is None else _lock_new(workdir, shown)
    if fd is not None:
      return _Lock(fd, workdir / LOCK_NAME, created_top)
  raise UserInputError(f"--workdir {shown} keeps changing under this run; check what else writes there")


def _release_lock(lock: _Lock) -> None:
  # Removed before it is unlocked, and only if it still is this run's file (see _lock_existing).
  with contextlib.suppress(OSError):
    if _same_file(lock.fd, lock.path):
      os.unlink(lock.path)
  os.close(lock.fd)


@contextlib.contextmanager
def locked_run(workdir, *, resume: bool, files: Sequence = ()) -> Iterator[pathlib.Path]:
  """A run in ``workdir``, alone: takes the workdir's lock (creating the folder if need be) before
  anything is written, checks under it that the folder fits ``resume`` (``prepare_workdir``), holds it
  until the run ends and yields the workdir. A run that finds the lock taken is refused with
  ``WorkdirInUseError`` naming the holder (pid, host, start time) and touches nothing.

  A run that fails before its first checkpoint takes back what it wrote (``workdir_transaction``) since
  it took the lock: never anything another run made. The lock file is removed when the run ends; one
  left by a killed run is taken over (docs/design.md, "Run folders").
  """
  workdir = prepare_workdir(workdir, resume=resume, create=False)
  lock = _take_lock(workdir.absolute(), workdir)
  try:
    with _undo_on_failure(workdir.absolute(), lock.created_top, files, keep=(LOCK_NAME,)):
      prepare_workdir(workdir, resume=resume, create=False)  # again: another run may have just ended there
      yield workdir
  finally:
    _release_lock(lock)


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
  needs the key file and the metrics. create: make the workdir on entry. The CLIs use ``locked_run``,
  which does this under the workdir's lock.
  """
  workdir = pathlib.Path(workdir).expanduser().absolute()
  with _undo_on_failure(workdir, _missing_top(workdir), files):
    if create:
      workdir.mkdir(parents=True, exist_ok=True)
    yield workdir


@contextlib.contextmanager
def _undo_on_failure(workdir: pathlib.Path, created_top: pathlib.Path | None, files: Sequence,
                     keep: Sequence[str] = ()) -> Iterator[None]:
  """The undo of ``workdir_transaction``, from the folder and ``files`` as they are now; ``keep``: names
  in the workdir never taken back (the lock file, which its holder removes last)."""
  before = _entries(workdir) | set(keep)
  saved = {}  # path -> ("file", content, mode) or ("link", target); None where nothing was (a folder is left alone)
  for path in map(pathlib.Path, files):
    if path.is_symlink():  # replacing the link (--overwrite-key) must not cost the user the link itself
      saved[path] = ("link", os.readlink(path))
    elif path.is_file():
      saved[path] = ("file", path.read_bytes(), path.stat().st_mode)
    elif not os.path.lexists(path):
      saved[path] = None
  try:
    yield
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
      elif old[0] == "link":
        if not path.is_symlink() or os.readlink(path) != old[1]:
          _remove(str(path))
          os.symlink(old[1], path)
      elif path.is_symlink() or not path.is_file() or path.read_bytes() != old[1]:
        _remove(str(path))
        # Written with its old mode from the start: a key file must never be readable by others.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, old[2] & 0o7777)
        with os.fdopen(fd, "wb") as f:
          f.write(old[1])
  with contextlib.suppress(OSError):
    if created_top is None:
      _remove_new_entries(workdir, before)
      return
    _discard_folder(workdir)
    for folder in workdir.parents:  # the parents this run created, if nothing else was put there
      if not folder.is_relative_to(created_top) or any(folder.iterdir()):
        break
      folder.rmdir()


def _discard_folder(folder: pathlib.Path) -> None:
  """Removes a folder the run created. Renamed away first: a run starting meanwhile in a folder of that
  name then makes its own, which this removal never reaches."""
  aside = folder.with_name(f".{folder.name}.removed-{secrets.token_hex(4)}")
  try:
    os.rename(folder, aside)
  except OSError:
    aside = folder
  shutil.rmtree(aside, ignore_errors=True)


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
