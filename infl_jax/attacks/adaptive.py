"""The adaptive attacker: the server holds every trained weight, key encoder included, so the model
depends on the secret only through the 16-dim key vector ``k``. The attacker fits ``k`` directly.

- ``apply_with_key_vector`` runs a keyed model with a given ``k`` instead of key coordinates.
- ``prior_key_vector``: the attacker's guess without data, the mean ``k`` of keys of the same mode
  drawn from seeds of their own (anyone with the code can draw them).
- ``fit_key_vector``: from ``n`` labelled samples, Adam on the cross-entropy over ``k`` alone.
- In gradient inversion ``k`` is the ``extra`` unknown of ``gradient_inversion.invert``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from infl_jax import keys as keylib
from runkit.errors import UserInputError
from infl_jax.keyed import KeyEncoder, key_vector

__all__ = ["apply_with_key_vector", "fit_key_vector", "prior_key_vector"]

# Placeholder coordinates: they only switch the INR path on; the encoder's output is replaced.
_PLACEHOLDER_COORDS = jnp.zeros((1, 2), jnp.float32)


def apply_with_key_vector(model: nn.Module, variables, x, k: jax.Array, **kwargs):
  """``model.apply(variables, x, key_coords=<a key whose vector is k>, **kwargs)``."""

  def inject(next_fun, args, call_kwargs, context):
    if isinstance(context.module, KeyEncoder) and context.method_name == "__call__":
      return k
    return next_fun(*args, **call_kwargs)

  with nn.intercept_methods(inject):
    return model.apply(variables, x, key_coords=_PLACEHOLDER_COORDS, **kwargs)


def prior_key_vector(variables, mode: str = "uniform", *, num_keys: int = 8, first_seed: int = 10_000) -> jax.Array:
  """Mean key vector of ``num_keys`` keys of ``mode`` from the attacker's own seeds."""
  if num_keys < 1:
    raise UserInputError(f"prior_key_vector: num_keys must be >= 1, got {num_keys}")
  coords = jnp.stack([jnp.asarray(keylib.generate_key(first_seed + i, mode).coords) for i in range(num_keys)])
  return jnp.mean(jax.vmap(lambda c: key_vector(variables, c))(coords), axis=0)


_FIT_PROGRAMS: dict = {}


def _fit_program(model: nn.Module, steps: int, learning_rate: float, model_kwargs: dict):
  """One compiled fit per (model, settings): samples are padded to a bucket size and masked."""
  cache_key = (id(model), steps, learning_rate, tuple(sorted(model_kwargs.items())))
  if cache_key not in _FIT_PROGRAMS:
    opt = optax.adam(learning_rate)

    def loss_fn(k, variables, x, y, mask):
      logits = apply_with_key_vector(model, variables, x, k, **model_kwargs)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
      return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    def run(k, variables, x, y, mask):
      def step(carry, _):
        k, state = carry
        grads = jax.grad(loss_fn)(k, variables, x, y, mask)
        updates, state = opt.update(grads, state, k)
        return (optax.apply_updates(k, updates), state), None

      (k, _), _ = jax.lax.scan(step, (k, opt.init(k)), None, length=steps)
      return k

    _FIT_PROGRAMS[cache_key] = (model, jax.jit(run))  # the model is kept alive with its id
  return _FIT_PROGRAMS[cache_key][1]


def fit_key_vector(model: nn.Module, variables, x, y, k_init: jax.Array, *, steps: int = 200,
                   learning_rate: float = 0.05, model_kwargs: dict | None = None) -> jax.Array:
  """Fits ``k`` by Adam on the mean cross-entropy of the labelled samples ``(x [n, F], y [n])``.

  ``n = 0`` returns ``k_init`` unchanged (no data, nothing to fit).
  """
  x = np.asarray(x, np.float32)
  y = np.asarray(y, np.int32)
  if x.shape[0] != y.shape[0]:
    raise UserInputError(f"fit_key_vector: {x.shape[0]} inputs but {y.shape[0]} labels")
  n = x.shape[0]
  if n == 0:
    return k_init
  bucket = max(32, 1 << (n - 1).bit_length())  # padded: one compiled shape up to 32 samples
  mask = np.r_[np.ones(n, np.float32), np.zeros(bucket - n, np.float32)]
  x = np.concatenate([x, np.zeros((bucket - n,) + x.shape[1:], np.float32)])
  y = np.concatenate([y, np.zeros(bucket - n, np.int32)])
  run = _fit_program(model, steps, learning_rate, dict(model_kwargs or {}))
  return run(jnp.asarray(k_init, jnp.float32), variables, jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask))
