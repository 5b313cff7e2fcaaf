"""``load_dataset``: one call from a data set name, an .h5ad path, an AnnData object, or a list
of per-site inputs, to a preprocessed ``FederatedSplit``."""

from __future__ import annotations

import difflib
import os
import pathlib
from typing import Sequence

import numpy as np

from infl_jax.data import anndata_io, builtin
from infl_jax.data.errors import DataError, preview
from infl_jax.data.preprocess import Preprocessor
from infl_jax.data.split import PARTITIONS, FederatedSplit, make_federated_split

__all__ = ["load_dataset"]


def _resolve_source(source, *, join: str, site_names, layer, use_raw):
  """(AnnData, built-in spec or None, default client_key, readable origin)."""
  if isinstance(source, str) and source in builtin.BUILTIN_DATASETS:
    spec = builtin.get_builtin(source)
    if layer is not None or use_raw:
      raise DataError(f"built-in {source!r} fixes its own matrix; drop layer=/use_raw= (or load_builtin_anndata and pass the AnnData)")
    return builtin.load_builtin_anndata(source), spec, spec.client_key, source
  if isinstance(source, (list, tuple)):
    adata = anndata_io.load_sites(source, site_names=site_names, join=join, layer=layer, use_raw=use_raw)
    return adata, None, "site", f"{len(source)} sites"
  if isinstance(source, str) and not pathlib.Path(source).suffix and not os.path.exists(source):
    close = difflib.get_close_matches(source, builtin.available_datasets(), n=1)
    raise DataError(
        f"unknown dataset {source!r}{f' (did you mean {close[0]!r}?)' if close else ''}; built-in data sets:"
        f" {', '.join(builtin.available_datasets())}; or pass a path to an .h5ad file, or an AnnData object")
  adata = anndata_io.as_anndata(source)
  origin = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "AnnData"
  return adata, None, None, origin


