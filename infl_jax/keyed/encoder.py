"""Key encoder: the secret coordinates -> a 16-dim key vector k (docs/design.md, "Keyed layers").

    k = mean_m LayerNorm( SiLU( W2 . SiLU( W1 . c_m + b1 ) + b2 ) )

One encoder is shared by all keyed layers of a model; its weights are ordinary trainable
parameters. The coordinates themselves are an *input* (``key_coords``), never a parameter.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from infl_jax.keyed._params import LayerNormParams, LinearParams, Params, layer_norm, linear

KEY_DIM = 16  # size of the key vector k
COORD_DIM = 2  # dimension d of one key point
ENCODER_HIDDEN = 32  # width of W1 (the reference leaves it to the model; 32 is ours)


def as_key_coords(key_coords: Any, coord_dim: int = COORD_DIM) -> jax.Array:
  """Validates key coordinates (an array ``[M, d]`` or a ``SecretKey``) and returns float32.

  Raises ``ValueError`` naming the problem for anything that is not a 2-D ``[M, d]`` array.
  """
  coords = getattr(key_coords, "coords", key_coords)  # a SecretKey carries its coordinates
  if not hasattr(coords, "shape"):
    coords = np.asarray(coords)
  if coords.ndim != 2 or coords.shape[-1] != coord_dim or coords.shape[0] < 1:
    raise ValueError(
        f"key_coords must have shape [M, {coord_dim}] (M key points in {coord_dim}-d, e.g. "
        f"[128, {coord_dim}]), got shape {tuple(coords.shape)}; pass SecretKey.coords from "
        "infl_jax.keys.generate_key/load_key, or key_coords=None to run without the INR path."
    )
  return jnp.asarray(coords, jnp.float32)


def encode_key(params: Params, coords: jax.Array) -> jax.Array:
  """Key vector ``k`` ``[key_dim]`` from coordinates ``[M, d]``.

  ``params``: ``{"W1": {"kernel", "bias"}, "W2": {"kernel", "bias"}, "norm": {"scale", "bias"}}``
  (the layout of ``KeyEncoder``'s parameters). Leading batch axes of ``coords`` are kept.
  """
  hidden = jax.nn.silu(linear(params["W1"], coords))
  per_point = layer_norm(params["norm"], jax.nn.silu(linear(params["W2"], hidden)))
  return jnp.mean(per_point, axis=-2)


class KeyEncoder(nn.Module):
  """Linen wrapper of ``encode_key``; ``__call__(coords [M, d]) -> k [key_dim]``."""

  hidden: int = ENCODER_HIDDEN
  key_dim: int = KEY_DIM
  coord_dim: int = COORD_DIM

  @nn.compact
  def __call__(self, coords: jax.Array) -> jax.Array:
    params = {
        "W1": LinearParams(self.coord_dim, self.hidden, name="W1")(),
        "W2": LinearParams(self.hidden, self.key_dim, name="W2")(),
        "norm": LayerNormParams(self.key_dim, name="norm")(),
    }
    return encode_key(params, as_key_coords(coords, self.coord_dim))
