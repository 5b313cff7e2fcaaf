"""scripts/infl_seed_study.py: the adaptive attacker's row (--adaptive-samples) on a tiny proteomics run."""

import importlib.util
import pathlib

import numpy as np
import pytest

from infl_jax.attacks import adaptive

REPO = pathlib.Path(__file__).resolve().parents[1]
# A few rounds of a small MLP on 200 proteins: the row's plumbing, not its figures.
TINY = ["--dataset", "proteomics", "--model", "mlp", "--hidden", "16", "--rounds", "2", "--local-epochs", "1",
        "--batch-size", "16", "--n-top-features", "200", "--no-central-baseline", "--key-scheme", "hardened"]


@pytest.fixture(scope="module")
def study():
  spec = importlib.util.spec_from_file_location("infl_seed_study", REPO / "scripts" / "infl_seed_study.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


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
