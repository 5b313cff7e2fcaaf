"""How close a reconstruction is to the truth (docs/design.md, "Privacy evaluation").

Omics inputs: MSE, MSE normalised by each feature's standard deviation, |Pearson r|, |Spearman rho|,
overlap of the top-50 features (by absolute value) and whether the label was recovered.
Images: MSE and PSNR. Every function takes a batch ``[N, ...]`` and returns per-sample numpy values;
``summarise`` reduces them to medians.
"""

from __future__ import annotations

import numpy as np

from runkit.errors import UserInputError

__all__ = ["image_metrics", "omics_metrics", "summarise", "top_k_overlap"]


def _pair(x_true, x_rec, name: str):
  x_true = np.asarray(x_true, np.float64)
  x_rec = np.asarray(x_rec, np.float64)
  if x_true.shape != x_rec.shape:
    raise UserInputError(f"{name}: true and recovered inputs differ in shape, {x_true.shape} vs {x_rec.shape}; "
                         "pass one recovered input per true input")
  if x_true.ndim < 2:
    raise UserInputError(f"{name}: pass a batch [N, features...], got shape {x_true.shape}; use x[None] for one")
  if not (np.all(np.isfinite(x_true)) and np.all(np.isfinite(x_rec))):
    raise UserInputError(f"{name}: inputs contain NaN or inf; a diverged attack should be reported, not scored")
  return x_true.reshape(len(x_true), -1), x_rec.reshape(len(x_rec), -1)


def _pearson(a, b):
  a = a - a.mean(-1, keepdims=True)
  b = b - b.mean(-1, keepdims=True)
  den = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
  return np.where(den > 0, (a * b).sum(-1) / np.where(den > 0, den, 1.0), 0.0)


def _ranks(a):
  from scipy.stats import rankdata

  return rankdata(a, axis=-1)


def top_k_overlap(x_true, x_rec, k: int = 50) -> np.ndarray:
  """Fraction of the ``k`` largest-magnitude features of the truth also among the recovered top ``k``."""
  k = min(k, x_true.shape[-1])
  top_true = np.argsort(-np.abs(x_true), axis=-1)[:, :k]
  top_rec = np.argsort(-np.abs(x_rec), axis=-1)[:, :k]
  return np.array([len(np.intersect1d(t, r)) / k for t, r in zip(top_true, top_rec)])


def omics_metrics(x_true, x_rec, *, feature_std=None, y_true=None, y_rec=None, top_k: int = 50) -> dict:
  """Per-sample metrics of recovered omics profiles ``[N, F]``.

  ``feature_std`` [F]: each feature's standard deviation (on training data) for the normalised MSE;
  by default that of ``x_true``. ``y_true``/``y_rec``: labels, for ``label_recovered``.
  """
  t, r = _pair(x_true, x_rec, "omics_metrics")
  std = np.std(t, axis=0) if feature_std is None else np.asarray(feature_std, np.float64).reshape(-1)
  if std.shape[0] != t.shape[1]:
    raise UserInputError(f"omics_metrics: feature_std has {std.shape[0]} entries for {t.shape[1]} features")
  std = np.where(std > 0, std, 1.0)
  out = {
      "mse": np.mean((t - r) ** 2, axis=-1),
      "nmse": np.mean(((t - r) / std) ** 2, axis=-1),
      "abs_pearson": np.abs(_pearson(t, r)),
      "abs_spearman": np.abs(_pearson(_ranks(t), _ranks(r))),
      "top50_overlap": top_k_overlap(t, r, top_k),
  }
  if y_true is not None and y_rec is not None:
    out["label_recovered"] = (np.asarray(y_true).reshape(-1) == np.asarray(y_rec).reshape(-1)).astype(np.float64)
  return out


def image_metrics(x_true, x_rec, *, data_range: float = 1.0) -> dict:
  """Per-image MSE and PSNR (``10 log10(range^2 / MSE)``, capped at 100 dB for an exact copy)."""
  t, r = _pair(x_true, x_rec, "image_metrics")
  mse = np.mean((t - r) ** 2, axis=-1)
  psnr = np.where(mse > 0, 10 * np.log10(data_range ** 2 / np.maximum(mse, 1e-300)), 100.0)
  return {"mse": mse, "psnr": np.minimum(psnr, 100.0)}


def summarise(per_sample: dict) -> dict:
  """Medians of per-sample metrics (label recovery as a mean: the fraction recovered)."""
  return {k: float(np.mean(v) if k == "label_recovered" else np.median(v)) for k, v in per_sample.items()}
