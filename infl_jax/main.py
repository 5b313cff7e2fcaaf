"""``infl-train``: federated INFL training on a built-in data set or an .h5ad file."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import os
import pathlib
import sys
import warnings

from infl_jax.config import TrainConfig
from infl_jax.tasks.common import write_summary
from infl_jax.tasks.registry import TASKS
from runkit.cli import (ArgumentParser, add_compile_cache_argument, enable_compilation_cache, has_checkpoint,
                        locked_run, prepare_workdir, run_cli)
from runkit.config import add_config_arguments, set_fields
from runkit.errors import UserInputError

__all__ = ["build_parser", "check_key_arguments", "config_from_args", "main", "train_and_evaluate"]

DEFAULT_KEY_NAME = "client_secret.key"


def build_parser() -> argparse.ArgumentParser:
  p = ArgumentParser(prog="infl-train", description=__doc__)
  groups = add_config_arguments(p, TrainConfig, choices={"task": sorted(TASKS)})
  groups["key"].add_argument("--key-file", help="the clients' secret key; created if missing, from the OS's secure "
                             f"random source (default: WORKDIR/{DEFAULT_KEY_NAME})")
  groups["key"].add_argument("--key-seed", type=_key_seed, help="make a newly created key from this integer: "
                             "reproducible but INSECURE: anyone who knows the seed rebuilds the key (default: 32 "
                             "bytes from the OS's secure random source)")
  groups["key"].add_argument("--overwrite-key", action="store_true", help="replace an existing key file with a new key")
  groups["key"].add_argument("--allow-shared-key-file", action="store_true", help="accept a key file that group or "
                             "others may read (refused by default: chmod 600 it)")
  p.add_argument("--workdir", required=True, help="folder for checkpoints, metrics.jsonl and summary.json")
  p.add_argument("--resume", action="store_true", help="continue the run in --workdir from its last checkpoint")
  add_compile_cache_argument(p)
  multi = p.add_argument_group("multi-process simulation", "one run over several processes (jax.distributed; "
                               "classification): start every process with the same options, each with its own "
                               "--process-id")
  multi.add_argument("--coordinator-address", metavar="HOST:PORT", help="where process 0 serves the "
                     "coordination service, e.g. 10.0.0.1:1234")
  multi.add_argument("--num-processes", type=int, metavar="N", help="how many processes run the simulation")
  multi.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0..N-1 (0 writes the "
                     "records)")
  return p


def _key_seed(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
  if not 0 <= value < 2**256:
    raise argparse.ArgumentTypeError(f"must be an integer >= 0 (and < 2**256), got {value}")
  return value


def check_key_arguments(args: argparse.Namespace) -> None:
  """Refuses key options that contradict each other, before anything is read or written."""
  if args.key_file is not None and not args.key_file.strip():
    raise UserInputError(f"--key-file is empty; name a file for the key, or drop --key-file to keep it in "
                         f"WORKDIR/{DEFAULT_KEY_NAME}")
  if args.overwrite_key and args.resume:
    raise UserInputError("--overwrite-key with --resume would replace the key the run was trained with; drop "
                         "--overwrite-key (a new key needs a new run in another --workdir)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
  """The preset of ``--dataset`` with every option the user set on top, checked."""
  overrides = set_fields(TrainConfig, args)
  dataset = overrides.pop("dataset", TrainConfig.dataset)
  try:
    config = TrainConfig.for_dataset(dataset, **overrides)
    if config.mosaic_anchor is not None and config.mosaic_anchor.lower() == "none":
      config = dataclasses.replace(config, mosaic_anchor=None)
    config.validate()
  except (TypeError, ValueError) as e:
    raise UserInputError(str(e)) from None
  if config.compute_dtype != "float32" and config.task != "classification":
    raise UserInputError(f"--bf16 is available for the classification task, not yet for {config.task!r}; "
                         "drop --bf16")
  return config


def check_distributed_arguments(args: argparse.Namespace, config: TrainConfig) -> bool:
  """Whether the run spans several processes; refuses incomplete or contradictory settings (exit 2)."""
  from infl_jax.federated.distributed import check_settings

  multi = check_settings(args.coordinator_address, args.num_processes, args.process_id)
  if multi and config.task != "classification":
    raise UserInputError(f"a multi-process run is available for the classification task, not yet for "
                         f"{config.task!r}; drop --coordinator-address/--num-processes/--process-id")
  if multi and config.drift_correction == "scaffold":
    raise UserInputError("--drift-correction scaffold does not run over several processes yet (each would need its "
                         "clients' control variates); drop it or run in one process")
  return multi


def read_shared_key(args: argparse.Namespace, workdir: pathlib.Path):
  """A process other than 0 of a multi-process run: the key file process 0 created or loaded, read only
  (on a host of its own: a copy of it at --key-file)."""
  from infl_jax import keys as keylib

  path = key_path(args, workdir)
  if not path.exists():
    raise UserInputError(f"process {args.process_id}: the clients' key file {path} does not exist on this host; "
                         "copy the run's key file there (or pass --key-file)")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", keylib.InsecureKeyWarning)  # process 0 says it
    return keylib.load_key(path, allow_shared=args.allow_shared_key_file)


def shared_key(args: argparse.Namespace, config: TrainConfig, workdir: pathlib.Path, *, announce=None):
  """The clients' key in every process of a multi-process run: process 0 loads or creates it, then the
  others read it; all must hold the same key (compared by fingerprint, which is public). announce: as
  in ``load_or_create_key``."""
  import numpy as np
  from jax.experimental import multihost_utils

  from infl_jax.federated.distributed import is_primary

  key = load_or_create_key(args, config, workdir, announce=announce) if is_primary() else None
  multihost_utils.sync_global_devices("infl-train: key file ready")
  if key is None:
    key = read_shared_key(args, workdir)
  fingerprints = multihost_utils.process_allgather(np.frombuffer(bytes.fromhex(key.fingerprint), np.uint8))
  if len({bytes(row) for row in np.asarray(fingerprints)}) > 1:
    raise UserInputError(f"process {args.process_id}: the processes hold different keys (key file "
                         f"{key_path(args, workdir)}); give every process a copy of the same key file")
  return key


def key_path(args: argparse.Namespace, workdir: pathlib.Path) -> pathlib.Path:
  return pathlib.Path(args.key_file).expanduser() if args.key_file else workdir / DEFAULT_KEY_NAME


def _unsaved_key(args: argparse.Namespace, path: pathlib.Path, error) -> UserInputError:
  """``save_key``'s refusal in the CLI's words (its own message names overwrite=True, a Python keyword)."""
  name = f"--key-file {path}" if args.key_file else f"the key file {path}"
  cause = error.__cause__
  if isinstance(cause, OSError):  # the folder cannot take the file
    reason = cause.strerror or str(cause)
    if cause.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
      reason = f"{next(p for p in path.parents if p.is_dir())} is not writable ({reason})"
    return UserInputError(f"cannot write {name}: {reason}; point --key-file to a writable folder")
  if path.is_dir():
    return _key_file_is_a_folder(args, path)
  return UserInputError(f"{name} already exists; pass --overwrite-key to replace it, or point --key-file elsewhere")


def _key_file_is_a_folder(args: argparse.Namespace, path: pathlib.Path) -> UserInputError:
  if args.key_file:
    return UserInputError(f"--key-file {path} is a folder, not a key file; name a file in it, e.g. --key-file "
                          f"{path / DEFAULT_KEY_NAME}")
  return UserInputError(f"the key file {path} is a folder; move that folder away, or pass --key-file")


def load_or_create_key(args: argparse.Namespace, config: TrainConfig, workdir: pathlib.Path, *, announce=None):
  """The key at ``key_path``: loaded, or created there (with --overwrite-key: replacing the file).

  announce: called with the line that tells the user a new key was made (default: print it to stderr);
  ``_main`` holds the line back until the run keeps the key (docs/design.md, "Run folders").
  """
  from infl_jax import keys as keylib

  path = key_path(args, workdir)
  if path.is_dir():
    raise _key_file_is_a_folder(args, path)
  if path.is_symlink() and not path.exists() and (args.resume or not args.overwrite_key):
    # A link to nothing: exists() says no, yet the name is taken (save_key would say "already exists").
    broken = f"{path} is a broken symbolic link (to {os.readlink(path)})"
    if args.resume:
      raise UserInputError(f"--resume needs the run's key file, but {broken}; pass --key-file")
    raise UserInputError(f"{'--key-file ' if args.key_file else 'the key file '}{broken}; remove the link, pass "
                         "--overwrite-key to put a new key file in its place, or point --key-file elsewhere")
  if path.exists() and not args.overwrite_key:
    if any(v is not None for v in (args.key_seed, args.key_mode)):
      raise UserInputError(f"{path} already holds a key, so --key-seed/--key-mode would be ignored; drop them, "
                           "pass --overwrite-key to replace the key, or point --key-file elsewhere")
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", keylib.InsecureKeyWarning)  # said below, in one line
      key = keylib.load_key(path, allow_shared=args.allow_shared_key_file)
    if key.seeded:
      print(f"note: {path} holds a seed-derived key: reproducible but insecure (anyone who knows the seed "
            "rebuilds it)", file=sys.stderr)
    return key
  if args.resume and not path.exists():
    raise UserInputError(f"--resume needs the run's key file, but {path} does not exist; pass --key-file")
  try:
    key = keylib.generate_key(args.key_seed, mode=config.key_mode, version=config.key_version)
  except ValueError as e:  # e.g. a negative seed
    raise UserInputError(f"--key-seed/--key-mode: {e}") from None
  try:
    keylib.save_key(key, path, overwrite=args.overwrite_key)
  except keylib.KeyFileError as e:
    raise _unsaved_key(args, path, e) from None
  insecure = "; made from --key-seed: reproducible but INSECURE" if key.seeded else ""
  line = (f"created a new secret key in {path} (owner-only, fingerprint {key.fingerprint}{insecure}); keep it with "
          "the clients, never with the server")
  if announce is None:
    print(line, file=sys.stderr)
  else:
    announce(line)
  return key


def train_and_evaluate(config: TrainConfig, workdir, key, **kwargs) -> dict:
  """The dispatcher: runs ``config.task``'s runner (``resume``, ``stop_after_round``, ``show_progress``
  pass through) and returns its summary."""
  if config.task not in TASKS:
    raise UserInputError(f"unknown task {config.task!r}; choose --task from {', '.join(sorted(TASKS))}")
  # The run records its key by fingerprint (a resume must match it), never by anything that rebuilds it
  # (docs/design.md, "Keys").
  config = dataclasses.replace(config, key_mode=key.mode, key_fingerprint=key.fingerprint)
  summary = TASKS[config.task].run(config, workdir, key, **kwargs)
  if "config" in summary:  # a finished run, whose summary.json the runner wrote
    summary = write_summary(workdir, {**summary, "key": key.public_record()})
  return summary


def _main(argv=None) -> None:
  args = build_parser().parse_args(argv)
  check_key_arguments(args)
  config = config_from_args(args)
  multi_process = check_distributed_arguments(args, config)
  # Checked here to refuse early (before the runtime starts), and again under the workdir's lock.
  workdir = prepare_workdir(args.workdir, resume=args.resume, create=False)
  if multi_process:  # before anything touches a device
    from infl_jax.federated.distributed import initialize
    initialize(args.coordinator_address, args.num_processes, args.process_id)
  enable_compilation_cache(args.compile_cache)
  primary = not multi_process or args.process_id == 0
  # One run at a time in the workdir (its lock), and a run that fails before its first checkpoint (bad
  # data, a wrong --label-key) takes back the key file and folders it made: left behind, the key made
  # the next run with --key-seed refuse to start. In a multi-process run only process 0 writes there,
  # so only it locks the folder and takes anything back.
  run_folder = (locked_run(workdir, resume=args.resume, files=[key_path(args, workdir)]) if primary
                else contextlib.nullcontext(workdir))
  created, finished = [], False  # a new key is announced only once the run keeps it
  try:
    with run_folder:
      key = (shared_key(args, config, workdir, announce=created.append) if multi_process
             else load_or_create_key(args, config, workdir, announce=created.append))
      summary = train_and_evaluate(config, workdir, key, resume=args.resume)
      finished = True
  finally:
    # Kept once the run finished or wrote a checkpoint (then a failure or Ctrl-C keeps it too); a run that
    # failed before took it back, and a line about a key that no longer exists would only mislead.
    if created and (finished or has_checkpoint(workdir)):
      print(created[0], file=sys.stderr)
  if not primary:
    return
  print(TASKS[config.task].format_summary(summary))
  written = [workdir / "summary.json", workdir / "metrics.jsonl"] + ([summary["h5ad"]] if "h5ad" in summary else [])
  print(f"wrote {', '.join(map(str, written))}")


def main(argv=None) -> int:
  return run_cli(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
