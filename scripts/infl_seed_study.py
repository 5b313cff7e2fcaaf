"""Test accuracy of an infl-train run over several seeds, as the figures in the README were made.

    python scripts/infl_seed_study.py --seeds 0 1 2 3 4 -- --dataset proteomics
    python scripts/infl_seed_study.py --seeds 0 1 2 3 4 -- --dataset pbmc --partition label-skew \
        --classes-per-client 2
    python scripts/infl_seed_study.py --seeds 0 1 2 3 4 --compare-schemes -- --dataset proteomics

Everything after ``--`` is infl-train's flags (without --workdir and --seed; the seed sets the split,
the partition, the initialisation, the training and the key). Prints one JSON line per seed, then one
with mean, std (ddof 1) and the per-seed values. ``--compare-schemes`` runs every seed under both key
schemes (``--key-scheme faithful`` and ``hardened``, the same key) and adds the paired difference of
the right-key accuracies.
"""

import argparse
import dataclasses
import json
import tempfile

import numpy as np

from infl_jax import keys as keylib
from infl_jax.config import TrainConfig
from infl_jax.main import build_parser, config_from_args, train_and_evaluate


def config_for_seed(train_flags: list[str], seed: int) -> TrainConfig:
  args = build_parser().parse_args([*train_flags, "--workdir", "unused", "--seed", str(seed)])
  return dataclasses.replace(config_from_args(args), checkpoint_every=10**6)


def key_study(train_flags: list[str], seed: int) -> dict:
  config = config_for_seed(train_flags, seed)
  with tempfile.TemporaryDirectory() as workdir:
    # A seeded key on purpose: the study reruns each seed exactly (insecure, and never saved).
    summary = train_and_evaluate(config, workdir, keylib.generate_key(seed=seed), show_progress=False)
  row = {name: m["accuracy"] for name, m in summary["test"].items()}
  if "central_right_key_test" in summary:
    row["central_right_key"] = summary["central_right_key_test"]["accuracy"]
  row["evaluated_round"] = summary["evaluated_round"]
  return row


def compare_schemes(train_flags: list[str], seed: int) -> dict:
  """The key study under the faithful and under the hardened key scheme, same seed and key: a paired row."""
  rows = {scheme: key_study([*train_flags, "--key-scheme", scheme], seed) for scheme in ("faithful", "hardened")}
  row = {f"{scheme}_{name}": value for scheme, r in rows.items() for name, value in r.items()
         if name != "evaluated_round"}
  row["hardened_minus_faithful_right_key"] = rows["hardened"]["right_key"] - rows["faithful"]["right_key"]
  return row


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
  p.add_argument("--compare-schemes", action="store_true",
                 help="run each seed under --key-scheme faithful and hardened (same key) and report the paired difference")
  p.add_argument("train_flags", nargs=argparse.REMAINDER, help="infl-train flags, after --")
  args = p.parse_args()
  train_flags = [f for f in args.train_flags if f != "--"] or ["--dataset", "proteomics"]
  study = compare_schemes if args.compare_schemes else key_study
  rows = []
  for seed in args.seeds:
    rows.append(study(train_flags, seed))
    print(json.dumps({"seed": seed, **rows[-1]}), flush=True)
  values = {k: [r[k] for r in rows] for k in rows[0]}
  print(json.dumps({k: {"mean": round(float(np.mean(v)), 3),
                        "std": round(float(np.std(v, ddof=1)), 3) if len(v) > 1 else None,
                        "per_seed": [round(x, 3) for x in v]} for k, v in values.items()}))


if __name__ == "__main__":
  main()
