"""The Layer Selective Attention (LSA) module and the classifier heads.

LSA is OUR RECONSTRUCTION (the LSANet paper's full text is not available; docs/design.md,
"LSANet"): it applies selective-kernel attention across layers instead of kernels. Each branch's
pooled feature u_i is projected to a common width d, the projections are summed, squeezed to d/r
(Dense-BN-ReLU), expanded to per-layer channel logits, softmaxed across layers, and fused as
v = sum_i a_i * u_i.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lsanet_jax.backbones import batch_norm, conv


class LayerSelectiveAttention(nn.Module):
  """Fuses L pooled features into one fused-head logit vector.

  Returns (logits (N, num_classes) float32, alpha (N, L, dim) float32: the layer weights,
  softmax across layers for every channel)."""
  num_classes: int
  dim: int = 128
  reduction: int = 4
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jnp.ndarray], train: bool):
    if len(features) < 2:
      raise ValueError("layer selective attention needs at least two branches to select among")
    u = []
    for i, f in enumerate(features):
      h = nn.Dense(self.dim, use_bias=False, dtype=self.dtype, name=f"project{i + 1}")(f)
      u.append(nn.relu(batch_norm(train, self.dtype, f"project{i + 1}_bn")(h)))
    u = jnp.stack(u, axis=1)  # (N, L, d)
    z = nn.Dense(max(1, self.dim // self.reduction), use_bias=False, dtype=self.dtype,
                 name="squeeze")(jnp.sum(u, axis=1))
    z = nn.relu(batch_norm(train, self.dtype, "squeeze_bn")(z))
    layer_logits = nn.Dense(len(features) * self.dim, dtype=self.dtype, name="select")(z)
    layer_logits = layer_logits.reshape(z.shape[0], len(features), self.dim)
    alpha = nn.softmax(layer_logits.astype(jnp.float32), axis=1)
    fused = jnp.sum(alpha.astype(u.dtype) * u, axis=1)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(fused)
    return logits.astype(jnp.float32), alpha


class LinearHead(nn.Module):
  """Global average pooling and a linear classifier; returns (logits, pooled feature)."""
  num_classes: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.dtype != jnp.float32:
      # jaxlib 0.12's CPU compiler fuses a bfloat16 block's last convolution, batch norm and ReLU into this
      # mean and returns NaN for most rows (the plain variant's jitted forward pass); kept apart, it is exact.
      x = jax.lax.optimization_barrier(x)
    pooled = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(pooled)
    return logits.astype(jnp.float32), pooled


class LightAuxHead(nn.Module):
  """A cheap auxiliary branch: 1x1 conv-BN-ReLU to `features`, pooling and a linear classifier."""
  num_classes: int
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = conv(self.features, 1, dtype=self.dtype, name="conv")(x)
    x = nn.relu(batch_norm(train, self.dtype, "bn")(x))
    return LinearHead(self.num_classes, self.dtype, name="head")(x)
