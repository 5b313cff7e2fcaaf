"""Key schemes: how the clients' secret key enters the model (docs/design.md, "Key schemes").

- ``faithful``: the INFL method as published. The key reaches the model only through its coordinates
  (``apply(..., key_coords=key.coords)``).
- ``hardened``: the key also fixes a secret permutation and sign flip of the input features, applied by the
  clients to their data before training and inference:

      x_s[i] = sign[i] * scale[i] * x[perm[i]]          (scale 1 unless ``scale_range`` is given)

Why: the faithful secret is a 16-dim vector ``k`` that changes little between keys and that gradient
descent can fit, and the analytic first-layer attack reads an input off an update without any key
(docs/privacy.md). The scramble is not a parameter, never leaves the clients and is discrete (one of
F! 2^F permutations and sign patterns), so gradient descent cannot fit it; whatever an attacker
reconstructs from an update is ``x_s``. With an i.i.d. initialisation, a dense first layer trained with a
coordinate-wise optimizer (Adam, SGD, weight decay) is equivariant to a signed permutation of its inputs,
so the key holder's training is the same in distribution; scales would change the optimizer's dynamics and
add no secrecy that the permutation does not give, hence off by default.

The scramble is drawn from the key material, never from a seed: ``SeedSequence(SHA-256(domain tag, material,
mode, version[, stream]))``, a stream apart from the key coordinates', reproducible from the SecretKey alone
and as unguessable as its material. ``stream`` separates the scrambles of a task's several inputs (e.g. the
two omics layers of a multi-omics client); the default stream is the one of earlier releases.

- ``mixed`` (an option, not a default; docs/privacy.md, "The mixed scheme"): the key fixes a secret orthogonal
  transform that mixes the features within random blocks of ``MIXING_BLOCK``:

      x_m = sign * (blockdiag(Q_1, ..., Q_nb) applied to x[perm])[out_perm]

  ``perm`` cuts the features into random blocks (consecutive runs of the permuted order, the last one smaller
  when the block size does not divide F), each ``Q_b`` is a Haar-random orthogonal matrix, and a second
  permutation and sign flip hide which output came from which block. Why: a signed permutation hides which
  feature is which but keeps every feature's marginal, which a public-panel attacker can match; each output of
  ``mixed`` is a combination of a block's features, whose marginal is a mixture of theirs. Sign flips before the
  rotation would add nothing (a Haar matrix times a sign pattern is again Haar). Exactly invertible by the key
  holder (``unscramble``: every factor is orthogonal or a permutation). Unlike a signed permutation it is not a
  symmetry of a coordinate-wise optimizer (Adam), so the key holder's training changes; the cost is measured
  there.

A task applies a scheme through ``KeyView``: the coordinates and the input scramble of one way of running
the model. ``study_views`` gives the key study's four (right key, a guessed key of the same mode, one of
another mode, no key): an attacker with a guessed key also scrambles with that key's scramble, and one
without a key feeds the raw features to the model without its INR path.
"""

from __future__ import annotations

import hashlib
import json
from typing import NamedTuple

import numpy as np

from infl_jax import keys as keylib
from runkit.errors import UserInputError

__all__ = ["KEY_SCHEMES", "MIXING_BLOCK", "InputMixer", "InputScrambler", "KeyView", "check_scheme", "client_view",
           "input_mixer", "input_scrambler", "scramble", "study_views", "unscramble"]

KEY_SCHEMES = ("faithful", "hardened", "mixed")
_DOMAIN_TAG = b"infl-hardened-scramble-v2\0"  # v1 was drawn from SeedSequence([seed, version, mode, tag])
_MIXING_DOMAIN_TAG = b"infl-mixed-transform-v1\0"  # its own stream: independent of the hardened scramble
# 16 features per block: an output is a random unit-vector combination of 16 features. One feature carries more
# than half of an output's weight (|q_k|^2 > 1/2) for 2.4% of the outputs (8 features: 27%, 32: 0.014%; Monte
# Carlo, docs/privacy.md "The mixed scheme"), the median largest share is 0.27, and with equal weights the skewness
# and excess kurtosis of independent features would shrink 4- and 16-fold. Larger blocks hide more but move the
# key holder's inputs further from the optimizer's axes.
MIXING_BLOCK = 16


class InputScrambler(NamedTuple):
  permutation: np.ndarray  # int [F]
  signs: np.ndarray  # float32 [F], +-1
  scales: np.ndarray  # float32 [F], > 0


