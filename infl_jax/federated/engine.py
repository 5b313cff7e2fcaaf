"""A federated round as one pure, jit-compilable function: sample, train locally under vmap, aggregate.

Order inside a round (all on device):
  1. derive this round's PRNG key from the run's key and the round number;
  2. sample ``max(1, round(fraction * C))`` clients without replacement;
  3. each sampled client trains from the global parameters (``client_update``), in
     chunks of ``client_chunk_size`` clients scanned one after another, each chunk vmapped;
  4. updates tagged with a key version other than the server's get weight 0;
  5. the weighted mean of the updates (weights n_k, or 1) is the pseudo-gradient of
     the server optimizer (FedAvg: SGD with lr 1); model state such as BatchNorm
     statistics is averaged with the same weights.

The same round runs with the client axis split across devices when it is given
``shard_clients(clients, mesh)`` instead of ``clients`` (``sharding.py``): sampling, keys,
weights and the server update are shared; only the client loop runs per device, its sums
``psum``-ed.

SCAFFOLD (``scaffold(...)``, or ``fedavg(..., control_variates=True)``; docs/design.md, "Drift
correction") adds control variates: a server variate ``c`` and one per client ``c_i``, stacked over all
clients and indexed by client id. A sampled client trains with ``c - c_i`` added to its gradients, its
``c_i`` is replaced by the mean gradient of its local steps (gathered and scattered inside the round), and
``c`` moves by the sum of the accepted clients' changes over the number of clients. A deployment's state holds ``c``
only (``init(..., client_controls=False)``): its sites keep their own ``c_i`` and send the change, whose sum
``server_update`` applies as the round does.

Two optional hooks make privacy mechanisms such as DP-FedAvg a training mode without a
second engine: ``update_transform(delta, rng, context) -> delta`` runs on each client's
parameter update before aggregation (e.g. clipping), and
``aggregate_noise(mean_delta, rng, num_accepted, context) -> mean_delta`` on the mean update
(e.g. Gaussian noise). Their keys come from ``fold_in(round key, ...)`` streams that the
sampling and local training do not use, so a run without hooks is unchanged.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from infl_jax.federated.aggregate import weighted_sum
from infl_jax.federated.client_data import ClientData
from infl_jax.federated.controls import check_controls, initial_controls, scatter_controls
from infl_jax.federated.local import LocalConfig, client_update, corrected_client_update
from infl_jax.federated.sharding import ShardedClientData, sharded_update_sums
from infl_jax.federated.site_local import (SiteLocal, check_sites, init_sites, scatter_sites, shared_delta,
                                          site_variables)
from infl_jax.federated.task import Task

PyTree = Any

WEIGHTINGS = ("samples", "uniform")
# fold_in constants of the hooks' PRNG streams (distinct from the split used for sampling/training).
_TRANSFORM_STREAM = 0x7A11
_NOISE_STREAM = 0x0153


class ServerState(NamedTuple):
  """Everything the server keeps; no key material by construction (the key is a round input)."""

  params: PyTree
  model_state: PyTree  # non-trainable collections, e.g. {"batch_stats": ...}; {} if none
  opt_state: PyTree
  round: jax.Array  # int32, rounds completed
  rng: jax.Array  # uint32 raw key data (checkpointable); round r uses fold_in(rng, r)
  key_version: jax.Array  # int32, the only version whose updates are accepted
  # SCAFFOLD's control variates, None for the other algorithms: {"server": c, shaped like the parameters,
  # "clients": every client's c_i, each parameter leaf with a leading [num_clients] axis} (a dict, as
  # checkpoints store it). The clients' rows are the simulated clients' own state, carried here so that one
  # jitted round can gather and scatter them; a deployment's state has no "clients": each site keeps its row.
  controls: Any = None
  # Site-local variables (``site_local.py``, e.g. FedBN), None otherwise: {"params": each client's local part,
  # "model_state": each client's model state}, leaves with a leading [num_clients] axis.
  sites: Any = None


def global_variables(state: ServerState) -> dict:
  """The global model's flax variables: ``{"params": ..., **model_state}``."""
  return {"params": state.params, **state.model_state}


class RoundKeys(NamedTuple):
  """A round's PRNG streams, all from ``fold_in(run key, round)``."""

  sample: jax.Array
  train: jax.Array  # client k trains with fold_in(train, k)
  transform: jax.Array  # update_transform hook, client k: fold_in(transform, k)
  noise: jax.Array  # aggregate_noise hook


