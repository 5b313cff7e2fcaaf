"""Channel/spatial attention modules that a backbone block can carry: none, SE, CBAM, ECA.

Placement (see backbones.py): in residual blocks after the last BatchNorm of the residual branch,
before the addition (where the SE, CBAM and ECA papers put them); in VGG after each conv-BN-ReLU; in
MobileNetV2 after the depthwise convolution (the MnasNet/MobileNetV3 placement).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

ATTENTION_KINDS = ("none", "se", "cbam", "eca")


class SqueezeExcitation(nn.Module):
  """Hu et al. 2018: global average pool, bottleneck MLP, sigmoid channel gates."""
  reduction: int = 16
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    s = jnp.mean(x, axis=(1, 2))
    s = nn.relu(nn.Dense(max(1, channels // self.reduction), dtype=self.dtype, name="reduce")(s))
    s = nn.sigmoid(nn.Dense(channels, dtype=self.dtype, name="expand")(s))
    return x * s[:, None, None, :]


class CBAM(nn.Module):
  """Woo et al. 2018: channel attention (shared MLP on avg- and max-pool) then 7x7 spatial attention."""
  reduction: int = 16
  spatial_kernel: int = 7
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    hidden = nn.Dense(max(1, channels // self.reduction), dtype=self.dtype, name="mlp_reduce")
    out = nn.Dense(channels, dtype=self.dtype, name="mlp_expand")
    mlp = lambda v: out(nn.relu(hidden(v)))
    gate = nn.sigmoid(mlp(jnp.mean(x, axis=(1, 2))) + mlp(jnp.max(x, axis=(1, 2))))
    x = x * gate[:, None, None, :]
    pooled = jnp.concatenate([jnp.mean(x, axis=-1, keepdims=True),
                              jnp.max(x, axis=-1, keepdims=True)], axis=-1)
    k = self.spatial_kernel
    spatial = nn.Conv(1, (k, k), padding=[(k // 2, k // 2)] * 2, use_bias=False,
                      dtype=self.dtype, name="spatial_conv")(pooled)
    return x * nn.sigmoid(spatial)


def eca_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
  """ECA's adaptive 1D kernel size: nearest odd number to (log2(C) + b) / gamma."""
  t = int(abs((math.log2(channels) + b) / gamma))
  return t if t % 2 else t + 1


class ECA(nn.Module):
  """Wang et al. 2020: global average pool, 1D conv across channels (no reduction), sigmoid."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    k = eca_kernel_size(channels)
    s = jnp.mean(x, axis=(1, 2))[:, :, None]  # (N, C, 1): channels become the conv's length axis
    s = nn.Conv(1, (k,), padding=[(k // 2, k // 2)], use_bias=False, dtype=self.dtype,
                name="conv1d")(s)
    return x * nn.sigmoid(s[:, :, 0])[:, None, None, :]


def apply_attention(kind: str, x, *, dtype=jnp.float32, name: str = "attention"):
  """Applies the named attention module to x (NHWC); must be called inside a compact method."""
  if kind == "none":
    return x
  if kind == "se":
    return SqueezeExcitation(dtype=dtype, name=name)(x)
  if kind == "cbam":
    return CBAM(dtype=dtype, name=name)(x)
  if kind == "eca":
    return ECA(dtype=dtype, name=name)(x)
  raise ValueError(f"unknown attention module {kind!r}; choose one of {', '.join(ATTENTION_KINDS)}")
