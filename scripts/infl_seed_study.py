"""Test accuracy of an infl-train run over several seeds, as the figures in the README were made.

    python scripts/infl_seed_study.py --seeds 0 1 2 3 4 -- --dataset proteomics
    python scripts/infl_seed_study.py --seeds 0 1 2 3 4 -- --dataset pbmc --partition label-skew \
        --classes-per-client 2
    python scripts/infl_seed_study.py --seeds 0 1 2 3 4 --compare-schemes -- --dataset proteomics

Everything after ``--`` is infl-train's flags (without --workdir and --seed; the seed sets the split,
the partition, the initialisation, the training and the key). Prints one JSON line per seed, then one
with mean, std (ddof 1) and the per-seed values. ``--compare-schemes`` runs every seed under both key
schemes (``--key-scheme faithful`` and ``hardened``, the same key) and adds the paired difference of
the right-key accuracies. ``--adaptive-samples N`` (classification) adds ``adaptive_nN``: the test accuracy of
infl-privacy's adaptive attacker, who holds the server's weights and N labelled validation samples
(``adaptive_accuracy``). ``chance`` is the largest class's share of the test split.
"""

import argparse
import dataclasses
import json
import pathlib
import tempfile

import jax
import numpy as np

from infl_jax import keys as keylib
from infl_jax.attacks import adaptive, gradient_inversion as gi
from infl_jax.config import TrainConfig
from infl_jax.federated import ServerState, algorithm_from_config, global_variables
from infl_jax.main import build_parser, config_from_args, train_and_evaluate
from infl_jax.privacy.attack_models import adaptive_key_vector, attack_programs, split_test_accuracy
from infl_jax.tasks.classification import classification_task, create_model, init_variables, load_data
from infl_jax.tasks.common import resume_settings
from runkit.checkpoint import Checkpointer
from runkit.cli import CHECKPOINT_SUBDIR
from runkit.errors import UserInputError


def config_for_seed(train_flags: list[str], seed: int) -> TrainConfig:
  args = build_parser().parse_args([*train_flags, "--workdir", "unused", "--seed", str(seed)])
  return dataclasses.replace(config_from_args(args), checkpoint_every=10**6)


def trained_classifier(config: TrainConfig, workdir, key: keylib.SecretKey, split):
  """``(model, variables)`` of the finished classification run in ``workdir``: the global model the key study
  evaluated (the round selected on validation), restored from the run's last checkpoint into a freshly
  initialised state of the same settings, as a resume would."""
  # train_and_evaluate records the key's mode and fingerprint in the settings the checkpoint is checked against.
  config = dataclasses.replace(config, key_mode=key.mode, key_fingerprint=key.fingerprint)
  model = create_model(config, split.n_classes)
  algo = algorithm_from_config(config, classification_task(model))
  rng = jax.random.key(0)  # the template's values are overwritten; only its structure counts
  template = algo.init(init_variables(model, split.n_features, rng), rng, key_version=config.key_version)._asdict()
  fingerprint, defaults = resume_settings(config)
  checkpointer = Checkpointer(pathlib.Path(workdir) / CHECKPOINT_SUBDIR, config=fingerprint,
                              config_defaults=defaults)
  try:
    saved, _ = checkpointer.restore({"state": template, "selected": template})
  finally:
    checkpointer.close()
  return model, global_variables(ServerState(**saved["selected"]))


def attacker_samples(split, n: int, seed: int) -> np.ndarray:
  """Indices into the validation split of the ``n`` labelled samples the adaptive attacker holds, drawn with
  ``seed``. Validation, as in infl-privacy: client data that could leak to the server, never the test split the
  attacker is scored on."""
  if not 0 <= n <= len(split.val_y):
    raise UserInputError(f"--adaptive-samples {n}: the validation split has {len(split.val_y)} samples; "
                         f"choose 0 (the prior alone) to {len(split.val_y)}")
  # A stream of its own (the split and the training use the seed itself).
  return np.random.default_rng([seed, 0xADA]).choice(len(split.val_y), n, replace=False)