def round_keys(state: ServerState) -> RoundKeys:
  """The PRNG streams of the round ``state`` is about to run (loops that mirror the round use them too)."""
  round_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.round)
  sample_rng, train_rng = jax.random.split(round_rng)
  return RoundKeys(sample=sample_rng, train=train_rng, transform=jax.random.fold_in(round_rng, _TRANSFORM_STREAM),
                   noise=jax.random.fold_in(round_rng, _NOISE_STREAM))


def sample_clients(keys: RoundKeys, num_clients: int, client_fraction: float) -> jax.Array:
  """The round's clients: ``max(1, round(fraction * C))`` drawn without replacement, in increasing order."""
  num_sampled = max(1, round(client_fraction * num_clients))
  if num_sampled < num_clients:
    return jnp.sort(jax.random.choice(keys.sample, num_clients, (num_sampled,), replace=False))
  return jnp.arange(num_clients)


class _UpdateSums(NamedTuple):
  """Weighted sums over a set of clients; sums over disjoint sets add up (the sharded round psums them)."""

  delta: PyTree  # sum_k w_k (params_k - params)
  model_state: PyTree  # sum_k w_k model_state_k
  loss: jax.Array  # sum_k w_k loss_k
  weight: jax.Array  # sum_k w_k (w_k = 0 for rejected or padding slots)
  num_accepted: jax.Array  # int32
  control_delta: PyTree = None  # SCAFFOLD: sum over accepted clients of (c_i+ - c_i); None otherwise


UpdateSums = _UpdateSums  # public name: what a deployment (infl_jax/flower) gathers from its sites


class FederatedAlgorithm(NamedTuple):
  init: Callable[..., ServerState]
  round: Callable[[ServerState, ClientData, Any], tuple[ServerState, dict]]
  # (state, sums, num_sampled, context, num_clients=None) -> (state, metrics): the round's last step on sums
  # gathered elsewhere (a deployment's sites); the aggregation and server optimizer of ``round``, so both give the
  # same server state. SCAFFOLD needs ``sums.control_delta`` and the federation's ``num_clients``.
  server_update: Callable[..., tuple[ServerState, dict]] | None = None
  spec: Any = None  # the static settings ``round`` closes over (``host_round.py`` drives the same round from Python)


def server_optimizer(name: str = "fedavg", learning_rate: float | None = None) -> optax.GradientTransformation:
  """FedAvg (SGD, lr 1), FedAdam or FedYogi (Reddi et al. 2021, eps 1e-3) applied to the mean update."""
  name = name.lower()
  if name == "fedavg":
    return optax.sgd(1.0 if learning_rate is None else learning_rate)
  if name == "fedadam":
    return optax.adam(1e-2 if learning_rate is None else learning_rate, b1=0.9, b2=0.99, eps=1e-3)
  if name == "fedyogi":
    return optax.yogi(1e-2 if learning_rate is None else learning_rate, b1=0.9, b2=0.99, eps=1e-3)
  raise ValueError(f"unknown server optimizer {name!r}; choose one of fedavg, fedadam, fedyogi")


class _RoundSpec(NamedTuple):
  """The static settings of a round (closed over by ``fedavg``'s functions, never traced)."""

  task: Task
  client_optimizer: optax.GradientTransformation
  local: LocalConfig
  client_fraction: float
  weighting: str
  server_opt: optax.GradientTransformation
  client_chunk_size: int | None
  update_transform: Callable | None
  aggregate_noise: Callable | None
  client_lr_schedule: Callable | None
  control_variates: bool
  site_local: SiteLocal | None


def cosine_round_schedule(rounds: int, final_fraction: float = 0.0) -> Callable[[jax.Array], jax.Array]:
  """The client step-size factor of round r (0-based): half a cosine from 1 in round 0 to ``final_fraction`` after
  ``rounds`` rounds, constant from there (docs/design.md, "Federated protocol")."""
  if rounds < 1:
    raise ValueError(f"rounds must be >= 1, got {rounds}")

  def factor(r):
    progress = jnp.clip(r.astype(jnp.float32) / rounds, 0.0, 1.0)
    return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))

  return factor


