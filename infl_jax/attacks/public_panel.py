"""The public-panel attack on the hardened scheme (docs/privacy.md, "Public-panel attacker").

The analytic first-layer attack reads each input of a hardened model as ``x_s[i] = sign[i] x[perm[i]]``, and
``common_scale_inputs`` puts every recovered sample on one common scale (of unknown size and sign). An
attacker holding unscrambled samples of the same features from elsewhere (a *panel*: another cohort, plate
or site) tries to undo the scramble by recognising each feature in both sets:

1. **Signatures**, on data z-scored per feature within each set (this removes the clients' preprocessing
   and the unknown scale; what is left is shape): quantiles of the marginal (a sign flip mirrors them, so
   they also tell the sign) and the correlation profile (the feature's largest |r| with other features, its
   mean |r|, its |r| with the top principal components; sign-free). The panel's signatures are averaged
   over random subsamples of the recovered set's size, so that both sides carry the same small-sample bias;
   the spread over those subsamples weighs each signature dimension.
2. **A signed assignment** on that cost (minimum-weight bipartite matching over each feature's best
   candidates; each pair takes the sign that fits it better).
3. **Refinement by correlation structure**: the most confident matches become anchors; a ridge regression
   fitted on the panel predicts every panel feature from the anchors; applied to the recovered samples
   (anchors unscrambled by the current guess) it predicts each panel feature's values there, and the
   recovered feature that correlates with those values is that feature (the correlation's sign is its sign).
   A feature is never predicted from itself (leave-one-out). Repeated with twice the anchors each round.

The result is an ``InputScrambler``: the attacker's guess of the clients' scramble, to be used as
``key_scheme.unscramble(recovered, guess)``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

from infl_jax.key_scheme import InputScrambler
from runkit.errors import UserInputError

__all__ = ["PanelConfig", "PanelMatch", "common_scale_inputs", "match_accuracy", "public_panel_attack",
           "public_prior", "random_scrambler"]

_TOP = (1, 2, 4, 8, 16, 32, 64, 128)  # ranks of the largest |r| kept in the correlation profile
_PCS = 3  # principal components whose |r| with the feature enter the profile
_DENSE_ASSIGNMENT = 1024  # up to this many features a dense assignment is cheap enough


class PanelConfig(NamedTuple):
  quantiles: int = 9  # quantile levels of the marginal signature (symmetric around the median)
  subsamples: int = 4  # panel subsamples of the recovered set's size behind the panel's signatures
  refine_rounds: int = 3
  anchor_fraction: float = 0.1  # share of features used as anchors in the first refinement round
  ridge: float = 10.0  # of the regression predicting panel features from anchors
  candidates: int = 64  # per feature in the sparse assignment (more are added when no full matching exists)
  seed: int = 0  # of the panel subsamples

  def validate(self) -> "PanelConfig":
    if self.quantiles < 3 or self.subsamples < 1 or self.refine_rounds < 0 or self.candidates < 2:
      raise UserInputError(f"PanelConfig: need quantiles >= 3, subsamples >= 1, refine_rounds >= 0 and "
                           f"candidates >= 2, got {self}")
    if not (0 < self.anchor_fraction <= 1 and self.ridge > 0):
      raise UserInputError(f"PanelConfig: need 0 < anchor_fraction <= 1 and ridge > 0, got {self}")
    return self


class PanelMatch(NamedTuple):
  scrambler: InputScrambler  # the guess: recovered feature i is panel feature permutation[i] times signs[i]
  confidence: np.ndarray  # [F] margin of each feature's match over its best alternative (larger: surer)


# --------------------------------------------------------------------------------------------
# What the attacker has: one common scale for every recovered sample


@jax.jit
def common_scale_inputs(kernel_grad, bias_grad, iterations: int = 100):
  """Batch-1 first-layer gradients ``[T, F, U]``, ``[T, U]`` -> the inputs ``[T, F]`` on one common scale.

  For unit j of a keyed layer ``(dL/dW)[:, j] / (dL/db)_j = c_j x`` (``attacks.analytic``): each sample is
  known up to the scale of the unit it is read from, and a sign among them would mirror that sample's
  values. Every active unit of a sample gives the same x, so their ratios give ``c_j / c_k``; a masked
  rank-1 fit (alternating least squares) of those ratios gives every ``c_j`` up to one common factor, and
  dividing it out leaves ``x / kappa`` with one ``kappa`` for all samples (the z-scoring in the attack removes
  its size; only its sign stays unknown). A sample whose gradient is exactly zero (a saturated softmax)
  gives nothing and comes back as zeros.
  """
  magnitude = jnp.abs(bias_grad)
  # Relative to the sample's largest: a confidently classified sample has tiny gradients, yet exact ratios.
  active = (magnitude > 1e-6 * jnp.max(magnitude, axis=-1, keepdims=True)) & (magnitude > 0)  # [T, U]
  ratios = jnp.where(active[:, None, :], kernel_grad / jnp.where(active, bias_grad, 1.0)[:, None, :], 0.0)
  best = jnp.take_along_axis(ratios, jnp.argmax(magnitude, -1)[:, None, None], axis=-1)[..., 0]  # [T, F]
  # c_j / c_best(t) per sample, zero where unit j is off
  a = jnp.einsum("tfu,tf->tu", ratios, best) / jnp.maximum(jnp.sum(best * best, -1, keepdims=True), 1e-30)
  a, m = jnp.where(active, a, 0.0), active.astype(a.dtype)
  c0 = a[jnp.argmax(jnp.sum(m, -1))]  # start from the sample with the most active units

  def step(_, c):
    w = jnp.sum(m * a * c, -1) / jnp.maximum(jnp.sum(m * c * c, -1), 1e-30)
    return jnp.sum(m * a * w[:, None], 0) / jnp.maximum(jnp.sum(m * (w * w)[:, None], 0), 1e-30)

  c = jax.lax.fori_loop(0, iterations, step, c0)
  c = c / jnp.max(jnp.abs(c))
  weight = m * c  # least squares of ratios[t, :, j] = c_j x_t over the sample's active units
  return jnp.einsum("tfu,tu->tf", ratios, weight) / jnp.maximum(jnp.sum(weight * c, -1), 1e-30)[:, None]


# --------------------------------------------------------------------------------------------
# Signatures and costs


def _zscore(x):
  x = x - jnp.mean(x, 0)
  std = jnp.std(x, 0)
  return x / jnp.where(std > 0, std, 1.0)


def _levels(n: int) -> jax.Array:
  return jnp.linspace(0.1, 0.9, n)  # symmetric, so the quantiles of -z are those of z mirrored


def _signatures(z, num_levels: int):
  """``(marginal [F, L], profile [F, P])`` of z-scored data ``z [n, F]``."""
  n, f = z.shape
  marginal = jnp.quantile(z, _levels(num_levels), axis=0).T
  corr = jnp.abs(z.T @ z / n) * (1.0 - jnp.eye(f, dtype=z.dtype))
  ranks = [r for r in _TOP if r < f]
  top = jax.lax.top_k(corr, ranks[-1])[0][:, jnp.asarray(ranks) - 1]
  u = jnp.linalg.svd(z, full_matrices=False)[0][:, :min(_PCS, n - 1)]
  loadings = jnp.abs(z.T @ u) / jnp.sqrt(n)  # |r| with each principal component's scores
  return marginal, jnp.concatenate([top, jnp.sum(corr, 1, keepdims=True) / (f - 1), loadings], 1)


def _squared_distance(a, b):
  return jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None, :] - 2 * a @ b.T


@functools.partial(jax.jit, static_argnames=("num_levels",))
def _signature_costs(z_rec, panel, subsets, num_levels: int):
  """``(cost_plus, cost_minus)``, each ``[F_rec, F_panel]``: how unlike recovered feature i (kept, or
  sign-flipped) is panel feature j, in units of the panel signatures' spread over its subsamples."""
  marg_r, prof_r = _signatures(z_rec, num_levels)
  marg_p, prof_p = jax.lax.map(lambda idx: _signatures(_zscore(panel[idx]), num_levels), subsets)
  # one spread per dimension, pooled over features; the floor keeps a degenerate dimension from dominating
  w_marg = 1.0 / jnp.sqrt(jnp.mean(jnp.var(marg_p, 0), 0) + 1e-3)
  w_prof = 1.0 / jnp.sqrt(jnp.mean(jnp.var(prof_p, 0), 0) + 1e-4)
  prof = _squared_distance(prof_r * w_prof, jnp.mean(prof_p, 0) * w_prof)
  panel_marg = jnp.mean(marg_p, 0) * w_marg
  plus = _squared_distance(marg_r * w_marg, panel_marg)
  minus = _squared_distance(-marg_r[:, ::-1] * w_marg, panel_marg)  # quantiles of -z
  return plus + prof, minus + prof


