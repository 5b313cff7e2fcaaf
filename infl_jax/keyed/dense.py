"""Keyed dense layer (docs/design.md, "Keyed layers").

    [s ; t] = V2 . LayerNorm( SiLU( V1 . k ) )        V1: key_dim -> key_hidden, V2: -> 2*out
    W_eff   = diag(1 + lambda*tanh s) . W             (scales each output unit)
    b_eff   = b + lambda*tanh t
    y       = W_eff x + b_eff

With a Flax kernel ``[in, out]`` scaling the output row of W is scaling the output column of the
kernel, i.e. ``y = (x @ kernel) * (1 + lambda*tanh s) + b + lambda*tanh t``.
"""

from __future__ import annotations

from typing import Any, Callable

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

KEY_HIDDEN = 8


def key_modulation(params: Params, k: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-output-unit ``(s, t)`` from the key vector ``k``.

  ``params``: ``{"V1": {"kernel", "bias"}, "norm": {"scale", "bias"}, "V2": {"kernel", "bias"}}``
  (``KeyModulation``'s layout). Returns two arrays of shape ``[..., out]``.
  """
  hidden = layer_norm(params["norm"], jax.nn.silu(linear(params["V1"], k)))
  s, t = jnp.split(linear(params["V2"], hidden), 2, axis=-1)
  return s, t


def keyed_kernel_and_bias(kernel, bias, s, t, key_strength: float):
  """``(W_eff, b_eff)`` in Flax layout: kernel ``[in, out]`` scaled per output column."""
  return kernel * (1.0 + key_strength * jnp.tanh(s)), bias + key_strength * jnp.tanh(t)


def keyed_dense_apply(x, kernel, bias, s, t, key_strength: float) -> jax.Array:
  """``y = W_eff x + b_eff`` (the keyed layer's output)."""
  scale = 1.0 + key_strength * jnp.tanh(s)
  return jnp.dot(x, kernel) * scale + bias + key_strength * jnp.tanh(t)


def modulate_dense_output(y_plain, bias, s, t, key_strength: float) -> jax.Array:
  """Same as ``keyed_dense_apply`` but from the plain layer's output ``y_plain = W x + b``.

  ``W_eff x + b_eff = (y_plain - b) * (1 + lambda tanh s) + b + lambda tanh t``; written so the
  user's ``nn.Dense`` computes ``W x + b`` with its own dtype/precision/dot_general settings.
  """
  scale = 1.0 + key_strength * jnp.tanh(s)
  return y_plain * scale - bias * (scale - 1.0) + key_strength * jnp.tanh(t)


class KeyModulation(nn.Module):
  """Declares V1/LayerNorm/V2 and returns ``(s, t)`` for ``features`` output units."""

  features: int
  key_dim: int = KEY_DIM
  key_hidden: int = KEY_HIDDEN

  @nn.compact
  def __call__(self, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    params = {
        "V1": LinearParams(self.key_dim, self.key_hidden, name="V1")(),
        "norm": LayerNormParams(self.key_hidden, name="norm")(),
        "V2": LinearParams(
            self.key_hidden, 2 * self.features, small_normal_init, nn.initializers.zeros, name="V2"
        )(),
    }
    return key_modulation(params, k)


class KeyedDense(nn.Module):
  """A Dense layer whose weights are modulated by the key vector ``k``.

  ``__call__(x, k=None)``: ``k`` is the 16-dim key vector from the model's shared
  ``KeyEncoder``; ``k=None`` runs the plain layer ``W x + b`` (no INR path). Parameters:
  ``{"kernel": [in, out], "bias": [out], "key_mod": {"V1", "norm", "V2"}}``; ``kernel``/``bias``
  are laid out like ``nn.Dense`` so plain weights can be copied in. Initialising with ``k=None``
  still creates the ``key_mod`` parameters.

  ``dtype``: compute dtype of ``x @ W`` (e.g. bfloat16; parameters stay float32). The key path
  ``(s, t)`` and the modulation stay in float32 (per layer, not per sample, and lambda amplifies
  their rounding); the output has the compute dtype.
  """

  features: int
  key_strength: float = 1.0
  key_dim: int = KEY_DIM
  key_hidden: int = KEY_HIDDEN
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, k: jax.Array | None = None) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
    bias = self.param("bias", self.bias_init, (self.features,))
    modulation = KeyModulation(self.features, self.key_dim, self.key_hidden, name="key_mod")
    if k is None and self.is_initializing():  # create the INR parameters even when initialised key-less
      modulation(jnp.zeros((self.key_dim,), jnp.float32))
    if self.dtype is None:
      if k is None:
        return jnp.dot(x, kernel) + bias
      s, t = modulation(k)
      return keyed_dense_apply(x, kernel, bias, s, t, self.key_strength)
    y_plain = linear({"kernel": kernel, "bias": bias}, x, self.dtype)
    if k is None:
      return y_plain
    s, t = modulation(k)
    return modulate_dense_output(y_plain.astype(jnp.float32), bias, s, t, self.key_strength).astype(self.dtype)
