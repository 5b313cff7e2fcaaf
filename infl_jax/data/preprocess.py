"""Feature preprocessing fitted on the training split only, and reusable on new data.

``Preprocessor`` chains, in this order: a fixed log transform (no fitted state), per-feature
imputation of missing values (training median or mean), top-variance feature selection and
per-feature standardisation. Every fitted statistic comes from the rows passed to ``fit``
(the training clients pooled), never from validation or test rows. ``to_dict``/``from_dict``
round-trip through JSON, so a checkpointed model can carry the transform it was trained with.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import numpy as np

from infl_jax.data.errors import DataError, preview

__all__ = ["LOG_TRANSFORMS", "Preprocessor", "Standardizer", "apply_log_transform", "check_finite"]

LOG_TRANSFORMS = ("none", "log1p", "log2")
IMPUTE_STRATEGIES = (None, "median", "mean")


def _as_2d_float(x, what: str = "x") -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != 2:
    raise DataError(f"{what} must be a 2-D array [samples, features], got shape {x.shape}")
  if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer) or x.dtype == bool):
    raise DataError(f"{what} must be numeric, got dtype {x.dtype}")
  return x.astype(np.float64, copy=False)


def check_finite(x, feature_names: Sequence[str] | None = None, *, allow_nan: bool = False,
                 what: str = "X") -> None:
  """Raises a ``DataError`` that counts the NaN/inf entries and names the features holding them."""
  bad_inf = np.isinf(x)
  bad_nan = np.zeros_like(bad_inf) if allow_nan else np.isnan(x)
  bad = bad_inf | bad_nan
  if not bad.any():
    return
  cols = np.flatnonzero(bad.any(axis=0))
  names = [feature_names[c] for c in cols] if feature_names is not None else [f"#{c}" for c in cols]
  kinds = " and ".join(k for k, m in (("NaN", bad_nan), ("inf", bad_inf)) if m.any())
  fix = ("replace the infinite values (e.g. clip, or set them to NaN and impute)" if bad_inf.any() else
         "impute them: pass --impute median (impute='median' in Python) to fill each feature with its"
         " training-split median, or impute beforehand (e.g. KNN imputation), or drop those features")
  raise DataError(
      f"{what} holds {int(bad.sum())} {kinds} values in {len(cols)} of {x.shape[1]} features"
      f" ({preview(names)}) across {int(bad.any(axis=1).sum())} samples; fix: {fix}")


def apply_log_transform(x: np.ndarray, kind: str) -> np.ndarray:
  """``log1p`` for counts or normalised expression, ``log2`` for positive intensities (RFU, LFQ)."""
  if kind not in LOG_TRANSFORMS:
    raise DataError(f"unknown log transform {kind!r}; choose --log-transform from {', '.join(LOG_TRANSFORMS)}")
  if kind == "none":
    return x
  with np.errstate(invalid="ignore"):
    bad = (x <= 0) if kind == "log2" else (x <= -1)
  if bad.any():
    domain = "positive" if kind == "log2" else "greater than -1"
    raise DataError(
        f"--log-transform {kind} needs {domain} values, but {int(bad.sum())} values are not (min"
        f" {np.nanmin(x):.4g}); is the data already log-transformed? then pass --log-transform none"
        " (log_transform='none' in Python)")
  return np.log2(x) if kind == "log2" else np.log1p(x)


@dataclasses.dataclass
class Standardizer:
  """Per-feature ``(x - mean) / scale``; constant features get scale 1 so they map to 0."""

  mean: np.ndarray | None = None
  scale: np.ndarray | None = None

  @property
  def fitted(self) -> bool:
    return self.mean is not None

  def fit(self, x) -> "Standardizer":
    x = _as_2d_float(x)
    if len(x) < 2:
      raise DataError(f"standardisation needs at least 2 training samples, got {len(x)}")
    self.mean = x.mean(axis=0)
    std = x.std(axis=0)
    self.scale = np.where(std > 1e-12 * np.maximum(1.0, np.abs(self.mean)), std, 1.0)
    return self

  def transform(self, x) -> np.ndarray:
    if not self.fitted:
      raise DataError("Standardizer is not fitted; call fit(train_x) first")
    x = _as_2d_float(x)
    if x.shape[1] != self.mean.shape[0]:
      raise DataError(f"x has {x.shape[1]} features but the Standardizer was fitted on {self.mean.shape[0]}")
    return ((x - self.mean) / self.scale).astype(np.float32)

  def inverse_transform(self, z) -> np.ndarray:
    return (np.asarray(z, np.float64) * self.scale + self.mean).astype(np.float32)

  def to_dict(self) -> dict[str, Any]:
    return {"mean": None if self.mean is None else self.mean.tolist(),
            "scale": None if self.scale is None else self.scale.tolist()}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Standardizer":
    arr = lambda v: None if v is None else np.asarray(v, np.float64)
    return cls(mean=arr(d.get("mean")), scale=arr(d.get("scale")))


@dataclasses.dataclass
class Preprocessor:
  """log transform -> impute -> top-variance selection -> standardise, fitted on train rows.

  Attributes set by ``fit``: ``n_input_features``, ``fill_values`` (per input feature, only
  with ``impute``), ``feature_index`` (kept input columns, ascending) and ``standardizer``.
  """

  log_transform: str = "none"
  impute: str | None = None
  n_top_features: int | None = None
  standardize: bool = True
  n_input_features: int | None = None
  fill_values: np.ndarray | None = None
  feature_index: np.ndarray | None = None
  standardizer: Standardizer | None = None

  def __post_init__(self):
    if self.log_transform not in LOG_TRANSFORMS:
      raise DataError(f"unknown log transform {self.log_transform!r}; choose --log-transform from"
                      f" {', '.join(LOG_TRANSFORMS)}")
    if self.impute not in IMPUTE_STRATEGIES:
      raise DataError(f"unknown impute {self.impute!r}; choose --impute median or mean (None, 'median' or 'mean'"
                      " in Python)")
    if self.n_top_features is not None and (not isinstance(self.n_top_features, (int, np.integer))
                                            or self.n_top_features < 1):
      raise DataError(f"--n-top-features must be a positive integer or None, got {self.n_top_features!r}")

  @property
  def fitted(self) -> bool:
    return self.feature_index is not None

  def _log_and_fill(self, x: np.ndarray, feature_names) -> np.ndarray:
    check_finite(x, feature_names, allow_nan=self.impute is not None)
    x = apply_log_transform(x, self.log_transform)
    if self.fill_values is not None:
      x = np.where(np.isnan(x), self.fill_values, x)
    return x

  def fit(self, x, feature_names: Sequence[str] | None = None) -> "Preprocessor":
    x = _as_2d_float(x, "train_x")
    self.n_input_features = x.shape[1]
    self.fill_values = None
    x = self._log_and_fill(x, feature_names)
    if self.impute is not None:
      all_nan = np.flatnonzero(np.isnan(x).all(axis=0))
      if all_nan.size:
        names = [feature_names[c] for c in all_nan] if feature_names is not None else all_nan
        raise DataError(
            f"{all_nan.size} features have no observed value in the training split ({preview(names)});"
            " nothing to impute them from: drop those features")
      with np.errstate(all="ignore"):
        self.fill_values = (np.nanmedian if self.impute == "median" else np.nanmean)(x, axis=0)
      x = np.where(np.isnan(x), self.fill_values, x)
    if self.n_top_features is not None and self.n_top_features < x.shape[1]:
      variance = x.var(axis=0)
      top = np.argsort(-variance, kind="stable")[:self.n_top_features]
      self.feature_index = np.sort(top).astype(np.int64)
    else:
      self.feature_index = np.arange(x.shape[1], dtype=np.int64)
    x = x[:, self.feature_index]
    self.standardizer = Standardizer().fit(x) if self.standardize else None
    return self

  def transform(self, x, feature_names: Sequence[str] | None = None) -> np.ndarray:
    if not self.fitted:
      raise DataError("Preprocessor is not fitted; call fit(train_x) first")
    x = _as_2d_float(x)
    if x.shape[1] != self.n_input_features:
      raise DataError(
          f"x has {x.shape[1]} features but the preprocessing was fitted on {self.n_input_features};"
          " pass data with the training feature panel (same columns, same order)")
    x = self._log_and_fill(x, feature_names)[:, self.feature_index]
    return self.standardizer.transform(x) if self.standardizer is not None else x.astype(np.float32)

  def fit_transform(self, x, feature_names: Sequence[str] | None = None) -> np.ndarray:
    return self.fit(x, feature_names).transform(x, feature_names)

  def selected_names(self, feature_names: Sequence[str]) -> list[str]:
    return [str(feature_names[i]) for i in self.feature_index]

  def describe(self) -> str:
    steps = [] if self.log_transform == "none" else [self.log_transform]
    if self.impute:
      steps.append(f"impute train {self.impute}")
    if self.n_top_features is not None:
      steps.append(f"top {self.n_top_features} train-variance features")
    if self.standardize:
      steps.append("standardise (train mean/std)")
    return " -> ".join(steps) or "none"

  def to_dict(self) -> dict[str, Any]:
    lst = lambda a: None if a is None else np.asarray(a).tolist()
    return {
        "log_transform": self.log_transform, "impute": self.impute, "n_top_features": self.n_top_features,
        "standardize": self.standardize, "n_input_features": self.n_input_features,
        "fill_values": lst(self.fill_values), "feature_index": lst(self.feature_index),
        "standardizer": None if self.standardizer is None else self.standardizer.to_dict(),
    }

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Preprocessor":
    arr = lambda v, dtype: None if v is None else np.asarray(v, dtype)
    return cls(
        log_transform=d["log_transform"], impute=d.get("impute"), n_top_features=d.get("n_top_features"),
        standardize=d.get("standardize", True), n_input_features=d.get("n_input_features"),
        fill_values=arr(d.get("fill_values"), np.float64), feature_index=arr(d.get("feature_index"), np.int64),
        standardizer=None if d.get("standardizer") is None else Standardizer.from_dict(d["standardizer"]))

  def to_json(self) -> str:
    return json.dumps(self.to_dict())

  @classmethod
  def from_json(cls, text: str) -> "Preprocessor":
    return cls.from_dict(json.loads(text))
