"""``load_dataset``: one call from a data set name, an .h5ad path, an AnnData object, or a list
of per-site inputs, to a preprocessed ``FederatedSplit``."""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Sequence

import numpy as np

from infl_jax.data import anndata_io, builtin
from infl_jax.data.errors import BUILTIN_NAMES, DataError, did_you_mean, preview
from infl_jax.data.preprocess import Preprocessor
from infl_jax.data.split import PARTITIONS, FederatedSplit, make_federated_split

__all__ = ["load_dataset"]


def load_dataset(
    source,
    *,
    label_key: str | None = None,
    client_key: str | None = None,
    n_clients: int | None = None,
    partition: str | None = None,
    alpha: float | None = None,
    classes_per_client: int = 2,
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
    default_n_clients: int | None = None,
) -> FederatedSplit:
  """Loads omics data for federated classification.

  Args:
    source: a built-in name (``"proteomics"``, ``"pbmc"``), a path to an .h5ad file, an AnnData object, or a
      list of those, one per site (clients = sites by default; panels must match unless ``join="inner"``).
    label_key: obs column with the class label (built-ins have a default).
    client_key: obs column whose values are the clients (site, plate, patient); selects ``partition="column"``.
    n_clients: number of clients. With ``partition="column"``, None means one per
      distinct value and a larger number splits the biggest groups (stratified, seeded).
    partition: ``"column"``, ``"iid"``, ``"dirichlet"`` or ``"dirichlet-balanced"`` (``alpha``), ``"label-skew"``
      (``classes_per_client``). Default: the built-in's, else ``"column"`` with a ``client_key``, else ``"iid"``.
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
    default_n_clients: n_clients where a partition needs one and neither caller nor built-in gives it (infl-train: 5).
  """
  adata, spec, default_client_key, origin = _resolve_source(
      source, join=join, site_names=site_names, layer=layer, use_raw=use_raw)
  options = _settle_options(adata, spec, default_client_key, origin, label_key=label_key, client_key=client_key,
                            n_clients=n_clients, partition=partition, alpha=alpha, log_transform=log_transform,
                            default_n_clients=default_n_clients)
  union_info = _union_feature_join(adata)
  if union_info is not None and impute is None:
    # Features a site did not measure are NaN: fill them with the training mean of the sites
    # that measured them, which standardisation maps to exactly 0 (the masked value).
    impute = "mean"
  samples = _read_labelled_samples(
      adata, options, drop_unlabelled=drop_unlabelled, layer=layer, use_raw=use_raw,
      matrix_in_x=spec is not None or isinstance(source, (list, tuple)))
  samples = _drop_rare_classes(samples, min_class_count)
  name = spec.name if spec is not None else origin
  split = make_federated_split(
      samples.x, samples.y, partition=options.partition, n_clients=options.n_clients, groups=samples.groups,
      alpha=options.alpha, classes_per_client=classes_per_client, val_fraction=val_fraction,
      test_fraction=test_fraction, seed=seed,
      preprocessor=Preprocessor(log_transform=options.log_transform, impute=impute, n_top_features=n_top_features,
                                standardize=standardize),
      min_client_size=min_client_size, feature_names=samples.feature_names, class_names=samples.class_names,
      sample_ids=samples.sample_ids, description=_describe(name, options, samples.notes))
  _record_provenance(split, name, options, union_info, layer=layer, use_raw=use_raw, min_class_count=min_class_count,
                     drop_unlabelled=drop_unlabelled, join=join)
  return split


