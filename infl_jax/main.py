"""``infl-train``: federated INFL training on a built-in data set or an .h5ad file."""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

from infl_jax.common.cli import UserInputError, prepare_workdir, run_cli
from infl_jax.config import TrainConfig

DEFAULT_KEY_NAME = "client_secret.key"


def _csv_ints(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(t) for t in text.split(",") if t)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 256,128, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="infl-train", description=__doc__,
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--task", choices=["classification", "multiomics", "spatial", "perturbation"],
                 help="what to learn (default: the data set's preset, else classification); see docs/tasks.md")
  p.add_argument("--dataset", default="proteomics",
                 help="built-in data set (proteomics, pbmc, pbmc_sites, pbmc_panels, nutrimouse, spatial, perturbation_sim) or a path"
                      " to an .h5ad file")
  p.add_argument("--label-key", help="obs column holding the class label (built-ins have a default)")
  p.add_argument("--client-key", help="obs column whose values are the clients (site, plate, patient)")
  p.add_argument("--n-clients", type=int, help="number of clients (default: the data set's preset)")
  p.add_argument("--partition", choices=["column", "iid", "dirichlet"], help="how samples go to clients")
  p.add_argument("--alpha", type=float, help="Dirichlet concentration for --partition dirichlet")
  p.add_argument("--n-top-features", type=int, help="keep the most variable features (fitted on training data)")
  p.add_argument("--model", choices=["proteomics", "mlp"])
  p.add_argument("--hidden", type=_csv_ints, help="hidden sizes of the MLP, e.g. 256,128")
  p.add_argument("--key-strength", "--lambda", dest="key_strength", type=float, help="lambda, the privacy knob")
  p.add_argument("--variant", choices=["modulation", "positional"])
  p.add_argument("--rounds", type=int)
  p.add_argument("--local-epochs", type=int)
  p.add_argument("--batch-size", type=int)
  p.add_argument("--client-fraction", type=float, help="share of clients sampled each round")
  p.add_argument("--learning-rate", type=float)
  p.add_argument("--weight-decay", type=float)
  p.add_argument("--dropout", type=float)
  p.add_argument("--weighting", choices=["samples", "uniform"], help="FedAvg weights: n_k or equal")
  p.add_argument("--server-optimizer", choices=["fedavg", "fedadam", "fedyogi"])
  p.add_argument("--server-learning-rate", type=float)
  p.add_argument("--prox-mu", type=float, help="FedProx proximal weight (0: plain FedAvg)")
  p.add_argument("--key-file", help=f"the clients' secret key; created if missing (default: WORKDIR/{DEFAULT_KEY_NAME})")
  p.add_argument("--key-seed", type=int, help="seed of a newly created key")
  p.add_argument("--key-mode", choices=["uniform", "normal", "ones", "zeros", "constant"])
  p.add_argument("--key-version", type=int)
  p.add_argument("--overwrite-key", action="store_true", help="replace an existing key file with a new key")
  p.add_argument("--seed", type=int, help="seed of the data split, partition, initialisation and training")
  p.add_argument("--eval-every", type=int)
  p.add_argument("--checkpoint-every", type=int)
  p.add_argument("--keep-checkpoints", type=int)
  p.add_argument("--no-central-baseline", dest="central_baseline", action="store_const", const=False)
  p.add_argument("--embed-dim", type=int, help="clustering tasks: size of the learned embedding")
  p.add_argument("--cluster-method", choices=["kmeans", "leiden"], help="clustering tasks: how embeddings are clustered")
  p.add_argument("--graph-neighbors", type=int, help="spatial: neighbours per spot; perturbation: co-expression neighbours per gene")
  p.add_argument("--mosaic-anchor", help="multiomics: the modality whose code is a sample's embedding where present"
                 " (others are aligned to it); 'none': the mean of the present modalities' codes (default"
                 " except for nutrimouse, whose preset anchors on lipids)")
  p.add_argument("--align-weight", type=float, help="multiomics: weight pulling each modality's code to the joint code")
  p.add_argument("--isometry-weight", type=float,
                 help="multiomics: weight keeping each modality's pairwise distances in its code")
  p.add_argument("--bf16", dest="compute_dtype", action="store_const", const="bfloat16",
                 help="mixed precision: bfloat16 compute, float32 parameters, BatchNorm statistics and loss "
                      "(classification)")
  p.add_argument("--shard-clients", dest="shard_clients", action="store_const", const=True,
                 help="split the clients over all local devices (one round, each device training its share)")
  p.add_argument("--workdir", required=True, help="folder for checkpoints, metrics.jsonl and summary.json")
  p.add_argument("--resume", action="store_true", help="continue the run in --workdir from its last checkpoint")
  return p


def load_or_create_key(args, config: TrainConfig, workdir: pathlib.Path):
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


def _main(argv=None) -> None:
  from infl_jax import train

  args = build_parser().parse_args(argv)
  fields = {f for f in TrainConfig.__dataclass_fields__}
  overrides = {k: v for k, v in vars(args).items() if k in fields and k != "dataset"}
  try:
    config = TrainConfig.for_dataset(args.dataset, **overrides)
  except TypeError as e:
    raise UserInputError(str(e))
  if args.mosaic_anchor is not None and args.mosaic_anchor.lower() == "none":
    config = dataclasses.replace(config, mosaic_anchor=None)
  if config.compute_dtype != "float32" and config.task != "classification":
    raise UserInputError(f"--bf16 is available for the classification task, not yet for {config.task!r}; "
                         "drop --bf16")
  workdir = prepare_workdir(args.workdir, resume=args.resume)
  key = load_or_create_key(args, config, workdir)
  if config.task != "classification":
    from infl_jax.tasks import runners

    summary = runners.train_and_evaluate(config, workdir, key, resume=args.resume)
    print(runners.format_summary(summary))
    print(f"wrote {workdir / 'summary.json'}, {workdir / 'metrics.jsonl'} and {summary['h5ad']}")
    return
  summary = train.train_and_evaluate(config, workdir, key, resume=args.resume)
  print(train.format_summary(summary))
  print(f"wrote {workdir / 'summary.json'} and {workdir / 'metrics.jsonl'}")


def main(argv=None) -> int:
  return run_cli(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
