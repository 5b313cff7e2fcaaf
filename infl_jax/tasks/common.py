"""What every task runner shares: the key check, the federated training run and writing results
(summary.json, an .h5ad). The key study's four ways to run a model are ``infl_jax.key_scheme.study_views``."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import pathlib
import re
from typing import Any, Callable

import jax
import numpy as np

from infl_jax import keys as keylib
from infl_jax.config import TrainConfig
from infl_jax.federated import (ClientData, FederatedAlgorithm, RoundsResult, RunDir, ServerState, client_mesh,
                                client_optimizer_from_config, jit_round, run_rounds, shard_clients, stack_clients)
from infl_jax.federated.distributed import is_primary
from infl_jax.federated.sharding import ClientSource, local_copy, replicate
from runkit.disk import disk_errors_reported
from runkit.cli import has_checkpoint
from runkit.errors import CheckpointError, UserInputError
from runkit.metrics_log import write_json_atomic

__all__ = ["check_key_version", "check_memory", "class_presence", "memory_available", "resume_settings",
           "split_clients", "stopped_early", "train_federated", "training_record", "write_h5ad", "write_summary"]


def check_key_version(config: TrainConfig, key: keylib.SecretKey) -> None:
  if key.version != config.key_version:
    raise UserInputError(f"the key file holds key version {key.version} but the run expects version "
                         f"{config.key_version}; pass --key-version {key.version} or the matching key file")


def resume_settings(config: TrainConfig) -> tuple[dict[str, Any], dict[str, Any]]:
  """``(fingerprint, defaults)`` a resume is checked against: ``config.resume_fingerprint()``, the key's
  fingerprint included. A checkpoint from before runs recorded it has nothing to check it against, so its
  default is the present key's: any key resumes such a run, as it did before."""
  fingerprint, defaults = config.resume_fingerprint()
  defaults["key_fingerprint"] = fingerprint["key_fingerprint"]
  return fingerprint, defaults


def _key_mismatch(error: CheckpointError, config: TrainConfig) -> UserInputError | None:
  """The checkpointer's "different settings" error told as what it is when the key differs: the wrong key file."""
  found = re.search(r"key_fingerprint: saved '([0-9a-f]+)'", str(error))
  if found is None:
    return None
  others = str(error).count(": saved ") - 1
  more = f" (besides, {others} other setting(s) differ: {error})" if others else ""
  return UserInputError(f"the key file's fingerprint {config.key_fingerprint} differs from the run's "
                        f"{found.group(1)}; pass the run's --key-file{more}")


def class_presence(y: np.ndarray, n_classes: int, rows: int | None = None) -> np.ndarray:
  """``[rows, n_classes]`` float32, every row 1 for the classes among one client's labels ``y`` and 0 for the
  others: what FedRS's loss needs of the client (``--absent-class-scale``), carried beside each sample since
  a client's data holds only per-sample arrays. ``rows``: its padded length (default ``len(y)``)."""
  held = (np.bincount(np.asarray(y, np.int64), minlength=n_classes)[:n_classes] > 0).astype(np.float32)
  return np.broadcast_to(held, (len(y) if rows is None else rows, n_classes)).copy()


def split_clients(split, key_version: int, *, presence: bool = False) -> ClientSource:
  """The training clients of a classification split (``{"x", "y"}`` each, and ``"held"`` from
  ``class_presence`` with ``presence``), stacked on demand: in a multi-process run each process stacks only
  the clients its devices hold."""
  sizes = split.client_sizes()

  def client(k) -> dict:
    y = split.train_y[split.train_client == k].astype(np.int32)
    arrays = {"x": split.train_x[split.train_client == k].astype(np.float32), "y": y}
    return dict(arrays, held=class_presence(y, split.n_classes)) if presence else arrays

  def stack(indices, pad_to: int) -> ClientData:
    return stack_clients([client(k) for k in indices], key_version=key_version, pad_to=pad_to)

  return ClientSource(num_samples=np.asarray(sizes), stack=stack)


# --------------------------------------------------------------------------------------------
# Memory: a run whose round cannot fit is refused before XLA sees it (XLA aborted the process with a
# C++ stack trace, exit 134, past any clean-up). The estimate counts only what a round surely holds at
# once, so it stays below what any run needs and refuses only clear overshoots (docs/design.md, "One
# round, step by step": checkpoints and failures).


def _nbytes(tree) -> int:
  """Bytes of a pytree of arrays, ``jax.ShapeDtypeStruct`` or scalars (Python ints: no overflow)."""
  size = lambda x: math.prod(x.shape if hasattr(x, "shape") else np.shape(x))
  itemsize = lambda x: np.dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype).itemsize
  return sum(size(x) * itemsize(x) for x in jax.tree_util.tree_leaves(tree))


