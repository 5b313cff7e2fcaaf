"""What infl_round.py times: the workload, our two ways to run a round, and the timing of rounds.

The workload is the ``proteomics`` preset (``TrainConfig.for_dataset("proteomics")``) with the
keyed reference proteomics network, on synthetic client data of the proteomics shape; our round is
built by ``algorithm_from_config``. Every round, timed or not, runs through ``run_rounds``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import harness
from infl_jax import keys as keylib
from infl_jax import models
from infl_jax.config import TrainConfig
from infl_jax.federated import (ClientData, FederatedAlgorithm, LocalConfig, ServerState, Task, algorithm_from_config,
                                client_optimizer_from_config, client_update, fedavg, round_keys, run_rounds,
                                stack_clients)
from infl_jax.tasks import classification

PROTEOMICS = TrainConfig.for_dataset("proteomics")
# SomaScan proteins of the built-in proteomics cohort (docs/design.md, "Data sets and presets").
PROTEOMICS_FEATURES = 5207
CLIENT_OPTIMIZERS = ("adam", "sgd")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  clients: tuple[int, ...] = (8, 64, 512)
  samples_per_client: int = 32
  features: int = PROTEOMICS_FEATURES
  num_classes: int = 2
  key_strength: float = PROTEOMICS.key_strength
  local_epochs: int = PROTEOMICS.local_epochs
  batch_size: int = PROTEOMICS.batch_size
  learning_rate: float = PROTEOMICS.learning_rate
  weight_decay: float = PROTEOMICS.weight_decay
  dropout: float = PROTEOMICS.dropout
  num_blocks: int = 2  # residual blocks of the proteomics network (the reference has 2)
  client_optimizer: str = "adam"  # "adam" (the reference, the config's) or "sgd" (see Workload.algorithm)
  repeats: int = 5  # timed rounds of our vmapped round (after the compile round)
  loop_rounds: int = 3  # timed rounds, at most, of the jit loop and the torch loop
  torch_single_round_from: int = 512  # from this many clients the torch loop times 1 round
  section_budget_s: float = 40.0  # per (method, client count): no new timed round past it
  torch_budget_s: float = 120.0  # the torch loop at all client counts together
  time_limit_s: float = 240.0  # the whole script: sections not started by then are skipped
  large_clients: int = 10_000
  large_chunk: int = 1000
  bf16_clients: tuple[int, ...] = (64,)  # client counts that also time our round in bfloat16
  seed: int = 0
  use_torch: bool = True

  def train_config(self, compute_dtype: str = "float32") -> TrainConfig:
    """The proteomics preset with this benchmark's settings: what our round is built from."""
    return TrainConfig.for_dataset(
        "proteomics", key_strength=self.key_strength, local_epochs=self.local_epochs, batch_size=self.batch_size,
        learning_rate=self.learning_rate, weight_decay=self.weight_decay, dropout=self.dropout,
        compute_dtype=compute_dtype, seed=self.seed)


# A smoke run for a few CPU cores: compiling the keyed round dominates it, hence one residual block.
# The time limit leaves room for cores shared with other jobs (the smoke test's run takes ~110 s on
# two such cores; at 120 s its check was once skipped) and stays under that test's 300 s timeout.
SMALL = dict(clients=(2, 4), features=64, num_blocks=1, local_epochs=2, repeats=3, loop_rounds=2,
             section_budget_s=10.0, torch_budget_s=20.0, time_limit_s=200.0, large_clients=12, large_chunk=5,
             bf16_clients=())


def workload_description(cfg: BenchConfig) -> str:
  return ("one FedAvg round of the keyed reference proteomics network (make_proteomics_net: "
          f"{cfg.features} inputs, key strength {cfg.key_strength}, {cfg.num_blocks} residual blocks), "
          f"{cfg.client_optimizer} lr {cfg.learning_rate} wd {cfg.weight_decay}, {cfg.local_epochs} local epochs, "
          f"batch {cfg.batch_size}, {cfg.samples_per_client} samples per client, sample-weighted average")


# ------------------------------------------------------------------------------------------------
# The workload.


def make_model(cfg: BenchConfig, compute_dtype: str = "float32"):
  # classification.create_model has no num_blocks, which --small and --num-blocks need.
  config = cfg.train_config(compute_dtype)
  return models.make_proteomics_net(cfg.num_classes, key_strength=config.key_strength, dropout_rate=config.dropout,
                                    num_blocks=cfg.num_blocks, variant=config.variant, dtype=config.compute_dtype)


