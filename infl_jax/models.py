"""INFL task models, written as plain Flax models and keyed with ``keyed(...)``.

Every model here runs as::

    model.apply(variables, x, key_coords=coords_or_None, train=bool,
                rngs={"dropout": rng}, mutable=["batch_stats"])      # the last two when training

``key_coords=None`` runs the un-keyed path (plain W, b, no FiLM). The plain classes
(``PlainProteomicsNet``, ``PlainMLPClassifier``) are ordinary Flax models; their variables copy
into the keyed ones with ``infl_jax.keyed.copy_plain_params``.

Mixed precision (``dtype="bfloat16"`` in the factories): the hidden Dense layers, FiLM's matmuls
and the activations run in bfloat16; parameters (the master weights the optimizer updates),
BatchNorm statistics, the key path and the output layer stay float32, so logits and the loss
are float32.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from infl_jax.keyed._params import compute_dtype
from infl_jax.keyed.encoder import KEY_DIM
from infl_jax.keyed.transform import KeyedModel, keyed

# Reference settings for the proteomics cohort task (docs/design.md, "Data sets and presets").
PROTEOMICS_KEY_STRENGTH = 20.0
PROTEOMICS_DROPOUT = 0.2
BATCH_NORM_MOMENTUM = 0.9  # PyTorch's momentum 0.1 in Flax's convention
BATCH_NORM_EPSILON = 1e-5


def _batch_norm(train: bool, name: str, dtype: Any = None) -> nn.BatchNorm:
  # Flax reduces BatchNorm statistics in float32 whatever ``dtype`` (the output's) is.
  return nn.BatchNorm(
      use_running_average=not train,
      momentum=BATCH_NORM_MOMENTUM,
      epsilon=BATCH_NORM_EPSILON,
      dtype=dtype,
      name=name,
  )


def _head_dtype(dtype: Any) -> Any:
  # The output layer computes in float32 under mixed precision: logits feed softmax and the loss.
  return None if dtype is None else jnp.float32


def _row_mask(mask: jax.Array | None) -> jax.Array | None:
  """[B] sample mask -> [B, 1], so BatchNorm statistics skip padding rows of a minibatch."""
  return None if mask is None else mask.reshape(-1, 1).astype(bool)


def _check_input(x: jax.Array, model_name: str) -> None:
  if x.ndim < 2:
    raise ValueError(
        f"{model_name} takes a batch of samples [batch, features], got shape {x.shape}; "
        "add a leading batch axis (x[None]) for a single sample."
    )


class ResidualBlock(nn.Module):
  """Dense-(FiLM)-BN-ReLU-Dropout-Dense-(FiLM), added to the input, then BN.

  FiLM appears once the model is keyed (it follows every keyed Dense). As in the reference the
  block ends with the BatchNorm of the sum; ``output_relu`` adds a ReLU after it (a
  post-activation block), an option kept for comparison (docs/design.md, "Data sets and presets").
  """

  features: int
  dropout_rate: float = PROTEOMICS_DROPOUT
  dtype: Any = None  # compute dtype (None: float32); parameters stay float32
  output_relu: bool = False

  @nn.compact
  def __call__(self, h: jax.Array, train: bool = False, mask: jax.Array | None = None) -> jax.Array:
    y = nn.Dense(self.features, dtype=self.dtype, name="dense_0")(h)
    y = nn.relu(_batch_norm(train, "bn_0", self.dtype)(y, mask=_row_mask(mask)))
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = nn.Dense(self.features, dtype=self.dtype, name="dense_1")(y)
    out = _batch_norm(train, "bn_out", self.dtype)(h + y, mask=_row_mask(mask))
    return nn.relu(out) if self.output_relu else out


class PlainProteomicsNet(nn.Module):
  """The reference proteomics cohort classifier, un-keyed (docs/design.md, "Data sets and presets").

  Dense(in->64), ``num_blocks`` residual blocks, Dense(64->32)-ReLU-Dropout, Dense(32->classes).
  """

  num_classes: int
  hidden: int = 64
  bottleneck: int = 32
  num_blocks: int = 2
  dropout_rate: float = PROTEOMICS_DROPOUT
  dtype: Any = None  # compute dtype (None: float32); parameters stay float32
  residual_relu: bool = False  # a ReLU after each residual block's output BatchNorm (not the reference)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None) -> jax.Array:
    """``mask`` [B]: real samples (True) versus padding, kept out of BatchNorm statistics."""
    _check_input(x, type(self).__name__)
    h = nn.Dense(self.hidden, dtype=self.dtype, name="embed")(x)
    for i in range(self.num_blocks):
      h = ResidualBlock(self.hidden, self.dropout_rate, self.dtype, self.residual_relu,
                        name=f"block_{i}")(h, train, mask)
    h = nn.relu(nn.Dense(self.bottleneck, dtype=self.dtype, name="bottleneck")(h))
    h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    return nn.Dense(self.num_classes, dtype=_head_dtype(self.dtype), name="head")(h)


NORMS = ("batch", "layer", "none")


class PlainMLPClassifier(nn.Module):
  """An MLP classifier: [Dense-(Norm)-ReLU-(Dropout)] per hidden size, then Dense(->classes).

  ``norm``: "batch" (BatchNorm), "layer" (LayerNorm: per-sample statistics, so a client holding a
  single class normalises as a mixed one does and there are no running statistics to average) or "none".
  """

  hidden_sizes: Sequence[int]
  num_classes: int
  norm: str = "none"
  dropout_rate: float = 0.0
  dtype: Any = None  # compute dtype (None: float32); parameters stay float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None) -> jax.Array:
    """``mask`` [B]: real samples (True) versus padding, kept out of BatchNorm statistics."""
    _check_input(x, type(self).__name__)
    h = x
    for i, size in enumerate(self.hidden_sizes):
      h = nn.Dense(size, dtype=self.dtype, name=f"dense_{i}")(h)
      if self.norm == "batch":
        h = _batch_norm(train, f"bn_{i}", self.dtype)(h, mask=_row_mask(mask))
      elif self.norm == "layer":
        h = nn.LayerNorm(epsilon=BATCH_NORM_EPSILON, dtype=self.dtype, name=f"ln_{i}")(h)
      h = nn.relu(h)
      if self.dropout_rate > 0:
        h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    return nn.Dense(self.num_classes, dtype=_head_dtype(self.dtype), name="head")(h)


def _check_sizes(num_classes: int, **sizes: int) -> None:
  for name, value in {"num_classes": num_classes, **sizes}.items():
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_rate(dropout_rate: float) -> None:
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")


def make_proteomics_net(
    num_classes: int,
    *,
    key_strength: float = PROTEOMICS_KEY_STRENGTH,
    hidden: int = 64,
    bottleneck: int = 32,
    num_blocks: int = 2,
    dropout_rate: float = PROTEOMICS_DROPOUT,
    film: bool = True,
    variant: str = "modulation",
    dtype: Any = None,
    residual_relu: bool = False,
) -> KeyedModel:
  """The keyed reference proteomics network: every Dense keyed, FiLM after all but ``head``.

  As the reference (docs/design.md, "Data sets and presets"): no ReLU after a residual block's
  output BatchNorm (``residual_relu=True`` adds one) and a key encoder as wide as the key vector.
  ``dtype``: compute dtype, None/"float32" or "bfloat16" (mixed precision, see the module doc).
  """
  _check_sizes(num_classes, hidden=hidden, bottleneck=bottleneck)
  if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
    raise ValueError(f"num_blocks must be an integer >= 0, got {num_blocks!r}")
  _check_rate(dropout_rate)
  plain = PlainProteomicsNet(num_classes, hidden, bottleneck, num_blocks, dropout_rate, compute_dtype(dtype),
                             residual_relu)
  return keyed(plain, key_strength=key_strength, film=film, variant=variant, film_skip=("head",),
               encoder_hidden=KEY_DIM)


def make_mlp_classifier(
    hidden_sizes: Sequence[int],
    num_classes: int,
    *,
    key_strength: float = 1.0,
    norm: str = "none",
    dropout_rate: float = 0.0,
    film: bool = True,
    variant: str = "modulation",
    dtype: Any = None,
) -> KeyedModel:
  """A keyed MLP classifier with configurable hidden sizes; FiLM after all but ``head``.

  ``dtype``: compute dtype, None/"float32" or "bfloat16" (mixed precision, see the module doc).
  """
  hidden_sizes = tuple(hidden_sizes)
  _check_sizes(num_classes, **{f"hidden_sizes[{i}]": s for i, s in enumerate(hidden_sizes)})
  _check_rate(dropout_rate)
  if norm not in NORMS:
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
  plain = PlainMLPClassifier(hidden_sizes, num_classes, norm, dropout_rate, compute_dtype(dtype))
  return keyed(
      plain, key_strength=key_strength, film=film, variant=variant, film_skip=("head",)
  )