def load_dataset(
    source,
    *,
    label_key: str | None = None,
    client_key: str | None = None,
    n_clients: int | None = None,
    partition: str | None = None,
    alpha: float | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    seed: int = 0,
    layer: str | None = None,
    use_raw: bool = False,
    log_transform: str | None = None,
    impute: str | None = None,
    n_top_features: int | None = None,
    standardize: bool = True,
    min_client_size: int = 2,
    min_class_count: int | None = None,
    drop_unlabelled: bool = False,
    join: str = "exact",
    site_names: Sequence[str] | None = None,
) -> FederatedSplit:
  """Loads omics data for federated classification.

  Args:
    source: a built-in name (``"proteomics"``, ``"pbmc"``), a path to an .h5ad file, an
      AnnData object, or a list of those, one per site (clients = sites by default; the
      panels must match unless ``join="inner"``).
    label_key: obs column with the class label (built-ins have a default).
    client_key: obs column whose values are the clients (site, plate, patient). Giving it
      selects ``partition="column"``.
    n_clients: number of clients. With ``partition="column"``, None means one per
      distinct value and a larger number splits the biggest groups (stratified, seeded).
    partition: ``"column"``, ``"iid"`` or ``"dirichlet"`` (label skew, ``alpha``).
      Default: the built-in's, else ``"column"`` with a ``client_key``, else ``"iid"``.
    val_fraction, test_fraction: held-out shares, stratified by label, drawn before the
      client partition so central and federated training use the same training samples.
    seed: one seed for the held-out split and the partition (independent streams).
    layer, use_raw: which matrix of the AnnData to read (default ``X``).
    log_transform: ``"none"``, ``"log1p"`` or ``"log2"`` (built-in default, else none).
    impute: None (NaNs are an error), ``"median"`` or ``"mean"`` of the training split.
    n_top_features: keep the features of highest training-split variance.
    standardize: per-feature z-score with the training split's mean and std.
    min_client_size: a Dirichlet draw leaving a client smaller than this is redrawn.
    min_class_count: drop classes with fewer samples than this before splitting.
    drop_unlabelled: leave out samples whose label is missing instead of failing.
    join: for several sites: ``"exact"``, ``"inner"`` (shared features only) or ``"union"``
      (every feature; a site's unmeasured ones are filled with the training mean of the sites
      that measured them, i.e. 0 after standardisation; ``config["feature_present"]`` holds
      each client's mask).
    site_names: names of the sites in a list ``source`` (default: file stems).
  """
  adata, spec, default_client_key, origin = _resolve_source(
      source, join=join, site_names=site_names, layer=layer, use_raw=use_raw)

  if label_key is None:
    if spec is None:
      raise DataError(
          f"label_key is required for {origin}: pass the obs column holding the class, one of "
          f"{preview(list(adata.obs.columns), 30) or '(no obs columns)'}")
    label_key = spec.label_key
  if partition is None:
    if client_key is not None:
      partition = "column"
    elif spec is not None:
      partition = spec.partition
    else:
      partition = "column" if default_client_key else "iid"
  if partition not in PARTITIONS:
    raise DataError(f"unknown partition {partition!r}; choose one of {', '.join(PARTITIONS)}")
  if partition == "column":
    client_key = client_key or default_client_key
    if client_key is None:
      raise DataError(
          "partition='column' needs client_key=<obs column with the site/plate/patient>; available obs"
          f" columns: {preview(list(adata.obs.columns), 30)}; or use partition='iid'/'dirichlet' with n_clients")
  elif client_key is not None:
    raise DataError(f"client_key is only used with partition='column', not {partition!r}; drop one of them")
  if n_clients is None and spec is not None and partition == spec.partition:
    n_clients = spec.n_clients
  if partition != "column" and n_clients is None:
    raise DataError(f"partition={partition!r} needs n_clients (e.g. n_clients=5)")
  if alpha is None:
    alpha = spec.alpha if spec is not None else 0.5
  if log_transform is None:
    log_transform = spec.log_transform if spec is not None else "none"
  union_info = adata.uns.get("feature_join", {}) if hasattr(adata, "uns") else {}
  union_join = union_info.get("join") == "union" and "present" in union_info
  if union_join and impute is None:
    # Features a site did not measure are NaN: fill them with the training mean of the sites
    # that measured them, which standardisation maps to exactly 0 (the masked value).
    impute = "mean"

  y, class_names, keep = anndata_io.encode_labels(adata, label_key, drop_unlabelled=drop_unlabelled)
  groups = anndata_io.obs_column(adata, client_key, "client")[keep] if partition == "column" else None
  if spec is not None or isinstance(source, (list, tuple)):
    # Built-ins and load_sites already hold the chosen matrix in X.
    x, feature_names = anndata_io.feature_matrix(adata)
  else:
    x, feature_names = anndata_io.feature_matrix(adata, layer=layer, use_raw=use_raw)
  x = x[keep]
  sample_ids = np.asarray(adata.obs_names, dtype=str)[keep]

  notes = []
  if not keep.all():
    notes.append(f"{int((~keep).sum())} unlabelled samples dropped")
  if min_class_count is not None:
    counts = np.bincount(y, minlength=len(class_names))
    rare = np.flatnonzero(counts < min_class_count)
    if rare.size:
      notes.append(f"classes with < {min_class_count} samples dropped: {preview([class_names[c] for c in rare])}")
      kept_classes = np.flatnonzero(counts >= min_class_count)
      if kept_classes.size < 2:
        raise DataError(f"min_class_count={min_class_count} leaves {kept_classes.size} class(es); lower it")
      rows = np.isin(y, kept_classes)
      remap = np.full(len(class_names), -1, np.int32)
      remap[kept_classes] = np.arange(kept_classes.size, dtype=np.int32)
      x, y, sample_ids = x[rows], remap[y[rows]], sample_ids[rows]
      groups = groups[rows] if groups is not None else None
      class_names = [class_names[c] for c in kept_classes]

  name = spec.name if spec is not None else origin
  description = f"{name} [label {label_key}" + (f", clients by {client_key}" if partition == "column" else "") + "]"
  if notes:
    description += " (" + "; ".join(notes) + ")"
  split = make_federated_split(
      x, y, partition=partition, n_clients=n_clients, groups=groups, alpha=alpha,
      val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
      preprocessor=Preprocessor(log_transform=log_transform, impute=impute, n_top_features=n_top_features,
                                standardize=standardize),
      min_client_size=min_client_size, feature_names=feature_names, class_names=class_names,
      sample_ids=sample_ids, description=description)
  split.config.update({"source": name, "label_key": label_key, "client_key": client_key if partition == "column" else None,
                       "layer": layer, "use_raw": use_raw, "min_class_count": min_class_count,
                       "drop_unlabelled": drop_unlabelled, "join": join})
  if union_join:
    present = np.asarray(union_info["present"]).astype(bool)
    site_names_ = [str(s) for s in union_info["sites"]]
    kept = split.preprocessing.feature_index
    split.config["join"] = "union"
    split.config["feature_present"] = {
        name: present[site_names_.index(name)][kept].tolist() for name in split.client_names if name in site_names_}
  return split