def init_variables(model, cfg: BenchConfig, *, abstract: bool = False):
  """The model's variables (jitted: eager init dispatches hundreds of small ops); shapes only if ``abstract``."""
  init = functools.partial(classification.init_variables, model, cfg.features)
  rng = jax.random.key(cfg.seed)
  return jax.eval_shape(init, rng) if abstract else jax.device_get(jax.jit(init)(rng))


def param_count(tree) -> int:
  return int(sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))  # arrays or shapes


def torch_reference_model(cfg: BenchConfig):
  """The PyTorch mirror of ``make_model(cfg)`` (imports torch)."""
  import torch_models

  return torch_models.ProteomicsNet(cfg.features, cfg.num_classes, key_strength=cfg.key_strength,
                                    dropout=cfg.dropout, num_blocks=cfg.num_blocks)


@dataclasses.dataclass(frozen=True)
class Workload:
  """What every column trains: the run settings, the network and its initial variables, the key."""

  config: TrainConfig
  optimizer_name: str  # "adam" (the config's) or "sgd"
  model: Any
  task: Task
  variables: dict
  coords: jax.Array  # the secret key's coordinates: the round's context
  coords_host: np.ndarray  # a writable host copy (torch shares it on CPU)

  def client_optimizer(self) -> optax.GradientTransformation:
    if self.optimizer_name == "adam":
      return client_optimizer_from_config(self.config)
    # TrainConfig names no client optimizer (it is Adam, as the reference trains), so SGD clients are
    # this benchmark's one exception to the builder, with the same PyTorch-style weight decay. They
    # serve --client-optimizer sgd and the vmap/jit-loop check (see run_check).
    return optax.chain(optax.add_decayed_weights(self.config.weight_decay), optax.sgd(self.config.learning_rate))

  def local(self) -> LocalConfig:
    return LocalConfig(local_epochs=self.config.local_epochs, batch_size=self.config.batch_size,
                       prox_mu=self.config.prox_mu)

  def algorithm(self, client_chunk_size: int | None = None) -> FederatedAlgorithm:
    if self.optimizer_name == "adam":
      return algorithm_from_config(self.config, self.task, client_chunk_size=client_chunk_size)
    # The SGD exception (see client_optimizer): fedavg with the config's local work; elsewhere the
    # engine's defaults (FedAvg server, sample weights, every client), which are the preset's too.
    return fedavg(self.task, self.client_optimizer(), local_epochs=self.config.local_epochs,
                  batch_size=self.config.batch_size, client_chunk_size=client_chunk_size)

  def fresh_state(self) -> ServerState:
    return self.algorithm().init(self.variables, jax.random.key(self.config.seed + 1), key_version=1)


def build_workload(cfg: BenchConfig, compute_dtype: str = "float32") -> Workload:
  model = make_model(cfg, compute_dtype)
  coords_host = np.array(keylib.generate_key(cfg.seed).coords, np.float32)  # a copy: the key's is read-only
  return Workload(config=cfg.train_config(compute_dtype), optimizer_name=cfg.client_optimizer, model=model,
                  task=classification.classification_task(model), variables=init_variables(model, cfg),
                  coords=jnp.asarray(coords_host), coords_host=coords_host)


