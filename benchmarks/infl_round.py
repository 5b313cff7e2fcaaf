"""Benchmark: one INFL round of the reference proteomics model, three ways, side by side.

    PYTHONPATH=. python benchmarks/infl_round.py --out infl_round.json          # accelerator sizes
    PYTHONPATH=. python benchmarks/infl_round.py --small --out /tmp/small.json  # CPU smoke run, ~1 minute

Columns (one process, one machine, the same synthetic data and settings):
  vmap        our round: ``jax.jit(fedavg(...).round)``, clients vmapped, data on device (ClientData).
  jit_loop    ``jax.jit`` of one client's ``client_update`` (plus adding its weighted update to the
              running sums) called in a Python loop over clients, then the weighted average.
  torch_loop  a PyTorch module of the same structure and work, trained the way the reference
              implementation does it: per client load the global state_dict, a new Adam, local
              epochs of minibatches, collect state_dicts, weighted average.
  vmap_bf16   our round with bfloat16 compute (where make_proteomics_net offers ``dtype``).
Then one round with many clients (default 10,000) in client chunks, for time and peak memory.

Prints one JSON object on stdout (progress goes to stderr) and writes it to ``--out`` after every
section, so a run cut short still leaves what it measured. No section can stop the others: each
records its error string and the script goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import inspect
import json
import math
import os
import pathlib
import platform
import signal
import statistics
import sys
import time
import traceback
from typing import Any, Sequence

# Allocate device memory as it is needed, so the peak-memory figure means something and the
# PyTorch reference can share the accelerator; a caller's own setting wins.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"
if __name__ == "__main__" and "--small" in sys.argv and "--no-fast-compile" not in sys.argv:
  # --small is a smoke run on a few shared CPU cores, where LLVM's optimisation of the keyed
  # round takes most of the run; set here because XLA reads its flags when the backend starts.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE_FLAG).strip()

if __name__ == "__main__":  # run as a file: make the repository's packages importable without PYTHONPATH
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from infl_jax import keys as keylib  # noqa: E402
from infl_jax import models  # noqa: E402
from infl_jax.config import PRESETS  # noqa: E402
from infl_jax.federated import (ClientData, LocalConfig, ServerState, client_update, fedavg, round_keys,  # noqa: E402
                                stack_clients)
from infl_jax.tasks.classification import classification_task  # noqa: E402

PROTEOMICS = PRESETS["proteomics"]
PROTEOMICS_FEATURES = 5207  # SomaScan proteins of the built-in proteomics cohort (DESIGN.md section 3)
NO_TORCH_ENV = "INFL_BENCH_NO_TORCH"


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  clients: tuple[int, ...] = (8, 64, 512)
  samples_per_client: int = 32
  features: int = PROTEOMICS_FEATURES
  num_classes: int = 2
  key_strength: float = PROTEOMICS["key_strength"]
  local_epochs: int = PROTEOMICS["local_epochs"]
  batch_size: int = PROTEOMICS["batch_size"]
  learning_rate: float = PROTEOMICS["learning_rate"]
  weight_decay: float = PROTEOMICS["weight_decay"]
  dropout: float = PROTEOMICS["dropout"]
  num_blocks: int = 2  # residual blocks of the proteomics network (the reference has 2)
  client_optimizer: str = "adam"  # "adam" (the reference) or "sgd"
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


# A smoke run for a few CPU cores: compiling the keyed round dominates it, hence one residual block.
SMALL = dict(clients=(2, 4), features=64, num_blocks=1, local_epochs=2, repeats=3, loop_rounds=2,
             section_budget_s=10.0, torch_budget_s=20.0, time_limit_s=120.0, large_clients=12, large_chunk=5,
             bf16_clients=())


_START = time.perf_counter()


def log(message: str) -> None:
  print(f"[infl_round {time.perf_counter() - _START:6.1f}s] {message}", file=sys.stderr, flush=True)


def error_string(error: BaseException) -> str:
  return f"{type(error).__name__}: {error}"[:2000]


def is_out_of_memory(error: BaseException) -> bool:
  text = str(error).lower()
  return "resource_exhausted" in text or "out of memory" in text or "oom" in type(error).__name__.lower()


def median_rate(times: Sequence[float]) -> dict:
  seconds = statistics.median(times)
  return {"seconds_per_round": seconds, "rounds_per_s": 1.0 / seconds, "times_s": list(times)}


# ------------------------------------------------------------------------------------------------
# The workload: model, task, optimizer, key and synthetic client data of the proteomics shape.


@dataclasses.dataclass
class Workload:
  model: Any
  task: Any
  optimizer: Any
  local: LocalConfig
  variables: dict
  coords: jax.Array
  coords_np: np.ndarray


CLIENT_OPTIMIZERS = ("adam", "sgd")


def client_optimizer(name: str, cfg: BenchConfig):
  # As infl_jax.train.create_client_optimizer: PyTorch-style weight decay (L2 added to the gradient).
  if name == "adam":
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay), optax.adam(cfg.learning_rate))
  if name == "sgd":
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay), optax.sgd(cfg.learning_rate))
  raise ValueError(f"client optimizer must be one of {CLIENT_OPTIMIZERS}, got {name!r}")


def supports_compute_dtype() -> bool:
  return "dtype" in inspect.signature(models.make_proteomics_net).parameters


def make_model(cfg: BenchConfig, dtype: str | None = None):
  """``dtype="bfloat16"``: mixed precision, where make_proteomics_net offers it (float32 master weights)."""
  extra = {} if dtype is None else {"dtype": dtype}
  return models.make_proteomics_net(cfg.num_classes, key_strength=cfg.key_strength, dropout_rate=cfg.dropout,
                                    num_blocks=cfg.num_blocks, **extra)


def init_variables(model, cfg: BenchConfig, *, abstract: bool = False):
  """The model's variables (jitted: eager init dispatches hundreds of small ops); shapes only if ``abstract``."""
  def init(rng):
    return model.init({"params": rng, "dropout": rng}, jnp.zeros((2, cfg.features), jnp.float32),
                      key_coords=None, train=False)

  rng = jax.random.key(cfg.seed)
  return jax.eval_shape(init, rng) if abstract else jax.device_get(jax.jit(init)(rng))


