"""The compiled pieces of training: preprocessing, one training step, a whole epoch, prediction, and
the data-parallel mesh they can be split over.

The data live on the device; one jit-compiled function runs a whole epoch (lax.scan over batches,
or a jit-compiled step driven from Python on CPU) and one scores every head on a range of evaluation
batches (validation or test).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from runkit.errors import UserInputError

from lsanet_jax.config import EPOCH_LOOPS, TrainConfig
from lsanet_jax.data.medmnist import MULTI_LABEL
from lsanet_jax.losses import lsanet_loss
from lsanet_jax.models import head_names

# The parts of the state one training step changes; the rest (the kept best weights) stays out of
# the scanned carry so the loop never touches it.
STEP_STATE_KEYS = ("params", "batch_stats", "opt_state", "step")


def preprocess(images_u8, key=None, augment: bool = False):
  """uint8 NHWC -> float normalised with mean 0.5 std 0.5; optional random flip + padded crop."""
  x = images_u8.astype(jnp.float32) / 255.0
  x = (x - 0.5) / 0.5
  if augment and key is not None:
    flip_key, crop_key = jax.random.split(key)
    n, h, w, c = x.shape
    flip = jax.random.bernoulli(flip_key, 0.5, (n,))
    x = jnp.where(flip[:, None, None, None], x[:, :, ::-1, :], x)
    pad = max(1, h // 7)  # 4 px at 28 px, as in the usual CIFAR-style crop
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * pad + 1)
    x = jax.vmap(lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c)))(padded, offsets)
  return x


def train_step(state, images, labels, key, *, model, tx, config: TrainConfig, task: str):
  """One Adam step on one batch; returns (state, {loss parts, LSA layer weights})."""
  x = preprocess(images, key, config.augment)

  def loss_fn(params):
    outputs, new_model_state = model.apply(
        {"params": params, "batch_stats": state["batch_stats"]}, x, train=True,
        mutable=["batch_stats"])
    loss, parts = lsanet_loss(outputs, labels, task, dynamic_weights=config.dynamic_aux_weights,
                              synergy=config.synergy)
    if outputs["lsa_alpha"] is not None:
      layer_weights = jnp.mean(outputs["lsa_alpha"], axis=(0, 2))
      for name, w in zip(head_names(model.resolved_aux_stages(), False), layer_weights):
        parts[f"lsa_weight_{name}"] = w
    return loss, (parts, new_model_state["batch_stats"])

  grads, (parts, batch_stats) = jax.grad(loss_fn, has_aux=True)(state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  new_state = dict(state, params=params, batch_stats=batch_stats, opt_state=opt_state,
                   step=state["step"] + 1)
  return new_state, parts


def resolve_epoch_loop(epoch_loop: str) -> str:
  """'auto': one lax.scan-compiled function per epoch on accelerators; on CPU a jit-compiled step
  driven from Python, because XLA:CPU runs convolutions inside a while loop whose body carries the
  parameters about 8x slower (measured here: 0.45-0.7 s vs 0.06-0.09 s per ResNet-18 step; cf.
  jax-ml/jax#12868). Both keep the data on the device and never copy a batch to the host."""
  if epoch_loop not in EPOCH_LOOPS:
    raise ValueError(f"unknown epoch loop {epoch_loop!r}; choose auto, scan or host")
  if epoch_loop == "auto":
    return "host" if jax.default_backend() == "cpu" else "scan"
  return epoch_loop


def steps_per_epoch(batch_size: int, num_train: int) -> int:
  """Batches per epoch; a training set smaller than the batch is one batch."""
  return math.ceil(num_train / min(batch_size, num_train))


class DataParallelError(UserInputError):
  """A batch that does not split evenly over the devices."""


def data_parallel_mesh(batch_size: int, devices=None, *, num_train: int | None = None) -> Mesh:
  """A 1-D mesh over all local devices (axis "data") that every batch is split across.

  Raises DataParallelError when the batch does not split evenly; ``num_train`` (the training set
  size, when it is smaller than --batch-size and so is the batch) makes the message name it."""
  devices = list(devices if devices is not None else jax.local_devices())
  if num_train is not None and num_train < batch_size:
    if num_train % len(devices):
      raise DataParallelError(
          f"the training set holds {num_train} images, fewer than --batch-size {batch_size}, so a batch is the whole "
          f"set, and {num_train} does not split over {len(devices)} devices: train on more images "
          f"(--label-fraction) or drop --data-parallel")
    batch_size = num_train
  if batch_size % len(devices):
    raise DataParallelError(f"data-parallel training splits each batch of {batch_size} images over "
                            f"{len(devices)} devices: choose a --batch-size divisible by {len(devices)} "
                            f"(or drop --data-parallel)")
  return Mesh(np.array(devices), ("data",))


def replicate(tree, mesh: Mesh | None):
  """Places every array of tree on every device of mesh (a no-op without a mesh)."""
  if mesh is None:
    return tree
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def batch_sharder(mesh: Mesh | None):
  """x -> x split along its first (batch) axis over the mesh's "data" axis, inside jit.

  With the parameters replicated, GSPMD then all-reduces the gradients and BatchNorm's batch
  statistics, so a data-parallel step computes what one device computes on the whole batch."""
  if mesh is None:
    return lambda x: x
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  return lambda x: jax.lax.with_sharding_constraint(x, sharding)


def make_train_epoch(model, tx, config: TrainConfig, task: str, num_train: int,
                     epoch_loop: str = "auto", mesh: Mesh | None = None):
  """Returns (train_epoch(state, images, labels, epoch_key) -> (state, mean metrics), steps).

  Every epoch visits a fresh permutation of all training images; the last batch is filled up by
  wrapping around the permutation so every batch has the same shape. With a mesh (see
  data_parallel_mesh) each batch is split over its devices; state and images must then be
  replicated on them (see replicate)."""
  batch_size = min(config.batch_size, num_train)
  if mesh is not None:
    data_parallel_mesh(batch_size, mesh.devices.flat)  # checks divisibility
  steps = steps_per_epoch(config.batch_size, num_train)
  step_fn = functools.partial(train_step, model=model, tx=tx, config=config, task=task)
  shard = batch_sharder(mesh)

  def epoch_plan(epoch_key):
    perm_key, aug_key = jax.random.split(epoch_key)
    order = jnp.resize(jax.random.permutation(perm_key, num_train), (steps * batch_size,))
    return order.reshape(steps, batch_size), jax.random.split(aug_key, steps)

  def indexed_step(state, images, labels, idx, key):
    idx = shard(idx)  # each device gathers only its own share of the batch
    return step_fn(state, shard(images[idx]), shard(labels[idx]), key)

  if resolve_epoch_loop(epoch_loop) == "scan":
    @functools.partial(jax.jit, donate_argnums=(0,))
    def train_epoch(state, images, labels, epoch_key):
      order, keys = epoch_plan(epoch_key)
      carry = {k: state[k] for k in STEP_STATE_KEYS}
      carry, parts = jax.lax.scan(lambda s, inp: indexed_step(s, images, labels, *inp), carry,
                                  (order, keys))
      return dict(state, **carry), jax.tree_util.tree_map(jnp.mean, parts)
    return train_epoch, steps

  plan = jax.jit(epoch_plan)
  step = jax.jit(indexed_step, donate_argnums=(0,))
  mean_parts = jax.jit(lambda parts: jax.tree_util.tree_map(lambda *v: jnp.mean(jnp.stack(v)), *parts))

  def train_epoch(state, images, labels, epoch_key):
    order, keys = plan(epoch_key)
    carry = {k: state[k] for k in STEP_STATE_KEYS}
    parts = []
    for i in range(steps):  # dispatches asynchronously; nothing returns to the host here
      carry, p = step(carry, images, labels, order[i], keys[i])
      parts.append(p)
    return dict(state, **carry), mean_parts(parts)
  return train_epoch, steps


def make_predict(model, task: str, batch_size: int, max_batches: int, mesh: Mesh | None = None):
  """jit(variables, images, first_batch, num_batches, key_coords=None) -> {head: probabilities
  (max_batches * batch_size, C)}:
  every head scored in eval mode, in one pass over the batches first_batch .. first_batch + num_batches - 1
  of images (rows batch_size * first_batch onwards; pad each split to whole batches). Rows past
  num_batches * batch_size are zeros.

  The batch range is an argument, not a shape, so validation and test (of different sizes) share one
  compiled function; the loop runs only the batches asked for. With a mesh, each batch is split over its
  devices when it divides evenly."""
  activation = jax.nn.sigmoid if task == MULTI_LABEL else jax.nn.softmax
  shard = batch_sharder(mesh if mesh is not None and batch_size % mesh.size == 0 else None)

  def one(variables, xb, key_coords):
    # A keyed model (lsanet-federated --key-scheme) takes the key as an argument of the compiled function, never
    # as a constant inside it (which the compilation cache would write to disk).
    key = {} if key_coords is None else {"key_coords": key_coords}
    logits = model.apply(variables, preprocess(shard(xb)), train=False, **key)["logits"]
    return {k: activation(v) for k, v in logits.items()}

  @jax.jit
  def predict(variables, images, first_batch, num_batches, key_coords=None):
    shapes = jax.eval_shape(one, variables, images[:batch_size], key_coords)
    out = {k: jnp.zeros((max_batches, *v.shape), v.dtype) for k, v in shapes.items()}

    def body(i, out):
      xb = jax.lax.dynamic_slice_in_dim(images, (first_batch + i) * batch_size, batch_size)
      return {k: out[k].at[i].set(v) for k, v in one(variables, xb, key_coords).items()}

    out = jax.lax.fori_loop(0, num_batches, body, out)
    return {k: v.reshape(max_batches * batch_size, -1) for k, v in out.items()}

  return predict
