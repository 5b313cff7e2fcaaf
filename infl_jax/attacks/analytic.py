"""The analytic first-layer attack (not in the reference evaluation).

For one sample through a dense first layer ``y = x W + b`` (flax kernel ``W [in, out]``), the loss
gradient is ``dL/dW = x ⊗ dL/dy`` and ``dL/db = dL/dy``: any output unit ``j`` with
``dL/db_j != 0`` gives the input exactly, ``x = (dL/dW)[:, j] / (dL/db)_j``.

For a keyed layer ``y = x (W diag(c)) + b + λ tanh t`` with ``c = 1 + λ tanh s`` (docs/design.md,
"Keyed layers"), ``dL/dW[:, j] = c_j x (dL/dy)_j`` while ``dL/db_j = (dL/dy)_j``: the same ratio gives
``c_j x``, the input up to a per-unit scale (FiLM after the layer changes ``dL/dy`` but not this
structure). Scale-free measures such as |Pearson| see the input unchanged, without the key.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from runkit.errors import UserInputError

__all__ = ["analytic_ratios", "recover_first_layer_input", "find_first_layer"]


def _check(kernel_grad, bias_grad):
  kernel_grad = jnp.asarray(kernel_grad)
  bias_grad = jnp.asarray(bias_grad)
  if kernel_grad.ndim < 2 or bias_grad.shape != kernel_grad.shape[:-2] + kernel_grad.shape[-1:]:
    raise UserInputError(
        f"analytic attack: expected a kernel gradient [..., in, out] and a bias gradient [..., out], got "
        f"{kernel_grad.shape} and {bias_grad.shape}; pass the first dense layer's 'kernel' and 'bias' gradients")
  return kernel_grad, bias_grad


def analytic_ratios(kernel_grad, bias_grad, eps: float = 1e-12):
  """``(dL/dW)[:, j] / (dL/db)_j`` for every unit ``j``: ``[..., in, out]`` (0 where ``dL/db_j = 0``)."""
  kernel_grad, bias_grad = _check(kernel_grad, bias_grad)
  safe = jnp.where(jnp.abs(bias_grad) > eps, bias_grad, 1.0)
  return jnp.where(jnp.abs(bias_grad)[..., None, :] > eps, kernel_grad / safe[..., None, :], 0.0)


def recover_first_layer_input(kernel_grad, bias_grad):
  """The input read off one sample's first-layer gradient: the ratio at the unit with the largest
  ``|dL/db_j|`` (the best-conditioned). Batched over leading axes. Exact for a plain layer; the
  input times ``c_j`` for a keyed one."""
  kernel_grad, bias_grad = _check(kernel_grad, bias_grad)
  ratios = analytic_ratios(kernel_grad, bias_grad)
  j = jnp.argmax(jnp.abs(bias_grad), axis=-1)
  return jnp.take_along_axis(ratios, j[..., None, None], axis=-1)[..., 0]


def find_first_layer(grads: dict, path: str) -> tuple:
  """``(kernel_grad, bias_grad)`` of the dense layer at ``path`` ("embed", "block_0/dense_0") of a
  gradient tree of parameters."""
  node = grads
  for part in path.split("/"):
    if not isinstance(node, dict) or part not in node:
      have = sorted(node) if isinstance(node, dict) else type(node).__name__
      raise UserInputError(f"analytic attack: no layer {path!r} in the gradients (at {part!r}, found {have}); "
                           "pass the path of the model's first dense layer")
    node = node[part]
  if "kernel" not in node or "bias" not in node:
    raise UserInputError(f"analytic attack: {path!r} has no kernel and bias; it must be a dense layer with a bias")
  return node["kernel"], node["bias"]
