"""The older INR variant: a per-output-neuron bias from a positional encoding (docs/design.md, "Keyed layers").

Output neuron j of a layer with ``out`` units gets the coordinate ``x_j = 2j/(out-1) - 1``
(``x_0 = 0`` when ``out == 1``), the encoding ``[sin(2^i pi x), cos(2^i pi x)]`` for i < 8
(interleaved: sin, cos of frequency 1, then of frequency 2, ...; 16 numbers), and a ReLU MLP
16 -> h -> h -> 1 (h = 8) maps it to a bias ``delta_j``:  ``y = W x + b + delta``.

Because delta is a function of a continuous coordinate, one MLP serves layers of any width.
Note that, as in the reference, delta does not depend on the key coordinates: on its own this
variant only separates "INR path on" from "INR path off". ``keyed(..., variant="positional",
film=True)`` adds the key-dependent FiLM on top.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from infl_jax.keyed._params import LinearParams, Params, linear

NUM_FREQUENCIES = 8
POSITIONAL_HIDDEN = 8


def neuron_coordinates(num_neurons: int) -> jax.Array:
  """``x_j = 2j/(out-1) - 1`` in [-1, 1], ``[out]``; a single neuron sits at 0."""
  if num_neurons == 1:
    return jnp.zeros((1,), jnp.float32)
  return 2.0 * jnp.arange(num_neurons, dtype=jnp.float32) / (num_neurons - 1) - 1.0


def positional_encoding(x: jax.Array, num_frequencies: int = NUM_FREQUENCIES) -> jax.Array:
  """``[..., 2*num_frequencies]``: sin/cos of ``2^i pi x`` interleaved per frequency."""
  angles = x[..., None] * (jnp.pi * 2.0 ** jnp.arange(num_frequencies, dtype=jnp.float32))
  return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(
      *x.shape, 2 * num_frequencies
  )


def positional_bias(params: Params, num_neurons: int, num_frequencies: int = NUM_FREQUENCIES):
  """Per-neuron bias ``delta`` ``[num_neurons]``; ``params``: ``{"L1", "L2", "L3"}``."""
  enc = positional_encoding(neuron_coordinates(num_neurons), num_frequencies)
  hidden = jax.nn.relu(linear(params["L2"], jax.nn.relu(linear(params["L1"], enc))))
  return linear(params["L3"], hidden)[..., 0]


def positional_dense_apply(x, kernel, bias, delta) -> jax.Array:
  """``y = W x + b + delta``."""
  return jnp.dot(x, kernel) + bias + delta


class PositionalBias(nn.Module):
  """Declares the ReLU MLP and returns ``delta`` ``[num_neurons]``."""

  num_neurons: int
  hidden: int = POSITIONAL_HIDDEN
  num_frequencies: int = NUM_FREQUENCIES

  @nn.compact
  def __call__(self) -> jax.Array:
    params = {
        "L1": LinearParams(2 * self.num_frequencies, self.hidden, name="L1")(),
        "L2": LinearParams(self.hidden, self.hidden, name="L2")(),
        "L3": LinearParams(self.hidden, 1, name="L3")(),
    }
    return positional_bias(params, self.num_neurons, self.num_frequencies)


class PositionalDense(nn.Module):
  """Dense layer plus the positional INR bias; ``__call__(x, use_inr=True)``.

  Parameters ``{"kernel", "bias", "pos_bias": {"L1", "L2", "L3"}}``; ``use_inr=False`` runs
  ``W x + b`` only (initialisation still creates ``pos_bias``). ``dtype``: compute dtype of
  ``x @ W`` (parameters stay float32; ``delta`` is computed in float32, then cast).
  """

  features: int
  hidden: int = POSITIONAL_HIDDEN
  num_frequencies: int = NUM_FREQUENCIES
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, use_inr: bool = True) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
    bias = self.param("bias", self.bias_init, (self.features,))
    delta_module = PositionalBias(self.features, self.hidden, self.num_frequencies, name="pos_bias")
    if self.dtype is not None:
      kernel, bias, x = kernel.astype(self.dtype), bias.astype(self.dtype), x.astype(self.dtype)
    if not use_inr:
      if self.is_initializing():
        delta_module()
      return jnp.dot(x, kernel) + bias
    delta = delta_module()
    return positional_dense_apply(x, kernel, bias, delta if self.dtype is None else delta.astype(self.dtype))
