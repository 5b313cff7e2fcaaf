"""``infl-privacy``: the INFL privacy evaluation (attacks, DP-FedAvg, membership inference) on a data set.

Writes WORKDIR/results.json, table.csv, table.md, privacy_utility_lambda.png and privacy_utility_dp.png.
"""

from __future__ import annotations

import argparse
import sys

from infl_jax.common.cli import UserInputError, run_cli


def _csv(kind):
  def parse(text: str):
    try:
      return tuple(kind(t) for t in text.split(",") if t.strip())
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s such as 0,5,20, got {text!r}")
  return parse


def build_parser() -> argparse.ArgumentParser:
  from infl_jax.privacy.evaluate import PrivacyConfig

  d = PrivacyConfig()
  p = argparse.ArgumentParser(prog="infl-privacy", description=__doc__,
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--dataset", default=d.dataset, help="built-in data set (proteomics, pbmc) or an .h5ad path")
  p.add_argument("--workdir", required=True, help="folder for the results, table and plots")
  p.add_argument("--rounds", type=int, help="federated rounds (default: the data set's preset)")
  p.add_argument("--local-epochs", type=int, help="local epochs per round (default: the preset)")
  p.add_argument("--lambdas", type=_csv(float), default=d.lambdas, help="key strengths of the sweep")
  p.add_argument("--main-lambda", type=float, help="lambda attacked by every attacker (default: the preset's)")
  p.add_argument("--dp-epsilons", type=_csv(float), default=d.dp_epsilons, help="target epsilons of DP-FedAvg")
  p.add_argument("--dp-delta", type=float, default=d.dp_delta)
  p.add_argument("--dp-clip-norm", type=float, default=d.dp_clip_norm)
  p.add_argument("--num-targets", type=int, default=d.num_targets, help="held-out samples attacked")
  p.add_argument("--inversion-steps", type=int, default=d.inversion_steps)
  p.add_argument("--inversion-restarts", type=int, default=d.inversion_restarts)
  p.add_argument("--inversion-lr", type=float, default=d.inversion_lr)
  p.add_argument("--inversion-optimizer", choices=["normalized_gd", "adam"], default=d.inversion_optimizer)
  p.add_argument("--inversion-l2-weight", type=float, default=d.inversion_l2_weight,
                 help="weight of the (relative) L2 term next to 1 - cosine")
  p.add_argument("--adaptive-samples", type=_csv(int), default=d.adaptive_samples,
                 help="labelled samples the adaptive attacker fits the key vector on")
  p.add_argument("--num-shadows", type=int, default=d.num_shadows, help="LiRA shadow models (0: no LiRA)")
  p.add_argument("--shadow-epochs", type=int, default=d.shadow_epochs)
  p.add_argument("--no-hardened", dest="hardened", action="store_false", help="skip the hardened variant")
  p.add_argument("--key-seed", type=int, default=d.key_seed)
  p.add_argument("--key-mode", default=d.key_mode, choices=["uniform", "normal", "ones", "zeros", "constant"])
  p.add_argument("--seed", type=int, default=d.seed)
  p.add_argument("--no-progress", dest="progress", action="store_false")
  return p


def run(argv=None) -> int:
  args = build_parser().parse_args(argv)
  from infl_jax.privacy.evaluate import PrivacyConfig, run_evaluation

  values = {k: v for k, v in vars(args).items() if k not in ("workdir", "progress")}
  try:
    config = PrivacyConfig(**values)
  except TypeError as error:
    raise UserInputError(f"bad settings: {error}") from error
  results = run_evaluation(config, args.workdir, show_progress=args.progress)
  print((__import__("pathlib").Path(args.workdir) / "table.md").read_text())
  print(f"wrote {args.workdir}/table.csv, table.md, results.json and the privacy-utility plots "
        f"({results['total_seconds']:.0f} s)", file=sys.stderr)
  return 0


def main(argv=None) -> int:
  """The console script: exit code 2 and a one-line message on bad input."""
  return run_cli(run, argv)


if __name__ == "__main__":
  sys.exit(main())
