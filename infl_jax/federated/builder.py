"""The one place a federated algorithm is built from run settings (``infl_jax.config.TrainConfig``)."""

from __future__ import annotations

from typing import Callable

import jax
import optax

from infl_jax.config import TrainConfig
from infl_jax.federated.engine import FederatedAlgorithm, cosine_round_schedule, fedavg, server_optimizer
from infl_jax.federated.task import Task

__all__ = ["algorithm_from_config", "client_optimizer_from_config"]


# Parameter leaves at least this large get their own optimizer update; smaller ones share one flattened vector.
LARGE_LEAF = 1 << 16


def client_optimizer_from_config(config: TrainConfig) -> optax.GradientTransformation:
  """PyTorch-style Adam weight decay (L2 added to the gradient), as the reference trains.

  The update is elementwise, so how leaves are grouped changes no value, only the compiled round: the
  hundred small leaves of a keyed network (its INR modules) go through the optimizer as one flattened vector
  (a smaller program, a shorter compile), while each large weight matrix keeps its own update (flattening
  it would copy it into and out of the vector every step: a third of a round's time on a 10,000-feature
  file; benchmarks/infl_time_to_result.py).
  """
  adam = lambda: optax.chain(optax.add_decayed_weights(config.weight_decay),
                             optax.adam(config.learning_rate, eps=config.adam_eps))
  size_class = lambda params: jax.tree_util.tree_map(lambda p: "large" if p.size >= LARGE_LEAF else "small", params)
  return optax.multi_transform({"small": optax.flatten(adam()), "large": adam()}, size_class)


def algorithm_from_config(config: TrainConfig, task: Task, *, batch_size: int | None = None,
                          weighting: str | None = None, client_chunk_size: int | None = None,
                          update_transform: Callable | None = None,
                          aggregate_noise: Callable | None = None) -> FederatedAlgorithm:
  """``fedavg`` of ``task`` with the client optimizer, local work, sampling, weighting and server
  optimizer that ``config`` names. ``batch_size`` and ``weighting`` override the config where a task
  or a mechanism fixes them (full-graph clustering steps; DP-FedAvg's equal weights); the hooks are
  the engine's (a privacy mechanism's, e.g. ``privacy.dp.dp_fedavg``)."""
  return fedavg(
      task,
      client_optimizer_from_config(config),
      local_epochs=config.local_epochs,
      batch_size=config.batch_size if batch_size is None else batch_size,
      client_fraction=config.client_fraction,
      weighting=config.weighting if weighting is None else weighting,
      prox_mu=config.prox_mu,
      server_opt=server_optimizer(config.server_optimizer, config.server_learning_rate),
      client_chunk_size=client_chunk_size,
      update_transform=update_transform,
      aggregate_noise=aggregate_noise,
      client_lr_schedule=cosine_round_schedule(config.rounds) if config.lr_schedule == "cosine" else None,
      control_variates=config.drift_correction == "scaffold",
  )
