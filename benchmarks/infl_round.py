"""Benchmark: one INFL round of the reference proteomics model, three ways, side by side.

    PYTHONPATH=. python benchmarks/infl_round.py --out infl_round.json          # accelerator sizes
    PYTHONPATH=. python benchmarks/infl_round.py --small --out /tmp/small.json  # CPU smoke run, ~1 minute

Columns (one process, one machine, the same synthetic data and settings):
  vmap        our round: ``jax.jit(algorithm_from_config(...).round)``, clients vmapped, data on device.
  jit_loop    ``jax.jit`` of one client's ``client_update`` (plus adding its weighted update to the
              running sums) called in a Python loop over clients, then the weighted average.
  torch_loop  a PyTorch module of the same structure and work, trained the way the reference
              implementation does it (torch_models.ReferenceFedAvg).
  vmap_bf16   our round with bfloat16 compute.
Then one round with many clients (default 10,000) in client chunks, for time and peak memory, and a
check that the vmapped round and the jit loop compute the same round.

Every timed round of every column runs through ``infl_jax.federated.run_rounds`` (see
infl_workload.timed_rounds).
The workload, our two loops and the check are in infl_workload.py; the report, timing and errors
in harness.py. No section can stop the others: each records its error string and the script goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import pathlib
import platform
import sys
import time
from typing import Any, Callable, Sequence

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
import numpy as np  # noqa: E402

import harness  # noqa: E402
from infl_workload import (CLIENT_OPTIMIZERS, SMALL, BenchConfig, JitLoop, Workload, build_workload,  # noqa: E402
                           client_data, large_round, param_count, run_check, synthetic_arrays, timed_rounds,
                           torch_reference_model, workload_description)

NO_TORCH_ENV = "INFL_BENCH_NO_TORCH"


# ------------------------------------------------------------------------------------------------
# Sections: each returns its JSON entry and never raises.


def section(cfg: BenchConfig, report: harness.Report, where: str, measure: Callable[[], dict],
            description: str | None = None) -> dict:
  """``measure()``, logged and guarded (an error is recorded under ``where``); ``{"skipped": "time
  limit"}`` once ``cfg.time_limit_s`` is spent."""
  if report.elapsed() > cfg.time_limit_s:
    report.log.info("%s: skipped, the time limit (%s s) is spent", where, cfg.time_limit_s)
    return {"skipped": "time limit"}
  report.log.info("%s", description or where)
  result = report.attempt(where, measure)
  if "rounds_per_s" in result:
    report.log.info("%s: %.3g rounds/s", where, result["rounds_per_s"])
  return result


def time_vmap_round(cfg: BenchConfig, work: Workload, clients) -> tuple[dict, Any]:
  """Our round, compiled ahead of time: one untimed round, then up to ``cfg.repeats`` timed ones.
  Returns the entry and the compiled round."""
  algorithm = work.algorithm()
  state = work.fresh_state()
  t0 = time.perf_counter()
  compiled = jax.jit(algorithm.round).lower(state, clients, work.coords).compile()
  compile_s = time.perf_counter() - t0
  rounds = timed_rounds(compiled, state, clients, work.coords, warmup_rounds=1, max_timed_rounds=cfg.repeats,
                        budget_s=cfg.section_budget_s)
  return {"compile_s": compile_s, "first_round_s": rounds.seconds[0], **harness.median_rate(rounds.seconds[1:]),
          "train_loss_last_round": rounds.last_metrics["train_loss"]}, compiled


def time_jit_loop(cfg: BenchConfig, work: Workload, loop: JitLoop, clients) -> dict:
  """The jit loop: its first round compiles (untimed), then up to ``cfg.loop_rounds`` timed ones."""
  rounds = timed_rounds(loop.round, work.fresh_state(), loop.prepare(clients), work.coords, warmup_rounds=1,
                        max_timed_rounds=cfg.loop_rounds, budget_s=cfg.section_budget_s)
  return {"first_round_s (includes compile)": rounds.seconds[0], **harness.median_rate(rounds.seconds[1:]),
          "train_loss_last_round": rounds.last_metrics["train_loss"]}


def jax_columns(cfg: BenchConfig, report: harness.Report, work: Workload, loop: JitLoop, count: int, clients):
  """vmap and jit_loop at one client count; returns the compiled vmapped round or None."""
  entry = report.data["results"][str(count)]
  compiled = []

  def vmap() -> dict:
    result, round_fn = time_vmap_round(cfg, work, clients)
    compiled.append(round_fn)
    return result

  entry["vmap"] = section(cfg, report, f"vmap {count}", vmap)
  entry["jit_loop"] = section(cfg, report, f"jit_loop {count}", lambda: time_jit_loop(cfg, work, loop, clients))
  return compiled[0] if compiled else None


def time_torch_loop(cfg: BenchConfig, reference, coords, x: np.ndarray, y: np.ndarray, budget_s: float) -> dict:
  """One warm-up client (untimed), then at most ``cfg.loop_rounds`` rounds (one from
  ``cfg.torch_single_round_from`` clients); a round that would overrun ``budget_s`` is timed over
  its first clients and scaled up."""
  xs, ys = reference.clients(x, y)
  num_clients = len(xs)

  def round_seconds(first_clients: int, max_rounds: int = 1) -> list[float]:
    return timed_rounds(reference.round, reference.init(), (xs[:first_clients], ys[:first_clients]), coords,
                        warmup_rounds=0, max_timed_rounds=max_rounds, budget_s=budget_s,
                        sync=lambda state: reference.synchronize()).seconds

  per_client_estimate = round_seconds(1)[0]  # the warm-up: CUDA context, kernels, allocator
  result = {"warmup_one_client_s": per_client_estimate}
  if per_client_estimate * num_clients > budget_s:
    timed_clients = max(1, min(num_clients, int(budget_s / max(per_client_estimate, 1e-9))))
    seconds = round_seconds(timed_clients)[0] * num_clients / timed_clients
    return {**result, **harness.median_rate([seconds]), "extrapolated_from_clients": timed_clients}
  rounds = 1 if num_clients >= cfg.torch_single_round_from else cfg.loop_rounds
  return {**result, **harness.median_rate(round_seconds(num_clients, rounds))}


def load_torch_reference(cfg: BenchConfig, report: harness.Report, work: Workload):
  """(torch_models.ReferenceFedAvg, the JSON's "torch" entry), or (None, why there is none)."""
  if not cfg.use_torch:
    return None, {"skipped": f"--no-torch or {NO_TORCH_ENV} set"}
  try:
    import torch  # imported here only, so that everything else runs where it is missing
  except ImportError:
    return None, {"skipped": "torch not installed"}
  except Exception as e:  # noqa: BLE001 - e.g. a CUDA library torch cannot load
    return None, {"skipped": f"torch failed to import: {report.error('torch import', e)}"}

  def setup():
    import torch_models

    reference = torch_models.ReferenceFedAvg(
        lambda: torch_reference_model(cfg), optimizer=work.optimizer_name, learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay, local_epochs=cfg.local_epochs, batch_size=cfg.batch_size, seed=cfg.seed)
    cpu = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return reference, {
        "version": torch.__version__,
        "device": torch.cuda.get_device_name(0) if reference.device.type == "cuda" else cpu,
        "param_count": int(sum(p.numel() for p in reference.initial_model.parameters())),
        "cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "note": ("reference-style loop: per client load_state_dict, new optimizer, local epochs of shuffled "
                 "minibatches, collect state_dicts, sample-weighted average; client data already on the "
                 "device (the reference moves batches from the host each step)"),
    }

  try:
    return setup()
  except Exception as e:  # noqa: BLE001
    return None, {"error": report.error("torch setup", e)}


