"""What the engine needs from a model and its objective, and nothing more."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax

PyTree = Any


class Task(NamedTuple):
  """Pure functions over pytrees that make a model trainable by the engine.

  loss(params, model_state, batch, mask, rng, context) -> (scalar loss, new model_state)
    ``batch`` is the client data pytree sliced to one minibatch (leading axis B);
    ``mask`` is float [B], 1 for real samples and 0 for padding: the loss must be a
    mask-weighted mean and padding must not touch ``model_state`` (e.g. BatchNorm
    statistics). ``context`` is what every client holds but never sends, e.g. the
    secret key coordinates; it is None for models without one.
  """

  loss: Callable[[PyTree, PyTree, PyTree, jax.Array, jax.Array, Any], tuple[jax.Array, PyTree]]
