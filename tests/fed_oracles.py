"""Reference implementations the engine is checked against (a Python loop over clients)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from infl_jax.federated import ServerState, client_update
from infl_jax.federated.local import LocalConfig


def looped_fedavg_round(task, client_optimizer, local: LocalConfig, state: ServerState, clients, context,
                        sampled, weighting="samples", server_opt=optax.sgd(1.0)):
  """One FedAvg round client by client, with the same per-client PRNG derivation as the engine."""
  round_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.round)
  _, train_rng = jax.random.split(round_rng)
  update = jax.jit(lambda p, s, d, n, r, c: client_update(task, client_optimizer, local, p, s, d, n, r, c))
  deltas, states, weights = [], [], []
  for k in np.asarray(sampled):
    data = jax.tree_util.tree_map(lambda x: x[k], clients.data)
    p, s, _ = update(state.params, state.model_state, data, clients.num_samples[k],
                     jax.random.fold_in(train_rng, int(k)), context)
    deltas.append(jax.tree_util.tree_map(lambda a, b: np.asarray(a) - np.asarray(b), p, state.params))
    states.append(jax.tree_util.tree_map(np.asarray, s))
    accepted = int(clients.key_version[k]) == int(state.key_version)
    w = float(clients.num_samples[k]) if weighting == "samples" else 1.0
    weights.append(w if accepted else 0.0)
  weights = np.asarray(weights)
  mean = lambda trees: jax.tree_util.tree_map(lambda *xs: sum(w * x for w, x in zip(weights, xs)) / weights.sum(), *trees)
  mean_delta = mean(deltas)
  updates, _ = server_opt.update(jax.tree_util.tree_map(jnp.negative, mean_delta), server_opt.init(state.params),
                                 state.params)
  return optax.apply_updates(state.params, updates), mean(states)