def _resolve_source(source, *, join: str, site_names, layer, use_raw):
  """(AnnData, built-in spec or None, default client_key, readable origin)."""
  if isinstance(source, str) and source in builtin.BUILTIN_DATASETS:
    spec = builtin.get_builtin(source)
    if layer is not None or use_raw:
      raise DataError(f"built-in {source!r} fixes its own matrix; drop --layer (layer=/use_raw= in Python; or"
                      " load_builtin_anndata and pass the AnnData)")
    return builtin.load_builtin_anndata(source), spec, spec.client_key, source
  if isinstance(source, (list, tuple)):
    adata = anndata_io.load_sites(source, site_names=site_names, join=join, layer=layer, use_raw=use_raw)
    return adata, None, "site", f"{len(source)} sites"
  if isinstance(source, str) and not pathlib.Path(source).suffix and not os.path.exists(source):
    raise DataError(
        f"unknown dataset {source!r}{did_you_mean(source, BUILTIN_NAMES)}; built-in data sets (--dataset):"
        f" {', '.join(BUILTIN_NAMES)}; or pass a path to an .h5ad file, or an AnnData object")
  adata = anndata_io.as_anndata(source)
  origin = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "AnnData"
  return adata, None, None, origin


@dataclasses.dataclass(frozen=True)
class _LoadOptions:
  """The caller's choices with the built-in's (or generic) defaults filled in and checked."""

  label_key: str
  client_key: str | None  # set exactly when partition == "column"
  partition: str
  n_clients: int | None
  alpha: float
  log_transform: str


@dataclasses.dataclass(frozen=True)
class _LabelledSamples:
  """The rows handed to the split, and what was left out on the way (for the description)."""

  x: np.ndarray
  y: np.ndarray
  groups: np.ndarray | None  # client values per row, only for partition="column"
  sample_ids: np.ndarray
  feature_names: list[str]
  class_names: list[str]
  notes: tuple[str, ...] = ()


def _settle_options(adata, spec, default_client_key, origin, *, label_key, client_key, n_clients, partition,
                    alpha, log_transform, default_n_clients) -> _LoadOptions:
  """Fills unset options from the built-in ``spec`` (or generic defaults) and rejects bad combinations."""
  label_key = _choose_label_key(label_key, adata, spec, origin)
  partition = _choose_partition(partition, client_key, spec, default_client_key)
  client_key, n_clients = _choose_clients(partition, client_key, n_clients, adata, spec, default_client_key,
                                          default_n_clients)
  if alpha is None:
    alpha = spec.alpha if spec is not None else 0.5
  if log_transform is None:
    log_transform = spec.log_transform if spec is not None else "none"
  return _LoadOptions(label_key=label_key, client_key=client_key, partition=partition, n_clients=n_clients,
                      alpha=alpha, log_transform=log_transform)


def _choose_label_key(label_key, adata, spec, origin) -> str:
  """The caller's label column, else the built-in's; other data has no sensible default."""
  if label_key is not None:
    return label_key
  if spec is None:
    raise DataError(
        f"a label column is required for {origin}: pass --label-key COLUMN (label_key is required in Python),"
        f" the obs column holding the class, one of {preview(list(adata.obs.columns), 30) or '(no obs columns)'}")
  return spec.label_key


def _choose_partition(partition, client_key, spec, default_client_key) -> str:
  """The caller's partition; a client_key implies "column"; else the built-in's, else by site if known."""
  if partition is None:
    if client_key is not None:
      partition = "column"
    elif spec is not None:
      partition = spec.partition
    else:
      partition = "column" if default_client_key else "iid"
  if partition not in PARTITIONS:
    raise DataError(f"unknown partition {partition!r}; choose --partition from {', '.join(PARTITIONS)}")
  return partition


def _choose_clients(partition, client_key, n_clients, adata, spec, default_client_key, default_n_clients):
  """(client_key, n_clients): the obs column naming clients for "column", else how many to draw."""
  if partition == "column":
    client_key = client_key or default_client_key
    if client_key is None:
      raise DataError(
          "--partition column needs --client-key COLUMN (client_key= in Python), the obs column with the"
          f" site/plate/patient; available obs columns: {preview(list(adata.obs.columns), 30)}; or use"
          f" --partition {'/'.join(p for p in PARTITIONS if p != 'column')} with --n-clients")
  elif client_key is not None:
    raise DataError(f"--client-key is only used with --partition column, not {partition!r}; drop one of them"
                    " (client_key=/partition= in Python)")
  # The built-in's client count only fits its own partition.
  if n_clients is None and spec is not None and partition == spec.partition:
    n_clients = spec.n_clients
  if partition != "column" and n_clients is None:
    n_clients = default_n_clients
  if partition != "column" and n_clients is None:
    raise DataError(f"--partition {partition} needs n_clients: pass --n-clients N (n_clients=N in Python)")
  return client_key, n_clients