def synthetic_arrays(cfg: BenchConfig, num_clients: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """x [C, n, F] float32 ~ N(0, 1); y [C, n] int32 from a fixed random linear rule (so there is signal)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((num_clients, cfg.samples_per_client, cfg.features), dtype=np.float32)
  direction = np.random.default_rng(cfg.seed + 12345).standard_normal(cfg.features).astype(np.float32)
  scores = x @ direction
  edges = np.quantile(scores, np.linspace(0, 1, cfg.num_classes + 1)[1:-1])  # classes of equal size
  return x, np.digitize(scores, edges).astype(np.int32)


def client_data(x: np.ndarray, y: np.ndarray) -> ClientData:
  return stack_clients([{"x": x[c], "y": y[c]} for c in range(x.shape[0])], key_version=1)


# ------------------------------------------------------------------------------------------------
# Timed rounds, through the one round loop.


class TimedRounds(NamedTuple):
  state: Any  # after the last round
  seconds: list[float]  # of every round, the warm-up ones first
  last_metrics: dict  # the last round's


def timed_rounds(round_fn: Callable, state, clients, context, *, warmup_rounds: int, max_timed_rounds: int,
                 budget_s: float, sync: Callable[[Any], Any] = jax.block_until_ready) -> TimedRounds:
  """``run_rounds`` of ``round_fn``: ``warmup_rounds`` untimed rounds, then timed ones until
  ``max_timed_rounds``, or after at least one, until ``budget_s`` has passed since the warm-up.

  What a
  round's seconds include: ``run_rounds`` calls ``round_fn`` (dispatch and compute) and fetches the
  round's metrics with ``jax.device_get``, as in every real run; then ``extra_metrics`` here waits
  for the whole new state (``sync``) and reads the clock. A round is the time between two such
  readings, so it also holds run_rounds' bookkeeping of a row (microseconds, no checkpoints here),
  and the first round the loop's setup (why the jax columns leave it untimed, with the compile).
  """
  round_ends = [time.perf_counter()]

  def round_seconds(state, rounds_done: int) -> dict:
    sync(state)
    round_ends.append(time.perf_counter())
    return {"round_s": round_ends[-1] - round_ends[-2]}

  def budget_spent(state, rounds_done: int) -> bool:
    timed = len(round_ends) - 1 - warmup_rounds
    return timed >= 1 and round_ends[-1] - round_ends[warmup_rounds] >= budget_s

  result = run_rounds(round_fn, state, clients, context, rounds=int(state.round) + warmup_rounds + max_timed_rounds,
                      extra_metrics=round_seconds, should_stop=budget_spent)
  return TimedRounds(result.state, [row["round_s"] for row in result.history], result.history[-1])


# ------------------------------------------------------------------------------------------------
# The jit loop: the same math as the engine round, one client per call.


class JitLoop:
  """One jitted call per client (local training + adding its weighted update to the sums).

  Client i of a round trains with ``fold_in(round_keys(state).train, i)``, as in ``fedavg``'s round,
  so from the same state this loop and the vmapped round take the same steps; ``check`` in the
  JSON is the difference between their results. Like the preset, it averages over every client
  weighted by samples, and its server step is FedAvg's.
  """

  def __init__(self, work: Workload):
    task, optimizer, local = work.task, work.client_optimizer(), work.local()

    def train_and_accumulate(sums, params, model_state, data, num_samples, weight, train_rng, client_index,
                             context):
      rng = jax.random.fold_in(train_rng, client_index)
      new_params, new_state, loss = client_update(task, optimizer, local, params, model_state, data, num_samples,
                                                  rng, context)
      sum_delta, sum_state, sum_loss = sums
      sum_delta = jax.tree_util.tree_map(lambda acc, p, g: acc + weight * (p - g), sum_delta, new_params, params)
      sum_state = jax.tree_util.tree_map(lambda acc, s: acc + weight * s, sum_state, new_state)
      return sum_delta, sum_state, sum_loss + weight * loss

    def start_round(state: ServerState):
      zeros = lambda tree: jax.tree_util.tree_map(jnp.zeros_like, tree)
      return round_keys(state).train, (zeros(state.params), zeros(state.model_state), jnp.float32(0.0))

    def finish_round(state: ServerState, sums, total):
      sum_delta, sum_state, sum_loss = sums
      # FedAvg's server step (SGD, lr 1, on minus the mean update) is adding the mean update.
      params = jax.tree_util.tree_map(lambda p, d: p + d / total, state.params, sum_delta)
      model_state = jax.tree_util.tree_map(lambda s: s / total, sum_state)
      return state._replace(params=params, model_state=model_state, round=state.round + 1), sum_loss / total

    self.train_and_accumulate = jax.jit(train_and_accumulate, donate_argnums=(0,))
    self.start_round = jax.jit(start_round)
    self.finish_round = jax.jit(finish_round)

  def prepare(self, clients: ClientData):
    """Per-client device arrays, sliced once before timing."""
    count = clients.num_clients
    data = [jax.tree_util.tree_map(lambda x, c=c: x[c], clients.data) for c in range(count)]
    num_samples = [clients.num_samples[c] for c in range(count)]
    weights = [n.astype(jnp.float32) for n in num_samples]  # weighting="samples"
    indices = [jnp.int32(c) for c in range(count)]
    total = jnp.sum(clients.num_samples).astype(jnp.float32)
    prepared = (data, num_samples, weights, indices, total)
    jax.block_until_ready(prepared)
    return prepared

  def round(self, state: ServerState, prepared, coords) -> tuple[ServerState, dict]:
    """A round with the engine round's signature, ``prepared`` in place of the clients."""
    data, num_samples, weights, indices, total = prepared
    train_rng, sums = self.start_round(state)
    for c in range(len(data)):
      sums = self.train_and_accumulate(sums, state.params, state.model_state, data[c], num_samples[c], weights[c],
                                       train_rng, indices[c], coords)
    state, loss = self.finish_round(state, sums, total)
    return state, {"train_loss": loss}


# ------------------------------------------------------------------------------------------------
# The check: the jit loop computes the vmapped round.


def max_abs_difference(a, b) -> float:
  diffs = [float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))]
  return max(diffs, default=0.0)


