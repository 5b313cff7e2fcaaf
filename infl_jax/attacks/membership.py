"""Membership inference on a trained model: a loss-threshold attack and LiRA (Carlini et al. 2022).

Scores are "higher = more likely a member". ``attack_metrics`` reports ROC AUC and the TPR at a
fixed low FPR (1% and 0.1%): the largest TPR over thresholds whose FPR does not exceed the target.

LiRA here is the online variant with a global variance: ``K`` shadow models, each trained on a
random half of a data pool that holds the targets; for each example, the logit-scaled confidence
``phi = log p_y - log(1 - p_y)`` under the shadows that saw it (IN) and those that did not (OUT)
are fitted by Gaussians, and the target model's ``phi`` is scored by the log likelihood ratio.
``train_shadow_models`` trains all shadows at once: the engine's ``client_update`` under vmap.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from runkit.errors import UserInputError

__all__ = ["attack_metrics", "lira_scores", "logit_confidence", "loss_threshold_scores", "roc_auc",
           "shadow_membership", "tpr_at_fpr", "train_shadow_models"]


def _check_scores(is_member, scores):
  is_member = np.asarray(is_member).astype(bool).reshape(-1)
  scores = np.asarray(scores, np.float64).reshape(-1)
  if is_member.shape != scores.shape:
    raise UserInputError(f"membership: {is_member.shape[0]} membership labels but {scores.shape[0]} scores")
  if is_member.all() or not is_member.any():
    raise UserInputError("membership: need both members and non-members to measure an attack")
  if not np.all(np.isfinite(scores)):
    raise UserInputError("membership: scores contain NaN or inf")
  return is_member, scores


def roc_auc(is_member, scores) -> float:
  from sklearn.metrics import roc_auc_score

  is_member, scores = _check_scores(is_member, scores)
  return float(roc_auc_score(is_member, scores))


def tpr_at_fpr(is_member, scores, fpr: float) -> float:
  """The largest true-positive rate of a threshold rule ``score >= t`` whose false-positive rate is
  at most ``fpr``. With fewer than ``1/fpr`` non-members that allows no false positive at all."""
  is_member, scores = _check_scores(is_member, scores)
  if not 0 <= fpr <= 1:
    raise UserInputError(f"membership: fpr must be in [0, 1], got {fpr}")
  neg = np.sort(scores[~is_member])[::-1]
  allowed = int(np.floor(fpr * len(neg) + 1e-9))  # false positives allowed
  # Threshold just above the (allowed+1)-th highest non-member score.
  if allowed >= len(neg):
    return 1.0
  bar = neg[allowed]
  return float(np.mean(scores[is_member] > bar))


def attack_metrics(is_member, scores, fprs=(0.01, 0.001)) -> dict:
  out = {"auc": roc_auc(is_member, scores)}
  for f in fprs:
    out[f"tpr_at_{f:g}_fpr"] = tpr_at_fpr(is_member, scores, f)
  return out


def _per_example_ce(logits, y):
  logits = jnp.asarray(logits, jnp.float32)
  return -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), jnp.asarray(y)[:, None], -1)[:, 0]


def loss_threshold_scores(logits, y) -> np.ndarray:
  """Yeom et al.: a lower loss means a member. Score = -cross-entropy."""
  return -np.asarray(_per_example_ce(logits, y), np.float64)


def logit_confidence(logits, y) -> np.ndarray:
  """``phi = log p_y - log(1 - p_y)``, computed stably from logits ``[..., N, C]``."""
  logits = jnp.asarray(logits, jnp.float32)
  y = jnp.asarray(y)
  log_p = jax.nn.log_softmax(logits, -1)
  log_py = jnp.take_along_axis(log_p, jnp.broadcast_to(y[:, None], log_p.shape[:-1] + (1,)), -1)[..., 0]
  others = jnp.where(jax.nn.one_hot(y, logits.shape[-1], dtype=bool), -jnp.inf, log_p)
  return np.asarray(log_py - jax.nn.logsumexp(others, -1), np.float64)


def lira_scores(target_phi, shadow_phi, shadow_in) -> np.ndarray:
  """Online LiRA with a global variance per side.

  ``target_phi`` [N]; ``shadow_phi`` [K, N]; ``shadow_in`` [K, N] bool (shadow k trained on n).
  """
  target_phi = np.asarray(target_phi, np.float64)
  shadow_phi = np.asarray(shadow_phi, np.float64)
  shadow_in = np.asarray(shadow_in, bool)
  if shadow_phi.shape != shadow_in.shape or shadow_phi.shape[1:] != target_phi.shape:
    raise UserInputError(f"lira_scores: shapes disagree: target {target_phi.shape}, shadow {shadow_phi.shape}, "
                         f"membership {shadow_in.shape}; need [N], [K, N], [K, N]")
  n_in, n_out = shadow_in.sum(0), (~shadow_in).sum(0)
  if np.any(n_in == 0) or np.any(n_out == 0):
    raise UserInputError("lira_scores: every example needs at least one IN and one OUT shadow model; train more "
                         "shadow models")
  mu_in = np.where(shadow_in, shadow_phi, 0).sum(0) / n_in
  mu_out = np.where(~shadow_in, shadow_phi, 0).sum(0) / n_out
  var_in = np.var((shadow_phi - mu_in)[shadow_in]) + 1e-6
  var_out = np.var((shadow_phi - mu_out)[~shadow_in]) + 1e-6
  log_in = -0.5 * (target_phi - mu_in) ** 2 / var_in - 0.5 * np.log(var_in)
  log_out = -0.5 * (target_phi - mu_out) ** 2 / var_out - 0.5 * np.log(var_out)
  return log_in - log_out


def shadow_membership(rng: jax.Array, num_shadows: int, pool_size: int) -> np.ndarray:
  """[K, N] bool: each shadow takes a random half of the pool; every example is IN for exactly
  half of the shadows (K even), so all examples get IN and OUT statistics."""
  if num_shadows < 2 or num_shadows % 2:
    raise UserInputError(f"membership: num_shadows must be an even number >= 2, got {num_shadows}")
  ranks = jnp.argsort(jax.random.uniform(rng, (pool_size, num_shadows)), axis=1)  # per example, a shuffle of shadows
  return np.asarray(ranks < num_shadows // 2).T


def train_shadow_models(task, optimizer, local_config, variables, x_pool, y_pool, membership, rng,
                        context: Any = None):
  """Trains one model per row of ``membership`` [K, N] on its IN samples, all under one vmap.

  Each shadow starts from ``variables`` (the attacker's own initialisation) and trains like a
  client with ``local_config`` (epochs, batch size). Returns the stacked variables (leading K).
  """
  from infl_jax.federated import client_update

  membership = np.asarray(membership, bool)
  x_pool, y_pool = np.asarray(x_pool, np.float32), np.asarray(y_pool, np.int32)
  sizes = membership.sum(1)
  max_n = int(sizes.max())
  order = np.argsort(~membership, axis=1, kind="stable")[:, :max_n]  # IN rows first
  data = {"x": jnp.asarray(x_pool[order]), "y": jnp.asarray(y_pool[order])}
  variables = dict(variables)
  params = variables.pop("params")

  def one(d, n, r):
    p, s, _ = client_update(task, optimizer, local_config, params, variables, d, n, r, context)
    return {"params": p, **s}

  rngs = jax.random.split(rng, membership.shape[0])
  return jax.jit(jax.vmap(one))(data, jnp.asarray(sizes, jnp.int32), rngs)
