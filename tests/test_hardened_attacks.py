"""Attacks on the hardened scheme where the answer is known: the public-panel attacker on synthetic
data (distinct marginals: recovered; identical i.i.d. marginals: chance), the common scale of analytic
reconstructions on a keyed layer, and the brute force over seed-derived keys on a tiny trained model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from infl_jax import keys as keylib
from infl_jax.attacks import analytic, gradient_inversion as gi, metrics
from infl_jax.attacks import public_panel as pp
from infl_jax.attacks import seed_search
from infl_jax.privacy import hardened
from runkit.errors import UserInputError


def _factor_data(rng, n, f, distinct: bool):
  """4 shared factors plus noise (correlated features); with ``distinct``, each feature then goes through
  its own skewing map (skew from negative to positive), without, the features are i.i.d. N(0, 1)."""
  if not distinct:
    return rng.normal(size=(n, f))
  z = rng.normal(size=(n, 4)) @ rng.normal(size=(4, f)) + 0.7 * rng.normal(size=(n, f))
  z = z / z.std(0)
  a = np.linspace(-1.0, 1.0, f)[rng.permutation(f)]  # never 0 for an even f
  return np.expm1(a * z) / a


@pytest.mark.parametrize("distinct", [True, False])
def test_public_panel_attack_recovers_distinct_features_and_is_at_chance_on_identical_ones(distinct):
  f = 40
  x = _factor_data(np.random.default_rng(0), 900, f, distinct)
  targets, panel = x[:300], x[300:]
  truth = pp.random_scrambler(f, np.random.default_rng(1))
  recovered = hardened.scramble(targets, truth) * -3.0  # one common scale, of unknown size and sign
  guess = pp.public_panel_attack(recovered, panel).scrambler
  accuracy = pp.match_accuracy(guess, truth)
  abs_r = np.median(metrics.omics_metrics(targets, hardened.unscramble(recovered, guess))["abs_pearson"])
  if distinct:
    assert accuracy["position"] >= 0.8 and accuracy["position_and_sign"] >= 0.8, accuracy
    assert abs_r > 0.9
  else:  # nothing tells the features apart: 1 feature in 40 placed right by chance, on average
    assert accuracy["position"] <= 0.15, accuracy
    assert abs_r < 0.3


def test_match_accuracy_counts_one_global_sign_flip_as_recovered():
  truth = pp.random_scrambler(10, np.random.default_rng(0))
  flipped = hardened.InputScrambler(truth.permutation, -truth.signs, truth.scales)
  assert pp.match_accuracy(flipped, truth) == {"position": 1.0, "position_and_sign": 1.0}
  perm = truth.permutation.copy()
  perm[[0, 1]] = perm[[1, 0]]
  signs = truth.signs.copy()
  signs[2] *= -1
  assert pp.match_accuracy(hardened.InputScrambler(perm, signs, truth.scales), truth) == {
      "position": 0.8, "position_and_sign": 0.7}


def test_public_prior_is_the_panels_first_axis():
  rng = np.random.default_rng(0)
  axis = rng.choice([-1.0, 1.0], 30)  # in z-scored units, as the prior
  x = rng.normal(size=(50, 1)) * axis + 0.01 * rng.normal(size=(50, 30))
  prior = pp.public_prior(x[:40], 10)
  assert prior.shape == (10, 30)
  assert np.median(metrics.omics_metrics(x[40:], prior)["abs_pearson"]) > 0.99


def test_common_scale_inputs_puts_every_sample_on_one_scale():
  # A keyed first layer's batch-1 gradients (attacks.analytic): dL/dW[:, j] = c_j x (dL/db)_j, with
  # per-unit scales c_j of both signs and units switched off (dL/db_j = 0) differently per sample.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(12, 6))
  c = rng.uniform(-3, 3, size=8)
  bias = rng.normal(size=(12, 8)) * (rng.random((12, 8)) < 0.6) * 10.0 ** rng.integers(-9, 1, size=(12, 1))
  kernel = x[:, :, None] * (c * bias)[:, None, :]
  assert np.any(bias == 0)
  per_sample = np.asarray(analytic.recover_first_layer_input(kernel, bias)) / x
  assert np.ptp(per_sample[:, 0]) > 0.1 * np.abs(per_sample[:, 0]).max()  # each sample on its own scale
  common = np.asarray(pp.common_scale_inputs(jnp.asarray(kernel, jnp.float32), jnp.asarray(bias, jnp.float32))) / x
  np.testing.assert_allclose(common, common[0, 0], rtol=1e-4)


def test_public_panel_attack_rejects_mismatched_sets():
  with pytest.raises(UserInputError, match="share F"):
    pp.public_panel_attack(np.zeros((10, 5)), np.zeros((10, 6)))
  with pytest.raises(UserInputError, match="ridge"):
    pp.PanelConfig(ridge=0.0).validate()


def test_v1_scrambler_is_the_old_seed_derivation():
  s = seed_search.v1_scrambler(5, 8)  # SeedSequence([5, 1, 0, 0x4A7D5C]), as privacy/hardened.py drew it
  assert s.permutation.tolist() == [6, 0, 1, 7, 4, 5, 2, 3]
  assert s.signs.tolist() == [1.0, -1.0, -1.0, -1.0, 1.0, 1.0, 1.0, -1.0]
  coords, perms, signs = seed_search.seed_candidates([3, 4], 20, derivation="seeded")
  today = hardened.input_scrambler(keylib.generate_key(4), 20)
  np.testing.assert_array_equal(perms[1], today.permutation)
  np.testing.assert_array_equal(signs[1], today.signs)
  np.testing.assert_array_equal(coords[0], keylib.generate_key(3).coords)
  assert seed_search.seconds_to_enumerate(32, 1000.0) == 2 ** 32 / 1000.0


def _fit_logistic(x, y, steps=300, lr=0.5):
  """The clients' model: logistic regression on their (scrambled) data, by full-batch gradient descent."""
  w, b = np.zeros(x.shape[1]), 0.0
  for _ in range(steps):
    p = 1.0 / (1.0 + np.exp(-(x @ w + b)))
    w, b = w - lr * x.T @ (p - y) / len(y), b - lr * np.mean(p - y)
  return jnp.asarray(w, jnp.float32), jnp.float32(b)


