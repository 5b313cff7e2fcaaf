"""Real omics data sets that ship inside installable packages (no download at run time).

``proteomics``: the SomaScan plasma example ADAT of somadata 1.2.x. The 170 study samples
(SampleType "Sample"; calibrators, buffers and QC wells dropped) x 5,207 human protein
aptamers (Type "Protein"), in RFU; the default preprocessing takes log2. Label ``Sex``
(85 F / 85 M). Two plates (``PlateId``) are the natural sites: one client per plate, or
``n_clients=4`` for each plate split in two (label-stratified, seeded).

``pbmc``: scanpy's bundled ``pbmc68k_reduced``: 700 cells x 765 genes, label
``bulk_labels`` (10 FACS-sorted populations, 8 to 240 cells each). ``X`` here is the
log1p-normalised expression (the source's ``.raw.X``); the source's ``.X`` was scaled with
statistics of all 700 cells, which would leak held-out cells into training, so it is kept
only as ``layers["scaled_all_cells"]``. Clients by Dirichlet label skew (alpha 0.5, 5).

``pbmc_sites`` / ``pbmc_panels``: the same cells in 3 seeded iid sites (``obs["site"]``), with
full gene panels, or with each site missing its own disjoint 20% of the genes (heterogeneous
panels, aligned to the union with a per-site mask: ``uns["feature_join"]["present"]``).

``pbmc_patients``: the same cells in 5 sites (``obs["patient"]``) that hold two related populations each,
as sites that sorted different cell types would (docs/design.md, "Clients that hold few classes").
pbmc68k_reduced has no donor column, so these "patients" are built from the labels, not real donors; the
set shows how a federation of label-skewed sites trains from a user's .h5ad with the generic defaults.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pathlib
from typing import TYPE_CHECKING, Callable

import numpy as np

from infl_jax.data.errors import DataError

if TYPE_CHECKING:
  import anndata

__all__ = ["BUILTIN_DATASETS", "BuiltinDataset", "available_datasets", "load_builtin_anndata"]


@dataclasses.dataclass(frozen=True)
class BuiltinDataset:
  """A bundled data set and the defaults ``load_dataset`` uses for it."""

  name: str
  summary: str
  label_key: str
  client_key: str | None
  partition: str
  n_clients: int | None
  alpha: float
  log_transform: str
  build: Callable[[], "anndata.AnnData"]
  requires: str


def _require(package: str):
  """Imports an optional dependency, or says which package to install."""
  try:
    return importlib.import_module(package)
  except ImportError as e:
    raise DataError(
        f"this built-in data set needs the {package!r} package, which is not installed here; install it"
        f" (pip install {package}, or pip install 'infl-lsanet-jax[omics]')") from e


def _package_dir(package: str) -> pathlib.Path:
  module = _require(package)
  return pathlib.Path(module.__path__[0])


@functools.lru_cache(maxsize=None)
def _build_proteomics() -> "anndata.AnnData":
  anndata = _require("anndata")
  import pandas as pd

  adat_path = _package_dir("somadata") / "data" / "example_data.adat"
  if not adat_path.exists():
    raise DataError(f"somadata is installed but its example ADAT is missing ({adat_path}); reinstall somadata==1.2.6")
  adat = _require("somadata").read_adat(str(adat_path))
  obs = adat.index.to_frame(index=False)
  var = adat.columns.to_frame(index=False)
  rows = (obs["SampleType"] == "Sample").to_numpy()
  cols = (var["Type"] == "Protein").to_numpy()
  x = np.asarray(adat.values, dtype=np.float64)[np.ix_(rows, cols)]
  obs = obs.loc[rows].reset_index(drop=True)
  var = var.loc[cols].reset_index(drop=True)
  obs.index = pd.Index([f"{s}_{i}" for i, s in enumerate(obs["SampleId"].astype(str))])
  var.index = pd.Index(var["SeqId"].astype(str).to_numpy())
  # h5ad writing wants homogeneous column types.
  for frame in (obs, var):
    for c in frame.columns:
      if frame[c].dtype == object:
        frame[c] = frame[c].astype(str)
  for c in ("Sex", "PlateId"):
    obs[c] = obs[c].astype("category")
  adata = anndata.AnnData(X=x.astype(np.float32), obs=obs, var=var)
  adata.uns["source"] = "somadata example_data.adat (SomaScan plasma, RFU); SampleType=='Sample', Type=='Protein'"
  return adata


@functools.lru_cache(maxsize=None)
def _build_pbmc() -> "anndata.AnnData":
  anndata = _require("anndata")
  src = _require("scanpy").datasets.pbmc68k_reduced()
  log_norm = src.raw.X
  log_norm = np.asarray(log_norm.toarray() if hasattr(log_norm, "toarray") else log_norm, np.float32)
  if list(src.raw.var_names) != list(src.var_names):
    raise DataError("scanpy's pbmc68k_reduced changed layout (.raw and .X genes differ); pin scanpy>=1.10,<1.12")
  adata = anndata.AnnData(X=log_norm, obs=src.obs.copy(), var=src.raw.var.copy())
  adata.layers["scaled_all_cells"] = np.asarray(src.X, np.float32)
  adata.uns["source"] = "scanpy.datasets.pbmc68k_reduced(); X = raw.X (log1p of library-size-normalised counts)"
  return adata


PBMC_SITES = 3
PBMC_PANEL_DROP = 0.2


def _pbmc_site_adatas(drop_fraction: float):
  """pbmc split into 3 sites (seeded, iid); each site loses its own disjoint ``drop_fraction`` of genes."""
  adata = _build_pbmc()
  rng = np.random.default_rng(20261127)
  site_of = rng.permutation(np.arange(adata.n_obs) % PBMC_SITES)
  gene_order = rng.permutation(adata.n_vars)
  n_drop = int(round(drop_fraction * adata.n_vars))
  sites = []
  for s in range(PBMC_SITES):
    dropped = set(gene_order[s * n_drop:(s + 1) * n_drop].tolist())
    genes = [j for j in range(adata.n_vars) if j not in dropped]
    site = adata[site_of == s][:, genes].copy()
    del site.layers["scaled_all_cells"]
    sites.append(site)
  return sites


@functools.lru_cache(maxsize=None)
def _build_pbmc_sites() -> "anndata.AnnData":
  from infl_jax.data.anndata_io import load_sites

  combined = load_sites(_pbmc_site_adatas(0.0), site_names=[f"site{s}" for s in range(PBMC_SITES)], join="exact")
  combined.uns["source"] = "pbmc68k_reduced (log1p-normalised) in 3 seeded iid sites, full gene panels"
  return combined


@functools.lru_cache(maxsize=None)
def _build_pbmc_panels() -> "anndata.AnnData":
  from infl_jax.data.anndata_io import load_sites

  combined = load_sites(_pbmc_site_adatas(PBMC_PANEL_DROP), site_names=[f"site{s}" for s in range(PBMC_SITES)],
                        join="union")
  combined.uns["source"] = ("pbmc68k_reduced (log1p-normalised) in 3 seeded iid sites (as pbmc_sites); each site"
                            " lacks its own disjoint 20% of the genes; union join, unmeasured genes NaN + mask")
  return combined


# Two related populations per site, by lineage, so each site must learn from the others what its own pair is
# not. Sites are as unequal as sorted samples are (39 to 369 cells).
PBMC_PATIENT_POPULATIONS = {
    "myeloid": ("Dendritic", "CD14+ Monocyte"),
    "B_progenitor": ("CD19+ B", "CD34+"),
    "CD4_Treg_memory": ("CD4+/CD25 T Reg", "CD4+/CD45RO+ Memory"),
    "CD8": ("CD8+ Cytotoxic T", "CD8+/CD45RA+ Naive Cytotoxic"),
    "NK_naive_T": ("CD56+ NK", "CD4+/CD45RA+/CD25- Naive T"),
}


@functools.lru_cache(maxsize=None)
def _build_pbmc_patients() -> "anndata.AnnData":
  adata = _build_pbmc().copy()
  del adata.layers["scaled_all_cells"]
  site_of = {population: site for site, populations in PBMC_PATIENT_POPULATIONS.items() for population in populations}
  labels = adata.obs["bulk_labels"].astype(str)
  unplaced = sorted(set(labels) - set(site_of))
  if unplaced:
    raise DataError(f"scanpy's pbmc68k_reduced has populations no pbmc_patients site holds ({unplaced}); "
                    "pin scanpy>=1.10,<1.12")
  adata.obs["patient"] = labels.map(site_of).astype("category")
  adata.uns["source"] = ("pbmc68k_reduced (log1p-normalised) in 5 label-built sites (obs 'patient'), two related "
                         "populations each; not real donors")
  return adata


BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    "proteomics": BuiltinDataset(
        name="proteomics",
        summary="SomaScan plasma proteomics (somadata example ADAT): 170 samples x 5207 proteins, label Sex, 2 plates",
        label_key="Sex", client_key="PlateId", partition="column", n_clients=None, alpha=0.5,
        log_transform="log2", build=_build_proteomics, requires="somadata"),
    "pbmc": BuiltinDataset(
        name="pbmc",
        summary="scanpy pbmc68k_reduced: 700 cells x 765 genes (log1p-normalised), label bulk_labels (10 types)",
        label_key="bulk_labels", client_key=None, partition="dirichlet", n_clients=5, alpha=0.5,
        log_transform="none", build=_build_pbmc, requires="scanpy"),
    "pbmc_sites": BuiltinDataset(
        name="pbmc_sites",
        summary="pbmc in 3 iid sites with full gene panels (the reference for pbmc_panels)",
        label_key="bulk_labels", client_key="site", partition="column", n_clients=None, alpha=0.5,
        log_transform="none", build=_build_pbmc_sites, requires="scanpy"),
    "pbmc_panels": BuiltinDataset(
        name="pbmc_panels",
        summary="pbmc in the 3 sites of pbmc_sites, each missing a different 20% of the 765 genes (union join, masked)",
        label_key="bulk_labels", client_key="site", partition="column", n_clients=None, alpha=0.5,
        log_transform="none", build=_build_pbmc_panels, requires="scanpy"),
    "pbmc_patients": BuiltinDataset(
        name="pbmc_patients",
        summary="pbmc in 5 sites (obs 'patient', built from the labels) holding two related populations each",
        label_key="bulk_labels", client_key="patient", partition="column", n_clients=None, alpha=0.5,
        log_transform="none", build=_build_pbmc_patients, requires="scanpy"),
}


def available_datasets() -> list[str]:
  return sorted(BUILTIN_DATASETS)


def get_builtin(name: str) -> BuiltinDataset:
  try:
    return BUILTIN_DATASETS[name]
  except KeyError:
    raise DataError(
        f"unknown dataset {name!r}; built-in data sets: {', '.join(available_datasets())}; or pass a path"
        " to an .h5ad file, or an AnnData object") from None


def load_builtin_anndata(name: str) -> "anndata.AnnData":
  """The named built-in data set as a fresh AnnData (a copy; edit it freely)."""
  return get_builtin(name).build().copy()
