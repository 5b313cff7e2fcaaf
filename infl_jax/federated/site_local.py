"""Variables each client keeps to itself: trained locally every round it is sampled, never averaged.

FedBN (Li et al. 2021) keeps every BatchNorm layer's affine parameters and statistics at the site, the variant
recommended when sites' inputs differ in distribution (scanners, stains, protocols); FedPer-style personal heads
are the same mechanism with another split. docs/design.md, "Federated LSANet".

In a simulation the clients' own variables sit in ``ServerState.sites`` with a leading client axis, so one jitted
round can gather the sampled clients' rows and scatter the trained ones back (as SCAFFOLD's ``c_i``); the server
never averages them, and their part of every client update is zero. A deployment's sites would keep their rows.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any

__all__ = ["SiteLocal", "check_sites", "init_sites", "site_variables", "shared_delta", "scatter_sites"]


class SiteLocal(NamedTuple):
  """Which variables stay at the clients.

  ``split(params) -> (shared, local)`` and ``merge(shared, local) -> params`` divide the parameters (any two
  pytrees that ``merge`` reassembles); ``model_state``: keep the whole model state (e.g. BatchNorm statistics)
  per client too.
  """

  split: Callable[[PyTree], tuple[PyTree, PyTree]]
  merge: Callable[[PyTree, PyTree], PyTree]
  model_state: bool = True


def init_sites(site_local: SiteLocal, params: PyTree, model_state: PyTree, num_clients: int | None) -> dict:
  """Every client's own variables, all starting from the initial model's."""
  if num_clients is None or num_clients < 1:
    raise ValueError(f"site-local variables are kept per client: init(..., num_clients=C) needs the number of "
                     f"clients, got {num_clients}")
  stack = lambda tree: jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (num_clients,) + x.shape), tree)
  sites = {"params": stack(site_local.split(params)[1])}
  if site_local.model_state:
    sites["model_state"] = stack(model_state)
  return sites


def site_variables(site_local: SiteLocal, sites: dict, client_id, params: PyTree, model_state: PyTree):
  """(params, model_state) client ``client_id`` trains from (or is evaluated with): the global shared
  parameters with its own local ones, and its own model state where it keeps one."""
  row = lambda tree: jax.tree_util.tree_map(lambda x: x[client_id], tree)
  merged = site_local.merge(site_local.split(params)[0], row(sites["params"]))
  return merged, row(sites["model_state"]) if site_local.model_state else model_state


def shared_delta(site_local: SiteLocal, trained: PyTree, start: PyTree) -> PyTree:
  """``trained - start`` with the local part zero: what the client contributes to the average."""
  (shared_new, local_new), (shared_old, _) = site_local.split(trained), site_local.split(start)
  return site_local.merge(jax.tree_util.tree_map(jnp.subtract, shared_new, shared_old),
                          jax.tree_util.tree_map(jnp.zeros_like, local_new))


def scatter_sites(site_local: SiteLocal, sites: dict, client_ids, accepted, params_k: PyTree,
                  model_state_k: PyTree) -> dict:
  """``sites`` with the accepted clients' rows replaced by their trained variables (leading axis: the chunk's
  clients); a rejected or padding slot scatters past the end, which ``mode="drop"`` discards."""
  num_clients = jax.tree_util.tree_leaves(sites["params"])[0].shape[0]
  targets = jnp.where(accepted, client_ids, num_clients)
  put = lambda old, new: jax.tree_util.tree_map(lambda s, v: s.at[targets].set(v, mode="drop"), old, new)
  out = {"params": put(sites["params"], jax.vmap(lambda p: site_local.split(p)[1])(params_k))}
  if site_local.model_state:
    out["model_state"] = put(sites["model_state"], model_state_k)
  return out


def check_sites(state, num_clients: int) -> None:
  if state.sites is None:
    raise ValueError("a round with site-local variables needs a state from its own init(..., num_clients=C)")
  held = jax.tree_util.tree_leaves(state.sites)[0].shape[0]
  if held != num_clients:
    raise ValueError(f"the state holds site-local variables for {held} clients but the round was given "
                     f"{num_clients}; init with num_clients={num_clients}")
