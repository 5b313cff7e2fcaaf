"""Multi-omics clustering with missing modalities ("mosaic"): one encoder per modality into a
shared embedding, trained without labels.

Per sample, each present modality m is encoded to ``z_m``; the joint embedding ``z`` is the
mean over present modalities. The loss (per sample, averaged over real samples):

  * reconstruction of every present modality from ``z`` (denoising: inputs get dropout noise),
  * cross-reconstruction of each present modality from every *other* present modality's ``z_m``,
    which is what ties the encoders to one space (only samples holding both teach it),
  * alignment ``||z_m - z||^2`` between a modality's code and the joint code.

Clients that lack a modality never run its encoder on real data (its rows are masked out),
and its encoder's parameters are updated only by clients that hold it.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from infl_jax.federated import Task
from infl_jax.keyed import keyed

__all__ = ["MosaicAutoencoder", "make_mosaic_model", "mosaic_embed", "mosaic_task"]


class MosaicAutoencoder(nn.Module):
  """``__call__(inputs)`` with ``inputs = (x: {modality: [B, F_m]}, present: [B, M])``.

  Returns ``(z [B, E], codes [M, B, E], recon {m: [B, F_m]}, cross {m: [B, F_m]})``; ``cross[m]``
  decodes modality m from the mean code of the *other* present modalities.
  """

  modality_names: Sequence[str]
  modality_dims: Sequence[int]
  hidden: int = 64
  embed_dim: int = 16

  @nn.compact
  def __call__(self, inputs):
    x, present = inputs
    codes = []
    for m in self.modality_names:
      h = nn.silu(nn.Dense(self.hidden, name=f"enc_{m}_0")(x[m]))
      codes.append(nn.Dense(self.embed_dim, name=f"enc_{m}_1")(h))
    codes = jnp.stack(codes)  # [M, B, E]
    w = present.T[..., None]  # [M, B, 1]
    count = jnp.maximum(w.sum(0), 1.0)
    z = (codes * w).sum(0) / count
    others = ((codes * w).sum(0, keepdims=True) - codes * w) / jnp.maximum(count - w, 1.0)  # [M, B, E]
    recon, cross = {}, {}
    for j, (m, dim) in enumerate(zip(self.modality_names, self.modality_dims)):
      dec_0 = nn.Dense(self.hidden, name=f"dec_{m}_0")
      dec_1 = nn.Dense(dim, name=f"dec_{m}_1")
      both = jnp.concatenate([z, others[j]], 0)
      out = dec_1(nn.silu(dec_0(both)))
      recon[m], cross[m] = out[: z.shape[0]], out[z.shape[0]:]
    return z, codes, recon, cross


def make_mosaic_model(modality_names, modality_dims, *, hidden: int = 64, embed_dim: int = 16,
                      key_strength: float = 1.0, variant: str = "modulation"):
  """The keyed mosaic autoencoder (every Dense keyed; FiLM after all but the decoders' outputs)."""
  plain = MosaicAutoencoder(tuple(modality_names), tuple(int(d) for d in modality_dims), hidden, embed_dim)
  skip = tuple(f"dec_{m}_1" for m in modality_names)
  return keyed(plain, key_strength=key_strength, variant=variant, film_skip=skip)


def mosaic_task(model, modality_names: Sequence[str], *, input_dropout: float = 0.2,
                self_weight: float = 1.0, cross_weight: float = 1.0, align_weight: float = 0.1) -> Task:
  """Unsupervised loss for client data ``{"x": {m: [N, F_m]}, "present": [N, M]}``."""

  def loss(params, model_state, batch, mask, rng, context):
    present = batch["present"] * mask[:, None]
    keep_rngs = jax.random.split(rng, len(modality_names))
    noisy = {m: batch["x"][m] * jax.random.bernoulli(r, 1.0 - input_dropout, batch["x"][m].shape) / (1.0 - input_dropout)
             for m, r in zip(modality_names, keep_rngs)}
    z, codes, recon, cross = model.apply({"params": params, **model_state}, (noisy, present), key_coords=context)
    total = 0.0
    n_real = jnp.maximum(mask.sum(), 1.0)
    for j, m in enumerate(modality_names):
      have = present[:, j]
      err = jnp.mean(jnp.square(recon[m] - batch["x"][m]), -1)
      total += self_weight * jnp.sum(err * have) / n_real
      # Cross-reconstruction only where another modality is present too.
      other = (present.sum(1) - have) > 0
      cross_err = jnp.mean(jnp.square(cross[m] - batch["x"][m]), -1)
      total += cross_weight * jnp.sum(cross_err * have * other) / n_real
      align = jnp.sum(jnp.square(codes[j] - jax.lax.stop_gradient(z)), -1)
      total += align_weight * jnp.sum(align * have * other) / n_real
    return total, model_state

  return Task(loss=loss)


def mosaic_embed(model, variables, x: dict, present, key_coords):
  """Joint embeddings [N, E] (inference: no input noise)."""
  z, _, _, _ = model.apply(variables, (x, jnp.asarray(present, jnp.float32)), key_coords=key_coords)
  return z
