"""Weighted averaging of client pytrees."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def weighted_sum(trees, weights: jax.Array):
  """Σ_k w_k · tree_k over the leading client axis of every leaf."""
  return jax.tree_util.tree_map(lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=1), trees)


def weighted_mean(trees, weights: jax.Array):
  """Σ_k w_k tree_k / Σ_k w_k; a zero total gives zeros rather than NaN."""
  total = jnp.sum(weights)
  safe = jnp.where(total > 0, total, 1.0)
  return jax.tree_util.tree_map(lambda s: s / safe.astype(s.dtype), weighted_sum(trees, weights))