@jax.jit
def _prediction_evidence(z_rec, z_panel, anchors_rec, anchors_panel, anchor_signs, ridge):
  """``[F_rec, F_panel]``: Fisher-z evidence that recovered feature i is panel feature j with sign +1
  (negative: with sign -1): the correlation, over the recovered samples, of feature i with the values of
  panel feature j predicted from the anchors by a ridge regression fitted on the panel.

  Anchor lists are padded (sign 0, panel index F: a zero column appended here) to a few sizes, so that
  the rounds share compiled programs."""
  z_panel = jnp.concatenate([z_panel, jnp.zeros((z_panel.shape[0], 1), z_panel.dtype)], 1)
  x_panel = z_panel[:, anchors_panel] * jnp.abs(anchor_signs)  # [n_p, m]
  x_rec = z_rec[:, anchors_rec] * anchor_signs  # the anchors, unscrambled by the current guess
  inverse = jnp.linalg.inv(x_panel @ x_panel.T + ridge * jnp.eye(x_panel.shape[0], dtype=z_panel.dtype))
  cross = x_rec @ x_panel.T  # [n_r, n_p]
  pred = cross @ (inverse @ z_panel)  # [n_r, F + 1]

  def without_itself(u, v):  # an anchor's own panel feature u, predicted from the other anchors
    iu = inverse @ u
    beta = inverse @ u + iu * (iu @ u) / (1.0 - u @ iu)  # Sherman-Morrison: anchor u left out of the fit
    return cross @ beta - v * (u @ beta)

  pred = pred.at[:, anchors_panel].set(jax.vmap(without_itself, in_axes=(1, 1), out_axes=1)(x_panel, x_rec))
  pred = pred[:, :-1] - jnp.mean(pred[:, :-1], 0)
  pred = pred / jnp.maximum(jnp.linalg.norm(pred, axis=0), 1e-12)
  r = (z_rec / jnp.sqrt(z_rec.shape[0])).T @ pred
  return jnp.arctanh(jnp.clip(r, -0.999, 0.999)) * jnp.sqrt(max(z_rec.shape[0] - 3, 1))