class InputMixer(NamedTuple):
  """The ``mixed`` scheme's transform (module docstring); ``scramble``/``unscramble`` apply it."""

  permutation: np.ndarray  # int [F]: x[..., permutation] is cut into consecutive blocks
  blocks: np.ndarray  # float32 [F // B, B, B], orthogonal
  tail: np.ndarray  # float32 [F % B, F % B], orthogonal (0 x 0 when B divides F)
  out_permutation: np.ndarray  # int [F]
  signs: np.ndarray  # float32 [F], +-1


def _key_rng(tag: bytes, key: keylib.SecretKey, stream: str) -> np.random.Generator:
  """A generator drawn from the key material (SHA-256 of tag, material, mode, version[, stream]), never a seed."""
  label = [key.mode, key.version] + ([stream] if stream else [])
  digest = hashlib.sha256(tag + key.material + json.dumps(label).encode()).digest()
  return np.random.Generator(np.random.PCG64(np.random.SeedSequence(int.from_bytes(digest, "little"))))


def _check_key(key, num_features, what: str) -> int:
  if not isinstance(key, keylib.SecretKey):
    raise UserInputError(f"{what} needs a SecretKey (infl_jax.keys.generate_key/load_key), got {type(key).__name__}")
  if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)) or num_features < 1:
    raise UserInputError(f"{what}: num_features must be a positive integer, got {num_features!r}")
  return int(num_features)


def input_scrambler(key: keylib.SecretKey, num_features: int,
                    scale_range: tuple[float, float] | None = None, *, stream: str = "",
                    signed: bool = True) -> InputScrambler:
  """The key's scramble of ``num_features`` features; ``scale_range=(lo, hi)`` adds log-uniform scales;
  ``signed=False`` keeps every sign (the same permutation: the signs are drawn after it either way)."""
  num_features = _check_key(key, num_features, "input_scrambler")
  rng = _key_rng(_DOMAIN_TAG, key, stream)
  permutation = rng.permutation(num_features)
  signs = np.where(rng.random(num_features) < 0.5, -1.0, 1.0).astype(np.float32)
  if not signed:
    signs = np.ones(num_features, np.float32)
  if scale_range is None:
    scales = np.ones(num_features, np.float32)
  else:
    if not (len(scale_range) == 2 and 0 < scale_range[0] <= scale_range[1]):
      raise UserInputError(f"input_scrambler: scale_range must be (lo, hi) with 0 < lo <= hi, got {scale_range!r}")
    lo, hi = np.log(scale_range[0]), np.log(scale_range[1])
    scales = np.exp(rng.uniform(lo, hi, num_features)).astype(np.float32)
  return InputScrambler(permutation, signs, scales)


def _haar(rng: np.random.Generator, n: int) -> np.ndarray:
  """A Haar-random orthogonal ``[n, n]``: QR of a Gaussian matrix, R's diagonal made positive (Mezzadri 2007)."""
  q, r = np.linalg.qr(rng.standard_normal((n, n)))
  return (q * np.where(np.diag(r) < 0, -1.0, 1.0)).astype(np.float32)


def input_mixer(key: keylib.SecretKey, num_features: int, *, stream: str = "",
                block: int = MIXING_BLOCK) -> InputMixer:
  """The key's ``mixed`` transform of ``num_features`` features (blocks of ``block``, the last one smaller)."""
  num_features = _check_key(key, num_features, "input_mixer")
  if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 2:
    raise UserInputError(f"input_mixer: block must be an integer >= 2, got {block!r}")
  rng = _key_rng(_MIXING_DOMAIN_TAG, key, stream)
  full, rest = divmod(num_features, int(block))
  permutation = rng.permutation(num_features)
  blocks = np.stack([_haar(rng, block) for _ in range(full)]) if full else np.zeros((0, block, block), np.float32)
  tail = _haar(rng, rest) if rest else np.zeros((0, 0), np.float32)
  out_permutation = rng.permutation(num_features)
  signs = np.where(rng.random(num_features) < 0.5, -1.0, 1.0).astype(np.float32)
  return InputMixer(permutation, blocks, tail, out_permutation, signs)


def _check(x, s: InputScrambler | InputMixer):
  if np.shape(x)[-1] != len(s.permutation):
    raise UserInputError(f"scramble: inputs have {np.shape(x)[-1]} features but the transform was made for "
                         f"{len(s.permutation)}; build it with input_scrambler/input_mixer(key, num_features)")


