"""Multi-omics data with modalities missing per client ("mosaic"), for federated clustering.

Built-in ``nutrimouse`` (mvlearn >= 0.5 ``load_nutrimouse``): 40 mice, 120 hepatic genes and 21
hepatic lipids (fatty-acid percentages), labels ``diet`` (5) and ``genotype`` (2). The mice go
to three clients, stratified by diet (seeded): ``genes_only``, ``lipids_only`` and ``both``;
a client's missing modality is never read (its rows are zeros with ``present`` False).

Scaling uses the pooled statistics of the clients that measured a modality (a federated mean and
variance, which secure aggregation can give); clients that lack it contribute nothing. Two
per-modality transforms (``MODALITY_TRANSFORMS``):

* ``"standard"``: per-feature z-scores (for expression already on a log scale, like the genes);
* ``"log_composition"``: for compositions such as fatty-acid percentages: ``log(x + pseudocount)``
  per value, centred per feature and divided by one pooled std over all features. Per-feature
  z-scores would inflate trace lipids (near-zero percentages, mostly noise) to the weight of the
  major ones; on nutrimouse KMeans finds the diets with ARI 1.00 on log-composition lipids and
  0.42 on z-scored ones. The built-in applies it to the lipids.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from infl_jax.data.errors import DataError

__all__ = ["MosaicData", "MOSAIC_CLIENTS", "MODALITY_TRANSFORMS", "load_mosaic", "load_nutrimouse",
           "mosaic_from_arrays"]

# Which modalities each built-in client holds.
MOSAIC_CLIENTS = {"genes_only": ("genes",), "lipids_only": ("lipids",), "both": ("genes", "lipids")}
MODALITY_TRANSFORMS = ("standard", "log_composition")
NUTRIMOUSE_TRANSFORMS = {"genes": "standard", "lipids": "log_composition"}
# Half the smallest non-zero fatty-acid percentage nutrimouse reports (0.2 %): keeps log finite at 0.
LOG_PSEUDOCOUNT = 0.1


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


def _scale(x: np.ndarray, have: np.ndarray, transform: str, name: str) -> np.ndarray:
  """``x`` transformed and scaled with statistics of the rows in ``have`` only."""
  if transform == "log_composition":
    if (x[have] < 0).any():
      raise DataError(f"modality {name!r} holds negative values, so it is not a composition; "
                      "use transform 'standard' for it")
    x = np.log(np.maximum(x, 0.0) + LOG_PSEUDOCOUNT)
    mean = x[have].mean(0)
    std = float((x[have] - mean).std())
    return (x - mean) / (std if std > 1e-12 else 1.0)
  mean = x[have].mean(0)
  std = x[have].std(0)
  return (x - mean) / np.where(std > 1e-12, std, 1.0)


def mosaic_from_arrays(modalities: dict[str, np.ndarray], present: np.ndarray, client: np.ndarray,
                       client_names, labels: dict[str, np.ndarray], label_names: dict[str, list[str]],
                       feature_names: dict[str, list[str]] | None = None, sample_ids=None,
                       description: str = "", transforms: dict[str, str] | None = None) -> MosaicData:
  """Scales each modality on the samples that hold it (``transforms[m]``, default ``"standard"``)
  and zeroes the absent rows."""
  names = list(modalities)
  transforms = dict(transforms or {})
  for m, t in transforms.items():
    if m not in names:
      raise DataError(f"transforms names modality {m!r}, which the data does not hold; modalities: {names}")
    if t not in MODALITY_TRANSFORMS:
      raise DataError(f"unknown transform {t!r} for modality {m!r}; choose one of {MODALITY_TRANSFORMS}")
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
    transform = transforms.get(m, "standard")
    z = _scale(np.where(have[:, None], x, 0.0), have, transform, m)
    out[m] = np.where(have[:, None], z, 0.0).astype(np.float32)
    full[m] = _scale(x, have, transform, m).astype(np.float32) if np.isfinite(x).all() else None
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
      transforms=NUTRIMOUSE_TRANSFORMS,
      description=f"nutrimouse (mvlearn): {n} mice, 120 genes + 21 lipids; clients "
                  + ", ".join(f"{c} ({int((client == k).sum())})" for k, c in enumerate(client_names))
                  + "; genes z-scored, lipids log-composition")


def load_mosaic(source, *, seed: int = 0, modality_key: str = "modality", client_key: str = "site",
                label_keys=("label",), transforms: dict[str, str] | None = None) -> MosaicData:
  """``"nutrimouse"``, or an AnnData/h5ad whose ``var[modality_key]`` names each feature's modality
  and whose absent modalities are NaN rows (a sample's modality counts as present if any value is finite).
  ``transforms``: modality -> ``"standard"`` | ``"log_composition"`` (h5ad input; default standard)."""
  if isinstance(source, str) and source == "nutrimouse":
    if transforms:
      raise DataError("the built-in nutrimouse fixes its transforms (genes standard, lipids log_composition);"
                      " pass transforms only with an h5ad/AnnData input")
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
                            transforms=transforms,
                            description=f"{source if isinstance(source, str) else 'AnnData'}: mosaic multi-omics")