def torch_section(cfg: BenchConfig, report: harness.Report, work: Workload, arrays: dict) -> None:
  """The torch_loop column at every client count, ``cfg.torch_budget_s`` for all of them."""
  results = report.data["results"]
  reference, report.data["torch"] = load_torch_reference(cfg, report, work)
  if reference is None:
    if "skipped" in report.data["torch"]:
      for count in cfg.clients:
        results[str(count)]["torch_loop"] = {"skipped": report.data["torch"]["skipped"]}
    report.save()
    return
  coords = reference.tensor(work.coords_host)
  torch_start = time.perf_counter()
  for count in cfg.clients:
    remaining = cfg.torch_budget_s - (time.perf_counter() - torch_start)
    if count not in arrays:
      result = {"skipped": "no data"}
    elif remaining <= 0 or report.elapsed() > cfg.time_limit_s:
      result = {"skipped": "time budget"}
    else:
      result = section(cfg, report, f"torch_loop {count}",
                       lambda: time_torch_loop(cfg, reference, coords, *arrays[count], budget_s=remaining))
    results[str(count)]["torch_loop"] = result
  reference.close()  # the large round that follows measures the accelerator's memory
  report.save()


def large_round_section(cfg: BenchConfig, report: harness.Report, work: Workload) -> None:
  if cfg.large_clients == 0:
    report.data["large_round"] = {"skipped": "--large-clients 0"}
    return

  def measure() -> dict:
    try:
      return large_round(cfg, work)
    except Exception as e:  # noqa: BLE001 - out-of-memory is a result here, not only an error
      return {"clients": cfg.large_clients, "client_chunk_size": cfg.large_chunk, "success": False,
              "out_of_memory": harness.is_out_of_memory(e), "error": report.error("large round", e),
              "memory_after": harness.device_memory()}

  report.data["large_round"] = section(
      cfg, report, "large round", measure,
      description=f"large round: {cfg.large_clients} clients in chunks of {cfg.large_chunk}")


