"""``infl-privacy``: the INFL privacy evaluation (attacks, DP-FedAvg, membership inference) on a data set.

Writes WORKDIR/results.json, table.csv, table.md, privacy_utility_lambda.png and privacy_utility_dp.png
(and seed_search.png when the seed search runs).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from infl_jax.privacy.experiment import PrivacyConfig
from infl_jax.privacy.runner import run_evaluation
from runkit.cli import run_cli
from runkit.config import add_config_arguments, set_fields

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="infl-privacy", description=__doc__)
  add_config_arguments(p, PrivacyConfig)
  p.add_argument("--workdir", required=True, help="folder for the results, table and plots")
  p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
  return p


def run(argv=None) -> int:
  args = build_parser().parse_args(argv)
  config = PrivacyConfig(**set_fields(PrivacyConfig, args)).validate()
  results = run_evaluation(config, args.workdir, show_progress=args.progress)
  print((pathlib.Path(args.workdir) / "table.md").read_text())
  print(f"wrote {args.workdir}/table.csv, table.md, results.json and the privacy-utility plots "
        f"({results['total_seconds']:.0f} s)", file=sys.stderr)
  return 0


def main(argv=None) -> int:
  """The console script: exit code 2 and a one-line message on bad input."""
  return run_cli(run, argv)


if __name__ == "__main__":
  sys.exit(main())
