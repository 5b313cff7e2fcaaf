"""The key study of an infl-train run over several seeds, as the figures in the README were made.

    python scripts/infl_seed_study.py --seeds 0 1 2 3 4 -- --dataset proteomics
    python scripts/infl_seed_study.py --seeds 0 1 2 3 4 -- --dataset pbmc --partition label-skew \
        --classes-per-client 2
    python scripts/infl_seed_study.py --seeds 0 1 2 3 4 --compare-schemes -- --dataset proteomics
    python scripts/infl_seed_study.py --seeds 0 1 2 3 4 --compare-schemes -- --dataset spatial
    python scripts/infl_seed_study.py --seeds 0 1 2 3 4 --compare-schemes --schemes hardened mixed -- --dataset pbmc
    python scripts/infl_seed_study.py --seeds 0 --key-seeds 100 101 102 103 104 -- --dataset proteomics

Everything after ``--`` is infl-train's flags (without --workdir and --seed; the seed sets the split,
the partition, the initialisation, the training and the key). Prints one JSON line per seed, then one
with mean, std (ddof 1) and the per-seed values. ``--compare-schemes`` runs every seed under both key
schemes (``--key-scheme faithful`` and ``hardened``, the same key; ``--schemes A B`` picks two others, e.g.
``hardened mixed``) and adds the paired difference of the right-key figures (``B_minus_A_right_key``). ``--key-seeds K...`` keeps each seed's split, initialisation and training randomness
and varies the key instead (one row per seed and key seed): under the hardened scheme the key also scrambles
the inputs, so a seed's figure depends on it, and README command (a), which runs seed 0 with a fresh random
key each time, prints a draw from that spread. ``--adaptive-samples N`` (classification) adds ``adaptive_nN``: the test accuracy of
infl-privacy's adaptive attacker, who holds the server's weights and N labelled validation samples
(``adaptive_accuracy``).

Each row holds one headline figure per key condition (``right_key``, ``wrong_key_same_mode``,
``wrong_key_other_mode``, ``no_inr``), named by ``metric``, and the task's simple reference, which the key
scheme does not touch (``headline``):
- classification: test accuracy; ``chance`` is the largest class's share of the test split.
- spatial: ``ari``, the adjusted Rand index of the embedding's clusters against the annotated domains;
  ``baseline_pca_kmeans`` is the scanpy-style PCA + k-means on the log expression (``scanpy_style_pca_kmeans``).
- multiomics: ``ari_<label>``, the ARI of the mosaic embedding's clusters (every sample, whatever modalities
  its client holds) against ``diet`` on nutrimouse (an .h5ad's one label otherwise); ``baseline_kmeans_<m>``
  is k-means on modality m alone, over the samples of the clients that hold it. Not ``genotype``: on
  nutrimouse its ARI is near 0 for the federated model and the k-means baselines alike, so it cannot tell
  the key conditions apart.
- perturbation: ``pearson_delta``, the Pearson correlation of predicted and true change from control over every
  held-out condition (``held_out[...]["all"]``); ``baseline_sum_of_singles_combos`` is the sum of the two single
  effects, on the held-out combinations whose both singles were trained (a subset, so a reference, not a pair).
ARI rather than NMI: it is 0 in expectation for a random clustering whatever the number of clusters, so a
keyless condition near 0 reads as "nothing learned".
"""

import argparse
import dataclasses
import json
import pathlib
import sys
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
from infl_jax.tasks.label_skew import fit_to_federation
from runkit.checkpoint import Checkpointer
from runkit.cli import CHECKPOINT_SUBDIR, run_cli
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
  template = algo.init(init_variables(model, split.n_features, rng), rng, key_version=config.key_version,
                       num_clients=len(split.client_sizes()))._asdict()
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
  config, _ = fit_to_federation(config, split)  # the algorithm the run resolved --drift-correction auto to
  model, variables = trained_classifier(config, workdir, key, split)
  chosen = attacker_samples(split, n, config.seed)
  k = adaptive_key_vector(model, variables, split.val_x[chosen].astype(np.float32), split.val_y[chosen],
                          adaptive.prior_key_vector(variables, key.mode))
  # The query program infl-privacy scores its attackers with (its inversion settings are not used here).
  programs = attack_programs(model, split.n_features, split.n_classes, gi.InversionConfig())
  return split_test_accuracy(split, programs.logits_with_key_vector(variables, split.test_x.astype(np.float32), k))


# The tasks ``headline`` has a figure for.
HEADLINE_TASKS = ("classification", "spatial", "multiomics", "perturbation")