def check_same_round(vmap_round, loop: JitLoop, state, clients, coords) -> dict:
  """One round from the same state by both: the parameters must agree."""
  vmap_state, _ = vmap_round(state, clients, coords)
  loop_state, _ = loop.round(state, loop.prepare(clients), coords)
  params_diff = max_abs_difference(vmap_state.params, loop_state.params)
  state_diff = max_abs_difference(vmap_state.model_state, loop_state.model_state)
  largest = lambda tree: max((float(jnp.max(jnp.abs(x))) for x in jax.tree_util.tree_leaves(tree)), default=0.0)
  params_scale, state_scale = max(1.0, largest(vmap_state.params)), max(1.0, largest(vmap_state.model_state))
  # Relative to the largest value: BatchNorm variances can be large. Accelerators may run float32
  # matmuls in TF32, where batched and single dots round differently.
  tolerance = 1e-4 if jax.default_backend() == "cpu" else 5e-3
  return {
      "clients": clients.num_clients,
      "max_abs_diff_params": params_diff,
      "max_abs_diff_model_state": state_diff,
      "max_rel_diff_params": params_diff / params_scale,
      "max_rel_diff_model_state": state_diff / state_scale,
      "max_abs_param_change_in_round": max_abs_difference(vmap_state.params, state.params),
      "relative_tolerance": tolerance,
      "allclose": bool(params_diff / params_scale <= tolerance and state_diff / state_scale <= tolerance),
  }


def run_check(work: Workload, loop: JitLoop, compiled, clients: ClientData) -> dict:
  """The vmap/jit-loop agreement, with plain SGD as the client optimizer.

  Adam's first steps move each weight by about lr * g / (|g| + eps), so a gradient near zero turns
  summation-order roundoff into differences of order lr; with SGD the two paths must agree to
  roundoff, which is what guards the benchmark's "same math" claim. With SGD clients already, the
  timed round (``compiled``) and ``loop`` are reused.
  """
  if work.optimizer_name == "sgd" and compiled is not None:
    vmap_round = compiled
  else:
    work = dataclasses.replace(work, optimizer_name="sgd")
    loop, vmap_round = JitLoop(work), jax.jit(work.algorithm().round)
  return {"client_optimizer": "sgd", **check_same_round(vmap_round, loop, work.fresh_state(), clients, work.coords)}


# ------------------------------------------------------------------------------------------------
# The large round: many clients in chunks scanned inside the jitted round.


def large_round(cfg: BenchConfig, work: Workload) -> dict:
  count, chunk = cfg.large_clients, cfg.large_chunk
  result: dict[str, Any] = {"clients": count, "client_chunk_size": chunk, "success": False,
                            "data_bytes": count * cfg.samples_per_client * (cfg.features * 4 + 4),
                            "memory_before": harness.device_memory()}
  # Generated on the device, per client (stack_clients would hold two host copies of the whole set).
  shape = (cfg.samples_per_client,)

  @jax.jit
  def generate(rngs):
    def one(rng):
      x_rng, y_rng = jax.random.split(rng)
      return (jax.random.normal(x_rng, shape + (cfg.features,), jnp.float32),
              jax.random.randint(y_rng, shape, 0, cfg.num_classes, jnp.int32))
    return jax.vmap(one)(rngs)

  x, y = generate(jax.random.split(jax.random.key(cfg.seed + 7), count))
  clients = ClientData(data={"x": x, "y": y}, num_samples=jnp.full((count,), cfg.samples_per_client, jnp.int32),
                       key_version=jnp.ones((count,), jnp.int32))
  jax.block_until_ready(clients)
  algorithm = work.algorithm(client_chunk_size=chunk)
  state = work.fresh_state()
  t0 = time.perf_counter()
  compiled = jax.jit(algorithm.round).lower(state, clients, work.coords).compile()
  result["compile_s"] = time.perf_counter() - t0
  result["compiled_memory"] = harness.memory_analysis(compiled)
  rounds = timed_rounds(compiled, state, clients, work.coords, warmup_rounds=0, max_timed_rounds=1, budget_s=math.inf)
  result["round_s"], result["train_loss"] = rounds.seconds[0], rounds.last_metrics["train_loss"]
  leaves = jax.tree_util.tree_leaves(rounds.state.params)
  result["params_finite"] = bool(all(bool(jnp.all(jnp.isfinite(p))) for p in leaves))
  result["memory_after"] = harness.device_memory()
  result["success"] = result["params_finite"]
  return result
