"""The covariance-alignment attack on an orthogonal input transform (docs/privacy.md, "The mixed scheme").

Both keyed input transforms, ``hardened``'s signed permutation and ``mixed``'s blockwise rotation, are orthogonal:
``x_t = x M`` with ``M Mᵀ = I``. The analytic attack reads ``x_t / kappa`` off a batch-1 gradient
(``public_panel.common_scale_inputs``: one common scale for every recovered sample). An orthogonal map keeps
second moments up to the rotation: ``cov(x_t) = Mᵀ cov(x) M``, so the principal axes of the recovered samples are
the panel's principal axes carried through ``M``, whatever ``M`` is. This attacker does not need to know which
feature is which:

1. centre the recovered samples and put them on the panel's total variance (``M`` keeps it; this removes the size
   of ``kappa``);
2. principal axes of both sets; the i-th axis of one is taken for the i-th of the other, its sign fixed by the
   skewness of the scores along it (a mirrored axis mirrors the skewness; kappa's sign is absorbed here);
3. the reconstruction is the recovered sample's scores on the first ``k`` axes, carried onto the panel's axes. ``k``
   is chosen on the panel alone (halves of it playing recovered and panel), never with the truth.

It recovers a sample's position in the top principal subspace (the same for any orthogonal transform), not feature
identities: on proteomics-like data with one dominant factor that is most of what a sample's profile holds.
``feature_identity`` scores any attacker's linear guess against the true transform feature by feature.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from runkit.errors import UserInputError

__all__ = ["Alignment", "align_covariance", "feature_identity"]

_COMPONENTS = (1, 2, 4, 8, 16, 32)  # the k the attacker chooses among


class Alignment(NamedTuple):
  """The attacker's linear guess: ``reconstruct(r) = (r - rec_mean) * scale @ rec_axes.T * signs @ panel_axes +
  panel_mean`` for a recovered (transformed) sample r."""

  rec_axes: np.ndarray  # [F, k] principal axes of the recovered samples
  panel_axes: np.ndarray  # [F, k] the panel's, in the same order
  signs: np.ndarray  # [k] +-1
  scale: float  # puts the recovered samples on the panel's total variance
  rec_mean: np.ndarray  # [F]
  panel_mean: np.ndarray  # [F]

  def linear(self, r: np.ndarray) -> np.ndarray:
    """The guess's linear part (no means): transformed-space vectors ``[..., F]`` -> raw feature space."""
    return ((r * self.scale) @ self.rec_axes * self.signs) @ self.panel_axes.T

  def reconstruct(self, recovered: np.ndarray) -> np.ndarray:
    return self.linear(recovered - self.rec_mean) + self.panel_mean

  def forward(self, x: np.ndarray) -> np.ndarray:
    """The guess of the transform itself, for raw samples ``x [n, F]``: what the attacker feeds the model (the
    recovered samples' mean on the panel's scale, plus the top-subspace part). Like every guess made from
    ``x_t / kappa`` it is right up to kappa's sign, one flip of the whole input."""
    return ((x - self.panel_mean) @ self.panel_axes * self.signs) @ self.rec_axes.T + self.rec_mean * self.scale


def _axes(z: np.ndarray, k: int) -> np.ndarray:
  return np.linalg.svd(z, full_matrices=False)[2][:k].T


def _skew_sign(scores: np.ndarray) -> np.ndarray:
  return np.where(np.mean(scores ** 3, 0) < 0, -1.0, 1.0)


def _fit(recovered: np.ndarray, panel: np.ndarray, k: int) -> Alignment:
  rec_mean, panel_mean = recovered.mean(0), panel.mean(0)
  rc, pc = recovered - rec_mean, panel - panel_mean
  scale = float(np.sqrt(np.sum(pc ** 2) / len(pc) / max(np.sum(rc ** 2) / len(rc), 1e-30)))
  k = min(k, len(rc) - 1, len(pc) - 1)
  rec_axes, panel_axes = _axes(rc * scale, k), _axes(pc, k)
  signs = _skew_sign(rc @ rec_axes) * _skew_sign(pc @ panel_axes)
  return Alignment(rec_axes, panel_axes, signs, scale, rec_mean, panel_mean)


