"""Knowledge synergy, dynamic auxiliary weights and the total LSANet loss against hand computations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsanet_jax.losses import (MULTI_LABEL, classification_loss, dynamic_aux_weights,
                               knowledge_synergy_loss, lsanet_loss)


def np_softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_knowledge_synergy_is_the_sum_of_pairwise_kl():
  rng = np.random.default_rng(0)
  logits = {n: rng.normal(size=(4, 5)).astype(np.float32) for n in ("aux1", "main", "fused")}
  expected = 0.0
  for a in logits:
    for b in logits:
      if a != b:
        p, q = np_softmax(logits[b]) + 1e-8, np_softmax(logits[a]) + 1e-8
        expected += np.mean(np.sum(p * np.log(p / q), axis=-1))
  got = knowledge_synergy_loss({k: jnp.asarray(v) for k, v in logits.items()}, "multi-class")
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  same = {"a": jnp.ones((2, 3)), "b": jnp.ones((2, 3))}
  np.testing.assert_allclose(knowledge_synergy_loss(same, "multi-class"), 0.0, atol=1e-6)


def test_knowledge_synergy_teacher_is_detached():
  za, zb = jnp.array([[1.0, 0.0, -1.0]]), jnp.array([[0.0, 2.0, 0.0]])
  # d/dz_a of KL(sg(p_b) || p_a) + KL(sg(p_a) || p_b): only the first term reaches z_a.
  grad_a = jax.grad(lambda a: knowledge_synergy_loss({"a": a, "b": zb}, "multi-class"))(za)
  expected = jax.nn.softmax(za) - jax.nn.softmax(zb)  # gradient of CE(p_b, softmax(z_a))
  np.testing.assert_allclose(grad_a, expected, atol=1e-6)


def test_multilabel_synergy_is_per_label_bernoulli_kl():
  za, zb = np.array([[0.5, -1.0]]), np.array([[2.0, 0.0]])
  sig = lambda z: 1 / (1 + np.exp(-z))
  def bkl(t, s):
    p, q = sig(t), sig(s)
    return np.mean((p + 1e-8) * np.log((p + 1e-8) / (q + 1e-8))
                   + (1 - p + 1e-8) * np.log((1 - p + 1e-8) / (1 - q + 1e-8)))
  got = knowledge_synergy_loss({"a": jnp.asarray(za), "b": jnp.asarray(zb)}, MULTI_LABEL)
  np.testing.assert_allclose(got, bkl(zb, za) + bkl(za, zb), rtol=1e-5)


def test_classification_losses():
  logits = jnp.array([[2.0, 0.0], [0.0, 1.0]])
  ce = classification_loss(logits, jnp.array([[0], [0]]), "binary-class")
  p = np_softmax(np.asarray(logits))
  np.testing.assert_allclose(ce, -np.mean(np.log([p[0, 0], p[1, 0]])), rtol=1e-6)
  bce = classification_loss(logits, jnp.array([[1, 0], [0, 1]]), MULTI_LABEL)
  sig = 1 / (1 + np.exp(-np.asarray(logits)))
  expected = -np.mean([np.log(sig[0, 0]), np.log(1 - sig[0, 1]), np.log(1 - sig[1, 0]), np.log(sig[1, 1])])
  np.testing.assert_allclose(bce, expected, rtol=1e-6)


def test_dynamic_weights_follow_mean_layer_weights():
  alpha = jnp.array([[[0.2, 0.4], [0.3, 0.1], [0.5, 0.5]]] * 3)  # (N=3, L=3, d=2)
  np.testing.assert_allclose(dynamic_aux_weights(alpha), [0.3 * 3, 0.2 * 3], rtol=1e-6)
  uniform = jnp.full((2, 3, 4), 1 / 3)
  np.testing.assert_allclose(dynamic_aux_weights(uniform), [1.0, 1.0], rtol=1e-6)
  # not differentiated: the weights steer the losses, they are not optimised through them
  assert float(jnp.sum(jax.grad(lambda a: dynamic_aux_weights(a).sum())(alpha) ** 2)) == 0.0


@pytest.mark.parametrize("dynamic, synergy", [(False, False), (True, False), (True, True)])
def test_total_loss_combines_the_parts(dynamic, synergy):
  rng = np.random.default_rng(1)
  logits = {n: jnp.asarray(rng.normal(size=(6, 4)), jnp.float32) for n in ("aux1", "aux2", "main", "fused")}
  alpha = jax.nn.softmax(jnp.asarray(rng.normal(size=(6, 3, 5)), jnp.float32), axis=1)
  labels = jnp.asarray(rng.integers(0, 4, size=(6, 1)))
  total, parts = lsanet_loss({"logits": logits, "lsa_alpha": alpha}, labels, "multi-class",
                             dynamic_weights=dynamic, synergy=synergy)
  ce = {n: classification_loss(z, labels, "multi-class") for n, z in logits.items()}
  w = dynamic_aux_weights(alpha) if dynamic else jnp.ones(2)
  expected = ce["main"] + ce["fused"] + w[0] * ce["aux1"] + w[1] * ce["aux2"]
  if synergy:
    expected = expected + knowledge_synergy_loss(logits, "multi-class")
  np.testing.assert_allclose(total, expected, rtol=1e-6)
  np.testing.assert_allclose(parts["weight_aux1"], w[0], rtol=1e-6)
  assert ("loss_synergy" in parts) == synergy
