"""Benchmark: one INFL round over two processes (jax.distributed) against the same round in one process.

    python benchmarks/infl_multiprocess.py --out infl_multiprocess.json          # 16 clients, CPU-sized
    python benchmarks/infl_multiprocess.py --clients 64 --features 200 --out ...

Both runs train the same synthetic clients of the keyed proteomics network (infl_workload.py) from the
same state with the same round keys:
  one_process    the round as ``infl-train`` runs it in one process without --shard-clients: every client on
                 one device, vmapped.
  two_processes  two processes on this machine (127.0.0.1, gloo collectives on CPU), one device each: the
                 client axis split over both, each process stacking only its own clients (``ClientSource``),
                 the sums psum-ed across processes (docs/design.md, "Multi-host simulation").
Reported per run: the compile, the median seconds per round (after one untimed round) through
``run_rounds`` (infl_workload.timed_rounds); then ``ratio_two_over_one`` (seconds per round, two processes
over one) and ``max_abs_diff_params``, the difference between the two runs' final parameters. The two
runs add the clients' updates in a different order; with SGD clients (``--client-optimizer sgd``) that
leaves ~1e-8, while Adam clients turn it into up to ~1e-4 on parameters whose gradients are near zero
(the FiLM biases, initialised at 0: Adam's step there is about lr times the gradient's sign), so the
tight check is the SGD one (tests/test_infl_multiprocess.py checks ``infl-train``'s run to 1e-5).

The workers are this script run with ``--worker``; each prints one ``RESULT {json}`` line (process 0 only)
and writes its final parameters to an .npz. A worker that fails or runs past ``--timeout`` is recorded in
``errors`` and killed; the report still comes out (harness.Report).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

if __name__ == "__main__":  # run as a file: make the repository's packages importable without PYTHONPATH
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

RESULT = "RESULT "


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--clients", type=int, default=16)
  p.add_argument("--samples-per-client", type=int, default=32)
  p.add_argument("--features", type=int, default=64)
  p.add_argument("--num-blocks", type=int, default=1, help="residual blocks of the proteomics network")
  p.add_argument("--local-epochs", type=int, default=1)
  p.add_argument("--client-optimizer", choices=("adam", "sgd"), default="adam",
                 help="adam: the preset's; sgd: makes max_abs_diff_params a tight check (see the docstring)")
  p.add_argument("--repeats", type=int, default=5, help="timed rounds after the untimed first one")
  p.add_argument("--timeout", type=float, default=600.0, help="seconds a run (its processes) may take")
  p.add_argument("--out", help="also write the JSON here")
  # A worker's own options (set by the parent).
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--coordinator-address", help=argparse.SUPPRESS)
  p.add_argument("--num-processes", type=int, default=1, help=argparse.SUPPRESS)
  p.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
  p.add_argument("--params-out", help=argparse.SUPPRESS)
  return p.parse_args(argv)


def bench_config(args: argparse.Namespace):
  from infl_workload import BenchConfig

  return BenchConfig(clients=(args.clients,), samples_per_client=args.samples_per_client, features=args.features,
                     num_blocks=args.num_blocks, local_epochs=args.local_epochs,
                     client_optimizer=args.client_optimizer, use_torch=False)


# ------------------------------------------------------------------------------------------------
# A worker: one process of a run.


def worker(args: argparse.Namespace) -> None:
  if args.num_processes > 1:
    from infl_jax.federated.distributed import initialize
    initialize(args.coordinator_address, args.num_processes, args.process_id)
  import jax

  from infl_jax.federated import ClientData, client_mesh, jit_round, shard_clients, stack_clients
  from infl_jax.federated.sharding import ClientSource, local_copy, replicate
  from infl_workload import build_workload, synthetic_arrays, timed_rounds

  cfg = bench_config(args)
  work = build_workload(cfg)
  # Every process draws the same arrays (a seed), then keeps the clients it holds.
  x, y = synthetic_arrays(cfg, args.clients, cfg.seed)

  def stack(indices, pad_to: int) -> ClientData:
    return stack_clients([{"x": x[c], "y": y[c]} for c in indices], key_version=1, pad_to=pad_to)

  source = ClientSource(num_samples=np.full(args.clients, cfg.samples_per_client), stack=stack)
  state, coords = work.fresh_state(), work.coords
  if args.num_processes > 1:
    mesh = client_mesh()
    clients = shard_clients(source, mesh)
    state, coords = replicate((state, coords), mesh)
  else:
    clients = source.stack_all()
  t0 = time.perf_counter()
  compiled = jit_round(work.algorithm().round).lower(state, clients, coords).compile()
  compile_s = time.perf_counter() - t0
  rounds = timed_rounds(compiled, state, clients, coords, warmup_rounds=1, max_timed_rounds=args.repeats,
                        budget_s=args.timeout)
  params = jax.tree_util.tree_leaves(local_copy(rounds.state.params))
  if jax.process_index() == 0:
    np.savez(args.params_out, *[np.asarray(p) for p in params])
    timed = rounds.seconds[1:]
    print(RESULT + json.dumps({"processes": args.num_processes, "devices": [str(d) for d in jax.devices()],
                               "compile_s": compile_s, "first_round_s": rounds.seconds[0],
                               "seconds_per_round": float(np.median(timed)), "times_s": timed,
                               "train_loss_last_round": float(rounds.last_metrics["train_loss"])}), flush=True)


# ------------------------------------------------------------------------------------------------
# The parent: launches the runs, compares them.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(args: argparse.Namespace, num_processes: int, params_out: pathlib.Path) -> dict:
  """Runs ``num_processes`` workers on this machine; process 0's RESULT, or a RuntimeError with the tail of
  the first failing process's stderr."""
  shared = ["--clients", str(args.clients), "--samples-per-client", str(args.samples_per_client),
            "--features", str(args.features), "--num-blocks", str(args.num_blocks), "--local-epochs",
            str(args.local_epochs), "--client-optimizer", args.client_optimizer, "--repeats", str(args.repeats),
            "--timeout", str(args.timeout),
            "--params-out", str(params_out), "--num-processes", str(num_processes)]
  if num_processes > 1:
    shared += ["--coordinator-address", f"127.0.0.1:{_free_port()}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = []
  try:
    for i in range(num_processes):
      procs.append(subprocess.Popen([sys.executable, __file__, "--worker", *shared, "--process-id", str(i)],
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=args.timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for i, (p, (_, err)) in enumerate(zip(procs, outputs)):
    if p.returncode != 0:
      raise RuntimeError(f"process {i} of {num_processes} exited with {p.returncode}: {err[-1500:]}")
  lines = [line for line in outputs[0][0].splitlines() if line.startswith(RESULT)]
  if not lines:
    raise RuntimeError(f"process 0 of {num_processes} printed no result: {outputs[0][1][-1500:]}")
  return json.loads(lines[-1][len(RESULT):])


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.worker:
    worker(args)
    return 0
  import harness
  from infl_workload import workload_description

  cfg = bench_config(args)
  report = harness.Report("infl_multiprocess", {
      "environment": harness.environment(),
      "workload": workload_description(cfg) + f", {args.clients} clients, all sampled",
      "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "coordinator_address",
                                                                     "num_processes", "process_id", "params_out")},
      "results": {}}, out=args.out)
  results = report.data["results"]

  with tempfile.TemporaryDirectory(prefix="infl-multiprocess-") as folder:
    params = {n: pathlib.Path(folder) / f"params_{n}.npz" for n in (1, 2)}

    def body():
      for n, name in ((1, "one_process"), (2, "two_processes")):
        report.log.info("%s: %d process(es), %d clients", name, n, args.clients)
        results[name] = report.attempt(name, lambda n=n: launch(args, n, params[n]))

    def summarize():
      one, two = results.get("one_process", {}), results.get("two_processes", {})
      if "seconds_per_round" in one and "seconds_per_round" in two:
        results["ratio_two_over_one"] = two["seconds_per_round"] / one["seconds_per_round"]
      if all(p.exists() for p in params.values()):
        a, b = (np.load(params[n]) for n in (1, 2))
        results["max_abs_diff_params"] = max(float(np.max(np.abs(a[k] - b[k]))) for k in a.files)

    report.run(body, summarize)
  return 1 if report.data["errors"] else 0


if __name__ == "__main__":
  sys.exit(main())