def fedavg(task: Task, client_optimizer: optax.GradientTransformation, *,
           local_epochs: int = 1, batch_size: int = 64, client_fraction: float = 1.0,
           weighting: str = "samples", prox_mu: float = 0.0,
           server_opt: optax.GradientTransformation | None = None,
           client_chunk_size: int | None = None,
           update_transform: Callable[[PyTree, jax.Array, Any], PyTree] | None = None,
           aggregate_noise: Callable[[PyTree, jax.Array, jax.Array, Any], PyTree] | None = None,
           client_lr_schedule: Callable[[jax.Array], jax.Array] | None = None,
           control_variates: bool = False,
           site_local: SiteLocal | None = None,
           wrap_last_batch: bool = False,
           ) -> FederatedAlgorithm:
  """FedAvg and its relatives (FedProx via ``prox_mu``, FedAdam/FedYogi via ``server_opt``, SCAFFOLD via
  ``control_variates``, FedBN via ``site_local``: then ``init`` needs ``num_clients``).

  ``wrap_last_batch``: ``LocalConfig.wrap_last_batch`` (for models whose batch statistics take no mask).

  ``client_lr_schedule(round)``: a factor on every client optimizer step of that round (0-based), e.g.
  ``cosine_round_schedule(rounds)``; it scales the optimizer's output, which for Adam and SGD is
  exactly a scaled learning rate. A fresh client optimizer state each round cannot anneal on its own.

  ``update_transform`` and ``aggregate_noise``: optional hooks (see the module docstring); they
  receive the round's ``context`` too, so a setting such as a noise level can change between
  runs without recompiling the round.
  """
  if not 0.0 < client_fraction <= 1.0:
    raise ValueError(f"client_fraction must be in (0, 1], got {client_fraction}")
  if weighting not in WEIGHTINGS:
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
  if client_chunk_size is not None and client_chunk_size < 1:
    raise ValueError(f"client_chunk_size must be >= 1, got {client_chunk_size}")
  if control_variates and site_local is not None:
    raise ValueError("SCAFFOLD with site-local variables is not available; choose one")
  local = LocalConfig(local_epochs=local_epochs, batch_size=batch_size, prox_mu=prox_mu, wrap_last_batch=wrap_last_batch)
  spec = _RoundSpec(task=task, client_optimizer=client_optimizer, local=local,
                    client_fraction=client_fraction, weighting=weighting,
                    server_opt=server_opt or server_optimizer("fedavg"), client_chunk_size=client_chunk_size,
                    update_transform=update_transform, aggregate_noise=aggregate_noise,
                    client_lr_schedule=client_lr_schedule, control_variates=control_variates,
                    site_local=site_local)
  update_sums = functools.partial(_update_sums, spec)

  def init(variables: PyTree, rng: jax.Array, *, key_version: int = 1, num_clients: int | None = None,
           client_controls: bool = True) -> ServerState:
    """``client_controls=False`` (SCAFFOLD in a deployment): the state holds the server's variate only, as each
    site keeps its own; such a state serves ``server_update``, not ``round``."""
    variables = dict(variables)
    params = variables.pop("params")
    rng_data = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
    controls = initial_controls(params, num_clients, client_controls) if control_variates else None
    sites = None if site_local is None else init_sites(site_local, params, variables, num_clients)
    return ServerState(params=params, model_state=variables, opt_state=spec.server_opt.init(params),
                       round=jnp.int32(0), rng=jnp.asarray(rng_data, jnp.uint32),
                       key_version=jnp.int32(key_version), controls=controls, sites=sites)

  def round_fn(state: ServerState, clients: ClientData | ShardedClientData, context: Any = None):
    num_clients = clients.num_clients
    keys = round_keys(state)
    sampled = sample_clients(keys, num_clients, client_fraction)
    num_sampled = sampled.shape[0]
    per_client = _check_per_client_state(spec, state, clients)
    if isinstance(clients, ShardedClientData):
      sums = sharded_update_sums(update_sums, clients, sampled, state, keys, context)
    else:
      sums = update_sums(clients, sampled, sampled, jnp.ones(num_sampled, bool), state, keys, context)
    sums, client_side = sums if per_client else (sums, (None, None))
    return _server_update(spec, state, sums, num_sampled, keys, context, num_clients, *client_side)

  def server_update(state: ServerState, sums: _UpdateSums, num_sampled: int, context: Any = None,
                    num_clients: int | None = None):
    if control_variates and (sums.control_delta is None or num_clients is None or num_clients < 1):
      raise ValueError("SCAFFOLD's server step moves c by the clients' summed control change over the number of "
                       "clients: pass sums.control_delta and num_clients")
    return _server_update(spec, state, sums, num_sampled, round_keys(state), context, num_clients)

  return FederatedAlgorithm(init=init, round=round_fn, server_update=server_update, spec=spec)