def memory_available() -> tuple[int, str] | None:
  """``(bytes, where)``: what XLA may use on the first local device (an accelerator's ``bytes_limit``), else
  the host's memory (RAM and swap); None where neither is known."""
  device = jax.local_devices()[0]
  stats = None
  with contextlib.suppress(Exception):  # a backend without memory statistics
    stats = device.memory_stats()
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"this {device.platform.upper()} has"
  try:
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None
  swap = 0
  with contextlib.suppress(OSError, ValueError, IndexError):
    meminfo = pathlib.Path("/proc/meminfo").read_text().splitlines()
    swap = next((int(line.split()[1]) * 1024 for line in meminfo if line.startswith("SwapTotal:")), 0)
  return ram + swap, "this machine has"


def _size_text(n: float) -> str:
  for unit in ("bytes", "kB", "MB", "GB", "TB", "PB"):
    if n < 1000 or unit == "PB":
      return f"{n:.0f} {unit}" if n >= 10 or unit == "bytes" else f"{n:.1f} {unit}"
    n /= 1000


def check_memory(config: TrainConfig, algo: FederatedAlgorithm, variables, clients: ClientData | ClientSource,
                 rng: jax.Array, *, data_bytes: int | None = None, model: str | None = None,
                 model_fix: str | None = None, client_chunk_size: int | None = None) -> None:
  """Raises UserInputError when a round of ``config`` over ``clients`` surely needs more memory than the
  device has (``memory_available``). ``variables`` may be abstract (``jax.eval_shape`` of the model's init):
  nothing is allocated, the server state's shape comes from ``jax.eval_shape`` of ``algo.init`` too.
  ``model``/``model_fix``: the settings that size the model and how to shrink it, in the CLI's words
  (default: --hidden and --embed-dim). ``data_bytes``: the stacked client data (default: a ``ClientData``'s
  own; a ``ClientSource``'s counted as nothing). ``client_chunk_size``: that of ``algo``, if it has one.

  Counted, on the device that trains the most clients: the server state (parameters, model state, server
  optimizer state, SCAFFOLD's control variates), the round's summed update, and for every client training at
  once (a round vmaps all its sampled clients, split over the devices with --shard-clients, at most a chunk)
  its parameters, model state, Adam state and batch order (--local-epochs x its samples); then the client
  data. Left out, so as never to refuse a run that fits: gradients, activations, the new state, the selected
  round's state, the central baseline training alongside.
  """
  available = memory_available()
  if available is None:
    return
  limit, where = available
  num_clients = int(clients.num_clients)
  server = jax.eval_shape(functools.partial(algo.init, key_version=config.key_version, num_clients=num_clients),
                          variables, rng)
  param_bytes, state_bytes = _nbytes(server.params), _nbytes(server.model_state)
  client_opt = _nbytes(jax.eval_shape(client_optimizer_from_config(config).init, server.params))
  max_samples = int(np.max(clients.num_samples))
  devices = len(jax.devices()) if config.shard_clients or jax.process_count() > 1 else 1
  at_once = math.ceil(max(1, round(config.client_fraction * num_clients)) / devices)
  at_once = min(at_once, client_chunk_size or at_once)
  if data_bytes is None:
    data_bytes = _nbytes(clients.data) if isinstance(clients, ClientData) else 0
  parts = {
      "model": _nbytes(server) + param_bytes + at_once * (param_bytes + state_bytes + client_opt),
      "schedule": at_once * config.local_epochs * max_samples * 4,  # each epoch's int32 sample order
      "data": math.ceil(data_bytes / devices),
  }
  needed = sum(parts.values())
  if needed <= limit:
    return
  clients_text = f"{at_once} client{'s' if at_once > 1 else ''} training at once"
  fewer = " (or fewer clients per round: --client-fraction)" if at_once > 1 else ""
  biggest = max(parts, key=parts.get)
  if biggest == "model":
    what = model or f"--hidden {','.join(map(str, config.hidden))} with --embed-dim {config.embed_dim}"
    fix = (model_fix or "choose a smaller --hidden or --embed-dim") + fewer
    detail = f"parameters and optimizer state ({clients_text})"
  elif biggest == "schedule":
    what, fix = f"--local-epochs {config.local_epochs}", "choose fewer --local-epochs" + fewer
    detail = f"the clients' batch orders ({max_samples} samples x {config.local_epochs} epochs, {clients_text})"
  else:
    what, detail = f"{num_clients} clients of up to {max_samples} samples", "their data"
    fix = "keep fewer features (--n-top-features)"
  raise UserInputError(f"{what} needs about {_size_text(needed)} of memory, mostly for {detail}, and {where} "
                       f"{_size_text(limit)}; {fix}")


