"""Clustering of learned embeddings and its scores: KMeans (or Leiden) then ARI / NMI against labels."""

from __future__ import annotations

import numpy as np

__all__ = ["cluster_embedding", "clustering_scores", "format_clustering_summary", "kmeans_labels",
           "pca_kmeans_baseline"]


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


def format_clustering_summary(summary: dict) -> str:
  """Readable lines of a clustering task's summary: ARI/NMI per way of running the model, then the baselines."""

  def fmt(scores):
    if "ari" in scores:
      return f"ARI {scores['ari']:.3f}  NMI {scores['nmi']:.3f}"
    return "  ".join(f"{label}: {fmt(v)}" for label, v in scores.items() if v is not None)

  lines = [f"{summary['task']} on {summary['dataset']} after {summary['rounds']} rounds:"]
  for name, scores in summary["clustering"].items():
    lines.append(f"  federated {name:<22s} {fmt(scores)}")
  for name, scores in summary.get("baselines", {}).items():
    lines.append(f"  baseline  {name:<22s} {fmt(scores)}")
  return "\n".join(lines)
