"""Hardened INFL: key-derived scrambling of the input features, on top of the keyed modulation.

Why: the faithful method's secret reaches the model only through a 16-dim vector ``k`` that
changes little between keys and that gradient descent can fit, and the analytic first-layer
attack reads the input off an update without any key (see docs/privacy.md). Here the key also
fixes a secret permutation and sign flip (optionally a scale) of the input features:

    x_s[i] = sign[i] * scale[i] * x[perm[i]]          (scale 1 unless ``scale_range`` is given)

Clients scramble their data before training and inference; the model is trained on ``x_s``.
The scramble is not a parameter, never leaves the clients and is discrete (one of F! * 2^F
permutations/sign patterns), so gradient descent cannot fit it. With an i.i.d. initialisation a dense
first layer trained with a coordinate-wise optimizer (Adam, SGD, weight decay) is equivariant to a
signed permutation of its inputs, so the key holder's training is the same in distribution; scales
would change the optimizer's dynamics and add no secrecy that the permutation does not give, hence
off by default. Whatever an
attacker reconstructs from a gradient is ``x_s``: scrambled unless they hold the key.

The scramble is drawn from the key material, never from a seed: ``SeedSequence(SHA-256(domain tag,
material, mode, version))``, a stream apart from the key coordinates' (docs/design.md, "Keys"),
reproducible from the SecretKey alone and as unguessable as its material.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import NamedTuple

import numpy as np

from infl_jax import keys as keylib
from runkit.errors import UserInputError

__all__ = ["InputScrambler", "harden_split", "input_scrambler", "scramble", "unscramble"]

_DOMAIN_TAG = b"infl-hardened-scramble-v2\0"  # v1 was drawn from SeedSequence([seed, version, mode, tag])


class InputScrambler(NamedTuple):
  permutation: np.ndarray  # int [F]
  signs: np.ndarray  # float32 [F], +-1
  scales: np.ndarray  # float32 [F], > 0


def input_scrambler(key: keylib.SecretKey, num_features: int,
                    scale_range: tuple[float, float] | None = None) -> InputScrambler:
  """The key's scramble of ``num_features`` features; ``scale_range=(lo, hi)`` adds log-uniform scales."""
  if not isinstance(key, keylib.SecretKey):
    raise UserInputError(f"input_scrambler needs a SecretKey (infl_jax.keys.generate_key/load_key), got "
                         f"{type(key).__name__}")
  if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)) or num_features < 1:
    raise UserInputError(f"input_scrambler: num_features must be a positive integer, got {num_features!r}")
  digest = hashlib.sha256(_DOMAIN_TAG + key.material + json.dumps([key.mode, key.version]).encode()).digest()
  rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(int.from_bytes(digest, "little"))))
  permutation = rng.permutation(int(num_features))
  signs = np.where(rng.random(num_features) < 0.5, -1.0, 1.0).astype(np.float32)
  if scale_range is None:
    scales = np.ones(num_features, np.float32)
  else:
    if not (len(scale_range) == 2 and 0 < scale_range[0] <= scale_range[1]):
      raise UserInputError(f"input_scrambler: scale_range must be (lo, hi) with 0 < lo <= hi, got {scale_range!r}")
    lo, hi = np.log(scale_range[0]), np.log(scale_range[1])
    scales = np.exp(rng.uniform(lo, hi, num_features)).astype(np.float32)
  return InputScrambler(permutation, signs, scales)


def _check(x, s: InputScrambler):
  if np.shape(x)[-1] != len(s.permutation):
    raise UserInputError(f"scramble: inputs have {np.shape(x)[-1]} features but the scrambler was made for "
                         f"{len(s.permutation)}; build it with input_scrambler(key, num_features)")


def scramble(x, s: InputScrambler):
  """``x [..., F]`` -> ``x_s``; works on numpy and jax arrays."""
  _check(x, s)
  return x[..., s.permutation] * (s.signs * s.scales)


def unscramble(x_s, s: InputScrambler):
  """The inverse of ``scramble``."""
  _check(x_s, s)
  inverse = np.argsort(s.permutation)
  return (x_s / (s.signs * s.scales))[..., inverse]


def harden_split(split, key: keylib.SecretKey):
  """A copy of a ``FederatedSplit`` whose train/val/test inputs are scrambled with ``key``."""
  s = input_scrambler(key, split.n_features)
  return dataclasses.replace(split, train_x=scramble(split.train_x, s).astype(np.float32),
                             val_x=scramble(split.val_x, s).astype(np.float32),
                             test_x=scramble(split.test_x, s).astype(np.float32))
