"""Small building blocks shared by the keyed modules: pure affine/LayerNorm maps and the
linen modules that only *declare* their parameters.

The keyed modules are written as pure functions over nested parameter dicts (so they can be
called on a params tree taken out of any model, stacked over clients, vmapped, ...). The linen
modules around them only declare the parameters with the right shapes and initialisers and then
call the pure function. Nothing here uses ``nn.Dense`` on purpose: ``keyed(...)`` intercepts
every ``nn.Dense``, and the INR path itself must not be keyed again.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Params = dict[str, Any]

# LayerNorm epsilon of the PyTorch reference (torch.nn.LayerNorm default), not Flax's 1e-6.
LAYER_NORM_EPSILON = 1e-5


def linear(params: Params, x: jax.Array, dtype: Any = None) -> jax.Array:
  """``x @ kernel + bias`` with a Flax-layout kernel ``[in, out]``.

  ``dtype``: compute dtype (e.g. bfloat16) that ``x`` and the float32 parameters are cast to;
  None computes in the inputs' promoted dtype.
  """
  if dtype is None:
    return jnp.dot(x, params["kernel"]) + params["bias"]
  return jnp.dot(x.astype(dtype), params["kernel"].astype(dtype)) + params["bias"].astype(dtype)


def layer_norm(params: Params, x: jax.Array, epsilon: float = LAYER_NORM_EPSILON) -> jax.Array:
  """LayerNorm over the last axis with a learned ``scale`` and ``bias``.

  Statistics are computed in float32 at least (a bfloat16 variance loses the small
  differences it normalises); the result has ``x``'s dtype.
  """
  stats_dtype = jnp.promote_types(x.dtype, jnp.float32)
  h = x.astype(stats_dtype)
  mean = jnp.mean(h, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
  return ((h - mean) * jax.lax.rsqrt(var + epsilon) * params["scale"] + params["bias"]).astype(x.dtype)


def compute_dtype(dtype: Any) -> Any:
  """Normalises a compute dtype argument: None or float32 -> None (full precision, no casts);
  bfloat16/float16 (as a dtype or its name) -> that dtype. Raises ``ValueError`` otherwise."""
  if dtype is None:
    return None
  try:
    resolved = jnp.dtype(dtype)
  except TypeError as error:
    raise ValueError(f"unknown compute dtype {dtype!r}; use None/'float32' or 'bfloat16'") from error
  if resolved == jnp.float32:
    return None
  if resolved not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise ValueError(f"compute dtype must be float32, bfloat16 or float16, got {resolved}; parameters stay "
                     "float32 in every case")
  return resolved


# The INR path's hidden layers use PyTorch's nn.Linear default initialisation, as the reference
# does: kernel and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)). Nonzero random biases matter for
# how different keys map to different key vectors.
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int) -> Callable:
  bound = 1.0 / float(fan_in) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# Output layers of the INR path (V2, F2) start at N(0, 0.02) with zero bias, so a fresh keyed
# layer stays close to the plain layer.
small_normal_init = nn.initializers.normal(stddev=0.02)


class LinearParams(nn.Module):
  """Declares ``{"kernel": [in, out], "bias": [out]}`` and returns it."""

  in_features: int
  out_features: int
  kernel_init: Callable | None = None  # None: PyTorch nn.Linear default
  bias_init: Callable | None = None  # None: PyTorch nn.Linear default

  @nn.compact
  def __call__(self) -> Params:
    kernel_init = self.kernel_init or torch_kernel_init
    bias_init = self.bias_init or torch_bias_init(self.in_features)
    return {
        "kernel": self.param("kernel", kernel_init, (self.in_features, self.out_features)),
        "bias": self.param("bias", bias_init, (self.out_features,)),
    }


class LayerNormParams(nn.Module):
  """Declares ``{"scale": ones, "bias": zeros}`` of a LayerNorm over ``features``."""

  features: int

  @nn.compact
  def __call__(self) -> Params:
    return {
        "scale": self.param("scale", nn.initializers.ones, (self.features,)),
        "bias": self.param("bias", nn.initializers.zeros, (self.features,)),
    }
