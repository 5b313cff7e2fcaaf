"""Clustering of learned embeddings and its scores: KMeans (or Leiden) then ARI / NMI against labels."""

from __future__ import annotations

import numpy as np

__all__ = ["cluster_embedding", "clustering_scores", "kmeans_labels", "pca_kmeans_baseline"]


def kmeans_labels(embedding: np.ndarray, n_clusters: int, seed: int = 0, n_init: int = 10) -> np.ndarray:
  from sklearn.cluster import KMeans

  embedding = np.asarray(embedding, np.float64)
  if not np.isfinite(embedding).all():
    raise ValueError("the embedding holds NaN/inf (training diverged?); lower the learning rate")
  return KMeans(n_clusters, n_init=n_init, random_state=seed).fit_predict(embedding)


def leiden_labels(embedding: np.ndarray, resolution: float = 1.0, n_neighbors: int = 15, seed: int = 0) -> np.ndarray:
  """Leiden on the embedding's kNN graph (scanpy; needs the ``leidenalg`` package)."""
  import anndata
  import scanpy as sc

  adata = anndata.AnnData(np.asarray(embedding, np.float32))
  sc.pp.neighbors(adata, n_neighbors=n_neighbors, use_rep="X", random_state=seed)
  sc.tl.leiden(adata, resolution=resolution, random_state=seed, flavor="igraph", n_iterations=2, directed=False)
  return adata.obs["leiden"].astype(int).to_numpy()


def cluster_embedding(embedding: np.ndarray, n_clusters: int, method: str = "kmeans", seed: int = 0) -> np.ndarray:
  if method == "kmeans":
    return kmeans_labels(embedding, n_clusters, seed)
  if method == "leiden":
    return leiden_labels(embedding, seed=seed)
  raise ValueError(f"unknown clustering method {method!r}; choose 'kmeans' or 'leiden'")


def clustering_scores(labels_true: np.ndarray, labels_pred: np.ndarray) -> dict[str, float]:
  from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

  return {"ari": float(adjusted_rand_score(labels_true, labels_pred)),
          "nmi": float(normalized_mutual_info_score(labels_true, labels_pred))}


def pca_kmeans_baseline(x: np.ndarray, labels_true: np.ndarray, n_clusters: int, n_components: int = 30,
                        seed: int = 0) -> dict[str, float]:
  """The scanpy-style baseline on already log-normalised, selected features: scale, PCA, KMeans."""
  from sklearn.decomposition import PCA

  x = np.asarray(x, np.float64)
  x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
  pcs = PCA(min(n_components, min(x.shape) - 1), random_state=seed).fit_transform(x)
  return clustering_scores(labels_true, kmeans_labels(pcs, n_clusters, seed))


# --------------------------------------------------------------------------------------------
# Spatial clustering: a graph autoencoder over the spatial neighbour graph.

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from infl_jax.federated import Task  # noqa: E402
from infl_jax.keyed import keyed  # noqa: E402
from infl_jax.tasks.graph import mean_aggregate  # noqa: E402


class SpatialGraphAutoencoder(nn.Module):
  """Dense -> neighbour mean -> Dense -> neighbour mean = embedding; MLP decoder back to the genes.

  ``__call__(x [N, G], neighbors [N, K], weights [N, K]) -> (z [N, E], reconstruction [N, G])``.
  """

  num_genes: int
  hidden: int = 128
  embed_dim: int = 16
  linear_encoder: bool = False

  @nn.compact
  def __call__(self, x, neighbors, weights):
    h = nn.Dense(self.hidden, name="enc_0")(x)
    if not self.linear_encoder:
      h = nn.silu(h)
    h = mean_aggregate(h, neighbors, weights)
    z = nn.Dense(self.embed_dim, name="enc_1")(h)
    z = mean_aggregate(z, neighbors, weights)
    out = nn.Dense(self.num_genes, name="dec_1")(nn.silu(nn.Dense(self.hidden, name="dec_0")(z)))
    return z, out


def make_spatial_model(num_genes: int, *, hidden: int = 128, embed_dim: int = 16, key_strength: float = 1.0,
                       variant: str = "modulation"):
  return keyed(SpatialGraphAutoencoder(num_genes, hidden, embed_dim), key_strength=key_strength, variant=variant,
               film_skip=("dec_1",))


def whole_graph(batch, mask):
  """Undoes the engine's row shuffle: with batch size = the client's padded node count, a batch
  holds every row once, so scattering by ``row`` restores the client's node order (padding adds 0)."""
  rows = batch["row"]
  n = rows.shape[0]

  def place(a):
    m = mask.reshape((-1,) + (1,) * (a.ndim - 1)).astype(a.dtype)
    return jnp.zeros_like(a).at[rows].add(a * m)

  return {k: place(v) for k, v in batch.items() if k != "row"}, jnp.zeros((n,), mask.dtype).at[rows].add(mask)


def spatial_task(model, *, input_dropout: float = 0.2) -> Task:
  """Denoising reconstruction of every real spot's genes through the graph encoder."""

  def loss(params, model_state, batch, mask, rng, context):
    graph, node_mask = whole_graph(batch, mask)
    x = graph["x"]
    noisy = x * jax.random.bernoulli(rng, 1.0 - input_dropout, x.shape) / (1.0 - input_dropout)
    _, recon = model.apply({"params": params, **model_state}, noisy, graph["neighbors"].astype(jnp.int32),
                           graph["weights"], key_coords=context)
    err = jnp.mean(jnp.square(recon - x), -1)
    return jnp.sum(err * node_mask) / jnp.maximum(node_mask.sum(), 1.0), model_state

  return Task(loss=loss)
