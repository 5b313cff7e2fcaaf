"""One client's local training: epochs of shuffled minibatches as a single lax.scan.

Every client in a vmapped round runs the same number of steps (set by the largest
client); a step whose minibatch holds no real sample leaves parameters, model state
and optimizer state untouched, so a padded client trains exactly as it would alone.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from infl_jax.federated.task import Task

PyTree = Any


@dataclasses.dataclass(frozen=True)
class LocalConfig:
  """Static settings of local training (they shape the compiled round)."""

  local_epochs: int = 1
  batch_size: int = 64
  prox_mu: float = 0.0  # FedProx: adds mu/2 ||w - w_global||^2 to each client's loss
  # Fill a client's last, partial batch by wrapping around its epoch order (real rows only) instead of padding
  # rows masked out of the loss: every batch a client trains on then holds real samples only, so batch
  # statistics (BatchNorm without a mask, e.g. a CNN's) never see padding. Central training of the same model
  # fills its last batch the same way.
  wrap_last_batch: bool = False

  def __post_init__(self):
    if self.local_epochs < 1:
      raise ValueError(f"local_epochs must be >= 1, got {self.local_epochs}")
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
    if self.prox_mu < 0:
      raise ValueError(f"prox_mu must be >= 0, got {self.prox_mu}")


def epoch_order(rng: jax.Array, num_samples: jax.Array, max_samples: int) -> jax.Array:
  """A random order of the client's real samples, padding rows last.

  Each row's sort key depends only on (rng, row index), not on ``max_samples``,
  so the order of real rows is the same however much padding the client carries.
  """
  rows = jnp.arange(max_samples)
  scores = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(rng, i)))(rows)
  scores = jnp.where(rows < num_samples, scores, jnp.inf)
  return jnp.argsort(scores, stable=True)


def _prox_term(params, anchor, mu: float):
  sq = sum(jnp.sum(jnp.square(p - a)) for p, a in zip(jax.tree_util.tree_leaves(params),
                                                        jax.tree_util.tree_leaves(anchor)))
  return 0.5 * mu * sq


def client_update(task: Task, optimizer: optax.GradientTransformation, config: LocalConfig,
                  params: PyTree, model_state: PyTree, data: PyTree, num_samples: jax.Array,
                  rng: jax.Array, context: Any, lr_factor: jax.Array | float = 1.0):
  """Trains from the global ``params`` on one client's ``data``; returns (params, model_state, mean loss).

  ``lr_factor`` scales every optimizer step (a round's learning-rate schedule).
  """
  params, model_state, mean_loss, _ = _local_training(task, optimizer, config, params, model_state, data,
                                                      num_samples, rng, context, lr_factor, correction=None)
  return params, model_state, mean_loss


def corrected_client_update(task: Task, optimizer: optax.GradientTransformation, config: LocalConfig,
                            params: PyTree, model_state: PyTree, data: PyTree, num_samples: jax.Array,
                            rng: jax.Array, context: Any, correction: PyTree, lr_factor: jax.Array | float = 1.0):
  """SCAFFOLD's local training (docs/design.md, "Drift correction"): ``client_update`` with ``correction``
  (the server's control variate minus the client's, ``c - c_i``) added to every minibatch gradient before the
  optimizer. Returns (params, model_state, mean loss, mean gradient): the last is the mean of the uncorrected
  minibatch gradients over the steps the client took, its new control variate ``c_i+``. With plain SGD this
  equals option II of Karimireddy et al. (2020), ``c_i - c + (x - y_i) / (K lr)``, exactly; it stays defined for
  other client optimizers (Adam), where option II's step-size division does not.
  """
  return _local_training(task, optimizer, config, params, model_state, data, num_samples, rng, context, lr_factor,
                         correction=correction)


class LocalPlan(NamedTuple):
  """A client's local steps, fixed before it trains: each step's rows of its (padded) data, the rows' mask and
  the step's PRNG key; a step whose mask is all zero is inactive."""

  rows: jax.Array  # int [steps, B]
  masks: jax.Array  # float32 [steps, B]
  rngs: jax.Array  # PRNG keys [steps]


def local_plan(config: LocalConfig, rng: jax.Array, num_samples: jax.Array, max_samples: int) -> LocalPlan:
  """Every epoch's shuffled batches of a client holding ``num_samples`` real rows of ``max_samples``."""
  batch_size = min(config.batch_size, max_samples)
  steps_per_epoch = math.ceil(max_samples / batch_size)
  slots = steps_per_epoch * batch_size

  epoch_rngs = jax.random.split(jax.random.fold_in(rng, 0), config.local_epochs)
  orders = jax.vmap(lambda r: epoch_order(r, num_samples, max_samples))(epoch_rngs)
  orders = jnp.pad(orders, ((0, 0), (0, slots - max_samples)))
  positions = jnp.arange(slots).reshape(steps_per_epoch, batch_size)
  if config.wrap_last_batch:
    # Slot i takes the real row at place i mod n of the epoch's order; batches past the client's own
    # ceil(n / B) are inactive.
    orders = orders[:, jnp.arange(slots) % jnp.maximum(num_samples, 1)]
    used_slots = -(-num_samples // batch_size) * batch_size
    batch_masks = jnp.tile((positions < used_slots).astype(jnp.float32), (config.local_epochs, 1))
  else:
    batch_masks = jnp.tile((positions < num_samples).astype(jnp.float32), (config.local_epochs, 1))
  batch_rows = orders.reshape(config.local_epochs * steps_per_epoch, batch_size)
  # Keyed by (epoch, step within epoch), so the steps a client really takes get the
  # same keys whatever the padding adds at each epoch's end.
  step_base = jax.random.fold_in(rng, 1)
  step_rngs = jax.vmap(lambda e: jax.vmap(lambda s: jax.random.fold_in(jax.random.fold_in(step_base, e), s))(
      jnp.arange(steps_per_epoch)))(jnp.arange(config.local_epochs))
  step_rngs = step_rngs.reshape((config.local_epochs * steps_per_epoch,) + step_rngs.shape[2:])
  return LocalPlan(rows=batch_rows, masks=batch_masks, rngs=step_rngs)


def local_step(task: Task, optimizer: optax.GradientTransformation, config: LocalConfig, data: PyTree,
               anchor: PyTree, context: Any, lr_factor, correction, carry, xs):
  """One step of local training: ``carry = (params, model_state, opt_state, gradient sum)``, ``xs = (rows, mask,
  rng)`` of the plan; an inactive step (mask all zero) leaves the carry as it was. Returns (carry, (loss,
  active))."""
  p, state, opt_state, grad_sum = carry
  rows, mask, step_rng = xs

  def objective(p, state, batch, mask, step_rng):
    loss, new_state = task.loss(p, state, batch, mask, step_rng, context)
    if config.prox_mu > 0:
      loss = loss + _prox_term(p, anchor, config.prox_mu)
    return loss, new_state

  batch = jax.tree_util.tree_map(lambda x: x[rows], data)
  (loss, new_state), grads = jax.value_and_grad(objective, has_aux=True)(p, state, batch, mask, step_rng)
  active = jnp.any(mask > 0)
  if correction is not None:
    grad_sum = jax.tree_util.tree_map(lambda s, g: s + jnp.where(active, g, 0.0), grad_sum, grads)
    grads = jax.tree_util.tree_map(jnp.add, grads, correction)
  updates, new_opt_state = optimizer.update(grads, opt_state, p)
  updates = jax.tree_util.tree_map(lambda u: u * lr_factor, updates)
  new_p = optax.apply_updates(p, updates)
  keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(active, a, b), new, old)
  carry = (keep(new_p, p), keep(new_state, state), keep(new_opt_state, opt_state), grad_sum)
  return carry, (jnp.where(active, loss, 0.0), active)


def _local_training(task, optimizer, config, params, model_state, data, num_samples, rng, context, lr_factor,
                    correction):
  max_samples = jax.tree_util.tree_leaves(data)[0].shape[0]
  plan = local_plan(config, rng, num_samples, max_samples)
  step = functools.partial(local_step, task, optimizer, config, data, params, context, lr_factor, correction)
  # Without a correction the gradient sum is an empty tuple: nothing is carried or computed for it.
  grad_sum = () if correction is None else jax.tree_util.tree_map(jnp.zeros_like, params)
  init = (params, model_state, optimizer.init(params), grad_sum)
  (params, model_state, _, grad_sum), (losses, active) = jax.lax.scan(step, init, tuple(plan))
  num_steps = jnp.maximum(jnp.sum(active), 1)
  mean_loss = jnp.sum(losses) / num_steps
  mean_grad = jax.tree_util.tree_map(lambda s: s / num_steps.astype(s.dtype), grad_sum)
  return params, model_state, mean_loss, mean_grad
