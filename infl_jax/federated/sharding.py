"""The client axis split across devices: the same round as on one device, each device training its share.

    mesh = client_mesh()                                  # all local devices on a "clients" axis
    sharded = shard_clients(clients, mesh)                # data placed once, before the rounds
    state, metrics = jax.jit(algo.round)(state, sharded, context)

``algo`` is the ordinary ``fedavg(...)``: its round sees a ``ShardedClientData`` and runs the
client training under ``shard_map``. The server samples the same clients from the same key as on
one device; each device trains the sampled clients it holds (with their global indices' PRNG
streams, in chunks of ``client_chunk_size``), its weighted sums are ``psum``-ed over the devices,
and the server update runs on the total, replicated. Results equal the single-device round up to
the order of floating-point additions.

A device runs ``min(clients per device, sampled clients)`` client slots, because any device may
hold all of a round's sample: with full participation that is exactly its share; with a small
``client_fraction`` it is up to ``num_devices`` times the balanced share (the padded slots train
and get weight 0).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from infl_jax.federated.client_data import ClientData

CLIENT_AXIS = "clients"
# key_version of the clients added to fill the last device: never sampled, never accepted.
PADDING_KEY_VERSION = -1


@functools.partial(jax.tree_util.register_dataclass, data_fields=["clients"], meta_fields=["num_clients", "mesh"])
@dataclasses.dataclass(frozen=True)
class ShardedClientData:
  """Client data split over a mesh's ``"clients"`` axis; build it with ``shard_clients``.

  ``clients`` holds ``num_clients`` real clients followed by zero-sample padding clients, so
  that every device holds the same number; ``num_clients`` and ``mesh`` are static.
  """

  clients: ClientData
  num_clients: int
  mesh: Mesh

  @property
  def num_devices(self) -> int:
    return int(self.mesh.shape[CLIENT_AXIS])

  @property
  def clients_per_device(self) -> int:
    return self.clients.num_clients // self.num_devices

  @property
  def max_samples(self) -> int:
    return self.clients.max_samples


def client_mesh(devices=None) -> Mesh:
  """A one-axis mesh named ``"clients"`` over ``devices`` (default: all of this process's devices)."""
  devices = jax.local_devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("client_mesh() needs at least one device")
  return Mesh(np.asarray(devices), (CLIENT_AXIS,))


def shard_clients(clients: ClientData, mesh: Mesh) -> ShardedClientData:
  """Places ``clients`` on ``mesh``, the client axis split over its ``"clients"`` axis.

  Pads the client count to a multiple of the number of devices with clients that hold no
  samples; the round never samples them. Other mesh axes, if any, hold replicas.
  """
  if isinstance(clients, ShardedClientData):
    raise ValueError("shard_clients(): the clients are already sharded; pass the ClientData from stack_clients")
  if not isinstance(clients, ClientData):
    raise TypeError(f"shard_clients() takes the ClientData from stack_clients, got {type(clients).__name__}")
  if not isinstance(mesh, Mesh) or CLIENT_AXIS not in mesh.axis_names:
    raise ValueError(f"shard_clients() needs a jax.sharding.Mesh with a {CLIENT_AXIS!r} axis, got {mesh!r}; "
                     "build one with infl_jax.federated.client_mesh()")
  num_devices = int(mesh.shape[CLIENT_AXIS])
  num_clients = clients.num_clients
  padding = -num_clients % num_devices

  def pad(x, value=0):
    x = jnp.asarray(x)
    return jnp.concatenate([x, jnp.full((padding,) + x.shape[1:], value, x.dtype)]) if padding else x

  padded = ClientData(data=jax.tree_util.tree_map(pad, clients.data), num_samples=pad(clients.num_samples),
                      key_version=pad(clients.key_version, PADDING_KEY_VERSION))
  placed = jax.device_put(padded, NamedSharding(mesh, PartitionSpec(CLIENT_AXIS)))
  return ShardedClientData(clients=placed, num_clients=num_clients, mesh=mesh)


def sharded_update_sums(update_sums: Callable, clients: ShardedClientData, sampled: jax.Array,
                        state: Any, keys: Any, context: Any):
  """``update_sums`` (the engine's single-device client loop) on each device's share, psum-ed.

  ``sampled``: the round's sorted global client indices, the same on every device.
  """
  per_device = clients.clients_per_device
  slots = min(per_device, int(sampled.shape[0]))

  def on_device(local_clients: ClientData, sampled, state, keys, context):
    first = jax.lax.axis_index(CLIENT_AXIS) * per_device
    here = (sampled >= first) & (sampled < first + per_device)
    # This device's sampled clients first, still in index order; the rest of the slots are padding.
    take = jnp.argsort(~here, stable=True)[:slots]
    ids, valid = sampled[take], here[take]
    rows = jnp.where(valid, ids - first, 0)
    sums = update_sums(local_clients, rows, ids, valid, state, keys, context)
    return jax.lax.psum(sums, CLIENT_AXIS)

  replicated = PartitionSpec()
  # check_vma off: the psum-ed sums are replicated by construction, which the checker cannot see
  # through the scanned client chunks.
  return jax.shard_map(on_device, mesh=clients.mesh,
                       in_specs=(PartitionSpec(CLIENT_AXIS), replicated, replicated, replicated, replicated),
                       out_specs=replicated, check_vma=False)(clients.clients, sampled, state, keys, context)