def _median_abs_r(truth: np.ndarray, guess: np.ndarray) -> float:
  t = truth - truth.mean(1, keepdims=True)
  g = guess - guess.mean(1, keepdims=True)
  r = np.sum(t * g, 1) / np.maximum(np.linalg.norm(t, axis=1) * np.linalg.norm(g, axis=1), 1e-30)
  return float(np.median(np.abs(r)))


def choose_components(panel: np.ndarray, size: int, seed: int = 0) -> int:
  """The k among ``_COMPONENTS`` that reconstructs best when halves of the panel play the two sets (the
  recovered half of ``size`` samples at most; PCA is equivariant to any orthogonal map, so no transform is
  simulated)."""
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(panel))
  half = min(size, len(panel) // 2)
  fake, rest = panel[order[:half]], panel[order[half:]]
  scores = {k: _median_abs_r(fake, _fit(fake, rest, k).reconstruct(fake)) for k in _COMPONENTS if k < half}
  return max(scores, key=scores.get) if scores else 1


def align_covariance(recovered, panel, components: int | None = None, seed: int = 0) -> Alignment:
  """The attacker's guess from ``recovered`` ``[n, F]`` (transformed inputs on one common scale) and unscrambled
  ``panel`` samples ``[m, F]`` of the same features; ``components`` fixes k (default: chosen on the panel)."""
  recovered, panel = np.asarray(recovered, np.float64), np.asarray(panel, np.float64)
  if recovered.ndim != 2 or panel.ndim != 2 or recovered.shape[1] != panel.shape[1]:
    raise UserInputError(f"align_covariance: recovered [n, F] and panel [m, F] must share F, got "
                         f"{recovered.shape} and {panel.shape}")
  if min(len(recovered), len(panel)) < 4 or not (np.all(np.isfinite(recovered)) and np.all(np.isfinite(panel))):
    raise UserInputError(f"align_covariance: needs >= 4 finite samples on each side, got {recovered.shape} and "
                         f"{panel.shape}")
  k = components if components is not None else choose_components(panel, len(recovered), seed)
  return _fit(recovered, panel, int(k))


def feature_identity(forward: Callable, guess: Callable, num_features: int, chunk: int = 512) -> dict[str, float]:
  """How many features a linear guess identifies. ``forward``: the true transform (raw -> transformed, linear);
  ``guess``: the attacker's linear map back (transformed -> raw). For ``G = guess(forward(I))``, column j is what
  the attacker's feature j is made of; feature j counts as identified when more than half of that column's
  weight (squared) is on the true feature j (``G[j, j]^2 > |G[:, j]|^2 / 2``), and as identified with its sign
  when ``G[j, j]`` also has the sign that most identified features share (one flip of every feature at once is
  the common scale's sign, which no |r| sees). For a guessed signed permutation of a true signed permutation this
  is the share of positions (and signs) recovered; chance is about 1/F."""
  diag = np.zeros(num_features)
  norm2 = np.zeros(num_features)
  for start in range(0, num_features, chunk):
    rows = np.zeros((min(chunk, num_features - start), num_features), np.float32)
    rows[np.arange(len(rows)), start + np.arange(len(rows))] = 1.0
    g = np.asarray(guess(np.asarray(forward(rows))), np.float64)  # rows of G: what true feature `row` becomes
    norm2 += np.sum(g * g, 0)
    diag[start:start + len(rows)] = g[np.arange(len(rows)), start + np.arange(len(rows))]
  identified = diag ** 2 > 0.5 * np.maximum(norm2, 1e-30)
  positive = int(np.sum(identified & (diag > 0)))
  return {"identified": float(identified.mean()),
          "identified_with_sign": max(positive, int(identified.sum()) - positive) / num_features}
