"""Activation-dependent FiLM (docs/design.md, "Keyed layers"), applied after keyed layers but the last.

    a       = LayerNorm( SiLU( A . h ) )                 a in R^act_dim (16)
    [g ; b] = F2 . SiLU( F1 . [a ; k ; a*k] )            F1: 3*16 -> 8, F2: 8 -> 2*features
    h'      = h * (1 + lambda*tanh g) + lambda*tanh b
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from infl_jax.keyed._params import (
    LayerNormParams,
    LinearParams,
    Params,
    layer_norm,
    linear,
    small_normal_init,
)
from infl_jax.keyed.encoder import KEY_DIM

FILM_HIDDEN = 8


def film_apply(params: Params, h: jax.Array, k: jax.Array, key_strength: float, dtype: Any = None) -> jax.Array:
  """Key- and activation-dependent feature-wise modulation of ``h`` ``[..., features]``.

  ``params``: ``{"A", "norm", "F1", "F2"}`` (``FiLM``'s layout); ``k``: key vector
  ``[key_dim]`` (the activation summary ``a`` has the same size, so ``a * k`` is defined).
  ``dtype``: compute dtype of the three matmuls (e.g. bfloat16); the LayerNorm statistics and
  the modulation ``h*(1 + lambda tanh g) + lambda tanh b`` stay in float32, since lambda (up to
  20 and more) amplifies rounding in g and b. The result has ``h``'s dtype.
  """
  if dtype is None:
    a = layer_norm(params["norm"], jax.nn.silu(linear(params["A"], h)))
    k = jnp.broadcast_to(k, a.shape)
    gamma, beta = jnp.split(
        linear(params["F2"], jax.nn.silu(linear(params["F1"], jnp.concatenate([a, k, a * k], -1)))),
        2,
        axis=-1,
    )
    return h * (1.0 + key_strength * jnp.tanh(gamma)) + key_strength * jnp.tanh(beta)
  a = layer_norm(params["norm"], jax.nn.silu(linear(params["A"], h, dtype)))
  k = jnp.broadcast_to(k.astype(dtype), a.shape)
  gamma_beta = linear(params["F2"], jax.nn.silu(linear(params["F1"], jnp.concatenate([a, k, a * k], -1), dtype)),
                      dtype)
  gamma, beta = jnp.split(gamma_beta.astype(jnp.float32), 2, axis=-1)
  out = h.astype(jnp.float32) * (1.0 + key_strength * jnp.tanh(gamma)) + key_strength * jnp.tanh(beta)
  return out.astype(h.dtype)


class FiLM(nn.Module):
  """Linen wrapper of ``film_apply``; ``__call__(h, k=None)``; ``k=None`` returns ``h``.

  Initialising with ``k=None`` still creates the parameters.
  """

  key_strength: float = 1.0
  key_dim: int = KEY_DIM
  hidden: int = FILM_HIDDEN
  dtype: Any = None  # compute dtype of the matmuls (see film_apply); parameters stay float32

  @nn.compact
  def __call__(self, h: jax.Array, k: jax.Array | None = None) -> jax.Array:
    features = h.shape[-1]
    params = {
        "A": LinearParams(features, self.key_dim, name="A")(),
        "norm": LayerNormParams(self.key_dim, name="norm")(),
        "F1": LinearParams(3 * self.key_dim, self.hidden, name="F1")(),
        "F2": LinearParams(
            self.hidden, 2 * features, small_normal_init, nn.initializers.zeros, name="F2"
        )(),
    }
    if k is None:
      if self.is_initializing():
        film_apply(params, h, jnp.zeros((self.key_dim,), h.dtype), self.key_strength, self.dtype)
      return h
    return film_apply(params, h, k, self.key_strength, self.dtype)