def train_federated(config: TrainConfig, workdir, algo: FederatedAlgorithm, variables,
                    clients: ClientData | ClientSource, context: Any, *, rng: jax.Array, resume: bool = False,
                    stop_after_round: int | None = None,
                    show_progress: bool | None = None,
                    extra_metrics: Callable[[ServerState, int], dict] | None = None,
                    select: Callable[[dict], Any] | None = None) -> RoundsResult:
  """Initialises the server state from ``variables`` and runs ``config.rounds`` rounds of ``algo`` in
  ``workdir`` (metrics.jsonl, checkpoints; ``resume`` continues from the last one).

  ``stop_after_round`` ends the run after that round's checkpoint (to test resume); ``select`` scores a
  round's metrics row for model selection (``run_rounds``).

  In a multi-process run (``jax.distributed``) the clients are always sharded, over every process's
  devices, each process holding its block of the client axis (from a ``ClientSource`` it stacks only
  those clients); the server state and ``context`` are replicated, and what the caller gets back (and
  ``extra_metrics`` sees) is this process's copy (docs/design.md, "Multi-host simulation").
  """
  check_memory(config, algo, variables, clients, rng)
  state = algo.init(variables, rng, key_version=config.key_version, num_clients=clients.num_clients)
  multi_process = jax.process_count() > 1
  if config.shard_clients or multi_process:
    mesh = client_mesh()
    clients = shard_clients(clients, mesh)
    if multi_process:
      state, context = replicate((state, context), mesh)
      if extra_metrics is not None:
        extra_metrics = _on_local_copy(extra_metrics)
  elif isinstance(clients, ClientSource):
    clients = clients.stack_all()
  fingerprint, defaults = resume_settings(config)
  run_dir = RunDir(pathlib.Path(workdir), checkpoint_every=config.checkpoint_every,
                   keep_checkpoints=config.keep_checkpoints, fingerprint=fingerprint,
                   fingerprint_defaults=defaults, resume=resume)
  should_stop = None if stop_after_round is None else (lambda _, done: done >= stop_after_round)
  try:
    result = run_rounds(jit_round(algo.round), state, clients, context, rounds=config.rounds, run_dir=run_dir,
                        extra_metrics=extra_metrics, should_stop=should_stop, select=select,
                        show_progress=show_progress)
    return result._replace(state=local_copy(result.state), selected=local_copy(result.selected))
  except CheckpointError as error:
    if (mismatch := _key_mismatch(error, config)) is None:
      raise
    raise mismatch from None


def _on_local_copy(extra_metrics: Callable[[ServerState, int], dict]) -> Callable[[ServerState, int], dict]:
  """``extra_metrics`` of a multi-process round's state, run on this process's copy of it."""
  return lambda state, done: extra_metrics(local_copy(state), done)


def stopped_early(result: RoundsResult, config: TrainConfig) -> dict | None:
  """The summary of a run ended by ``stop_after_round`` before its last round, else None."""
  done = int(result.state.round)
  return {"stopped_after_round": done} if done < config.rounds else None


def training_record(result: RoundsResult, config: TrainConfig) -> dict:
  """What every task's summary.json says about the federated training itself."""
  return {"rounds": int(result.state.round), "federated_train_seconds_this_session": result.seconds,
          "final_train_loss": result.history[-1]["train_loss"] if result.history else None,
          "config": dataclasses.asdict(config)}


def write_summary(workdir, summary: dict) -> dict:
  """Writes summary.json (in a multi-process run, process 0 only) and returns ``summary``; a full disk is
  one ``DiskWriteError`` line (``runkit.checkpoint``), summary.json left as it was."""
  if is_primary():
    with disk_errors_reported("summary.json", workdir, resumable=lambda: has_checkpoint(workdir)):
      write_json_atomic(pathlib.Path(workdir) / "summary.json", summary)
  return summary


def write_h5ad(path: pathlib.Path, x: np.ndarray, obs: dict, var_names, obsm: dict, layers: dict | None = None,
               uns: dict | None = None) -> pathlib.Path:
  """An AnnData file of a task's results: clusters and labels in ``obs``, embeddings in ``obsm``."""
  import anndata
  import pandas as pd

  def column(name, values):
    categorical = np.asarray(values).dtype.kind in "OUi" and name.endswith(("cluster", "client", "label"))
    return pd.Categorical(values) if categorical else values

  frame = pd.DataFrame({k: column(k, v) for k, v in obs.items()})
  frame.index = [str(s) for s in obs["sample_id"]] if "sample_id" in obs else [str(i) for i in range(len(frame))]
  adata = anndata.AnnData(np.asarray(x, np.float32), obs=frame, var=pd.DataFrame(index=[str(v) for v in var_names]))
  for k, v in obsm.items():
    adata.obsm[k] = np.asarray(v, np.float32)
  for k, v in (layers or {}).items():
    adata.layers[k] = np.asarray(v, np.float32)
  adata.uns.update(uns or {})
  adata.write_h5ad(path)
  return path
