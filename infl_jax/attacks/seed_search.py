"""Brute force over seed-derived keys (docs/privacy.md, "Seed-derived keys are enumerable").

Before key material existed, a key and its hardened scramble were functions of an integer seed: the
coordinates from ``SeedSequence([seed, version])`` (what ``keys.generate_key(seed=...)`` still gives) and the
scramble, *v1*, from ``SeedSequence([seed, version, mode index, 0x4A7D5C])`` (``privacy/hardened.py`` before
commit 4cf3da2). A seeded key of today (``--key-seed``, the privacy evaluation's key) is as enumerable: its
material is the seed, and the *seeded* derivation is ``generate_key(seed)`` then ``key_scheme.input_scrambler(key)``.

For each candidate seed the attacker rebuilds the key and its scramble and scores it with a test: the
trained model's loss on a few labelled samples of their own, scrambled by the candidate and run with its
coordinates (a wrong scramble leaves the model at chance), or, without labels, ``correlation_test``: whether
the candidate's unscrambling of the analytic attack's reconstructions reproduces the feature correlations
of public data. Candidates are derived with numpy on the host (numpy's SeedSequence and PCG64, not a JAX
program) and scored in batches by one jitted, vmapped program.
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from infl_jax import keys as keylib
from infl_jax import key_scheme
from runkit.errors import UserInputError

__all__ = ["DERIVATIONS", "SeedSearch", "correlation_test", "seconds_to_enumerate", "search_seeds", "seed_candidates",
           "v1_scrambler"]

DERIVATIONS = ("v1", "seeded")
_V1_DOMAIN_TAG = 0x4A7D5C  # the old scramble's tag (privacy/hardened.py before key material)


class SeedSearch(NamedTuple):
  seeds: np.ndarray  # int64 [S], the candidates in the order tried
  scores: np.ndarray  # float32 [S], lower: more like the key holder
  best_seed: int
  derive_per_second: float  # candidates derived per second (host, numpy)
  score_per_second: float  # candidates scored per second (the jitted, vmapped test; compilation excluded)
  per_second: float  # end to end, one after the other as here


def v1_scrambler(seed: int, num_features: int, mode: str = "uniform", version: int = 1) -> key_scheme.InputScrambler:
  """The old (v1) scramble of seed ``seed``, exactly as the seed-based scheme drew it."""
  rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
      [int(seed), int(version), keylib.KEY_MODES.index(mode), _V1_DOMAIN_TAG])))
  permutation = rng.permutation(int(num_features))
  signs = np.where(rng.random(num_features) < 0.5, -1.0, 1.0).astype(np.float32)
  return key_scheme.InputScrambler(permutation, signs, np.ones(num_features, np.float32))


def seed_candidates(seeds, num_features: int, derivation: str = "v1", mode: str = "uniform",
                    version: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(coords [S, M, 2], permutations [S, F], signs [S, F])`` of the keys of ``seeds``."""
  if derivation not in DERIVATIONS:
    raise UserInputError(f"seed_candidates: derivation must be one of {DERIVATIONS}, got {derivation!r}")
  coords, perms, signs = [], [], []
  for seed in seeds:
    key = keylib.generate_key(int(seed), mode, version)
    s = (v1_scrambler(seed, num_features, mode, version) if derivation == "v1"
         else key_scheme.input_scrambler(key, num_features))
    coords.append(key.coords)
    perms.append(s.permutation)
    signs.append(s.signs)
  return np.stack(coords), np.stack(perms).astype(np.int32), np.stack(signs)