# --------------------------------------------------------------------------------------------
# Assignment


def _assign(cost: np.ndarray, candidates: int) -> np.ndarray:
  """The column of each row in a minimum-cost perfect matching over each row's and each column's
  ``candidates`` cheapest entries (exact whenever the optimum uses only those); dense for small problems."""
  f = cost.shape[0]
  if f <= _DENSE_ASSIGNMENT or 2 * candidates >= f:
    return linear_sum_assignment(cost)[1]
  rows = np.argpartition(cost, candidates, axis=1)[:, :candidates]
  cols = np.argpartition(cost, candidates, axis=0)[:candidates, :]
  # The diagonal guarantees that a perfect matching exists: with popular columns (near to many rows)
  # the candidates alone may leave some row without a free column.
  r = np.concatenate([np.repeat(np.arange(f), candidates), cols.ravel(), np.arange(f)])
  c = np.concatenate([rows.ravel(), np.tile(np.arange(f), candidates), np.arange(f)])
  keep = np.unique(r * f + c)
  r, c = keep // f, keep % f
  weights = cost[r, c] - cost.min() + 1.0  # positive: a stored zero would read as a missing edge
  matched_rows, matched_cols = min_weight_full_bipartite_matching(csr_matrix((weights, (r, c)), shape=(f, f)))
  out = np.empty(f, np.int64)
  out[matched_rows] = matched_cols
  return out