def test_seed_search_finds_the_v1_seed_in_a_small_range():
  f, true_seed = 12, 37
  rng = np.random.default_rng(0)
  x = rng.normal(size=(240, f)).astype(np.float32)
  y = (x @ rng.normal(size=f) > 0).astype(np.float32)
  w, b = _fit_logistic(hardened.scramble(x[:200], seed_search.v1_scrambler(true_seed, f)), y[:200])
  public_x, public_y = jnp.asarray(x[200:216]), jnp.asarray(y[200:216])  # the attacker's labelled samples

  def score(coords, permutation, signs):  # a linear model has no keyed layer: the coordinates play no part
    del coords
    logits = (public_x[:, permutation] * signs) @ w + b
    return optax.sigmoid_binary_cross_entropy(logits, public_y).mean()

  found = seed_search.search_seeds(score, range(64), f, derivation="v1", batch=16)
  assert found.best_seed == true_seed
  assert found.scores[true_seed] < 0.5 * np.delete(found.scores, true_seed).min()
  assert found.per_second > 0 and found.derive_per_second > 0 and found.score_per_second > 0


def test_correlation_test_tells_the_v1_seed_apart_without_labels():
  f, true_seed = 30, 21
  x = _factor_data(np.random.default_rng(3), 400, f, distinct=True)
  recovered = hardened.scramble(x[:20], seed_search.v1_scrambler(true_seed, f)) * -2.0  # what the update shows
  found = seed_search.search_seeds(seed_search.correlation_test(recovered, x[20:], num_pairs=100), range(64), f,
                                   derivation="v1", batch=16)
  assert found.best_seed == true_seed
  others = np.delete(found.scores, true_seed)
  assert found.scores[true_seed] < -0.5 and np.abs(others).max() < 0.3  # the right unscramble stands far apart


def test_panel_settings_are_checked_before_training():
  from types import SimpleNamespace

  from infl_jax.privacy.experiment import PrivacyConfig
  from infl_jax.privacy.hardened_attacks import check_panel_settings

  split = SimpleNamespace(train_y=np.zeros(110), val_y=np.zeros(2), test_y=np.zeros(20))
  check_panel_settings(PrivacyConfig(panel_extra_samples=90), split)  # 110 recovered, 22 in the panel
  with pytest.raises(UserInputError, match="training split has only 110"):
    check_panel_settings(PrivacyConfig(panel_extra_samples=111), split)
  with pytest.raises(UserInputError, match=">= 4 recovered and >= 4 panel samples, got 130 and 2"):
    check_panel_settings(PrivacyConfig(panel_extra_samples=110), split)
  check_panel_settings(PrivacyConfig(panel_extra_samples=110, public_panel=False, seed_search=0), split)