def build_workload(cfg: BenchConfig, optimizer_name: str | None = None, dtype: str | None = None,
                   variables=None) -> Workload:
  """``variables``: reuse these (of the same model) instead of initialising again."""
  model = make_model(cfg, dtype)
  if variables is None:
    variables = init_variables(model, cfg)
  coords_np = np.array(keylib.generate_key(cfg.seed).coords, np.float32)  # writable: torch shares it on CPU
  optimizer = client_optimizer(optimizer_name or cfg.client_optimizer, cfg)
  return Workload(model=model, task=classification_task(model), optimizer=optimizer,
                  local=LocalConfig(local_epochs=cfg.local_epochs, batch_size=cfg.batch_size),
                  variables=variables, coords=jnp.asarray(coords_np), coords_np=coords_np)


def synthetic_arrays(cfg: BenchConfig, num_clients: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """x [C, n, F] float32 ~ N(0, 1); y [C, n] int32 from a fixed random linear rule (so there is signal)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((num_clients, cfg.samples_per_client, cfg.features), dtype=np.float32)
  direction = np.random.default_rng(cfg.seed + 12345).standard_normal(cfg.features).astype(np.float32)
  scores = x @ direction
  if cfg.num_classes == 2:
    y = (scores > 0).astype(np.int32)
  else:
    edges = np.quantile(scores, np.linspace(0, 1, cfg.num_classes + 1)[1:-1])
    y = np.digitize(scores, edges).astype(np.int32)
  return x, y


def client_data(x: np.ndarray, y: np.ndarray) -> ClientData:
  return stack_clients([{"x": x[c], "y": y[c]} for c in range(x.shape[0])], key_version=1)


def fresh_state(cfg: BenchConfig, algo, work: Workload) -> ServerState:
  return algo.init(work.variables, jax.random.key(cfg.seed + 1), key_version=1)


def param_count(tree) -> int:
  return int(sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))  # arrays or shapes


# ------------------------------------------------------------------------------------------------
# (i) our round: the vmapped, jitted engine round.


def compile_round(algo, state, clients, coords):
  t0 = time.perf_counter()
  compiled = jax.jit(algo.round).lower(state, clients, coords).compile()
  return compiled, time.perf_counter() - t0


def memory_analysis(compiled) -> dict | None:
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend reports it
    return None
  if analysis is None:
    return None
  names = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "generated_code_size_in_bytes")
  return {name: int(getattr(analysis, name)) for name in names if hasattr(analysis, name)}


def timed_rounds(round_fn, state, max_rounds: int, budget_s: float):
  """One untimed round, then up to ``max_rounds`` timed ones within ``budget_s`` (at least one).

  Returns (seconds of the first round, the timed rounds' seconds, the last round's second output)."""
  t0 = time.perf_counter()
  state, out = round_fn(state)
  jax.block_until_ready(state)
  first_round_s = time.perf_counter() - t0
  times = []
  section_start = time.perf_counter()
  while len(times) < max_rounds and (not times or time.perf_counter() - section_start < budget_s):
    t0 = time.perf_counter()
    state, out = round_fn(state)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
  return first_round_s, times, out


def time_vmap_round(cfg: BenchConfig, compiled, compile_s: float, state, clients, coords) -> dict:
  first_round_s, times, metrics = timed_rounds(lambda s: compiled(s, clients, coords), state, cfg.repeats,
                                               cfg.section_budget_s)
  return {"compile_s": compile_s, "first_round_s": first_round_s, **median_rate(times),
          "train_loss_last_round": float(metrics["train_loss"])}


# ------------------------------------------------------------------------------------------------
# (ii) a JAX jit loop over clients: the same math as the engine round, one client per call.


class JitLoop:
  """One jitted call per client (local training + adding its weighted update to the sums).

  Client i of a round trains with ``fold_in(round_keys(state).train, i)``, as in ``fedavg``'s
  round, so from the same state this loop and the vmapped round take the same steps; ``check`` in the JSON is the difference between their results.
  """

  def __init__(self, work: Workload):
    task, optimizer, local = work.task, work.optimizer, work.local

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
      train_rng = round_keys(state).train
      zeros = lambda tree: jax.tree_util.tree_map(jnp.zeros_like, tree)
      return train_rng, (zeros(state.params), zeros(state.model_state), jnp.float32(0.0))

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

  def round(self, state: ServerState, prepared, coords):
    data, num_samples, weights, indices, total = prepared
    train_rng, sums = self.start_round(state)
    for c in range(len(data)):
      sums = self.train_and_accumulate(sums, state.params, state.model_state, data[c], num_samples[c], weights[c],
                                       train_rng, indices[c], coords)
    return self.finish_round(state, sums, total)


def time_jit_loop(cfg: BenchConfig, loop: JitLoop, state, clients, coords) -> dict:
  prepared = loop.prepare(clients)
  first_round_s, times, loss = timed_rounds(lambda s: loop.round(s, prepared, coords), state, cfg.loop_rounds,
                                            cfg.section_budget_s)
  return {"first_round_s (includes compile)": first_round_s, **median_rate(times),
          "train_loss_last_round": float(loss)}


def max_abs_difference(a, b) -> float:
  diffs = [float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))]
  return max(diffs, default=0.0)


def check_same_round(vmap_round, loop: JitLoop, state, clients, coords) -> dict:
  """One round from the same state by (i) and (ii): the parameters must agree."""
  vmap_state, _ = vmap_round(state, clients, coords)
  loop_state, _ = loop.round(state, loop.prepare(clients), coords)
  params_diff = max_abs_difference(vmap_state.params, loop_state.params)
  state_diff = max_abs_difference(vmap_state.model_state, loop_state.model_state)
  moved = max_abs_difference(vmap_state.params, state.params)
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
      "max_abs_param_change_in_round": moved,
      "relative_tolerance": tolerance,
      "allclose": bool(params_diff / params_scale <= tolerance and state_diff / state_scale <= tolerance),
  }


def run_check(cfg: BenchConfig, work: Workload, algo, loop: JitLoop, compiled, clients: ClientData) -> dict:
  """The vmap/jit-loop agreement, with plain SGD as the client optimizer.

  Adam's first steps move each weight by about lr * g / (|g| + eps), so a gradient near zero turns
  summation-order roundoff into differences of order lr; with SGD the two paths must agree to
  roundoff, which is what guards the benchmark's "same math" claim.
  """
  if cfg.client_optimizer == "sgd" and compiled is not None:
    sgd_work, sgd_algo, sgd_loop, vmap_round = work, algo, loop, compiled
  else:
    sgd_work = build_workload(cfg, "sgd", variables=work.variables)
    sgd_algo = fedavg(sgd_work.task, sgd_work.optimizer, local_epochs=cfg.local_epochs, batch_size=cfg.batch_size)
    sgd_loop, vmap_round = JitLoop(sgd_work), jax.jit(sgd_algo.round)
  result = check_same_round(vmap_round, sgd_loop, fresh_state(cfg, sgd_algo, sgd_work), clients, sgd_work.coords)
  return {"client_optimizer": "sgd", **result}


# ------------------------------------------------------------------------------------------------
# (iii) the PyTorch loop over clients, mirroring the reference implementation. torch is imported
# here only, so everything else runs where it is missing.


def torch_reference_model(torch, cfg: BenchConfig):
  """The keyed proteomics network in PyTorch: same layers, sizes and work as ours (DESIGN.md section 2)."""
  from infl_jax.keyed.dense import KEY_HIDDEN
  from infl_jax.keyed.encoder import COORD_DIM, ENCODER_HIDDEN, KEY_DIM
  from infl_jax.keyed.film import FILM_HIDDEN

  nn, F = torch.nn, torch.nn.functional
  lam = cfg.key_strength

  def small_output_layer(fan_in, fan_out):
    layer = nn.Linear(fan_in, fan_out)
    nn.init.normal_(layer.weight, std=0.02)
    nn.init.zeros_(layer.bias)
    return layer

  class KeyEncoder(nn.Module):
    def __init__(self):
      super().__init__()
      self.W1, self.W2 = nn.Linear(COORD_DIM, ENCODER_HIDDEN), nn.Linear(ENCODER_HIDDEN, KEY_DIM)
      self.norm = nn.LayerNorm(KEY_DIM)

    def forward(self, coords):
      return self.norm(F.silu(self.W2(F.silu(self.W1(coords))))).mean(0)

  class FiLM(nn.Module):
    def __init__(self, features):
      super().__init__()
      self.A, self.norm = nn.Linear(features, KEY_DIM), nn.LayerNorm(KEY_DIM)
      self.F1, self.F2 = nn.Linear(3 * KEY_DIM, FILM_HIDDEN), small_output_layer(FILM_HIDDEN, 2 * features)

    def forward(self, h, k):
      a = self.norm(F.silu(self.A(h)))
      k = k.expand_as(a)
      gamma, beta = self.F2(F.silu(self.F1(torch.cat([a, k, a * k], -1)))).chunk(2, -1)
      return h * (1 + lam * torch.tanh(gamma)) + lam * torch.tanh(beta)

  class KeyedLinear(nn.Module):
    """The reference keyed layer: W_eff = diag(1 + lam tanh s) W, b_eff = b + lam tanh t, then FiLM."""

    def __init__(self, fan_in, fan_out, film=True):
      super().__init__()
      self.linear = nn.Linear(fan_in, fan_out)
      self.V1, self.norm = nn.Linear(KEY_DIM, KEY_HIDDEN), nn.LayerNorm(KEY_HIDDEN)
      self.V2 = small_output_layer(KEY_HIDDEN, 2 * fan_out)
      self.film = FiLM(fan_out) if film else None

    def forward(self, x, k):
      s, t = self.V2(self.norm(F.silu(self.V1(k)))).chunk(2, -1)
      weight = self.linear.weight * (1 + lam * torch.tanh(s))[:, None]
      y = F.linear(x, weight, self.linear.bias + lam * torch.tanh(t))
      return self.film(y, k) if self.film is not None else y

  def batch_norm(features):  # PyTorch defaults = our BATCH_NORM_MOMENTUM/EPSILON
    return nn.BatchNorm1d(features, eps=models.BATCH_NORM_EPSILON, momentum=1 - models.BATCH_NORM_MOMENTUM)

  class ResidualBlock(nn.Module):
    def __init__(self, features):
      super().__init__()
      self.dense_0, self.bn_0 = KeyedLinear(features, features), batch_norm(features)
      self.dense_1, self.bn_out = KeyedLinear(features, features), batch_norm(features)
      self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, h, k):
      y = self.dropout(F.relu(self.bn_0(self.dense_0(h, k))))
      return F.relu(self.bn_out(h + self.dense_1(y, k)))

  class ProteomicsNet(nn.Module):
    def __init__(self, hidden=64, bottleneck=32, num_blocks=2):
      super().__init__()
      self.key_encoder = KeyEncoder()
      self.embed = KeyedLinear(cfg.features, hidden)
      self.blocks = nn.ModuleList([ResidualBlock(hidden) for _ in range(num_blocks)])
      self.bottleneck = KeyedLinear(hidden, bottleneck)
      self.head = KeyedLinear(bottleneck, cfg.num_classes, film=False)
      self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, coords):
      k = self.key_encoder(coords)
      h = self.embed(x, k)
      for block in self.blocks:
        h = block(h, k)
      return self.head(self.dropout(F.relu(self.bottleneck(h, k))), k)

  return ProteomicsNet(num_blocks=cfg.num_blocks)


class TorchLoop:
  def __init__(self, torch, cfg: BenchConfig, coords_np: np.ndarray):
    self.torch, self.cfg = torch, cfg
    self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if self.device.type == "cpu":
      # Minibatches of 32 gain nothing from intra-op threads, and on shared cores OpenMP's
      # spinning made the timings swing 10x from run to run.
      torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    self.global_model = torch_reference_model(torch, cfg).to(self.device)
    self.local_model = torch_reference_model(torch, cfg).to(self.device)
    self.coords = torch.as_tensor(coords_np, device=self.device)

  def synchronize(self):
    if self.device.type == "cuda":
      self.torch.cuda.synchronize()

  def prepare(self, x: np.ndarray, y: np.ndarray):
    """Per-client tensors on the device before timing (the reference keeps them on the host)."""
    xs = [self.torch.as_tensor(x[c], device=self.device) for c in range(x.shape[0])]
    ys = [self.torch.as_tensor(y[c], device=self.device, dtype=self.torch.long) for c in range(y.shape[0])]
    self.synchronize()
    return xs, ys

  def local_training(self, global_state, x, y):
    torch, cfg, model = self.torch, self.cfg, self.local_model
    model.load_state_dict(global_state)
    optimizer_class = torch.optim.Adam if cfg.client_optimizer == "adam" else torch.optim.SGD
    optimizer = optimizer_class(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    model.train()
    n = x.shape[0]
    batch = min(cfg.batch_size, n)
    for _ in range(cfg.local_epochs):
      order = torch.randperm(n, device=self.device)
      for start in range(0, n, batch):
        rows = order[start:start + batch]
        if rows.numel() < 2:  # BatchNorm cannot train on one sample
          continue
        loss = torch.nn.functional.cross_entropy(model(x[rows], self.coords), y[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return {name: value.detach().clone() for name, value in model.state_dict().items()}

  def round(self, xs, ys, num_clients: int | None = None):
    """One round over the first ``num_clients`` clients (all by default): train, then weighted average."""
    torch = self.torch
    global_state = {name: value.clone() for name, value in self.global_model.state_dict().items()}
    count = len(xs) if num_clients is None else num_clients
    collected, sizes = [], []
    for c in range(count):
      collected.append(self.local_training(global_state, xs[c], ys[c]))
      sizes.append(xs[c].shape[0])
    weights = torch.tensor(sizes, dtype=torch.float32, device=self.device)
    weights = weights / weights.sum()
    averaged = {}
    for name, value in global_state.items():
      if value.is_floating_point():
        stacked = torch.stack([state[name] for state in collected])
        averaged[name] = (stacked * weights.view(-1, *([1] * value.dim()))).sum(0)
      else:  # BatchNorm's num_batches_tracked
        averaged[name] = collected[0][name]
    self.global_model.load_state_dict(averaged)


def time_torch_loop(cfg: BenchConfig, loop: TorchLoop, x, y, budget_s: float) -> dict:
  xs, ys = loop.prepare(x, y)
  num_clients = len(xs)
  rounds = 1 if num_clients >= cfg.torch_single_round_from else cfg.loop_rounds
  # Warm-up on one client (CUDA context, kernels, allocator), not timed.
  loop.synchronize()
  t0 = time.perf_counter()
  loop.round(xs[:1], ys[:1])
  loop.synchronize()
  per_client_estimate = time.perf_counter() - t0
  times, result = [], {}
  section_start = time.perf_counter()
  if per_client_estimate * num_clients > budget_s:
    # A full round would overrun the budget: time the first clients of a round and scale up.
    timed_clients = max(1, min(num_clients, int(budget_s / max(per_client_estimate, 1e-9))))
    loop.synchronize()
    t0 = time.perf_counter()
    loop.round(xs, ys, num_clients=timed_clients)
    loop.synchronize()
    times.append((time.perf_counter() - t0) * num_clients / timed_clients)
    result["extrapolated_from_clients"] = timed_clients
  else:
    while len(times) < rounds and (not times or time.perf_counter() - section_start < budget_s):
      loop.synchronize()
      t0 = time.perf_counter()
      loop.round(xs, ys)
      loop.synchronize()
      times.append(time.perf_counter() - t0)
  return {"warmup_one_client_s": per_client_estimate, **median_rate(times), **result}


# ------------------------------------------------------------------------------------------------
# The large round: many clients in chunks scanned inside the jitted round.


def device_memory() -> dict | None:
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # noqa: BLE001 - CPU backends have none
    return None
  if not stats:
    return None
  keys = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
  return {k: int(stats[k]) for k in keys if k in stats}


def large_round(cfg: BenchConfig, work: Workload) -> dict:
  count, chunk = cfg.large_clients, cfg.large_chunk
  result: dict[str, Any] = {"clients": count, "client_chunk_size": chunk, "success": False,
                            "data_bytes": count * cfg.samples_per_client * (cfg.features * 4 + 4),
                            "memory_before": device_memory()}
  # Generated on the device, per client (stack_clients would hold two host copies of the whole set).
  client_rngs = jax.random.split(jax.random.key(cfg.seed + 7), count)
  shape = (cfg.samples_per_client,)

  @jax.jit
  def generate(rngs):
    def one(rng):
      x_rng, y_rng = jax.random.split(rng)
      return (jax.random.normal(x_rng, shape + (cfg.features,), jnp.float32),
              jax.random.randint(y_rng, shape, 0, cfg.num_classes, jnp.int32))
    return jax.vmap(one)(rngs)

  x, y = generate(client_rngs)
  clients = ClientData(data={"x": x, "y": y}, num_samples=jnp.full((count,), cfg.samples_per_client, jnp.int32),
                       key_version=jnp.ones((count,), jnp.int32))
  jax.block_until_ready(clients)
  algo = fedavg(work.task, work.optimizer, local_epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                client_chunk_size=chunk)
  state = fresh_state(cfg, algo, work)
  compiled, result["compile_s"] = compile_round(algo, state, clients, work.coords)
  result["compiled_memory"] = memory_analysis(compiled)
  t0 = time.perf_counter()
  state, metrics = compiled(state, clients, work.coords)
  jax.block_until_ready(state)
  result["round_s"] = time.perf_counter() - t0
  result["train_loss"] = float(metrics["train_loss"])
  result["params_finite"] = bool(all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree_util.tree_leaves(state.params)))
  result["memory_after"] = device_memory()
  result["success"] = result["params_finite"]
  return result


# ------------------------------------------------------------------------------------------------
# Driver.


def environment() -> dict:
  device = jax.devices()[0]
  env = {
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jax_backend": jax.default_backend(),
      "jax_device_kind": device.device_kind,
      "jax_device_count": jax.device_count(),
      "host": platform.processor() or platform.machine(),
      "xla_python_client_preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "jax_default_matmul_precision": str(getattr(jax.config, "jax_default_matmul_precision", "unknown")),
      "optax": getattr(optax, "__version__", "unknown"),
  }
  try:
    import flax

    env["flax"] = flax.__version__
  except Exception:  # noqa: BLE001 - a version string is not worth a failed run
    pass
  return env


def parse_args(argv: Sequence[str] | None) -> tuple[BenchConfig, argparse.Namespace]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", type=pathlib.Path, help="also write the JSON here (after every section)")
  parser.add_argument("--small", action="store_true", help="CPU-sized run (2 and 4 clients, 64 features, ...)")
  parser.add_argument("--no-torch", action="store_true", help=f"skip the PyTorch loop (or set {NO_TORCH_ENV}=1)")
  parser.add_argument("--clients", type=str, help="client counts, comma-separated (default 8,64,512)")
  parser.add_argument("--samples-per-client", type=int)
  parser.add_argument("--features", type=int)
  parser.add_argument("--local-epochs", type=int)
  parser.add_argument("--batch-size", type=int)
  parser.add_argument("--repeats", type=int, help="timed rounds of our vmapped round")
  parser.add_argument("--loop-rounds", type=int, help="timed rounds, at most, of the jit and torch loops")
  parser.add_argument("--section-budget-s", type=float)
  parser.add_argument("--torch-budget-s", type=float)
  parser.add_argument("--time-limit-s", type=float)
  parser.add_argument("--large-clients", type=int, help="clients of the large round (0 skips it)")
  parser.add_argument("--large-chunk", type=int, help="client_chunk_size of the large round")
  parser.add_argument("--num-blocks", type=int, help="residual blocks of the network (reference: 2)")
  parser.add_argument("--client-optimizer", choices=CLIENT_OPTIMIZERS, help="adam (reference) or sgd")
  parser.add_argument("--no-fast-compile", action="store_true",
                      help=f"with --small, keep XLA's optimisation level (--small otherwise adds {FAST_COMPILE_FLAG})")
  parser.add_argument("--bf16-clients", type=str,
                      help="client counts that also time our round in bfloat16 (default 64; '' for none)")
  parser.add_argument("--seed", type=int)
  args = parser.parse_args(argv)

  values = dict(SMALL) if args.small else {}
  for name in ("samples_per_client", "features", "local_epochs", "batch_size", "repeats", "loop_rounds",
               "section_budget_s", "torch_budget_s", "time_limit_s", "large_clients", "large_chunk", "seed",
               "num_blocks", "client_optimizer"):
    if getattr(args, name) is not None:
      values[name] = getattr(args, name)
  for flag in ("clients", "bf16_clients"):
    text = getattr(args, flag)
    if text is None:
      continue
    try:
      values[flag] = tuple(int(c) for c in text.split(",") if c.strip())
    except ValueError:
      parser.error(f"--{flag.replace('_', '-')} takes comma-separated integers such as 8,64,512, got {text!r}")
  values["use_torch"] = not (args.no_torch or os.environ.get(NO_TORCH_ENV, "") not in ("", "0"))
  cfg = BenchConfig(**values)
  positive = {"samples_per_client": cfg.samples_per_client, "features": cfg.features,
              "local_epochs": cfg.local_epochs, "batch_size": cfg.batch_size, "repeats": cfg.repeats,
              "loop_rounds": cfg.loop_rounds, "large_chunk": cfg.large_chunk}
  for name, value in positive.items():
    if value < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
  if cfg.num_blocks < 0:
    parser.error(f"--num-blocks must be >= 0, got {cfg.num_blocks}")
  if not cfg.clients or min(cfg.clients) < 1:
    parser.error(f"--clients needs at least one count, each >= 1, got {args.clients!r}")
  if cfg.large_clients < 0:
    parser.error(f"--large-clients must be >= 0 (0 skips the large round), got {cfg.large_clients}")
  return cfg, args


class Report:
  """The JSON being built; written to ``--out`` after every section."""

  def __init__(self, cfg: BenchConfig, out: pathlib.Path | None):
    self.out = out
    self.start = time.perf_counter()
    self.data: dict[str, Any] = {
        "benchmark": "infl_round",
        "workload": ("one FedAvg round of the keyed reference proteomics network (make_proteomics_net: "
                     f"{cfg.features} inputs, key strength {cfg.key_strength}, {cfg.num_blocks} residual blocks), "
                     f"{cfg.client_optimizer} lr {cfg.learning_rate} "
                     f"wd {cfg.weight_decay}, {cfg.local_epochs} local epochs, batch {cfg.batch_size}, "
                     f"{cfg.samples_per_client} samples per client, sample-weighted average"),
        "synthetic_data": True,
        "data_note": ("synthetic float32 N(0,1) features of the proteomics shape and binary labels from a "
                      "random linear rule; speed does not depend on the values"),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()},
        "errors": [],
    }

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def error(self, where: str, error: BaseException) -> str:
    text = error_string(error)
    self.data["errors"].append({"section": where, "error": text})
    log(f"{where} failed: {text}")
    traceback.print_exc(file=sys.stderr)
    return text

  def save(self) -> None:
    self.data["total_seconds"] = self.elapsed()
    if self.out is not None:
      try:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.out)
      except OSError as e:
        log(f"could not write {self.out}: {e}")


def ratio(numerator: dict | None, denominator: dict | None) -> float | None:
  try:
    return numerator["rounds_per_s"] / denominator["rounds_per_s"]
  except (KeyError, TypeError, ZeroDivisionError):
    return None


def summarise(report: Report, cfg: BenchConfig) -> None:
  table = []
  for count in cfg.clients:
    row = report.data.get("results", {}).get(str(count), {})
    vmap, jit_loop, torch_loop = row.get("vmap"), row.get("jit_loop"), row.get("torch_loop")
    rate = lambda r: r.get("rounds_per_s") if isinstance(r, dict) else None
    row["ratio_vmap_over_torch"] = ratio(vmap, torch_loop)
    row["ratio_vmap_over_jit_loop"] = ratio(vmap, jit_loop)
    line = {"clients": count, "vmap_rounds_per_s": rate(vmap), "jit_loop_rounds_per_s": rate(jit_loop),
            "torch_loop_rounds_per_s": rate(torch_loop), "ratio_vmap_over_torch": row["ratio_vmap_over_torch"],
            "ratio_vmap_over_jit_loop": row["ratio_vmap_over_jit_loop"]}
    if "vmap_bf16" in row:
      row["ratio_vmap_bf16_over_torch"] = ratio(row["vmap_bf16"], torch_loop)
      line.update(vmap_bf16_rounds_per_s=rate(row["vmap_bf16"]),
                  ratio_vmap_bf16_over_torch=row["ratio_vmap_bf16_over_torch"])
    table.append(line)
  report.data["table"] = table


def run(cfg: BenchConfig, report: Report) -> None:
  data = report.data
  data["environment"] = environment()
  log(f"device: {data['environment']['jax_device_kind']} ({data['environment']['jax_backend']})")
  work = build_workload(cfg)
  data["model"] = {"jax_param_count": param_count(work.variables["params"]),
                   "jax_model_state_count": param_count({k: v for k, v in work.variables.items() if k != "params"})}
  algo = fedavg(work.task, work.optimizer, local_epochs=cfg.local_epochs, batch_size=cfg.batch_size)
  loop = JitLoop(work)
  data["results"] = {str(c): {} for c in cfg.clients}
  arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # host copies, for the torch loop and the check
  first_compiled = None
  for count in cfg.clients:
    try:
      arrays[count] = synthetic_arrays(cfg, count, cfg.seed + count)
    except Exception as e:  # noqa: BLE001
      data["results"][str(count)]["data_error"] = report.error(f"data {count}", e)
      continue
    compiled = jax_columns(cfg, report, work, algo, loop, count, client_data(*arrays[count]))
    if count == cfg.clients[0]:
      first_compiled = compiled  # reused by the check when the clients use SGD
    del compiled
    gc.collect()

  # Then by priority, so that the time limit sheds the extras: the torch loop (its own budget),
  # the large round (one compile, one round), the bf16 column, and the check (tested on CPU too;
  # with Adam clients it compiles a round and a loop of its own, see run_check).
  torch_section(cfg, report, work, arrays)
  summarise(report, cfg)
  report.save()
  large_round_section(cfg, report, work)
  gc.collect()
  for count in cfg.bf16_clients:
    if count in arrays:
      entry = data["results"][str(count)]
      entry["vmap_bf16"] = ({"skipped": "time limit"} if over_time(cfg, report, f"vmap_bf16 {count}")
                            else time_bf16_round(cfg, report, count, client_data(*arrays[count])))
  summarise(report, cfg)
  check_section(cfg, report, work, algo, loop, first_compiled, arrays)


def over_time(cfg: BenchConfig, report: Report, section: str) -> bool:
  if report.elapsed() > cfg.time_limit_s:
    log(f"{section}: skipped, the time limit ({cfg.time_limit_s} s) is spent")
    return True
  return False


def jax_columns(cfg: BenchConfig, report: Report, work: Workload, algo, loop: JitLoop, count: int,
                clients: ClientData):
  """vmap and jit_loop at one client count; returns the compiled vmapped round or None."""
  entry = report.data["results"][str(count)]
  compiled = None
  if over_time(cfg, report, f"vmap {count}"):
    entry["vmap"] = {"skipped": "time limit"}
  else:
    log(f"vmap: {count} clients")
    try:
      compiled, compile_s = compile_round(algo, fresh_state(cfg, algo, work), clients, work.coords)
      entry["vmap"] = time_vmap_round(cfg, compiled, compile_s, fresh_state(cfg, algo, work), clients, work.coords)
      log(f"vmap: {count} clients: {entry['vmap']['rounds_per_s']:.3g} rounds/s")
    except Exception as e:  # noqa: BLE001
      entry["vmap"] = {"error": report.error(f"vmap {count}", e)}
    report.save()
  if over_time(cfg, report, f"jit_loop {count}"):
    entry["jit_loop"] = {"skipped": "time limit"}
  else:
    log(f"jit_loop: {count} clients")
    try:
      entry["jit_loop"] = time_jit_loop(cfg, loop, fresh_state(cfg, algo, work), clients, work.coords)
      log(f"jit_loop: {count} clients: {entry['jit_loop']['rounds_per_s']:.3g} rounds/s")
    except Exception as e:  # noqa: BLE001
      entry["jit_loop"] = {"error": report.error(f"jit_loop {count}", e)}
    report.save()
  return compiled


def large_round_section(cfg: BenchConfig, report: Report, work: Workload) -> None:
  data = report.data
  if cfg.large_clients == 0:
    data["large_round"] = {"skipped": "--large-clients 0"}
  elif over_time(cfg, report, "large round"):
    data["large_round"] = {"skipped": "time limit"}
  else:
    log(f"large round: {cfg.large_clients} clients in chunks of {cfg.large_chunk}")
    try:
      data["large_round"] = large_round(cfg, work)
      log(f"large round: {data['large_round'].get('round_s', float('nan')):.3g} s")
    except Exception as e:  # noqa: BLE001
      data["large_round"] = {"clients": cfg.large_clients, "client_chunk_size": cfg.large_chunk, "success": False,
                             "out_of_memory": is_out_of_memory(e), "error": report.error("large round", e),
                             "memory_after": device_memory()}
  report.save()


def check_section(cfg: BenchConfig, report: Report, work: Workload, algo, loop: JitLoop, compiled, arrays) -> None:
  data = report.data
  count = cfg.clients[0]
  if count not in arrays:
    data["check"] = {"skipped": "no data"}
  elif over_time(cfg, report, "check"):
    data["check"] = {"skipped": "time limit"}
  else:
    log(f"check: one round from the same state, vmap vs jit loop, {count} clients")
    try:
      data["check"] = run_check(cfg, work, algo, loop, compiled, client_data(*arrays[count]))
    except Exception as e:  # noqa: BLE001
      data["check"] = {"error": report.error("check", e)}
  report.save()


def time_bf16_round(cfg: BenchConfig, report: Report, count: int, clients: ClientData) -> dict:
  """Our round with bfloat16 compute (float32 master weights), where the model offers it."""
  if not supports_compute_dtype():
    return {"skipped": "make_proteomics_net has no dtype option in this version"}
  log(f"vmap_bf16: {count} clients")
  try:
    work = build_workload(cfg, dtype="bfloat16")
    algo = fedavg(work.task, work.optimizer, local_epochs=cfg.local_epochs, batch_size=cfg.batch_size)
    compiled, compile_s = compile_round(algo, fresh_state(cfg, algo, work), clients, work.coords)
    result = time_vmap_round(cfg, compiled, compile_s, fresh_state(cfg, algo, work), clients, work.coords)
    log(f"vmap_bf16: {count} clients: {result['rounds_per_s']:.3g} rounds/s")
    return result
  except Exception as e:  # noqa: BLE001
    return {"error": report.error(f"vmap_bf16 {count}", e)}
  finally:
    report.save()


def torch_section(cfg: BenchConfig, report: Report, work: Workload, arrays) -> None:
  data, results = report.data, report.data["results"]
  if not cfg.use_torch:
    data["torch"] = {"skipped": f"--no-torch or {NO_TORCH_ENV} set"}
  else:
    torch = None
    try:
      import torch
    except ImportError:
      data["torch"] = {"skipped": "torch not installed"}
    except Exception as e:  # noqa: BLE001 - e.g. a CUDA library torch cannot load
      data["torch"] = {"skipped": f"torch failed to import: {report.error('torch import', e)}"}
    if torch is not None:
      try:
        loop = TorchLoop(torch, cfg, work.coords_np)
        data["torch"] = {
            "version": torch.__version__,
            "device": (torch.cuda.get_device_name(0) if loop.device.type == "cuda"
                       else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"),
            "param_count": int(sum(p.numel() for p in loop.global_model.parameters())),
            "cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "note": ("reference-style loop: per client load_state_dict, new optimizer, local epochs of shuffled "
                     "minibatches, collect state_dicts, sample-weighted average; client data already on the "
                     "device (the reference moves batches from the host each step)"),
        }
      except Exception as e:  # noqa: BLE001
        data["torch"] = {"error": report.error("torch setup", e)}
        loop = None
      if loop is not None:
        torch_start = time.perf_counter()
        for count in cfg.clients:
          entry = results[str(count)]
          remaining = cfg.torch_budget_s - (time.perf_counter() - torch_start)
          if count not in arrays:
            entry["torch_loop"] = {"skipped": "no data"}
          elif remaining <= 0 or report.elapsed() > cfg.time_limit_s:
            entry["torch_loop"] = {"skipped": "time budget"}
          else:
            log(f"torch_loop: {count} clients")
            try:
              entry["torch_loop"] = time_torch_loop(cfg, loop, *arrays[count], budget_s=remaining)
              log(f"torch_loop: {count} clients: {entry['torch_loop']['rounds_per_s']:.3g} rounds/s")
            except Exception as e:  # noqa: BLE001
              entry["torch_loop"] = {"error": report.error(f"torch_loop {count}", e)}
          report.save()
        del loop
        if torch.cuda.is_available():
          torch.cuda.empty_cache()
  if "skipped" in data.get("torch", {}):
    for count in cfg.clients:
      results[str(count)]["torch_loop"] = {"skipped": data["torch"]["skipped"]}


def main(argv: Sequence[str] | None = None) -> dict:
  cfg, args = parse_args(argv)
  report = Report(cfg, args.out)

  def on_term(signum, frame):  # a killed run still prints and saves what it has
    raise KeyboardInterrupt(f"signal {signum}")

  try:
    previous = signal.signal(signal.SIGTERM, on_term)
  except ValueError:  # not the main thread
    previous = None
  try:
    run(cfg, report)
  except BaseException as e:  # noqa: BLE001 - the JSON must come out whatever happened
    report.error("run", e)
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
    try:
      summarise(report, cfg)
    except Exception as e:  # noqa: BLE001
      report.error("summary", e)
    report.save()
    print(json.dumps(report.data, indent=2, default=str), flush=True)
  return report.data


if __name__ == "__main__":
  main()