def headline(summary: dict) -> dict:
  """The row's figures of a finished run, by task (see the module's docstring): ``metric``, one value per key
  condition, and the simple reference (``chance`` or ``baseline_*``)."""
  task = summary["task"]
  if task == "classification":
    return {"metric": "accuracy", **{name: m["accuracy"] for name, m in summary["test"].items()},
            "chance": summary["majority_class_test_fraction"]}
  if task == "spatial":
    return {"metric": "ari", **{name: m["ari"] for name, m in summary["clustering"].items()},
            "baseline_pca_kmeans": summary["baselines"]["scanpy_style_pca_kmeans"]["ari"]}
  if task == "multiomics":
    labels = summary["clustering"]["right_key"]["mosaic"]
    label = "diet" if "diet" in labels else next(iter(labels))  # nutrimouse: genotype is near 0 everywhere
    # The per-modality k-means; the untrained encoder is left out (it sees the scheme's scramble).
    baselines = {f"baseline_{name.removesuffix('_on_clients_holding_it')}": b[label]["ari"]
                 for name, b in summary["baselines"].items() if name.startswith("kmeans_")}
    return {"metric": f"ari_{label}",
            **{name: m["mosaic"][label]["ari"] for name, m in summary["clustering"].items()}, **baselines}
  if task == "perturbation":
    sums = summary["baselines"].get("sum_of_single_effects_combos_with_both_singles_seen", {}).get("combo")
    return {"metric": "pearson_delta", **{name: m["all"]["pearson_delta"] for name, m in summary["held_out"].items()},
            **({} if sums is None else {"baseline_sum_of_singles_combos": sums["pearson_delta"]})}
  raise ValueError(f"no headline figure for task {task!r}")  # key_study refuses such tasks before training


def scheme_independent(name: str) -> bool:
  """Row entries computed from the raw data and the seed alone, the same under both key schemes: reported once."""
  return name in ("metric", "chance") or name.startswith("baseline_")


def key_study(train_flags: list[str], seed: int, adaptive_samples: int | None = None,
              key_seed: int | None = None) -> dict:
  config = config_for_seed(train_flags, seed)
  if config.task not in HEADLINE_TASKS:
    raise UserInputError(f"the seed study has no headline figure for --task {config.task}; "
                         f"choose {', '.join(HEADLINE_TASKS)}")
  if adaptive_samples is not None and config.task != "classification":
    raise UserInputError(f"--adaptive-samples attacks classifiers; --task {config.task} has none to attack")
  # A seeded key on purpose: the study reruns each seed exactly (insecure, and never saved).
  key = keylib.generate_key(seed=seed if key_seed is None else key_seed)
  with tempfile.TemporaryDirectory() as workdir:
    summary = train_and_evaluate(config, workdir, key, show_progress=False)
    adaptive_row = ({} if adaptive_samples is None else
                    {f"adaptive_n{adaptive_samples}": adaptive_accuracy(config, workdir, key, adaptive_samples)})
  row = headline(summary)
  row.update(adaptive_row)
  if "central_right_key_test" in summary:
    row["central_right_key"] = summary["central_right_key_test"]["accuracy"]
  # The clustering tasks evaluate the last round's model (no selection on validation).
  row["evaluated_round"] = summary.get("evaluated_round", summary["rounds"])
  return row


def compare_schemes(train_flags: list[str], seed: int, adaptive_samples: int | None = None,
                    key_seed: int | None = None, schemes: tuple[str, str] = ("faithful", "hardened")) -> dict:
  """The key study under two key schemes (by default faithful, then hardened), same seed and key: a paired row."""
  first, second = schemes
  rows = {scheme: key_study([*train_flags, "--key-scheme", scheme], seed, adaptive_samples, key_seed)
          for scheme in schemes}
  row = {f"{scheme}_{name}": value for scheme, r in rows.items() for name, value in r.items()
         if name != "evaluated_round" and not scheme_independent(name)}
  row.update({name: value for name, value in rows[first].items() if scheme_independent(name)})
  row[f"{second}_minus_{first}_right_key"] = rows[second]["right_key"] - rows[first]["right_key"]
  return row


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
  p.add_argument("--compare-schemes", action="store_true",
                 help="run each seed under --key-scheme faithful and hardened (same key) and report the paired difference")
  p.add_argument("--schemes", nargs=2, metavar=("A", "B"), default=["faithful", "hardened"],
                 choices=("faithful", "hardened", "mixed"),
                 help="the two key schemes --compare-schemes runs (default: faithful hardened)")
  p.add_argument("--adaptive-samples", type=int, metavar="N",
                 help="also score the adaptive attacker that fits the key vector on N labelled validation samples "
                      "(classification; off by default)")
  p.add_argument("--key-seeds", type=int, nargs="+", metavar="K",
                 help="run each seed once per key seed K (the same split and training randomness, another key) "
                      "instead of with the key of its own seed")
  p.add_argument("train_flags", nargs=argparse.REMAINDER, help="infl-train flags, after --")
  args = p.parse_args(argv)
  train_flags = [f for f in args.train_flags if f != "--"] or ["--dataset", "proteomics"]
  rows = []
  for seed in args.seeds:
    for key_seed in args.key_seeds or [None]:
      rows.append(compare_schemes(train_flags, seed, args.adaptive_samples, key_seed, tuple(args.schemes))
                  if args.compare_schemes else key_study(train_flags, seed, args.adaptive_samples, key_seed))
      print(json.dumps({"seed": seed, **({} if key_seed is None else {"key_seed": key_seed}), **rows[-1]}),
            flush=True)
  print(json.dumps(seed_summary(rows)))


def seed_summary(rows: list[dict]) -> dict:
  """The last line: mean, std (ddof 1) and the per-seed values of every figure; ``metric``, a name, as it is."""
  values = {k: [r[k] for r in rows] for k in rows[0]}
  return {k: v[0] if isinstance(v[0], str) else
          {"mean": round(float(np.mean(v)), 3),
           "std": round(float(np.std(v, ddof=1)), 3) if len(v) > 1 else None,
           "per_seed": [round(x, 3) for x in v]} for k, v in values.items()}


if __name__ == "__main__":
  sys.exit(run_cli(main))
