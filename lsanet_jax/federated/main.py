"""`lsanet-federated`: LSANet (or a rung of its ablation ladder) trained by simulated hospitals together.

  lsanet-federated --flag digits --width 0.125 --rounds 30 --workdir runs/fed_digits   # no MedMNIST needed
  lsanet-federated --flag bloodmnist --n-clients 10 --alpha 0.5 --label-fraction 0.1 --workdir runs/blood
  lsanet-federated --data my_images/ --n-clients 5 --partition iid --workdir runs/mine   # your own images
  lsanet-federated --data sites.npz --partition sites --batch-norm fedbn --workdir runs/s  # npz with train_sites
  lsanet-federated ... --variant plain|ds|ds_lsa|lsanet     # the ablation ladder, as lsanet-train
  lsanet-federated ... --resume                             # continue an interrupted run

The data, model and label options are lsanet-train's; the federated group says how the training images are
spread over hospitals and how they train together. Outputs in --workdir: metrics.jsonl (one line per round),
summary.json (test ACC/AUC of every head at the best validation round, the hospitals), curves.png, checkpoints/.
"""
from __future__ import annotations

import argparse
import sys

from runkit.cli import ArgumentParser, enable_compilation_cache, locked_run, prepare_workdir, run_cli
from runkit.errors import UserInputError

from lsanet_jax.federated import train
from lsanet_jax.federated.config import FederatedConfig
from lsanet_jax.main import add_run_arguments, config_from_args


def build_parser() -> argparse.ArgumentParser:
  parser = ArgumentParser(prog="lsanet-federated", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  add_run_arguments(parser, FederatedConfig, "round")
  return parser


def run(argv=None) -> dict | None:
  """The whole command; returns the summary (None when stopped early by --stop-after-rounds)."""
  args = build_parser().parse_args(argv)
  config = config_from_args(args, FederatedConfig)
  if args.stop_after_rounds is not None and args.stop_after_rounds < 1:
    raise UserInputError("--stop-after-rounds must be at least 1")
  workdir = prepare_workdir(args.workdir, resume=args.resume, create=False)
  enable_compilation_cache(args.compile_cache)
  with locked_run(workdir, resume=args.resume):
    summary = train.train_and_evaluate(config, workdir, variant=args.variant, resume=args.resume,
                                       stop_after_rounds=args.stop_after_rounds)
  if summary is not None:
    head = summary["heads"][summary["selection_head"]]
    print(f"selected round {summary['selected_round']}: test ACC {head['test_acc']:.4f} AUC {head['test_auc']:.4f} "
          f"({summary['selection_head']} head, {len(summary['hospitals'])} hospitals, BatchNorm "
          f"{summary['batch_norm']}); summary in {workdir / 'summary.json'}")
  return summary


def main(argv=None) -> int:
  return run_cli(run, argv)


if __name__ == "__main__":
  sys.exit(main())
