"""INFL's key on the federated CNN (``--key-scheme faithful``): every Dense layer of LSANet's heads and LSA keyed
through ``infl_jax.keyed.keyed``, the key held by the hospitals only (docs/design.md, "Federated LSANet").

Faithful only: INFL's ``hardened`` scheme scrambles input features with the key, and a pixel scramble would break
the locality convolutions rely on. The key file is ``WORKDIR/client_secret.key``, made from the operating
system's random source for a new run (``infl_jax.keys.generate_key``, owner-only, never overwritten) and read back
on ``--resume``; runs record its fingerprint. The coordinates are an argument of the jitted round and of the
prediction function, never a constant compiled into either (the compilation cache writes programs to disk).
"""
from __future__ import annotations

import pathlib

import flax.linen as nn
import jax.numpy as jnp

from infl_jax import keys as keylib
from infl_jax.keyed import dense_call_order, keyed
from runkit.errors import UserInputError

__all__ = ["KEY_FILE_NAME", "keyed_lsanet", "load_or_create_key"]

KEY_FILE_NAME = "client_secret.key"
_CLASSIFIERS = ("classifier",)  # the Dense layers that give logits: keyed, but no FiLM after them


def keyed_lsanet(model: nn.Module, image_shape, key_strength: float) -> nn.Module:
  """``model`` with every Dense keyed (heads' classifiers, LSA's projections) and FiLM after all but the
  classifiers."""
  calls = dense_call_order(model, jnp.zeros((1, *image_shape)), train=False)
  return keyed(model, key_strength=key_strength,
               film_skip=tuple(p for p in calls if p.rsplit("/", 1)[-1] in _CLASSIFIERS))


def load_or_create_key(workdir: pathlib.Path, *, resume: bool) -> keylib.SecretKey:
  """The run's key: read back on resume, else a fresh one from the OS's random source saved owner-only (a key
  file already there is never overwritten)."""
  path = pathlib.Path(workdir) / KEY_FILE_NAME
  if resume:
    if not path.exists():
      raise UserInputError(f"--resume with --key-scheme faithful needs the run's key file {path}, which is "
                           "missing: restore it (or, for a run made without a key, drop --key-scheme), or start a "
                           "new run in an empty --workdir")
    return keylib.load_key(path)
  if path.exists():
    raise UserInputError(f"{path} already holds a key and is never overwritten; choose an empty --workdir")
  key = keylib.generate_key()
  keylib.save_key(key, path, overwrite=False)
  return key
