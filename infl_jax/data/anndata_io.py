"""Reading AnnData / h5ad input: files, in-memory objects, and several sites' files at once.

anndata is imported inside the functions that need it: the accelerator image does not ship
it, and code that only consumes a finished ``FederatedSplit`` must import without it.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from infl_jax.data.errors import BUILTIN_NAMES, DataError, did_you_mean, preview

if TYPE_CHECKING:
  import anndata

__all__ = [
    "PanelAlignment",
    "align_feature_panels",
    "as_anndata",
    "encode_labels",
    "feature_matrix",
    "is_anndata",
    "load_sites",
    "obs_column",
    "read_h5ad",
    "take_aligned_columns",
    "union_feature_mask",
]

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_OTHER_FORMATS = {
    ".csv": "pandas.read_csv then anndata.AnnData(df.values, ...)",
    ".tsv": "pandas.read_csv(sep='\\t') then anndata.AnnData(...)",
    ".loom": "scanpy.read_loom",
    ".mtx": "scanpy.read_10x_mtx",
    ".h5": "scanpy.read_10x_h5",
    ".zarr": "anndata.read_zarr",
    ".rds": "R: zellkonverter/SeuratDisk to write an h5ad",
    ".adat": "somadata.read_adat, then build an AnnData from its values",
}


def _import_anndata():
  try:
    import anndata
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise DataError(
        "reading AnnData/h5ad needs the 'anndata' package, which is not installed here; install it"
        " (pip install 'infl-lsanet-jax[omics]'), or load the data on a machine that has it") from e
  return anndata


def is_anndata(obj) -> bool:
  # Duck-typed so that checking a plain array never imports anndata.
  return type(obj).__name__ == "AnnData" and hasattr(obj, "obs") and hasattr(obj, "var_names")


def read_h5ad(path) -> "anndata.AnnData":
  """Reads one .h5ad file, with errors that say what is wrong with the path."""
  path = pathlib.Path(os.fspath(path)).expanduser()
  if not path.exists():
    hint = ""
    if path.parent.is_dir():
      near = sorted(p.name for p in path.parent.glob("*.h5ad"))[:10]
      hint = f"; .h5ad files in {path.parent}: {', '.join(near)}" if near else f"; {path.parent} holds no .h5ad file"
    raise DataError(f"data file not found: {path}{hint}. Check the path, or pass a built-in name as --dataset:"
                    f" {', '.join(BUILTIN_NAMES)}")
  if path.is_dir():
    raise DataError(f"{path} is a folder; pass the .h5ad file inside it")
  suffix = path.suffix.lower()
  if suffix != ".h5ad":
    how = _OTHER_FORMATS.get(suffix)
    fix = f"convert it first ({how}) and write it with adata.write_h5ad(...)" if how else (
        "convert it to AnnData and write it with adata.write_h5ad(...)")
    raise DataError(f"{path} is not an .h5ad file (suffix {suffix or 'none'!r}); {fix}, or pass the AnnData object itself")
  with open(path, "rb") as f:
    magic = f.read(8)
  if magic != _HDF5_MAGIC:
    raise DataError(
        f"{path} is not a valid h5ad file (not HDF5: the file is truncated, corrupted, or another format"
        " renamed to .h5ad); rewrite it with adata.write_h5ad(...)")
  anndata = _import_anndata()
  try:
    return anndata.read_h5ad(path)
  except Exception as e:  # anndata raises many types for malformed files
    raise DataError(f"could not read {path} as AnnData ({type(e).__name__}: {e}); rewrite it with adata.write_h5ad(...)") from e


def as_anndata(source) -> "anndata.AnnData":
  """A path to an .h5ad file or an AnnData object, as an AnnData object."""
  if is_anndata(source):
    return source
  if isinstance(source, (str, os.PathLike)):
    return read_h5ad(source)
  raise DataError(
      f"expected a dataset name, an .h5ad path or an AnnData object, got {type(source).__name__}; for plain"
      " arrays use make_federated_split(x, y, ...)")


# The obs columns infl-train takes as flags; the other purposes are set from Python only.
_OBS_FLAGS = {"label": "--label-key", "client": "--client-key"}


def obs_column(adata, key: str, purpose: str) -> np.ndarray:
  """``adata.obs[key]`` as an object array, or an error that suggests near misses and lists the columns."""
  columns = list(adata.obs.columns)
  if key not in columns:
    python = f"{purpose.replace(' ', '_')}_key="
    how = f"{_OBS_FLAGS[purpose]} ({python} in Python)" if purpose in _OBS_FLAGS else python
    raise DataError(
        f"{purpose} column {key!r} not found in adata.obs{did_you_mean(key, columns)}; available obs columns: "
        f"{preview(columns, 30) or '(none)'}. Pass one of them as {how}")
  return adata.obs[key].to_numpy(dtype=object)


def _is_missing(values: np.ndarray) -> np.ndarray:
  return np.array([v is None or (isinstance(v, (float, np.floating)) and np.isnan(v))
                   or (isinstance(v, str) and v.strip() == "") for v in values], bool)


def encode_labels(adata, label_key: str, *, drop_unlabelled: bool = False
                  ) -> tuple[np.ndarray, list[str], np.ndarray]:
  """Integer class ids, class names, and the mask of kept (labelled) samples.

  Categorical columns keep their category order (restricted to categories present);
  other columns are sorted. Continuous float labels are refused: this is classification.
  """
  series = adata.obs[label_key] if label_key in adata.obs.columns else None
  values = obs_column(adata, label_key, "label")
  missing = _is_missing(values)
  if missing.any() and not drop_unlabelled:
    raise DataError(
        f"label column {label_key!r} is missing for {int(missing.sum())} of {len(values)} samples; pass"
        " --drop-unlabelled (drop_unlabelled=True in Python) to leave them out, or fill them in adata.obs first")
  keep = ~missing
  values = values[keep]
  if values.size == 0:
    raise DataError(f"label column {label_key!r} has no labelled samples")
  import pandas as pd

  if pd.api.types.is_float_dtype(series.dtype):
    as_float = values.astype(float)
    if not np.all(as_float == np.round(as_float)) or len(np.unique(as_float)) > max(50, len(as_float) // 2):
      raise DataError(
          f"label column {label_key!r} holds continuous values ({len(np.unique(as_float))} distinct); this"
          " loader is for classification: bin them (pandas.cut) or pick a categorical column as --label-key")
    values = as_float.astype(np.int64)
  if isinstance(series.dtype, pd.CategoricalDtype):
    present = set(values.tolist())
    class_names = [str(c) for c in series.cat.categories if c in present]
    lookup = {str(c): i for i, c in enumerate(class_names)}
    y = np.array([lookup[str(v)] for v in values], np.int32)
  else:
    integer_like = all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in values)
    uniq, y = np.unique(values.astype(np.int64) if integer_like else values.astype(str), return_inverse=True)
    class_names = [str(c) for c in uniq]
    y = y.astype(np.int32)
  if len(class_names) < 2:
    raise DataError(
        f"label column {label_key!r} has a single class ({class_names[0]!r}) among the kept samples; a"
        " classifier needs at least 2: pick another --label-key or include samples of other classes")
  return y, class_names, keep


def feature_matrix(adata, *, layer: str | None = None, use_raw: bool = False) -> tuple[np.ndarray, list[str]]:
  """Dense float32 [samples, features] from ``X``, a layer, or ``raw.X``, with feature names."""
  if layer is not None and use_raw:
    raise DataError("pass either layer= or use_raw=True, not both")
  if use_raw:
    if adata.raw is None:
      raise DataError("use_raw=True but the AnnData has no .raw; drop use_raw or pass layer=")
    x, names = adata.raw.X, adata.raw.var_names
  elif layer is not None:
    if layer not in adata.layers:
      layers = list(adata.layers.keys())
      raise DataError(f"layer {layer!r} not found{did_you_mean(layer, layers)}; available layers:"
                      f" {preview(layers) or '(none)'}; pass one of them as --layer (layer= in Python), or drop"
                      " --layer to read X")
    x, names = adata.layers[layer], adata.var_names
  else:
    x, names = adata.X, adata.var_names
  if x is None:
    raise DataError(f"the AnnData has no X matrix; pass --layer NAME (layer= in Python) to use one of its layers:"
                    f" {preview(list(adata.layers.keys())) or '(none)'}")
  if hasattr(x, "toarray"):
    x = x.toarray()
  x = np.asarray(x)
  if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
    raise DataError(f"the feature matrix has dtype {x.dtype}, not numbers; pass --layer NAME (layer= in Python)"
                    " with a numeric layer")
  names = [str(n) for n in names]
  if len(set(names)) != len(names):
    dup = sorted({n for n in names if names.count(n) > 1}) if len(names) < 50_000 else ["..."]
    raise DataError(f"feature names are not unique ({preview(dup)}); call adata.var_names_make_unique() first")
  return x.astype(np.float32, copy=False), names


@dataclasses.dataclass
class PanelAlignment:
  """How each site's feature panel maps onto the common panel.

  ``site_columns[s][j]`` is the column of site s holding common feature j, or -1 where the
  site did not measure it (only possible with ``join="union"``); ``present`` is the
  matching [sites, features] mask, the shape a masked union join will need.
  """

  feature_names: list[str]
  site_columns: list[np.ndarray]
  present: np.ndarray
  join: str


def align_feature_panels(panels: Sequence[Sequence[str]], site_names: Sequence[str],
                         join: str = "exact") -> PanelAlignment:
  """Aligns per-site feature lists to one panel (first site's order), or explains the mismatch."""
  if join not in ("exact", "inner", "union"):
    raise DataError(f"unknown join {join!r}; choose 'exact' (panels must match), 'inner' (shared features) or 'union'")
  panels = [[str(f) for f in p] for p in panels]
  for name, p in zip(site_names, panels):
    if len(set(p)) != len(p):
      raise DataError(f"site {name!r} has duplicate feature names; call adata.var_names_make_unique() on it first")
  sets = [set(p) for p in panels]
  shared = set.intersection(*sets)
  union = set.union(*sets)
  if join == "exact" and shared != union:
    lines = []
    for name, p in zip(site_names, panels):
      missing = [f for f in panels[0] if f not in set(p)] + sorted(union - set(p) - set(panels[0]))
      extra = [f for f in p if f not in shared]
      if missing or extra:
        lines.append(f"site {name!r} lacks {len(missing)} ({preview(missing, 5) or '-'}) and has {len(extra)} not"
                     f" shared by all ({preview(extra, 5) or '-'})")
    raise DataError(
        f"feature panels differ between sites: {len(shared)} features shared, {len(union)} in total; "
        + "; ".join(lines) + f". Fix: pass join='inner' to keep only the {len(shared)} shared features,"
        f" join='union' to keep all {len(union)} with unmeasured ones masked per site, or align the panels yourself")
  if not shared and join != "union":
    raise DataError("the sites share no feature names at all; check that they use the same identifiers (gene symbols vs Ensembl ids)")
  if join == "union":
    # Every feature any site measured: the first site's order, then each later site's new ones.
    common, seen = [], set()
    for p in panels:
      for f in p:
        if f not in seen:
          seen.add(f)
          common.append(f)
  else:
    common = [f for f in panels[0] if f in shared]
  site_columns = []
  for p in panels:
    col = {f: i for i, f in enumerate(p)}
    site_columns.append(np.array([col.get(f, -1) for f in common], np.int64))
  present = np.stack([c >= 0 for c in site_columns])
  return PanelAlignment(common, site_columns, present, join)


def load_sites(sources: Sequence[Any], *, site_names: Sequence[str] | None = None, join: str = "exact",
               site_key: str = "site", layer: str | None = None, use_raw: bool = False) -> "anndata.AnnData":
  """One AnnData from several sites' AnnData objects or .h5ad files, with ``obs[site_key]``.

  The feature panels must match (``join="exact"``, any order) unless ``join="inner"`` is
  passed, which keeps the features every site has, or ``join="union"``, which keeps every
  feature any site has: a site's unmeasured features are NaN in ``X`` and
  ``uns["feature_join"]["present"]`` is the [sites, features] mask of measured ones. obs columns are outer-joined; sample
  names are prefixed with the site name where they collide.
  """
  anndata = _import_anndata()
  import pandas as pd

  if isinstance(sources, (str, os.PathLike)) or is_anndata(sources) or len(sources) == 0:
    raise DataError("load_sites expects a list of AnnData objects or .h5ad paths, one per site")
  adatas = [as_anndata(s) for s in sources]
  if site_names is None:
    site_names = [pathlib.Path(os.fspath(s)).stem if isinstance(s, (str, os.PathLike)) else f"site{i}"
                  for i, s in enumerate(sources)]
  site_names = [str(n) for n in site_names]
  if len(site_names) != len(adatas):
    raise DataError(f"got {len(adatas)} sites but {len(site_names)} site_names; pass one name per site")
  if len(set(site_names)) != len(site_names):
    raise DataError(f"site names must be unique, got {site_names}; pass site_names=[...]")
  matrices, panels = zip(*(feature_matrix(a, layer=layer, use_raw=use_raw) for a in adatas))
  alignment = align_feature_panels(panels, site_names, join)
  x = np.concatenate([take_aligned_columns(m, cols) for m, cols in zip(matrices, alignment.site_columns)], axis=0)
  obs_frames = []
  all_names = np.concatenate([np.asarray(a.obs_names, dtype=str) for a in adatas])
  collide = len(set(all_names)) != len(all_names)
  for name, a in zip(site_names, adatas):
    obs = a.obs.copy()
    if site_key in obs.columns:
      raise DataError(
          f"site {name!r} already has an obs column {site_key!r}, which would be overwritten; drop or rename"
          f" it (adata.obs.drop(columns={site_key!r})), or call load_sites(..., site_key='<other name>') and"
          " pass the result to load_dataset with client_key='<other name>'")
    obs[site_key] = name
    if collide:
      obs.index = [f"{name}:{i}" for i in obs.index]
    obs_frames.append(obs)
  obs = pd.concat(obs_frames, axis=0, join="outer")
  obs[site_key] = pd.Categorical(obs[site_key], categories=site_names)
  var = pd.DataFrame(index=pd.Index(alignment.feature_names, name=None))
  combined = anndata.AnnData(X=x, obs=obs, var=var)
  combined.uns["feature_join"] = {"join": join, "sites": site_names,
                                  "n_features_per_site": [len(p) for p in panels]}
  if join == "union":
    # Per-site panel mask: the loader uses it to tell "not measured here" from real missing values.
    combined.uns["feature_join"]["present"] = alignment.present.astype(np.uint8)
  return combined


def take_aligned_columns(x: np.ndarray, columns: np.ndarray) -> np.ndarray:
  """``x`` [n, site features] laid out on the common panel: column -1 (not measured) becomes NaN."""
  out = np.full((x.shape[0], len(columns)), np.nan, np.float32)
  have = columns >= 0
  out[:, have] = x[:, columns[have]]
  return out


def union_feature_mask(adata, site_key: str = "site") -> np.ndarray | None:
  """[samples, features] bool: whether each sample's site measured each feature (union joins only).

  None when ``adata`` is not the result of ``load_sites(..., join="union")``.
  """
  info = adata.uns.get("feature_join") if hasattr(adata, "uns") else None
  if not info or info.get("join") != "union" or "present" not in info:
    return None
  present = np.asarray(info["present"]).astype(bool)
  sites = [str(s) for s in info["sites"]]
  site_of = obs_column(adata, site_key, "site")
  index = {s: i for i, s in enumerate(sites)}
  rows = np.array([index[str(v)] for v in site_of])
  return present[rows]
