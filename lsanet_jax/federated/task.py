"""LSANet as a task of the federated engine: the loss central training minimises, and FedBN's split.

A hospital's minibatch is what central training's is: uint8 images normalised by ``steps.preprocess`` (with the
same augmentation), every head's loss, LSA's dynamic weights and knowledge synergy (``losses.lsanet_loss``),
BatchNorm in training mode. The engine fills a hospital's last batch by wrapping around its images
(``wrap_last_batch``), as central training does, so a batch the model sees never holds padding and BatchNorm's
statistics need no mask.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import traverse_util

from infl_jax.federated.site_local import SiteLocal
from infl_jax.federated.task import Task
from runkit.errors import UserInputError

from lsanet_jax.losses import lsanet_loss
from lsanet_jax.models import LSANet
from lsanet_jax.steps import preprocess

__all__ = ["batch_norm_site_local", "lsanet_task"]


def lsanet_task(model: LSANet, task: str, *, dynamic_weights: bool, synergy: bool, augment: bool) -> Task:
  """The engine's ``Task`` of ``model``: ``batch`` is ``{"images": uint8 [B, H, W, C], "labels": [B, L]}``; the
  round's context is the key's coordinates when ``model`` is keyed. Needs ``fedavg(..., wrap_last_batch=True)``:
  the loss takes a batch as wholly real or wholly inactive, and BatchNorm takes no mask."""

  def loss(params, model_state, batch, mask, rng, context):
    # context: the key's coordinates for a keyed model (lsanet_jax.federated.keys), None otherwise.
    key = {} if context is None else {"key_coords": context}
    x = preprocess(batch["images"], rng, augment)
    outputs, new_state = model.apply({"params": params, **model_state}, x, train=True, mutable=["batch_stats"],
                                     **key)
    value, _ = lsanet_loss(outputs, batch["labels"], task, dynamic_weights=dynamic_weights, synergy=synergy)
    # A batch is wholly real or wholly inactive (wrap_last_batch); an inactive one's step is discarded by the
    # engine, and its loss counts as 0.
    return value * jnp.max(mask), dict(new_state)

  return Task(loss=loss)


def batch_norm_site_local(variables: dict) -> SiteLocal:
  """FedBN: every BatchNorm layer's scale and bias (the modules that hold ``batch_stats``) and all statistics
  stay at the hospital; every other parameter is averaged."""
  bn_modules = {path[:-1] for path in traverse_util.flatten_dict(variables.get("batch_stats", {}))}
  if not bn_modules:
    raise UserInputError("FedBN keeps BatchNorm layers at the hospitals, and this model has none: use --batch-norm "
                         "fedavg")
  is_local = lambda path: path[:-1] in bn_modules

  def split(params: Any):
    flat = traverse_util.flatten_dict(params)
    shared = {p: v for p, v in flat.items() if not is_local(p)}
    local = {p: v for p, v in flat.items() if is_local(p)}
    return traverse_util.unflatten_dict(shared), traverse_util.unflatten_dict(local)

  def merge(shared: Any, local: Any):
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(shared), **traverse_util.flatten_dict(local)})

  return SiteLocal(split=split, merge=merge, model_state=True)