def scaffold(task: Task, client_optimizer: optax.GradientTransformation, **fedavg_kwargs) -> FederatedAlgorithm:
  """SCAFFOLD (Karimireddy et al. 2020): ``fedavg`` with control variates; every other setting is
  ``fedavg``'s (docs/design.md, "Drift correction"). ``init(variables, rng, num_clients=C)``."""
  return fedavg(task, client_optimizer, control_variates=True, **fedavg_kwargs)


def _check_per_client_state(spec: _RoundSpec, state: ServerState, clients) -> bool:
  """Whether the round carries per-client state (SCAFFOLD's, site-local), checked against its clients."""
  if spec.control_variates:
    check_controls(state, clients.num_clients)
  if spec.site_local is not None:
    check_sites(state, clients.num_clients)
  per_client = spec.control_variates or spec.site_local is not None
  if per_client and isinstance(clients, ShardedClientData):
    raise ValueError("SCAFFOLD and site-local variables are not available with the client axis sharded over "
                     "devices yet; run them on one device (drop --shard-clients)")
  return per_client


def _update_sums(spec: _RoundSpec, clients: ClientData, rows: jax.Array, ids: jax.Array, valid: jax.Array,
                 state: ServerState, keys: RoundKeys, context: Any) -> _UpdateSums:
  """Trains the clients in ``rows`` of ``clients`` and sums their weighted updates.

  ``ids`` are the clients' indices in the whole federation (their PRNG streams derive from
  them, so a client trains the same wherever its data sits); ``valid`` marks real slots.
  The single-device round passes the sampled clients as both ``rows`` and ``ids``; the
  sharded round (``sharding.py``) each device's share, with rows local to its shard.
  """
  num_slots = rows.shape[0]
  chunk = min(spec.client_chunk_size or num_slots, num_slots)
  num_chunks = math.ceil(num_slots / chunk)
  padding = num_chunks * chunk - num_slots
  valid = jnp.pad(valid, (0, padding))
  rows = jnp.pad(rows, (0, padding))
  ids = jnp.pad(ids, (0, padding))

  n_k = clients.num_samples[rows].astype(jnp.float32)
  base = n_k if spec.weighting == "samples" else jnp.ones_like(n_k)
  accepted = valid & (clients.key_version[rows] == state.key_version)
  weights = jnp.where(accepted, base, 0.0)

  lr_factor = 1.0 if spec.client_lr_schedule is None else spec.client_lr_schedule(state.round)

  def train_one(row, client_id):
    data = jax.tree_util.tree_map(lambda x: x[row], clients.data)
    client_rng = jax.random.fold_in(keys.train, client_id)
    params, model_state = state.params, state.model_state
    if spec.site_local is not None:
      params, model_state = site_variables(spec.site_local, state.sites, client_id, params, model_state)
    if not spec.control_variates:
      return (*client_update(spec.task, spec.client_optimizer, spec.local, params, model_state, data,
                             clients.num_samples[row], client_rng, context, lr_factor=lr_factor), ())
    own = jax.tree_util.tree_map(lambda c: c[client_id], state.controls["clients"])
    correction = jax.tree_util.tree_map(jnp.subtract, state.controls["server"], own)
    return corrected_client_update(spec.task, spec.client_optimizer, spec.local, params, model_state,
                                   data, clients.num_samples[row], client_rng, context, correction,
                                   lr_factor=lr_factor)

  def train_chunk(carry, chunk_xs):
    sums, (client_controls, sites) = carry
    chunk_rows, chunk_ids, w, chunk_accepted = chunk_xs
    params_k, model_state_k, loss_k, controls_k = jax.vmap(train_one)(chunk_rows, chunk_ids)
    if spec.site_local is None:
      delta_k = jax.tree_util.tree_map(lambda p, g: p - g, params_k, state.params)
    else:
      delta_k = jax.vmap(lambda p: shared_delta(spec.site_local, p, state.params))(params_k)
      sites = scatter_sites(spec.site_local, sites, chunk_ids, chunk_accepted, params_k, model_state_k)
    if spec.update_transform is not None:
      delta_k = jax.vmap(lambda d, i: spec.update_transform(d, jax.random.fold_in(keys.transform, i), context))(
          delta_k, chunk_ids)
    sum_delta, sum_state, sum_loss, sum_control_delta = sums
    if spec.control_variates:
      client_controls, chunk_control_delta = scatter_controls(client_controls, chunk_ids, chunk_accepted,
                                                               controls_k)
      sum_control_delta = jax.tree_util.tree_map(jnp.add, sum_control_delta, chunk_control_delta)
    sums = (jax.tree_util.tree_map(jnp.add, sum_delta, weighted_sum(delta_k, w)),
            jax.tree_util.tree_map(jnp.add, sum_state, weighted_sum(model_state_k, w)),
            sum_loss + jnp.dot(w, loss_k), sum_control_delta)
    return (sums, (client_controls, sites)), None

  zeros = lambda tree: jax.tree_util.tree_map(jnp.zeros_like, tree)
  if spec.control_variates:
    client_controls, control_zero = state.controls["clients"], zeros(state.params)
  else:
    client_controls, control_zero = (), ()
  sites = () if spec.site_local is None else state.sites
  init_sums = (zeros(state.params), zeros(state.model_state), jnp.float32(0.0), control_zero)
  as_chunks = lambda a: a.reshape(num_chunks, chunk)
  ((sum_delta, sum_state, sum_loss, sum_control_delta), (client_controls, sites)), _ = jax.lax.scan(
      train_chunk, (init_sums, (client_controls, sites)),
      (as_chunks(rows), as_chunks(ids), as_chunks(weights), as_chunks(accepted)))
  sums = _UpdateSums(delta=sum_delta, model_state=sum_state, loss=sum_loss, weight=jnp.sum(weights),
                     num_accepted=jnp.sum(accepted).astype(jnp.int32),
                     control_delta=sum_control_delta if spec.control_variates else None)
  if spec.control_variates or spec.site_local is not None:
    return sums, (client_controls if spec.control_variates else None,
                  sites if spec.site_local is not None else None)
  return sums


