"""``round`` with each client's local steps driven from Python: ``host_round(algorithm)``.

The same round (sampling, PRNG streams, local plan and steps, weights, key versions, site-local variables, the
server update) for backends where a compiled loop of steps runs slowly: on XLA:CPU a convolution's gradient inside
``lax.scan`` runs several times slower than in a lone jitted step (docs/design.md, "Federated LSANet"). One local step
is jitted once (every client's data keep their padded shape) and called for each sampled client's active steps;
the sums go through the algorithm's ``server_update``, as a deployment's do. It is not for accelerators, where
``round`` is one compiled program. SCAFFOLD and the privacy hooks are refused here: they run in ``round``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from infl_jax.federated.client_data import ClientData
from infl_jax.federated.engine import FederatedAlgorithm, ServerState, UpdateSums, round_keys, sample_clients
from infl_jax.federated.local import local_plan, local_step
from infl_jax.federated.site_local import scatter_sites, shared_delta, site_variables

__all__ = ["host_round"]

PyTree = Any


def _programs(spec, server_update: Callable) -> dict:
  """The round's jitted pieces (each compiled at its first call, once per run)."""
  site_local = spec.site_local

  def start(state, client_id):
    if site_local is None:
      return state.params, state.model_state
    return site_variables(site_local, state.sites, client_id, state.params, state.model_state)

  def contribution(sums, state, trained, model_state, loss, weight):
    delta = (jax.tree_util.tree_map(jnp.subtract, trained, state.params) if site_local is None
             else shared_delta(site_local, trained, state.params))
    add = lambda total, tree: jax.tree_util.tree_map(lambda s, x: s + weight * x, total, tree)
    return (add(sums[0], delta), add(sums[1], model_state), sums[2] + weight * loss, sums[3] + weight)

  return {
      "start": jax.jit(start),
      "plan": jax.jit(functools.partial(local_plan, spec.local), static_argnums=2),
      "init_opt": jax.jit(spec.client_optimizer.init),
      "step": jax.jit(functools.partial(local_step, spec.task, spec.client_optimizer, spec.local)),
      "contribution": jax.jit(contribution),
      "server_update": jax.jit(server_update, static_argnums=2),
      "scatter": None if site_local is None else jax.jit(functools.partial(scatter_sites, site_local)),
  }


def _train_client(programs: dict, state: ServerState, clients: ClientData, k: int, keys, context, lr_factor):
  """Client k's local training, step by step: (trained params, model state, mean loss over its active steps)."""
  params, model_state = programs["start"](state, k)
  data = jax.tree_util.tree_map(lambda x: x[k], clients.data)
  plan = programs["plan"](jax.random.fold_in(keys.train, k), clients.num_samples[k], clients.max_samples)
  carry = (params, model_state, programs["init_opt"](params), ())
  total = jnp.float32(0.0)
  active = np.flatnonzero(np.asarray(plan.masks).any(axis=1))
  for s in active:  # inactive steps change nothing in `round`; here they are skipped
    carry, (loss, _) = programs["step"](data, params, context, lr_factor, None, carry,
                                        (plan.rows[s], plan.masks[s], plan.rngs[s]))
    total = total + loss
  return carry[0], carry[1], total / max(len(active), 1)


def host_round(algorithm: FederatedAlgorithm) -> Callable:
  """``algorithm.round`` as a Python function of (state, clients, context) -> (state, metrics)."""
  spec = algorithm.spec
  if spec.control_variates or spec.update_transform is not None or spec.aggregate_noise is not None:
    raise ValueError("the host-driven round runs FedAvg and its relatives, with site-local variables; SCAFFOLD and "
                     "the privacy hooks run in the compiled round")
  return functools.partial(_run_host_round, spec, _programs(spec, algorithm.server_update))


def _run_host_round(spec, programs: dict, state: ServerState, clients: ClientData, context: Any = None):
  keys = round_keys(state)
  sampled = np.asarray(sample_clients(keys, clients.num_clients, spec.client_fraction))
  lr_factor = jnp.float32(1.0 if spec.client_lr_schedule is None else spec.client_lr_schedule(state.round))
  versions, sizes = np.asarray(clients.key_version), np.asarray(clients.num_samples)
  zeros = lambda tree: jax.tree_util.tree_map(jnp.zeros_like, tree)
  sums = (zeros(state.params), zeros(state.model_state), jnp.float32(0.0), jnp.float32(0.0))
  trained_sites, accepted = [], []
  for k in (int(k) for k in sampled):
    if versions[k] != int(state.key_version):
      continue  # weight 0 in `round`: it adds nothing
    params, model_state, loss = _train_client(programs, state, clients, k, keys, context, lr_factor)
    weight = jnp.float32(sizes[k] if spec.weighting == "samples" else 1.0)
    sums = programs["contribution"](sums, state, params, model_state, loss, weight)
    accepted.append(k)
    trained_sites.append((params, model_state))
  update_sums = UpdateSums(delta=sums[0], model_state=sums[1], loss=sums[2], weight=sums[3],
                           num_accepted=jnp.int32(len(accepted)))
  new_state, metrics = programs["server_update"](state, update_sums, len(sampled), context)
  if programs["scatter"] is not None and accepted:
    stack = lambda trees: jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)
    sites = programs["scatter"](state.sites, jnp.asarray(accepted, jnp.int32), jnp.ones(len(accepted), bool),
                                stack([p for p, _ in trained_sites]), stack([s for _, s in trained_sites]))
    new_state = new_state._replace(sites=sites)
  return new_state, metrics
