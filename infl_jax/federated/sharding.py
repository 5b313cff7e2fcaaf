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

Across processes (``jax.distributed``, docs/design.md, "Multi-host simulation") the same round runs on
a mesh over every process's devices: ``client_mesh()`` orders them by process, so process p holds one
contiguous block of the client axis (``process_client_rows``), and ``shard_clients`` given a
``ClientSource`` stacks only those clients in each process. The server state and the round's context
go in replicated (``replicate``); ``local_copy`` gives a process its own copy of a replicated result.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
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


class ClientSource(NamedTuple):
  """A federation's clients, stacked on demand, so that each process of a multi-process run stacks (and
  places) only the clients its devices hold; ``shard_clients`` takes one in place of a ``ClientData``."""

  num_samples: np.ndarray  # int [C]: every client's sample count (all processes know all of them)
  stack: Callable[[Sequence[int], int], ClientData]  # (client indices, pad_to) -> those clients, padded

  @property
  def num_clients(self) -> int:
    return int(len(self.num_samples))

  def stack_all(self) -> ClientData:
    return self.stack(range(self.num_clients), int(np.max(self.num_samples)))


def client_mesh(devices=None) -> Mesh:
  """A one-axis mesh named ``"clients"`` over ``devices`` (default: every process's devices, ordered by
  process, so that each process holds one contiguous block of clients; in one process, its devices)."""
  if devices is None:
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  devices = list(devices)
  if not devices:
    raise ValueError("client_mesh() needs at least one device")
  return Mesh(np.asarray(devices), (CLIENT_AXIS,))


def _blocks(mesh: Mesh) -> list[set[int]]:
  """Per position along the ``"clients"`` axis, the processes whose devices sit there."""
  devices = np.moveaxis(mesh.devices, mesh.axis_names.index(CLIENT_AXIS), 0)
  return [{d.process_index for d in row} for row in devices.reshape(devices.shape[0], -1)]


def process_client_rows(num_clients: int, mesh: Mesh, process_index: int | None = None) -> np.ndarray:
  """The rows of the padded client axis the devices of ``process_index`` (default: this process) hold
  on ``mesh``, in order: client ``c`` for ``c < num_clients``, padding clients after that."""
  process_index = jax.process_index() if process_index is None else process_index
  blocks = _blocks(mesh)
  per_device = -(-num_clients // len(blocks))
  held = [i for i, processes in enumerate(blocks) if process_index in processes]
  return np.concatenate([np.arange(i * per_device, (i + 1) * per_device) for i in held]).astype(np.int64) \
      if held else np.zeros((0,), np.int64)


def shard_clients(clients: ClientData | ClientSource, mesh: Mesh) -> ShardedClientData:
  """Places ``clients`` on ``mesh``, the client axis split over its ``"clients"`` axis.

  Pads the client count to a multiple of the number of devices with clients that hold no
  samples; the round never samples them. Other mesh axes, if any, hold replicas. With a mesh over
  several processes each process places the rows its devices hold (``process_client_rows``); from a
  ``ClientSource`` it stacks only those clients.
  """
  if isinstance(clients, ShardedClientData):
    raise ValueError("shard_clients(): the clients are already sharded; pass the ClientData from stack_clients")
  if not isinstance(clients, (ClientData, ClientSource)):
    raise TypeError(f"shard_clients() takes the ClientData from stack_clients, got {type(clients).__name__}")
  if not isinstance(mesh, Mesh) or CLIENT_AXIS not in mesh.axis_names:
    raise ValueError(f"shard_clients() needs a jax.sharding.Mesh with a {CLIENT_AXIS!r} axis, got {mesh!r}; "
                     "build one with infl_jax.federated.client_mesh()")
  num_devices = int(mesh.shape[CLIENT_AXIS])
  num_clients = clients.num_clients
  padded_count = num_clients + (-num_clients % num_devices)
  rows = process_client_rows(num_clients, mesh)
  real = rows[rows < num_clients]
  if isinstance(clients, ClientSource):
    # A process whose devices hold only padding still needs the leaves' shapes: it stacks client 0 and
    # zeroes it below.
    local, take = clients.stack(real if len(real) else [0], int(np.max(clients.num_samples))), np.arange(len(real))
  else:
    local, take = clients, real

  def held(x, value=0):
    x = np.asarray(x)
    out = np.full((len(rows),) + x.shape[1:], value, x.dtype)
    out[:len(real)] = x[take]
    return out

  block = ClientData(data=jax.tree_util.tree_map(held, local.data), num_samples=held(local.num_samples),
                     key_version=held(local.key_version, PADDING_KEY_VERSION))
  placed = jax.tree_util.tree_map(lambda x: _from_rows(x, rows, padded_count, mesh), block)
  return ShardedClientData(clients=placed, num_clients=num_clients, mesh=mesh)


def _from_rows(block: np.ndarray, rows: np.ndarray, padded_count: int, mesh: Mesh) -> jax.Array:
  """The global array of ``padded_count`` rows split over ``mesh``'s client axis, from this process's
  ``block`` (its rows ``rows``, in order; each device's rows are contiguous in it)."""
  position = {int(r): i for i, r in enumerate(rows)}

  def shard(index):
    start = index[0].start or 0
    stop = padded_count if index[0].stop is None else index[0].stop
    first = position[start]
    return block[(slice(first, first + stop - start),) + tuple(index[1:])]

  return jax.make_array_from_callback((padded_count,) + block.shape[1:],
                                      NamedSharding(mesh, PartitionSpec(CLIENT_AXIS)), shard)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """``tree``'s arrays replicated on every device of ``mesh`` (each process gives the same values): the
  server state and the round's context of a round over several processes."""
  sharding = NamedSharding(mesh, PartitionSpec())

  def put(x):
    value = np.asarray(x)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

  return jax.tree_util.tree_map(put, tree)


def local_copy(tree: Any) -> Any:
  """This process's copy of each replicated array of ``tree`` (on one of its devices), so that what a
  process does with a multi-process round's result (validation, evaluation) runs on its own."""
  def local(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if not x.is_fully_replicated:
        raise ValueError(f"local_copy() takes replicated arrays; got one sharded as {x.sharding}")
      return x.addressable_data(0)
    return x

  return jax.tree_util.tree_map(local, tree)


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
    # One all-reduce of one flat vector rather than one per leaf: across processes each is a gloo (or
    # network) round trip, and a keyed model has about a hundred leaves.
    flat, unflatten = ravel_pytree(sums)
    return unflatten(jax.lax.psum(flat, CLIENT_AXIS))

  replicated = PartitionSpec()
  # check_vma off: the psum-ed sums are replicated by construction, which the checker cannot see
  # through the scanned client chunks.
  return jax.shard_map(on_device, mesh=clients.mesh,
                       in_specs=(PartitionSpec(CLIENT_AXIS), replicated, replicated, replicated, replicated),
                       out_specs=replicated, check_vma=False)(clients.clients, sampled, state, keys, context)
