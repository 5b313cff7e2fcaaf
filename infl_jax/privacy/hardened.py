"""Hardened INFL in the privacy evaluation: the ``hardened`` key scheme (``infl_jax.key_scheme``, where the
scramble lives and why) applied to a classification split."""

from __future__ import annotations

import dataclasses

import numpy as np

from infl_jax import keys as keylib
from infl_jax.key_scheme import InputScrambler, input_scrambler, scramble, unscramble

__all__ = ["InputScrambler", "harden_split", "input_scrambler", "scramble", "unscramble"]


def harden_split(split, key: keylib.SecretKey):
  """A copy of a ``FederatedSplit`` whose train/val/test inputs are scrambled with ``key``."""
  s = input_scrambler(key, split.n_features)
  return dataclasses.replace(split, train_x=scramble(split.train_x, s).astype(np.float32),
                             val_x=scramble(split.val_x, s).astype(np.float32),
                             test_x=scramble(split.test_x, s).astype(np.float32))