def search_seeds(score_fn: Callable, seeds, num_features: int, *, derivation: str = "v1", mode: str = "uniform",
                 version: int = 1, batch: int = 64) -> SeedSearch:
  """Scores every seed of ``seeds`` with ``score_fn(coords [M, 2], permutation [F], signs [F]) -> scalar``
  (lower: the model works for that key; e.g. the loss on labelled samples ``x[:, permutation] * signs``).

  ``score_fn`` is vmapped over a batch of candidates and jitted once; the last batch is padded to the
  batch size so that it reuses the program. Timings leave the compilation out (a warm-up batch first).
  """
  seeds = np.asarray(list(seeds), np.int64)
  if seeds.ndim != 1 or len(seeds) == 0 or batch < 1:
    raise UserInputError(f"search_seeds: need at least one seed and batch >= 1, got {len(seeds)} seeds, "
                         f"batch {batch}")
  score = jax.jit(jax.vmap(score_fn))
  padded = np.concatenate([seeds, np.full(-len(seeds) % batch, seeds[-1])])
  jax.block_until_ready(score(*map(jnp.asarray, seed_candidates(padded[:batch], num_features, derivation, mode,
                                                                version))))
  derive_s = score_s = 0.0
  out = []
  for start in range(0, len(padded), batch):
    began = time.perf_counter()
    candidates = seed_candidates(padded[start:start + batch], num_features, derivation, mode, version)
    derived = time.perf_counter()
    out.append(np.asarray(score(*map(jnp.asarray, candidates))))
    derive_s += derived - began
    score_s += time.perf_counter() - derived
  scores = np.concatenate(out)[:len(seeds)].astype(np.float32)
  n = len(padded)
  return SeedSearch(seeds, scores, int(seeds[np.argmin(scores)]), n / max(derive_s, 1e-9), n / max(score_s, 1e-9),
                    n / max(derive_s + score_s, 1e-9))


def correlation_test(recovered, panel, num_pairs: int = 2048) -> Callable:
  """A candidate test without labels, from the analytic attack's output alone: ``score_fn`` for
  ``search_seeds`` that unscrambles ``recovered`` (scrambled inputs ``[n, F]`` on one common scale) by the
  candidate and measures how well it reproduces the ``num_pairs`` strongest feature-feature correlations
  of ``panel`` (unscrambled samples ``[m, F]`` of the same features): minus the mean, over those pairs, of
  the recovered correlation times the panel correlation's sign. The right scramble reproduces them (about
  their mean |r|); a wrong one scores 0 give or take ``1 / sqrt(n * num_pairs)``, so unlike a loss on a few
  labelled samples no wrong candidate among billions comes near (a wrong scramble can classify 8 samples
  right by chance, 1 in 256)."""
  recovered, panel = np.asarray(recovered, np.float64), np.asarray(panel, np.float64)
  if recovered.ndim != 2 or panel.ndim != 2 or recovered.shape[1] != panel.shape[1] or min(len(recovered),
                                                                                           len(panel)) < 3:
    raise UserInputError(f"correlation_test: recovered [n, F] and panel [m, F] must share F and have >= 3 "
                         f"samples each, got {recovered.shape} and {panel.shape}")
  z_rec, z_panel = (np.nan_to_num((a - a.mean(0)) / a.std(0)) for a in (recovered, panel))
  corr = z_panel.T @ z_panel / len(z_panel)
  upper = np.triu_indices(corr.shape[0], 1)
  num_pairs = min(num_pairs, len(upper[0]))
  strongest = np.argpartition(-np.abs(corr[upper]), num_pairs - 1)[:num_pairs]
  first, second = (jnp.asarray(u[strongest]) for u in upper)
  sign = jnp.asarray(np.sign(corr[upper][strongest]), jnp.float32)
  z_rec = jnp.asarray(z_rec, jnp.float32)

  def score(coords, permutation, signs):
    del coords  # the scramble alone decides what the reconstruction looks like
    source = jnp.zeros_like(permutation).at[permutation].set(jnp.arange(permutation.shape[0]))  # inverse
    a = z_rec[:, source[first]] * signs[source[first]]
    b = z_rec[:, source[second]] * signs[source[second]]
    return -jnp.mean(jnp.mean(a * b, 0) * sign)

  return score


def seconds_to_enumerate(bits: int, per_second: float) -> float:
  """Seconds to try all ``2**bits`` candidates at ``per_second`` (a float: 2**256 overflows no integer here,
  but the answer is astronomically large)."""
  return float(2.0 ** bits / per_second)
