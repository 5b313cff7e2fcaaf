"""`lsanet-train`: train LSANet or one of its ablations on a MedMNIST dataset or your own images.

  lsanet-train --flag bloodmnist --workdir runs/blood             # LSANet, ResNet-18, official recipe
  lsanet-train --flag digits --epochs 8 --width 0.125 --workdir runs/digits   # no MedMNIST needed
  lsanet-train --data my_images/ --workdir runs/mine              # your own images: DIR/<class>/*.png
  lsanet-train --data my_set.npz --workdir runs/mine              # or an npz in MedMNIST's layout
  lsanet-train --flag bloodmnist --source tfds --tfds-data-dir ~/tensorflow_datasets --workdir runs/b
  lsanet-train ... --variant plain|ds|ds_lsa|lsanet               # the ablation ladder
  lsanet-train ... --resume                                       # continue an interrupted run

Outputs in --workdir: metrics.jsonl (one line per epoch; validation scores every --eval-every epochs),
summary.json (test ACC/AUC of every head at the best validation epoch, the data's source and seeds),
curves.png, lsa_weights.png, checkpoints/ (orbax).
"""
from __future__ import annotations

import argparse
import sys

from runkit.cli import (ArgumentParser, add_compile_cache_argument, enable_compilation_cache, locked_run,
                        prepare_workdir, run_cli)
from runkit.config import add_config_arguments, set_fields
from runkit.errors import UserInputError

from lsanet_jax import steps, train
from lsanet_jax.config import VARIANTS, TrainConfig
from lsanet_jax.data.medmnist import INFO
from lsanet_jax.data.own_data import TASKS as OWN_TASKS


def add_run_arguments(parser: argparse.ArgumentParser, config_cls, unit: str) -> dict:
  """The options lsanet-train and lsanet-federated share: config_cls's settings, --variant, --workdir, --resume,
  --stop-after-<unit>s and --compile-cache. Returns the --help groups."""
  # --task lists the tasks only; its empty default (infer from the labels) is no value to type.
  groups = add_config_arguments(parser, config_cls, choices={"task": list(OWN_TASKS)})
  groups["model"].add_argument("--variant", default="lsanet", choices=list(VARIANTS),
                               help="ablation rung: plain backbone, + deep supervision (ds), + LSA, + synergy "
                                    "(default: lsanet)")
  groups["run"].add_argument("--workdir", required=True, help="folder for metrics, summary, plots, checkpoints")
  groups["run"].add_argument("--resume", action="store_true", help="continue the run in --workdir")
  groups["run"].add_argument(f"--stop-after-{unit}s", type=int, default=None,
                             help=f"stop (checkpointed) after this many {unit}s of this invocation; --resume later "
                             f"(default: all {unit}s)")
  add_compile_cache_argument(groups["run"])
  return groups


def build_parser() -> argparse.ArgumentParser:
  parser = ArgumentParser(
      prog="lsanet-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  groups = add_run_arguments(parser, TrainConfig, "epoch")
  groups["data"].add_argument("--download", action="store_true",
                              help="fetch the npz from Zenodo (MD5-verified) if it is not in --root")
  groups["data"].add_argument("--download-url-template", default=None,
                              help="mirror URL with a {filename} placeholder (default: the Zenodo record)")
  return parser


def config_from_args(args: argparse.Namespace, config_cls=TrainConfig) -> TrainConfig:
  """The --variant preset with the settings given on the command line, validated."""
  try:
    config = config_cls.for_variant(args.variant, **set_fields(config_cls, args))
    config.validate()
  except ValueError as e:
    raise UserInputError(str(e)) from None
  return config


def run(argv=None) -> dict | None:
  """The whole command; returns the summary (None when stopped early by --stop-after-epochs)."""
  args = build_parser().parse_args(argv)
  config = config_from_args(args)
  if args.stop_after_epochs is not None and args.stop_after_epochs < 1:
    raise UserInputError("--stop-after-epochs must be at least 1")
  if config.data_parallel:
    steps.data_parallel_mesh(config.batch_size)  # refuses an indivisible batch before anything is written
  if args.download and config.data:
    raise UserInputError("--download fetches a MedMNIST --flag; --data is your own file or folder: drop --download")
  if args.download and not INFO[config.flag].get("builtin"):
    from lsanet_jax.data.download import ZENODO_URL_TEMPLATE, download_medmnist
    download_medmnist(config.flag, config.root, config.size,
                      url_template=args.download_url_template or ZENODO_URL_TEMPLATE)
  workdir = prepare_workdir(args.workdir, resume=args.resume, create=False)  # again under the lock
  enable_compilation_cache(args.compile_cache)
  # One run at a time in the workdir (its lock), and a run that fails before its first checkpoint leaves
  # the workdir as it found it (no empty checkpoints/ or metrics.jsonl that would make the next run look
  # like a resume).
  with locked_run(workdir, resume=args.resume):
    summary = train.train_and_evaluate(config, workdir, variant=args.variant, resume=args.resume,
                                       stop_after_epochs=args.stop_after_epochs)
  if summary is not None:
    head = summary["heads"][summary["selection_head"]]
    print(f"best epoch {summary['best_epoch']}: test ACC {head['test_acc']:.4f} AUC {head['test_auc']:.4f} "
          f"({summary['selection_head']} head); summary in {workdir / 'summary.json'}")
  return summary


def main(argv=None) -> int:
  return run_cli(run, argv)


if __name__ == "__main__":
  sys.exit(main())
