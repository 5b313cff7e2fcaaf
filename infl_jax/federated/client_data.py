"""Client data stacked on a leading client axis, padded to a common size."""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


class ClientData(NamedTuple):
  """``data``: pytree with leaves [C, N_max, ...]; rows ``>= num_samples[c]`` are padding.

  ``key_version`` is the key version each client trains with; the server accepts
  only updates tagged with its current version.
  """

  data: PyTree
  num_samples: jax.Array  # int32 [C]
  key_version: jax.Array  # int32 [C]

  @property
  def num_clients(self) -> int:
    return int(self.num_samples.shape[0])

  @property
  def max_samples(self) -> int:
    return int(jax.tree_util.tree_leaves(self.data)[0].shape[1])


def stack_clients(per_client: Sequence[PyTree], *, key_version: int | Sequence[int] = 1,
                  pad_to: int | None = None) -> ClientData:
  """Pads each client's pytree (leaves [n_k, ...]) with zeros to a common N_max and stacks them."""
  if len(per_client) == 0:
    raise ValueError("stack_clients needs at least one client")
  sizes = []
  for k, tree in enumerate(per_client):
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
      raise ValueError(f"client {k} has no data arrays")
    n = {int(np.shape(x)[0]) for x in leaves}
    if len(n) != 1:
      raise ValueError(f"client {k}: arrays disagree on the number of samples ({sorted(n)}); "
                       "every leaf needs the same leading sample axis")
    (n,) = n
    if n == 0:
      raise ValueError(f"client {k} has no samples; drop it or repartition so every client holds data")
    sizes.append(n)
  n_max = max(sizes) if pad_to is None else pad_to
  if n_max < max(sizes):
    raise ValueError(f"pad_to={pad_to} is smaller than the largest client ({max(sizes)} samples)")

  def pad(x):
    x = np.asarray(x)
    return np.concatenate([x, np.zeros((n_max - x.shape[0],) + x.shape[1:], x.dtype)])

  data = jax.tree_util.tree_map(lambda *xs: jnp.asarray(np.stack([pad(x) for x in xs])), *per_client)
  versions = np.broadcast_to(np.asarray(key_version, np.int32), (len(per_client),))
  return ClientData(data=data, num_samples=jnp.asarray(sizes, jnp.int32), key_version=jnp.asarray(versions))