def _blockwise(y, m: InputMixer, transpose: bool):
  """``y [..., F]`` (in the order of ``m.permutation``) times blockdiag(blocks, tail), or its transpose."""
  xp = y.__array_namespace__()  # numpy or jax.numpy: the transform runs on either
  blocks, tail = (np.swapaxes(m.blocks, -1, -2), m.tail.T) if transpose else (m.blocks, m.tail)
  nb, b = blocks.shape[:2]
  lead = y.shape[:-1]
  out = (y[..., :nb * b].reshape(*lead, nb, 1, b) @ blocks).reshape(*lead, nb * b)
  return xp.concatenate([out, y[..., nb * b:] @ tail], axis=-1) if tail.size else out


def scramble(x, s: InputScrambler | InputMixer):
  """``x [..., F]`` -> ``x_s`` (hardened) or ``x_m`` (mixed); works on numpy and jax arrays."""
  _check(x, s)
  if isinstance(s, InputMixer):
    return _blockwise(x[..., s.permutation], s, transpose=False)[..., s.out_permutation] * s.signs
  return x[..., s.permutation] * (s.signs * s.scales)


def unscramble(x_s, s: InputScrambler | InputMixer):
  """The inverse of ``scramble``."""
  _check(x_s, s)
  if isinstance(s, InputMixer):
    y = _blockwise((x_s * s.signs)[..., np.argsort(s.out_permutation)], s, transpose=True)
    return y[..., np.argsort(s.permutation)]
  inverse = np.argsort(s.permutation)
  return (x_s / (s.signs * s.scales))[..., inverse]


def check_scheme(scheme: str) -> str:
  if scheme not in KEY_SCHEMES:
    raise UserInputError(f"unknown key scheme {scheme!r}; choose --key-scheme from {', '.join(KEY_SCHEMES)}")
  return scheme


class KeyView(NamedTuple):
  """One way of running a keyed model: its key coordinates (None: no INR path) and input scramble (None:
  raw features)."""

  coords: np.ndarray | None
  # by input stream ("" for a task's one input): an InputScrambler (hardened) or an InputMixer (mixed)
  scramblers: dict[str, InputScrambler | InputMixer] | None = None

  def inputs(self, x: np.ndarray, stream: str = "") -> np.ndarray:
    """``x`` as this view feeds it to the model (float32)."""
    x = np.asarray(x, np.float32)
    if self.scramblers is None:
      return x
    return np.asarray(scramble(x, self.scramblers[stream]), np.float32)


def _view(key: keylib.SecretKey, scheme: str, num_features: dict[str, int], signed: bool = True) -> KeyView:
  if check_scheme(scheme) == "faithful":
    return KeyView(key.coords)
  if scheme == "mixed":
    return KeyView(key.coords, {stream: input_mixer(key, n, stream=stream) for stream, n in num_features.items()})
  return KeyView(key.coords, {stream: input_scrambler(key, n, stream=stream, signed=signed)
                              for stream, n in num_features.items()})


def client_view(key: keylib.SecretKey, scheme: str, num_features: int | dict[str, int], *,
                signed: bool = True) -> KeyView:
  """What the clients feed their model under ``scheme``: the key's coordinates, and under ``hardened`` (``mixed``)
  their data scrambled (mixed) with the key. ``num_features``: the width of the task's input, or ``{stream: width}`` for
  a task with several inputs. ``signed=False``: a permutation only, for a task whose model is not equivariant
  to sign flips (docs/design.md, "Key schemes"); ``mixed`` has no unsigned form (such a task refuses it)."""
  widths = num_features if isinstance(num_features, dict) else {"": int(num_features)}
  return _view(key, scheme, widths, signed)


def study_views(key: keylib.SecretKey, scheme: str, num_features: int | dict[str, int],
                seed: int | None = None, *, signed: bool = True) -> dict[str, KeyView]:
  """The key study's four ways of running a trained model under ``scheme``: right key, a wrong key of the same
  mode, one of another mode (attackers' guesses made from ``seed`` or the key's public fingerprint, never
  from its material; ``keys.wrong_key_like``), and no key (raw features, no INR path)."""
  widths = num_features if isinstance(num_features, dict) else {"": int(num_features)}
  return {
      "right_key": _view(key, scheme, widths, signed),
      "wrong_key_same_mode": _view(keylib.wrong_key_like(key, seed=seed), scheme, widths, signed),
      "wrong_key_other_mode": _view(keylib.other_mode_key(key, seed=seed), scheme, widths, signed),
      "no_inr": KeyView(None),
  }