def _confidence(cost: np.ndarray, match: np.ndarray) -> np.ndarray:
  """How much cheaper each matched pair is than the row's and the column's best alternative."""
  rows = np.arange(len(match))
  matched = cost[rows, match]
  masked = cost.copy()
  masked[rows, match] = np.inf
  return np.minimum(masked.min(1), masked.min(0)[match]) - matched


def _signed_assignment(plus: np.ndarray, minus: np.ndarray, candidates: int):
  cost = np.minimum(plus, minus)
  match = _assign(cost, candidates)
  rows = np.arange(len(match))
  signs = np.where(plus[rows, match] <= minus[rows, match], 1.0, -1.0).astype(np.float32)
  return match, signs, _confidence(cost, match)


# --------------------------------------------------------------------------------------------
# The attack


def _check_sets(recovered, panel) -> tuple[np.ndarray, np.ndarray]:
  recovered, panel = np.asarray(recovered, np.float32), np.asarray(panel, np.float32)
  if recovered.ndim != 2 or panel.ndim != 2 or recovered.shape[1] != panel.shape[1]:
    raise UserInputError(f"public_panel_attack: recovered [n, F] and panel [m, F] must share F, got "
                         f"{recovered.shape} and {panel.shape}")
  if min(len(recovered), len(panel)) < 4 or recovered.shape[1] < 2:
    raise UserInputError(f"public_panel_attack: needs >= 4 samples on each side and >= 2 features, got "
                         f"{recovered.shape} and {panel.shape}")
  if not (np.all(np.isfinite(recovered)) and np.all(np.isfinite(panel))):
    raise UserInputError("public_panel_attack: inputs contain NaN or inf")
  return recovered, panel


def _evidence(z_rec, z_panel, match, signs, anchors, ridge, half) -> np.ndarray:
  """The prediction evidence, cross-fitted: rows of one half of the recovered features get it from the
  anchors of the other half, so no row is judged by predictions that used its own values (an anchor's row
  would otherwise favour every column predicted from it)."""
  f = z_panel.shape[1]
  out = np.zeros((z_rec.shape[1], f))
  for side in (False, True):
    source = anchors[half[anchors] != side]
    if len(source):
      size = 2 ** math.ceil(math.log2(len(source)))  # padded to a power of two: a few compiled sizes
      pad = size - len(source)
      rows = np.flatnonzero(half == side)
      out[rows] = np.asarray(_prediction_evidence(
          z_rec, z_panel, jnp.asarray(np.concatenate([source, np.zeros(pad, np.int64)])),
          jnp.asarray(np.concatenate([match[source], np.full(pad, f)])),
          jnp.asarray(np.concatenate([signs[source], np.zeros(pad, np.float32)])), ridge), np.float64)[rows]
  return out


def _confirmed_anchors(z_rec, z_panel, match, signs, anchors, ridge, half, sweeps: int = 3) -> np.ndarray:
  """The anchors whose match the others confirm: from the anchors of the other half, the anchor's own
  panel feature is its row's strongest evidence, with its sign. Wrong anchors predict
  nothing and would only blur what the signatures found, so the unconfirmed ones are dropped and the
  rest checked again."""
  for _ in range(sweeps):
    if len(anchors) < 2:
      break
    evidence = _evidence(z_rec, z_panel, match, signs, anchors, ridge, half)[anchors]
    own = evidence[np.arange(len(anchors)), match[anchors]] * signs[anchors]
    kept = anchors[(own > 0) & (own >= np.abs(evidence).max(1))]
    if len(kept) == len(anchors):
      break
    anchors = kept
  return anchors


