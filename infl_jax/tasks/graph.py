"""Neighbour graphs as padded neighbour lists, and message passing over them.

A graph on N nodes is ``(neighbors [N, K] int, weights [N, K] float)``: node i's neighbours are
``neighbors[i, k]`` where ``weights[i, k] > 0`` (padding slots hold weight 0 and any index). The
fixed width K keeps every shape static, so a client's graph stacks with other clients' and the
round compiles once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["knn_graph", "mean_aggregate", "restrict_graph", "sparsify_similarity"]


def knn_graph(points: np.ndarray, k: int, *, max_distance: float | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The k nearest other points of each point (Euclidean), optionally only those within ``max_distance``."""
  from sklearn.neighbors import NearestNeighbors

  points = np.asarray(points, np.float64)
  if points.ndim != 2 or len(points) < 2:
    raise ValueError(f"points must be [N >= 2, dims], got shape {points.shape}")
  k = min(int(k), len(points) - 1)
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  dist, idx = NearestNeighbors(n_neighbors=k + 1).fit(points).kneighbors(points)
  # Drop each point itself (ties may put it in any slot among distance-0 duplicates).
  neighbors = np.empty((len(points), k), np.int32)
  dists = np.empty((len(points), k))
  for i in range(len(points)):
    keep = idx[i] != i
    neighbors[i] = idx[i][keep][:k]
    dists[i] = dist[i][keep][:k]
  weights = np.ones((len(points), k), np.float32)
  if max_distance is not None:
    weights = (dists <= max_distance).astype(np.float32)
  return neighbors, weights


def restrict_graph(neighbors: np.ndarray, weights: np.ndarray, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The subgraph on ``nodes`` (indices into the full graph), renumbered 0..len(nodes)-1.

  Edges leaving the subset are cut (weight 0): a client holds only its own spots.
  """
  nodes = np.asarray(nodes)
  local = np.full(neighbors.shape[0], -1, np.int64)
  local[nodes] = np.arange(len(nodes))
  sub = local[neighbors[nodes]]
  w = np.where(sub >= 0, weights[nodes], 0.0).astype(np.float32)
  return np.where(sub >= 0, sub, 0).astype(np.int32), w


def mean_aggregate(h: jax.Array, neighbors: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean of each node's own features and its weighted neighbours': (h_i + sum_k w_ik h_nbr) / (1 + sum_k w_ik)."""
  gathered = h[neighbors]  # [N, K, F]
  total = h + jnp.einsum("nk,nkf->nf", weights, gathered)
  return total / (1.0 + weights.sum(-1, keepdims=True))


def sparsify_similarity(similarity: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Top-k most similar other items per row of a [N, N] similarity (e.g. gene co-expression), weights = similarity."""
  s = np.array(similarity, np.float64)
  np.fill_diagonal(s, -np.inf)
  k = min(k, s.shape[0] - 1)
  neighbors = np.argsort(-s, axis=1)[:, :k].astype(np.int32)
  w = np.take_along_axis(s, neighbors, 1)
  return neighbors, np.clip(np.nan_to_num(w, neginf=0.0), 0.0, None).astype(np.float32)
