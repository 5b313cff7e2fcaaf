"""DP-FedAvg (McMahan et al. 2018) as a training mode of the federated engine.

Each sampled client's parameter update is clipped to L2 norm ``clip_norm`` (the engine's
``update_transform`` hook); the server adds Gaussian noise of standard deviation
``noise_multiplier * clip_norm / m`` to the uniform mean of the ``m`` accepted updates (the
``aggregate_noise`` hook), i.e. noise ``z * C`` on the sum, client-level DP. The noise level and the
clip norm travel in the round's ``context`` (``DPContext``), so one compiled round serves every
target epsilon.

Accounting: ``rounds`` self-compositions of a Gaussian mechanism with noise multiplier ``z``,
Poisson-subsampled at rate ``q = sampled clients / clients`` (the usual approximation of the
engine's fixed-size sampling; exact when ``q = 1``), with ``dp_accounting``'s RDP accountant.

Not privatised: model state such as BatchNorm running statistics is averaged as in plain FedAvg
(it is a statistic of the clients' data); see docs/privacy.md.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from infl_jax.config import TrainConfig
from infl_jax.federated import FederatedAlgorithm, Task, algorithm_from_config
from runkit.errors import UserInputError

__all__ = [
    "DPContext",
    "clip_by_global_norm",
    "dp_epsilon",
    "dp_event",
    "dp_fedavg",
    "dp_fedavg_hooks",
    "dp_task",
    "gaussian_aggregate_noise",
    "noise_multiplier_for_epsilon",
]

PyTree = Any


class DPContext(NamedTuple):
  """The round context of a DP run: the task's own context (key coordinates or None) and the
  mechanism's settings as arrays, so changing them does not recompile the round."""

  task_context: Any
  clip_norm: jax.Array
  noise_multiplier: jax.Array

  @classmethod
  def make(cls, task_context, clip_norm: float, noise_multiplier: float) -> "DPContext":
    _check_positive("clip_norm", clip_norm)
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
      raise UserInputError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}")
    return cls(task_context, jnp.float32(clip_norm), jnp.float32(noise_multiplier))


def _check_positive(name: str, value) -> None:
  if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
    raise UserInputError(f"{name} must be a finite number > 0, got {value!r}")


def global_norm(tree: PyTree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(tree)))


def clip_by_global_norm(tree: PyTree, clip_norm: jax.Array) -> PyTree:
  """Scales ``tree`` by ``min(1, clip_norm / ||tree||)`` (one norm over all leaves)."""
  norm = global_norm(tree)
  scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-12))
  return jax.tree_util.tree_map(lambda x: (x * scale).astype(x.dtype), tree)


def gaussian_aggregate_noise(mean_delta: PyTree, rng: jax.Array, num_accepted: jax.Array,
                             clip_norm: jax.Array, noise_multiplier: jax.Array) -> PyTree:
  """Adds N(0, (z C / m)^2) to every coordinate of the mean of ``m`` clipped updates."""
  std = noise_multiplier * clip_norm / jnp.maximum(num_accepted, 1).astype(jnp.float32)
  leaves, treedef = jax.tree_util.tree_flatten(mean_delta)
  rngs = jax.random.split(rng, len(leaves))
  noisy = [x + (std * jax.random.normal(r, x.shape, jnp.float32)).astype(x.dtype) for x, r in zip(leaves, rngs)]
  return jax.tree_util.tree_unflatten(treedef, noisy)


def dp_fedavg_hooks():
  """``(update_transform, aggregate_noise)`` for ``fedavg(...)``; the round context is a ``DPContext``."""

  def update_transform(delta, rng, context: DPContext):
    del rng
    return clip_by_global_norm(delta, context.clip_norm)

  def aggregate_noise(mean_delta, rng, num_accepted, context: DPContext):
    return gaussian_aggregate_noise(mean_delta, rng, num_accepted, context.clip_norm, context.noise_multiplier)

  return update_transform, aggregate_noise


def dp_task(task: Task) -> Task:
  """The task with its context unwrapped from a ``DPContext``, so a DP round runs any task."""

  def loss(params, model_state, batch, mask, rng, context):
    return task.loss(params, model_state, batch, mask, rng, context.task_context)

  return Task(loss=loss)


def dp_fedavg(config: TrainConfig, task: Task) -> FederatedAlgorithm:
  """DP-FedAvg of ``task`` with ``config``'s local training: clipped client updates, Gaussian noise on
  their mean, equal client weights (the noise's sensitivity analysis needs them). Its round takes a
  ``DPContext`` (``DPContext.make(key_coords, clip_norm, noise_multiplier)``) as context."""
  update_transform, aggregate_noise = dp_fedavg_hooks()
  return algorithm_from_config(config, dp_task(task), weighting="uniform", update_transform=update_transform,
                               aggregate_noise=aggregate_noise)


def _check_accounting(sampling_rate, rounds, delta):
  if not (isinstance(sampling_rate, (int, float)) and 0 < sampling_rate <= 1):
    raise UserInputError(f"sampling_rate must be in (0, 1] (sampled clients / clients), got {sampling_rate!r}")
  if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
    raise UserInputError(f"rounds must be an integer >= 1, got {rounds!r}")
  if not (isinstance(delta, (int, float)) and 0 < delta < 1):
    raise UserInputError(f"delta must be in (0, 1), e.g. 1e-5, got {delta!r}")


def dp_event(noise_multiplier: float, sampling_rate: float, rounds: int):
  import dp_accounting

  gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
  step = gaussian if sampling_rate == 1 else dp_accounting.PoissonSampledDpEvent(sampling_rate, gaussian)
  return dp_accounting.SelfComposedDpEvent(step, rounds)


def dp_epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float = 1e-5) -> float:
  """The (epsilon, delta) guarantee's epsilon of ``rounds`` DP-FedAvg rounds (RDP accountant)."""
  from dp_accounting.rdp import RdpAccountant

  _check_accounting(sampling_rate, rounds, delta)
  if not (isinstance(noise_multiplier, (int, float)) and noise_multiplier > 0):
    raise UserInputError(f"noise_multiplier must be > 0 for a finite epsilon, got {noise_multiplier!r}")
  accountant = RdpAccountant()
  accountant.compose(dp_event(float(noise_multiplier), float(sampling_rate), rounds))
  return float(accountant.get_epsilon(delta))


def noise_multiplier_for_epsilon(target_epsilon: float, sampling_rate: float, rounds: int,
                                 delta: float = 1e-5) -> float:
  """The smallest noise multiplier whose ``dp_epsilon`` is at most ``target_epsilon``."""
  import dp_accounting
  from dp_accounting.rdp import RdpAccountant

  _check_accounting(sampling_rate, rounds, delta)
  _check_positive("target_epsilon", target_epsilon)
  return float(dp_accounting.calibrate_dp_mechanism(
      RdpAccountant, lambda z: dp_event(z, float(sampling_rate), rounds), float(target_epsilon), float(delta),
      bracket_interval=dp_accounting.LowerEndpointAndGuess(1e-3, 1.0), tol=1e-4))