def public_panel_attack(recovered, panel, config: PanelConfig = PanelConfig()) -> PanelMatch:
  """The attacker's guess of the scramble behind ``recovered`` ``[n, F]`` (scrambled inputs on one common
  scale, e.g. ``common_scale_inputs``), from unscrambled ``panel`` samples ``[m, F]`` of the same features."""
  config = config.validate()
  recovered, panel = _check_sets(recovered, panel)
  n, f = recovered.shape
  rng = np.random.default_rng(config.seed)
  size = min(n, len(panel))
  subsets = jnp.asarray(np.stack([rng.choice(len(panel), size, replace=False) for _ in range(config.subsamples)]))
  z_rec, z_panel = _zscore(jnp.asarray(recovered)), _zscore(jnp.asarray(panel))
  plus, minus = (np.asarray(c, np.float64) for c in _signature_costs(z_rec, jnp.asarray(panel), subsets,
                                                                      config.quantiles))
  match, signs, confidence = _signed_assignment(plus, minus, config.candidates)
  half = rng.random(f) < 0.5  # the cross-fitting halves of the recovered features
  for round_ in range(config.refine_rounds):
    m = max(2, min(f - 1, math.ceil(config.anchor_fraction * 2 ** round_ * f)))
    anchors = _confirmed_anchors(z_rec, z_panel, match, signs, np.argsort(-confidence)[:m], config.ridge, half)
    if len(anchors) < 2:  # nothing the correlation structure confirms yet: try more candidates
      continue
    evidence = _evidence(z_rec, z_panel, match, signs, anchors, config.ridge, half)
    # the signatures' cost is a squared distance (twice a negative log-likelihood); the evidence a z-score
    match, signs, confidence = _signed_assignment(0.5 * plus - evidence, 0.5 * minus + evidence, config.candidates)
  return PanelMatch(InputScrambler(match, signs, np.ones(f, np.float32)), confidence)


# --------------------------------------------------------------------------------------------
# Scores and baselines


def match_accuracy(guess: InputScrambler, truth: InputScrambler) -> dict[str, float]:
  """Share of features whose position the guess recovers, and whose position and sign it recovers. The
  sign counts up to one flip of every feature at once (the common scale's sign, which flips the whole
  reconstruction and no |r| sees): the flip that agrees with most correctly placed features."""
  placed = np.asarray(guess.permutation) == np.asarray(truth.permutation)
  agree = np.asarray(guess.signs)[placed] == np.asarray(truth.signs)[placed]
  signed = max(int(agree.sum()), int((~agree).sum()))
  return {"position": float(placed.mean()), "position_and_sign": signed / len(placed)}


def random_scrambler(num_features: int, rng: np.random.Generator) -> InputScrambler:
  """A guess made without looking: a uniformly random signed permutation (the chance level)."""
  signs = np.where(rng.random(num_features) < 0.5, -1.0, 1.0).astype(np.float32)
  return InputScrambler(rng.permutation(num_features), signs, np.ones(num_features, np.float32))


def public_prior(panel, num_samples: int) -> np.ndarray:
  """What the panel alone gives, without any observation: its first principal axis (z-scored units) as
  the reconstruction of every sample. Where one factor dominates the data this already correlates with
  most samples, so it is the floor an attack's |r| has to beat."""
  z = np.asarray(_zscore(jnp.asarray(np.asarray(panel, np.float32))))
  axis = np.linalg.svd(z, full_matrices=False)[2][0]
  return np.broadcast_to(axis, (num_samples, len(axis))).copy()