def _union_feature_join(adata) -> dict | None:
  """``load_sites(join="union")``'s record of which site measured which feature, if ``adata`` has one."""
  union_info = adata.uns.get("feature_join", {}) if hasattr(adata, "uns") else {}
  return union_info if union_info.get("join") == "union" and "present" in union_info else None


def _read_labelled_samples(adata, options: _LoadOptions, *, drop_unlabelled, layer, use_raw,
                           matrix_in_x) -> _LabelledSamples:
  """Labels, client groups, features and sample ids of the labelled samples."""
  y, class_names, keep = anndata_io.encode_labels(adata, options.label_key, drop_unlabelled=drop_unlabelled)
  groups = anndata_io.obs_column(adata, options.client_key, "client")[keep] if options.partition == "column" else None
  if matrix_in_x:
    # Built-ins and load_sites already hold the chosen matrix in X.
    x, feature_names = anndata_io.feature_matrix(adata)
  else:
    x, feature_names = anndata_io.feature_matrix(adata, layer=layer, use_raw=use_raw)
  notes = () if keep.all() else (f"{int((~keep).sum())} unlabelled samples dropped",)
  return _LabelledSamples(x=x[keep], y=y, groups=groups, sample_ids=np.asarray(adata.obs_names, dtype=str)[keep],
                          feature_names=feature_names, class_names=class_names, notes=notes)


def _drop_rare_classes(samples: _LabelledSamples, min_class_count: int | None) -> _LabelledSamples:
  """Leaves out classes with fewer than ``min_class_count`` samples and renumbers the rest 0..C-1."""
  if min_class_count is None:
    return samples
  counts = np.bincount(samples.y, minlength=len(samples.class_names))
  rare = np.flatnonzero(counts < min_class_count)
  if not rare.size:
    return samples
  note = f"classes with < {min_class_count} samples dropped: {preview([samples.class_names[c] for c in rare])}"
  kept_classes = np.flatnonzero(counts >= min_class_count)
  if kept_classes.size < 2:
    raise DataError(f"--min-class-count {min_class_count} leaves {kept_classes.size} class(es); lower it"
                    " (min_class_count= in Python)")
  rows = np.isin(samples.y, kept_classes)
  remap = np.full(len(samples.class_names), -1, np.int32)
  remap[kept_classes] = np.arange(kept_classes.size, dtype=np.int32)
  return dataclasses.replace(
      samples, x=samples.x[rows], y=remap[samples.y[rows]], sample_ids=samples.sample_ids[rows],
      groups=samples.groups[rows] if samples.groups is not None else None,
      class_names=[samples.class_names[c] for c in kept_classes], notes=samples.notes + (note,))


def _describe(name: str, options: _LoadOptions, notes: Sequence[str]) -> str:
  """Where the data came from, its label and client columns, and what loading left out."""
  description = (f"{name} [label {options.label_key}"
                 + (f", clients by {options.client_key}" if options.partition == "column" else "") + "]")
  if notes:
    description += " (" + "; ".join(notes) + ")"
  return description


def _record_provenance(split: FederatedSplit, name: str, options: _LoadOptions, union_info: dict | None,
                       **loader_args) -> None:
  """Adds the loading options to ``split.config`` so the run can be reproduced from it."""
  split.config.update({"source": name, "label_key": options.label_key,
                       "client_key": options.client_key if options.partition == "column" else None, **loader_args})
  if union_info is not None:
    # Which features each client measured, on the features kept after preprocessing.
    present = np.asarray(union_info["present"]).astype(bool)
    site_names = [str(s) for s in union_info["sites"]]
    kept = split.preprocessing.feature_index
    split.config["join"] = "union"
    split.config["feature_present"] = {
        client: present[site_names.index(client)][kept].tolist() for client in split.client_names
        if client in site_names}
