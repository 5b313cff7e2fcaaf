"""scripts/infl_seed_study.py: the adaptive attacker's row (--adaptive-samples) on a tiny proteomics run, and the
clustering tasks' headline rows (a tiny spatial run; a nutrimouse-shaped summary)."""

import pathlib

import numpy as np
import pytest

from infl_jax.attacks import adaptive
from script_modules import load_module

REPO = pathlib.Path(__file__).resolve().parents[1]
# A few rounds of a small MLP on 200 proteins: the row's plumbing, not its figures.
TINY = ["--dataset", "proteomics", "--model", "mlp", "--hidden", "16", "--rounds", "2", "--local-epochs", "1",
        "--batch-size", "16", "--n-top-features", "200", "--no-central-baseline", "--key-scheme", "hardened"]
# The same for the spatial task: two rounds of a small graph autoencoder on the built-in slice's 621 spots, one
# client (each client's spot count is a program to compile; compiling is most of the test's time).
TINY_SPATIAL = ["--dataset", "spatial", "--hidden", "16", "--embed-dim", "4", "--rounds", "2", "--local-epochs", "1",
                "--n-top-features", "100", "--n-clients", "1", "--key-scheme", "hardened"]
CONDITIONS = ("right_key", "wrong_key_same_mode", "wrong_key_other_mode", "no_inr")


@pytest.fixture(scope="module")
def study():
  return load_module(REPO / "scripts" / "infl_seed_study.py", "infl_seed_study")


def test_adaptive_attacker_fits_on_raw_validation_samples_never_test(study, monkeypatch):
  seen = []
  fit = adaptive.fit_key_vector

  def spy(model, variables, x, y, k_init, **kwargs):
    seen.append((np.asarray(x), np.asarray(y)))
    return fit(model, variables, x, y, k_init, **kwargs)

  monkeypatch.setattr(adaptive, "fit_key_vector", spy)
  row = study.key_study(TINY, seed=3, adaptive_samples=5)
  assert 0.0 <= row["adaptive_n5"] <= 1.0
  assert 0.0 < row["chance"] <= 1.0
  [(x, y)] = seen
  split = study.load_data(study.config_for_seed(TINY, 3))
  assert x.shape == (5, split.n_features)
  # Raw validation rows (the attacker does not know the hardened scheme's scramble), and none of the test split.
  val = {row.tobytes(): label for row, label in zip(split.val_x.astype(np.float32), split.val_y)}
  test = {row.tobytes() for row in split.test_x.astype(np.float32)}
  assert [val[row.tobytes()] for row in x] == list(y)
  assert not any(row.tobytes() in test for row in x)
  assert len(set(study.attacker_samples(split, 5, 3))) == 5


def test_spatial_row_holds_the_ari_of_every_key_condition_and_the_baseline(study):
  row = study.key_study(TINY_SPATIAL, seed=3)
  assert row["metric"] == "ari"
  for name in (*CONDITIONS, "baseline_pca_kmeans"):
    assert isinstance(row[name], float) and -1.0 <= row[name] <= 1.0, name
  assert row["evaluated_round"] == 2
  assert "chance" not in row


def test_multiomics_headline_is_the_mosaic_ari_on_diet_and_the_summary_line_keeps_the_metric(study):
  # A nutrimouse-shaped summary: every figure distinct, so a wrong path or label shows.
  def scores(diet, genotype):
    return {"diet": {"ari": diet, "nmi": 0.9}, "genotype": {"ari": genotype, "nmi": 0.1}}

  summary = {"task": "multiomics",
             "clustering": {name: {"mosaic": scores(0.1 * i, -0.01 * i)} for i, name in enumerate(CONDITIONS)},
             "baselines": {"untrained_encoder_right_key": scores(0.55, 0.0),
                           "kmeans_genes_on_clients_holding_it": scores(0.6, 0.02),
                           "kmeans_lipids_on_clients_holding_it": scores(0.7, 0.03)}}
  summary["clustering"]["right_key"]["all_modalities"] = scores(0.95, 0.0)
  row = study.headline(summary)
  assert row == {"metric": "ari_diet", "right_key": 0.0, "wrong_key_same_mode": 0.1, "wrong_key_other_mode": 0.2,
                 "no_inr": pytest.approx(0.3), "baseline_kmeans_genes": 0.6, "baseline_kmeans_lipids": 0.7}
  line = study.seed_summary([row, {**row, "right_key": 0.2}])
  assert line["metric"] == "ari_diet"
  assert line["right_key"] == {"mean": 0.1, "std": 0.141, "per_seed": [0.0, 0.2]}


class _Stopped(Exception):
  pass


def test_key_seeds_vary_the_key_and_keep_the_seed(study, monkeypatch):
  from infl_jax import keys as keylib

  seen = []

  def record(config, workdir, key, **kwargs):
    seen.append((config.seed, key.fingerprint))
    raise _Stopped  # the key is all this test needs; no training

  monkeypatch.setattr(study, "train_and_evaluate", record)
  for key_seed in (None, 7, 8):
    with pytest.raises(_Stopped):
      study.key_study(TINY, seed=3, key_seed=key_seed)
  assert [seed for seed, _ in seen] == [3, 3, 3]
  assert [fingerprint for _, fingerprint in seen] == [keylib.generate_key(seed=s).fingerprint for s in (3, 7, 8)]


def test_perturbation_headline_is_the_pearson_delta_over_all_held_out_conditions(study):
  def scores(pearson):
    return {part: {"mse": 9.0, "mse_top20_de": 9.0, "pearson_delta": pearson + offset, "n_conditions": 3}
            for part, offset in (("single", 0.5), ("combo", 0.25), ("all", 0.0))}

  summary = {"task": "perturbation", "held_out": {name: scores(0.1 * i) for i, name in enumerate(CONDITIONS)},
             "baselines": {"no_change_control_mean": scores(0.0),
                           "sum_of_single_effects_combos_with_both_singles_seen": {"combo": scores(0.8)["all"]}}}
  assert study.headline(summary) == {"metric": "pearson_delta", "right_key": 0.0, "wrong_key_same_mode": 0.1,
                                     "wrong_key_other_mode": 0.2, "no_inr": pytest.approx(0.3),
                                     "baseline_sum_of_singles_combos": 0.8}
  del summary["baselines"]["sum_of_single_effects_combos_with_both_singles_seen"]  # no combination of two seen
  assert "baseline_sum_of_singles_combos" not in study.headline(summary)


def test_bad_study_flags_meet_one_line(study, capsys):
  assert study.run_cli(study.main, ["--seeds", "1", "--adaptive-samples", "5", "--", *TINY_SPATIAL]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: --adaptive-samples attacks classifiers") and "Traceback" not in err