def _server_update(spec: _RoundSpec, state: ServerState, sums: _UpdateSums, num_sampled: int, keys: RoundKeys,
                   context: Any, num_clients: int | None = None, client_controls: PyTree = None,
                   sites: PyTree = None):
  """The weighted mean update through the server optimizer; a round with no accepted update keeps the state.

  SCAFFOLD: the server variate moves by the accepted clients' summed change over all ``num_clients`` clients (the
  paper's ``|S|/N`` times the sample mean); the simulated round passes the clients' updated variates too
  (``client_controls``), a deployment's sites keep theirs. Site-local variables: the simulated round passes the
  clients' trained rows (``sites``); the server's model state is the clients' average either way."""
  controls = state.controls
  if spec.control_variates:
    server_control = jax.tree_util.tree_map(lambda c, d: c + d / num_clients, controls["server"],
                                            sums.control_delta)
    controls = {**controls, "server": server_control}
    if client_controls is not None:
      controls["clients"] = client_controls
  any_accepted = sums.weight > 0
  safe_total = jnp.where(any_accepted, sums.weight, 1.0)
  mean_delta = jax.tree_util.tree_map(lambda s: s / safe_total, sums.delta)
  if spec.aggregate_noise is not None:
    mean_delta = spec.aggregate_noise(mean_delta, keys.noise, sums.num_accepted, context)
  pseudo_grad = jax.tree_util.tree_map(jnp.negative, mean_delta)
  updates, new_opt_state = spec.server_opt.update(pseudo_grad, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  new_model_state = jax.tree_util.tree_map(lambda s: s / safe_total, sums.model_state)

  keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(any_accepted, a, b), new, old)
  new_state = ServerState(
      params=keep(new_params, state.params),
      model_state=keep(new_model_state, state.model_state),
      opt_state=keep(new_opt_state, state.opt_state),
      round=state.round + 1,
      rng=state.rng,
      key_version=state.key_version,
      controls=keep(controls, state.controls),
      sites=state.sites if sites is None else sites,
  )
  metrics = {
      "train_loss": sums.loss / safe_total,
      "num_sampled": jnp.int32(num_sampled),
      "num_accepted": sums.num_accepted,
  }
  return new_state, metrics
