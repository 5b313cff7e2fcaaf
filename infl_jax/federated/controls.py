"""SCAFFOLD's control variates in the simulated round (docs/design.md, "Drift correction"): the server's ``c`` and
every client's ``c_i``, stacked over the clients and indexed by client id."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any

__all__ = ["check_controls", "initial_controls", "scatter_controls"]


def initial_controls(params: PyTree, num_clients: int | None, client_controls: bool) -> dict:
  """SCAFFOLD's variates at zero: the server's, and unless a deployment's sites keep them, every client's."""
  controls = {"server": jax.tree_util.tree_map(jnp.zeros_like, params)}
  if client_controls:
    if num_clients is None or num_clients < 1:
      raise ValueError(f"SCAFFOLD keeps a control variate per client: init(..., num_clients=C) needs the "
                       f"number of clients, got {num_clients}")
    controls["clients"] = jax.tree_util.tree_map(lambda p: jnp.zeros((num_clients,) + p.shape, p.dtype), params)
  return controls


def check_controls(state, num_clients: int) -> None:
  if state.controls is None or "clients" not in state.controls:
    held = "no control variates" if state.controls is None else "the server's control variate only (a deployment's)"
    raise ValueError(f"SCAFFOLD's round needs a state from its own init(..., num_clients=C); this one has {held}")
  held = jax.tree_util.tree_leaves(state.controls["clients"])[0].shape[0]
  if held != num_clients:
    raise ValueError(f"the state holds control variates for {held} clients but the round was given "
                     f"{num_clients}; init with num_clients={num_clients}")


def scatter_controls(client_controls: PyTree, chunk_ids, chunk_accepted, controls_k: PyTree):
  """SCAFFOLD: an accepted client's variate becomes its mean gradient; a rejected or padding slot changes nothing
  (it scatters past the end, which mode="drop" discards). Returns (the clients' variates, the chunk's summed
  change)."""
  num_all_clients = jax.tree_util.tree_leaves(client_controls)[0].shape[0]
  old_k = jax.tree_util.tree_map(lambda c: c[chunk_ids], client_controls)
  gain = chunk_accepted.astype(jnp.float32)
  control_delta_k = jax.tree_util.tree_map(
      lambda new, old: (new - old) * gain.reshape((-1,) + (1,) * (new.ndim - 1)), controls_k, old_k)
  targets = jnp.where(chunk_accepted, chunk_ids, num_all_clients)
  client_controls = jax.tree_util.tree_map(lambda c, old, d: c.at[targets].set(old + d, mode="drop"),
                                           client_controls, old_k, control_delta_k)
  return client_controls, jax.tree_util.tree_map(lambda d: jnp.sum(d, axis=0), control_delta_k)
