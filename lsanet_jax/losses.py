"""Losses: per-task classification loss, DKS knowledge synergy, LSA-driven auxiliary weights.

All are pure functions of logits and labels, usable with any Flax model.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import optax

MULTI_LABEL = "multi-label, binary-class"
KS_EPS = 1e-8  # DKS smooths probabilities by 1e-8 before the log


def classification_loss(logits, labels, task: str):
  """Mean loss over the batch: BCE for multi-label (labels (N, C) 0/1), otherwise softmax
  cross-entropy on integer labels (N,) or (N, 1) (binary and ordinal tasks use C outputs too,
  as in the official MedMNIST recipe)."""
  if task == MULTI_LABEL:
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype)))
  labels = labels.reshape(labels.shape[0])
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def _categorical_kl(teacher_logits, student_logits):
  p = jax.nn.softmax(teacher_logits, axis=-1) + KS_EPS
  q = jax.nn.softmax(student_logits, axis=-1) + KS_EPS
  return jnp.mean(jnp.sum(p * (jnp.log(p) - jnp.log(q)), axis=-1))


def _bernoulli_kl(teacher_logits, student_logits):
  p = jax.nn.sigmoid(teacher_logits)
  q = jax.nn.sigmoid(student_logits)
  p1, p0 = p + KS_EPS, 1.0 - p + KS_EPS
  q1, q0 = q + KS_EPS, 1.0 - q + KS_EPS
  per_label = p1 * (jnp.log(p1) - jnp.log(q1)) + p0 * (jnp.log(p0) - jnp.log(q0))
  return jnp.mean(per_label)  # mean over batch and labels, matching BCE's reduction


def knowledge_synergy_loss(logits: Mapping[str, jnp.ndarray], task: str):
  """DKS knowledge synergy: sum over ordered pairs (a, b), a != b, of
  KL(softmax(stop_grad(z_b)) || softmax(z_a)), batch-mean, temperature 1. For multi-label tasks the
  per-label Bernoulli KL (averaged over labels) replaces the categorical one."""
  kl = _bernoulli_kl if task == MULTI_LABEL else _categorical_kl
  names = list(logits)
  total = jnp.zeros((), jnp.float32)
  for a in names:
    for b in names:
      if a != b:
        total = total + kl(jax.lax.stop_gradient(logits[b]), logits[a])
  return total


def dynamic_aux_weights(lsa_alpha):
  """Auxiliary loss weights from the LSA layer weights (our reconstruction): alpha averaged over
  batch and channels, times the number of layers L so that a uniform selection gives every branch
  weight 1 (DKS's fixed weight), not differentiated. Returns (L-1,) for aux1..auxK; the last layer
  is the main branch, whose loss weight stays 1."""
  mean_alpha = jax.lax.stop_gradient(jnp.mean(lsa_alpha, axis=(0, 2)))
  return mean_alpha[:-1] * mean_alpha.shape[0]


def lsanet_loss(outputs, labels, task: str, *, dynamic_weights: bool, synergy: bool):
  """Total loss and its parts. outputs: the LSANet dict; heads aux*, main, fused (optional)."""
  logits = outputs["logits"]
  parts = {name: classification_loss(z, labels, task) for name, z in logits.items()}
  aux_names = [n for n in logits if n.startswith("aux")]
  if dynamic_weights and outputs.get("lsa_alpha") is not None and aux_names:
    weights = dynamic_aux_weights(outputs["lsa_alpha"])
  else:
    weights = jnp.ones((len(aux_names),), jnp.float32)
  total = sum(parts[n] for n in logits if not n.startswith("aux"))
  for w, n in zip(weights, aux_names):
    total = total + w * parts[n]
  metrics = {f"loss_{n}": v for n, v in parts.items()}
  if synergy and len(logits) > 1:
    ks = knowledge_synergy_loss(logits, task)
    total = total + ks
    metrics["loss_synergy"] = ks
  for w, n in zip(weights, aux_names):
    metrics[f"weight_{n}"] = w
  metrics["loss"] = total
  return total, metrics
