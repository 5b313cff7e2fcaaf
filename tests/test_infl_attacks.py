"""Attacks and privacy metrics against hand computations on tiny models."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infl_jax import keys as keylib
from infl_jax import models
from infl_jax.attacks import adaptive, analytic, gradient_inversion as gi, membership, metrics
from runkit.errors import UserInputError
from infl_jax.keyed import key_modulation, key_vector
from infl_jax.privacy import hardened


class TinyNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(8, name="first")(x))
    return nn.Dense(3, name="head")(h)


def _grad(apply_fn, params, x, y, num_classes=3):
  def loss(p):
    return gi.soft_cross_entropy(apply_fn(p, x[None]), jax.nn.one_hot(y, num_classes)[None])[0]

  return jax.grad(loss)(params)


def test_analytic_attack_recovers_plain_dense_input_exactly():
  model = TinyNet()
  x = jax.random.normal(jax.random.key(0), (6,))
  params = model.init(jax.random.key(1), x[None])["params"]
  g = _grad(lambda p, xb: model.apply({"params": p}, xb), params, x, 2)
  recovered = analytic.recover_first_layer_input(*analytic.find_first_layer(g, "first"))
  np.testing.assert_allclose(recovered, x, rtol=1e-4, atol=1e-5)
  # Every unit with a nonzero bias gradient gives the same x.
  ratios = analytic.analytic_ratios(g["first"]["kernel"], g["first"]["bias"])
  np.testing.assert_allclose(ratios, np.broadcast_to(np.asarray(x)[:, None], ratios.shape), rtol=1e-3, atol=1e-5)


def test_analytic_ratio_of_a_keyed_layer_is_the_input_up_to_a_per_unit_scale():
  lam = 5.0
  model = models.make_mlp_classifier((8,), 3, key_strength=lam)
  x = jax.random.normal(jax.random.key(2), (6,))
  variables = model.init(jax.random.key(3), x[None], key_coords=None)
  # Non-trivial keyed modulation: V2 is initialised near zero, so scale it up.
  variables = jax.tree_util.tree_map_with_path(
      lambda path, v: v * 50 if "V2" in jax.tree_util.keystr(path) else v, variables)
  key = keylib.generate_key(7)
  g = _grad(lambda p, xb: model.apply({"params": p}, xb, key_coords=key.coords), variables["params"], x, 1)
  ratios = np.asarray(analytic.analytic_ratios(g["dense_0"]["kernel"], g["dense_0"]["bias"]))
  s, _ = key_modulation(variables["params"]["dense_0"]["key_mod"], key_vector(variables, key.coords))
  c = 1 + lam * np.tanh(np.asarray(s))  # the keyed layer's per-unit scale
  assert np.std(c) > 0.1  # the scales really differ between units
  np.testing.assert_allclose(ratios, np.asarray(x)[:, None] * c[None, :], rtol=1e-3, atol=1e-5)
  r = metrics.omics_metrics(x[None], analytic.recover_first_layer_input(g["dense_0"]["kernel"],
                                                                          g["dense_0"]["bias"])[None])
  assert r["abs_pearson"][0] == pytest.approx(1.0, abs=1e-5)  # without the key


def test_idlg_label_guess():
  model = TinyNet()
  params = model.init(jax.random.key(1), jnp.zeros((1, 6)))["params"]
  xs = jax.random.normal(jax.random.key(4), (9, 6))
  ys = jnp.arange(9) % 3
  grads = jax.vmap(lambda x, y: _grad(lambda p, xb: model.apply({"params": p}, xb), params, x, y))(xs, ys)
  np.testing.assert_array_equal(gi.idlg_label(grads["head"]["bias"]), ys)


@pytest.mark.parametrize("optimizer,lr", [("adam", 0.1), ("normalized_gd", 0.5)])
def test_gradient_inversion_recovers_a_tiny_input(optimizer, lr):
  model = TinyNet()
  params = model.init(jax.random.key(1), jnp.zeros((1, 6)))["params"]
  xs = jax.random.normal(jax.random.key(5), (3, 6))
  ys = jnp.array([0, 1, 2])
  apply = lambda p, xb: model.apply({"params": p}, xb)
  observed = jax.vmap(lambda x, y: _grad(apply, params, x, y))(xs, ys)
  labels = gi.idlg_label(observed["head"]["bias"])
  config = gi.InversionConfig(steps=400, learning_rate=lr, restarts=3, optimizer=optimizer,
                              cosine_decay=optimizer == "normalized_gd")
  fn = lambda x, label_probs, extra: _grad_soft(apply, params, x, label_probs)
  result = jax.jit(lambda obs, lab: gi.invert(fn, obs, jax.random.key(6), (6,), 3, config, labels=lab))(observed, labels)
  chex_shape = result.x.shape
  assert chex_shape == (3, 6) and result.all_loss.shape == (3, 3)
  m = metrics.omics_metrics(xs, result.x)
  assert np.median(m["abs_pearson"]) > 0.95
  np.testing.assert_allclose(result.x, xs, atol=0.15)


def _grad_soft(apply, params, x, label_probs):
  return jax.grad(lambda p: gi.soft_cross_entropy(apply(p, x[None]), label_probs[None])[0])(params)


def test_gradient_inversion_recovers_an_input_from_a_multi_step_fedavg_update():
  model = TinyNet()
  params = model.init(jax.random.key(1), jnp.zeros((1, 6)))["params"]
  loss = lambda p, x, lp, extra: gi.soft_cross_entropy(model.apply({"params": p}, x[None]), lp[None])[0]
  update_fn = gi.simulated_update_fn(loss, params, local_steps=3, learning_rate=0.1)
  xs = jax.random.normal(jax.random.key(11), (2, 6))
  ys = jnp.array([2, 0])
  observed = jax.vmap(lambda x, y: update_fn(x, jax.nn.one_hot(y, 3), ()))(xs, ys)
  config = gi.InversionConfig(steps=400, learning_rate=0.5, restarts=3, optimizer="normalized_gd", cosine_decay=True)
  result = gi.invert(update_fn, observed, jax.random.key(12), (6,), 3, config, labels=ys)
  assert np.median(metrics.omics_metrics(xs, result.x)["abs_pearson"]) > 0.95
  with pytest.raises(UserInputError, match="local_steps"):
    gi.simulated_update_fn(loss, params, local_steps=0, learning_rate=0.1)


def test_gradient_inversion_optimises_the_soft_label_without_idlg():
  model = TinyNet()
  params = model.init(jax.random.key(1), jnp.zeros((1, 6)))["params"]
  apply = lambda p, xb: model.apply({"params": p}, xb)
  x, y = jax.random.normal(jax.random.key(8), (6,)), 1
  observed = jax.tree_util.tree_map(lambda a: a[None], _grad(apply, params, x, y))
  config = gi.InversionConfig(steps=400, learning_rate=0.1, restarts=3, use_idlg=False)
  result = gi.invert(lambda xx, lp, e: _grad_soft(apply, params, xx, lp), observed, jax.random.key(9), (6,), 3, config)
  assert int(jnp.argmax(result.label_probs[0])) == y


def test_adaptive_key_vector_injection_and_fit():
  model = models.make_mlp_classifier((8,), 2, key_strength=5.0)
  x = jax.random.normal(jax.random.key(0), (32, 6))
  variables = model.init(jax.random.key(1), x, key_coords=None)
  variables = jax.tree_util.tree_map_with_path(
      lambda path, v: v * 50 if "V2" in jax.tree_util.keystr(path) else v, variables)
  key = keylib.generate_key(3)
  k = key_vector(variables, key.coords)
  np.testing.assert_allclose(adaptive.apply_with_key_vector(model, variables, x, k),
                             model.apply(variables, x, key_coords=key.coords), rtol=1e-5, atol=1e-6)
  # Labels made by the keyed model: fitting k from a wrong starting point lowers the loss.
  y = jnp.argmax(model.apply(variables, x, key_coords=key.coords), -1)
  ce = lambda kk: float(jnp.mean(jax.nn.logsumexp(adaptive.apply_with_key_vector(model, variables, x, kk), -1)
                                 - jnp.take_along_axis(adaptive.apply_with_key_vector(model, variables, x, kk),
                                                       y[:, None], -1)[:, 0]))
  k0 = adaptive.prior_key_vector(variables, num_keys=2) + 0.5
  k_fit = adaptive.fit_key_vector(model, variables, x, y, k0, steps=100)
  assert ce(k_fit) < ce(k0)
  np.testing.assert_array_equal(adaptive.fit_key_vector(model, variables, x[:0], y[:0], k0), k0)


def test_tpr_at_fpr_and_auc_by_hand():
  # 5 non-members, 4 members.
  is_member = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1], bool)
  scores = np.array([0.1, 0.2, 0.3, 0.4, 0.9, 0.5, 0.6, 0.95, 0.35])
  # FPR <= 0.2 allows one false positive (0.9): threshold above 0.4 -> members 0.5, 0.6, 0.95 -> 3/4.
  assert membership.tpr_at_fpr(is_member, scores, 0.2) == pytest.approx(0.75)
  # FPR 0: threshold above 0.9 -> only 0.95 -> 1/4.
  assert membership.tpr_at_fpr(is_member, scores, 0.01) == pytest.approx(0.25)
  # AUC: pairs (member > non-member): 0.5->4, 0.6->4, 0.95->5, 0.35->3 => 16/20.
  assert membership.roc_auc(is_member, scores) == pytest.approx(16 / 20)
  m = membership.attack_metrics(is_member, scores, fprs=(0.2,))
  assert m == {"auc": pytest.approx(0.8), "tpr_at_0.2_fpr": pytest.approx(0.75)}


def test_loss_threshold_and_lira_scores():
  logits = jnp.array([[5.0, 0.0], [0.0, 1.0]])
  y = jnp.array([0, 0])
  scores = membership.loss_threshold_scores(logits, y)
  assert scores[0] > scores[1]
  np.testing.assert_allclose(membership.logit_confidence(logits, y), [5.0, -1.0], rtol=1e-5)
  # Shadows: IN phi ~ 2, OUT phi ~ -2; a target at 2 scores higher than one at -2.
  shadow_in = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], bool)
  shadow_phi = np.where(shadow_in, 2.0, -2.0) + np.array([[0.1], [-0.1], [0.2], [-0.2]])
  s = membership.lira_scores(np.array([2.0, -2.0]), shadow_phi, shadow_in)
  assert s[0] > 0 > s[1]
  m = membership.shadow_membership(jax.random.key(0), 4, 10)
  assert m.shape == (4, 10) and np.all(m.sum(0) == 2)


def test_shadow_models_train_under_vmap():
  from infl_jax.federated import LocalConfig, Task
  import optax

  def loss(params, state, batch, mask, rng, context):
    per_row = 0.5 * jnp.sum((params["w"] - batch["x"]) ** 2, -1)
    return jnp.sum(per_row * mask) / jnp.sum(mask), state

  x = np.arange(8, dtype=np.float32).reshape(4, 2)
  shadow_in = np.array([[1, 1, 0, 0], [0, 0, 1, 1]], bool)
  out = membership.train_shadow_models(Task(loss), optax.sgd(1.0), LocalConfig(1, 4), {"params": {"w": jnp.zeros(2)}},
                                       x, np.zeros(4), shadow_in, jax.random.key(0))
  np.testing.assert_allclose(out["params"]["w"], [x[:2].mean(0), x[2:].mean(0)], rtol=1e-6)


def test_reconstruction_metrics_by_hand():
  t = np.array([[1.0, 2.0, 3.0, 4.0]])
  r = np.array([[2.0, 4.0, 6.0, 8.0]])
  m = metrics.omics_metrics(t, r, feature_std=np.full(4, 2.0), y_true=[1], y_rec=[1], top_k=2)
  assert m["mse"][0] == pytest.approx(np.mean((t - r) ** 2))
  assert m["nmse"][0] == pytest.approx(np.mean(((t - r) / 2) ** 2))
  assert m["abs_pearson"][0] == pytest.approx(1.0) and m["abs_spearman"][0] == pytest.approx(1.0)
  assert m["top50_overlap"][0] == 1.0 and m["label_recovered"][0] == 1.0
  m2 = metrics.omics_metrics(t, -r[:, ::-1], top_k=2)
  assert m2["abs_pearson"][0] == pytest.approx(1.0)  # |r| of an anti-correlated profile
  assert m2["top50_overlap"][0] == 0.0
  im = metrics.image_metrics(np.zeros((1, 2, 2)), np.full((1, 2, 2), 0.1))
  assert im["psnr"][0] == pytest.approx(20.0)


def test_hardened_scramble_is_a_keyed_invertible_bijection():
  key = keylib.generate_key(0)
  x = np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32)
  s = hardened.input_scrambler(key, 50)
  np.testing.assert_allclose(hardened.unscramble(hardened.scramble(x, s), s), x, rtol=1e-6)
  again = hardened.input_scrambler(keylib.generate_key(0), 50)
  np.testing.assert_array_equal(s.permutation, again.permutation)
  other = hardened.input_scrambler(keylib.wrong_key_like(key), 50)
  assert not np.array_equal(s.permutation, other.permutation)
  wrong_view = hardened.unscramble(hardened.scramble(x, s), other)
  assert np.median(metrics.omics_metrics(x, wrong_view)["abs_pearson"]) < 0.5


def test_bad_inputs_give_clear_errors():
  with pytest.raises(UserInputError, match="differ in shape"):
    metrics.omics_metrics(np.zeros((2, 3)), np.zeros((2, 4)))
  with pytest.raises(UserInputError, match="batch"):
    metrics.omics_metrics(np.zeros(3), np.zeros(3))
  with pytest.raises(UserInputError, match="kernel gradient"):
    analytic.recover_first_layer_input(np.zeros((3, 4)), np.zeros(5))
  with pytest.raises(UserInputError, match="no layer"):
    analytic.find_first_layer({"a": {}}, "embed")
  with pytest.raises(UserInputError, match="steps"):
    gi.InversionConfig(steps=0).validate()
  with pytest.raises(UserInputError, match="optimizer"):
    gi.InversionConfig(optimizer="sgd").validate()
  with pytest.raises(UserInputError, match="both members and non-members"):
    membership.roc_auc(np.ones(3), np.zeros(3))
  with pytest.raises(UserInputError, match="IN and one OUT"):
    membership.lira_scores(np.zeros(2), np.zeros((2, 2)), np.ones((2, 2), bool))
  with pytest.raises(UserInputError, match="features"):
    hardened.scramble(np.zeros((1, 5)), hardened.input_scrambler(keylib.generate_key(0), 4))
  with pytest.raises(UserInputError, match="SecretKey"):
    hardened.input_scrambler(np.zeros((128, 2)), 4)


def test_cli_reports_bad_settings():
  from infl_jax.privacy.main import main

  assert main(["--workdir", "/tmp/unused", "--num-targets", "0"]) == 2
