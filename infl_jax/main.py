"""``infl-train``: federated INFL training on a built-in data set or an .h5ad file."""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

from infl_jax.config import TrainConfig
from infl_jax.tasks.registry import TASKS
from runkit.cli import prepare_workdir, run_cli
from runkit.config import add_config_arguments, set_fields
from runkit.errors import UserInputError

__all__ = ["build_parser", "config_from_args", "main", "train_and_evaluate"]

DEFAULT_KEY_NAME = "client_secret.key"


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="infl-train", description=__doc__)
  groups = add_config_arguments(p, TrainConfig, choices={"task": sorted(TASKS)})
  groups["key"].add_argument("--key-file", help="the clients' secret key; created if missing "
                             f"(default: WORKDIR/{DEFAULT_KEY_NAME})")
  groups["key"].add_argument("--overwrite-key", action="store_true", help="replace an existing key file with a new key")
  p.add_argument("--workdir", required=True, help="folder for checkpoints, metrics.jsonl and summary.json")
  p.add_argument("--resume", action="store_true", help="continue the run in --workdir from its last checkpoint")
  return p


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


def load_or_create_key(args: argparse.Namespace, config: TrainConfig, workdir: pathlib.Path):
  from infl_jax import keys as keylib

  path = pathlib.Path(args.key_file) if args.key_file else workdir / DEFAULT_KEY_NAME
  if path.exists() and not args.overwrite_key:
    if any(v is not None for v in (args.key_seed, args.key_mode)):
      raise UserInputError(f"{path} already holds a key, so --key-seed/--key-mode would be ignored; drop them, "
                           "pass --overwrite-key to replace the key, or point --key-file elsewhere")
    return keylib.load_key(path)
  if args.resume and not path.exists():
    raise UserInputError(f"--resume needs the run's key file, but {path} does not exist; pass --key-file")
  key = keylib.generate_key(config.key_seed, mode=config.key_mode, version=config.key_version)
  keylib.save_key(key, path, overwrite=args.overwrite_key)
  print(f"created a new secret key in {path} (owner-only); keep it with the clients, never with the server",
        file=sys.stderr)
  return key


def train_and_evaluate(config: TrainConfig, workdir, key, **kwargs) -> dict:
  """The dispatcher: runs ``config.task``'s runner (``resume``, ``stop_after_round``, ``show_progress``
  pass through) and returns its summary."""
  if config.task not in TASKS:
    raise UserInputError(f"unknown task {config.task!r}; choose --task from {', '.join(sorted(TASKS))}")
  return TASKS[config.task].run(config, workdir, key, **kwargs)


def _main(argv=None) -> None:
  args = build_parser().parse_args(argv)
  config = config_from_args(args)
  workdir = prepare_workdir(args.workdir, resume=args.resume)
  key = load_or_create_key(args, config, workdir)
  summary = train_and_evaluate(config, workdir, key, resume=args.resume)
  print(TASKS[config.task].format_summary(summary))
  written = [workdir / "summary.json", workdir / "metrics.jsonl"] + ([summary["h5ad"]] if "h5ad" in summary else [])
  print(f"wrote {', '.join(map(str, written))}")


def main(argv=None) -> int:
  return run_cli(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