def check_section(cfg: BenchConfig, report: harness.Report, work: Workload, loop: JitLoop, compiled,
                  arrays: dict) -> None:
  count = cfg.clients[0]
  if count not in arrays:
    report.data["check"] = {"skipped": "no data"}
    return
  report.data["check"] = section(
      cfg, report, "check", lambda: run_check(work, loop, compiled, client_data(*arrays[count])),
      description=f"check: one round from the same state, vmap vs jit loop, {count} clients")


# ------------------------------------------------------------------------------------------------
# Driver.


def parse_args(argv: Sequence[str] | None) -> tuple[BenchConfig, argparse.Namespace]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", type=pathlib.Path, help="also write the JSON here (after every section)")
  parser.add_argument("--small", action="store_true", help="CPU-sized run (2 and 4 clients, 64 features, ...)")
  parser.add_argument("--no-torch", action="store_true", help=f"skip the PyTorch loop (or set {NO_TORCH_ENV}=1)")
  parser.add_argument("--clients", type=str, help="client counts, comma-separated (default 8,64,512)")
  for name in ("samples-per-client", "features", "local-epochs", "batch-size"):
    parser.add_argument(f"--{name}", type=int)
  parser.add_argument("--repeats", type=int, help="timed rounds of our vmapped round")
  parser.add_argument("--loop-rounds", type=int, help="timed rounds, at most, of the jit and torch loops")
  for name in ("section-budget-s", "torch-budget-s", "time-limit-s"):
    parser.add_argument(f"--{name}", type=float)
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
  for name in ("clients", "bf16_clients"):
    text = getattr(args, name)
    if text is not None:
      try:
        values[name] = tuple(int(c) for c in text.split(",") if c.strip())
      except ValueError:
        parser.error(f"--{name.replace('_', '-')} takes comma-separated integers such as 8,64,512, got {text!r}")
  values["use_torch"] = not (args.no_torch or os.environ.get(NO_TORCH_ENV, "") not in ("", "0"))
  cfg = BenchConfig(**values)
  for name in ("samples_per_client", "features", "local_epochs", "batch_size", "repeats", "loop_rounds",
               "large_chunk"):
    if getattr(cfg, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
  if cfg.num_blocks < 0:
    parser.error(f"--num-blocks must be >= 0, got {cfg.num_blocks}")
  if not cfg.clients or min(cfg.clients) < 1:
    parser.error(f"--clients needs at least one count, each >= 1, got {args.clients!r}")
  if cfg.large_clients < 0:
    parser.error(f"--large-clients must be >= 0 (0 skips the large round), got {cfg.large_clients}")
  return cfg, args


def summarise(report: harness.Report, cfg: BenchConfig) -> None:
  """The ratios of each client count's row, and the summary ``table``."""
  def rate(entry):
    return entry.get("rounds_per_s") if isinstance(entry, dict) else None

  def ratio(numerator, denominator):
    return rate(numerator) / rate(denominator) if rate(numerator) and rate(denominator) else None

  table = []
  for count in cfg.clients:
    row = report.data.get("results", {}).get(str(count), {})
    vmap, jit_loop, torch_loop = row.get("vmap"), row.get("jit_loop"), row.get("torch_loop")
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


def run(cfg: BenchConfig, report: harness.Report) -> None:
  data = report.data
  data["environment"] = harness.environment()
  report.log.info("device: %s (%s)", data["environment"]["device_kind"], data["environment"]["backend"])
  work = build_workload(cfg)
  data["model"] = {"jax_param_count": param_count(work.variables["params"]),
                   "jax_model_state_count": param_count({k: v for k, v in work.variables.items() if k != "params"})}
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
    compiled = jax_columns(cfg, report, work, loop, count, client_data(*arrays[count]))
    if count == cfg.clients[0]:
      first_compiled = compiled  # reused by the check when the clients use SGD
    del compiled
    gc.collect()

  # Then by priority, so that the time limit sheds the extras: the torch loop (its own budget),
  # the large round (one compile, one round), the bf16 column, and the check (tested on CPU too;
  # with Adam clients it compiles a round and a loop of its own, see run_check).
  torch_section(cfg, report, work, arrays)
  summarise(report, cfg)
  large_round_section(cfg, report, work)
  gc.collect()
  for count in cfg.bf16_clients:
    if count in arrays:
      data["results"][str(count)]["vmap_bf16"] = section(cfg, report, f"vmap_bf16 {count}", lambda: time_vmap_round(
          cfg, build_workload(cfg, compute_dtype="bfloat16"), client_data(*arrays[count]))[0])
  summarise(report, cfg)
  check_section(cfg, report, work, loop, first_compiled, arrays)


def main(argv: Sequence[str] | None = None) -> dict:
  cfg, args = parse_args(argv)
  report = harness.Report("infl_round", {
      "workload": workload_description(cfg),
      "synthetic_data": True,
      "data_note": ("synthetic float32 N(0,1) features of the proteomics shape and labels from a random "
                    "linear rule; speed does not depend on the values"),
      "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()},
  }, args.out)
  return report.run(lambda: run(cfg, report), summarize=lambda: summarise(report, cfg))


if __name__ == "__main__":
  main()