def adaptive_accuracy(config: TrainConfig, workdir, key: keylib.SecretKey, n: int) -> float:
  """Test accuracy of infl-privacy's adaptive attacker against the finished run in ``workdir``.

  The attacker holds the server's weights (``trained_classifier``) and ``n`` labelled validation samples
  (``attacker_samples``), raw: under ``hardened`` it does not know the clients' scramble, and under ``faithful``
  raw features are the model's inputs anyway. It fits the key vector from its prior (the mean of keys of the
  key's mode from its own seeds) on them and classifies the raw test split, with infl-privacy's functions
  (``privacy.attack_models``), so both measure the same attacker.
  """
  split = load_data(config)  # raw features: the run scrambled its own copy
  model, variables = trained_classifier(config, workdir, key, split)
  chosen = attacker_samples(split, n, config.seed)
  k = adaptive_key_vector(model, variables, split.val_x[chosen].astype(np.float32), split.val_y[chosen],
                          adaptive.prior_key_vector(variables, key.mode))
  # The query program infl-privacy scores its attackers with (its inversion settings are not used here).
  programs = attack_programs(model, split.n_features, split.n_classes, gi.InversionConfig())
  return split_test_accuracy(split, programs.logits_with_key_vector(variables, split.test_x.astype(np.float32), k))


def key_study(train_flags: list[str], seed: int, adaptive_samples: int | None = None) -> dict:
  config = config_for_seed(train_flags, seed)
  if adaptive_samples is not None and config.task != "classification":
    raise UserInputError(f"--adaptive-samples attacks classifiers; --task {config.task} has none to attack")
  # A seeded key on purpose: the study reruns each seed exactly (insecure, and never saved).
  key = keylib.generate_key(seed=seed)
  with tempfile.TemporaryDirectory() as workdir:
    summary = train_and_evaluate(config, workdir, key, show_progress=False)
    adaptive_row = ({} if adaptive_samples is None else
                    {f"adaptive_n{adaptive_samples}": adaptive_accuracy(config, workdir, key, adaptive_samples)})
  row = {name: m["accuracy"] for name, m in summary["test"].items()}
  row.update(adaptive_row)
  if "central_right_key_test" in summary:
    row["central_right_key"] = summary["central_right_key_test"]["accuracy"]
  if "majority_class_test_fraction" in summary:
    row["chance"] = summary["majority_class_test_fraction"]
  row["evaluated_round"] = summary["evaluated_round"]
  return row


def compare_schemes(train_flags: list[str], seed: int, adaptive_samples: int | None = None) -> dict:
  """The key study under the faithful and under the hardened key scheme, same seed and key: a paired row."""
  rows = {scheme: key_study([*train_flags, "--key-scheme", scheme], seed, adaptive_samples)
          for scheme in ("faithful", "hardened")}
  row = {f"{scheme}_{name}": value for scheme, r in rows.items() for name, value in r.items()
         if name not in ("evaluated_round", "chance")}
  if "chance" in rows["faithful"]:  # the same split under both schemes
    row["chance"] = rows["faithful"]["chance"]
  row["hardened_minus_faithful_right_key"] = rows["hardened"]["right_key"] - rows["faithful"]["right_key"]
  return row


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
  p.add_argument("--compare-schemes", action="store_true",
                 help="run each seed under --key-scheme faithful and hardened (same key) and report the paired difference")
  p.add_argument("--adaptive-samples", type=int, metavar="N",
                 help="also score the adaptive attacker that fits the key vector on N labelled validation samples "
                      "(classification; off by default)")
  p.add_argument("train_flags", nargs=argparse.REMAINDER, help="infl-train flags, after --")
  args = p.parse_args()
  train_flags = [f for f in args.train_flags if f != "--"] or ["--dataset", "proteomics"]
  study = compare_schemes if args.compare_schemes else key_study
  rows = []
  for seed in args.seeds:
    rows.append(study(train_flags, seed, args.adaptive_samples))
    print(json.dumps({"seed": seed, **rows[-1]}), flush=True)
  values = {k: [r[k] for r in rows] for k in rows[0]}
  print(json.dumps({k: {"mean": round(float(np.mean(v)), 3),
                        "std": round(float(np.std(v, ddof=1)), 3) if len(v) > 1 else None,
                        "per_seed": [round(x, 3) for x in v]} for k, v in values.items()}))


if __name__ == "__main__":
  main()
