"""Benchmark: time per round of INFL deployed on Flower (localhost) against the in-process vmapped round.

    PYTHONPATH=. python benchmarks/infl_flower_overhead.py --out flower_overhead.json   # ~5-10 min on 2 cores

Both sides run the proteomics preset split over three clients (``n-clients 3``), the same seeds and key:
  in_process  ``jit_round(algorithm_from_config(...).round)``: the three clients vmapped in one process, data
              on device; seconds per round after the compiling first round (median).
  flower      a Flower SuperLink and three SuperNodes as local processes (``infl_jax.flower.local``), one
              ``flwr run``; seconds per round as the ServerApp measures it (sending the global variables,
              the sites' ClientApp processes starting, loading their data and compiled update from caches,
              training, replying, the server's aggregation), the first round excluded (it fills the caches).
              The run's wall time (startup, query, evaluation included) is reported too.
``ratio``: flower seconds per round / in-process seconds per round. Flower starts a ClientApp process per
message, so on CPU the ratio is mostly Python and JAX start-up per site per round, not the training.
Prints one JSON object (harness.Report); not a timed test.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time
from typing import Sequence

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402


def _in_process(report, rounds: int, key) -> dict:
  import jax

  from infl_jax.federated import algorithm_from_config, jit_round
  from infl_jax.flower.settings import run_settings
  from infl_jax.key_scheme import client_view
  from infl_jax.tasks import classification as cls

  config = run_settings({"preset": "proteomics", "rounds": rounds, "n-clients": 3}).config
  raw = cls.load_data(config)
  split = cls.client_split(raw, client_view(key, config.key_scheme, raw.n_features))
  model = cls.create_model(config, split.n_classes)
  algo = algorithm_from_config(config, cls.classification_task(model))
  init_rng, server_rng, _ = jax.random.split(jax.random.key(config.seed), 3)
  state = algo.init(cls.init_variables(model, split.n_features, init_rng), server_rng, key_version=config.key_version)
  clients = cls.client_data(split, config.key_version)
  round_fn = jit_round(algo.round)
  times = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    state, metrics = round_fn(state, clients, key.coords)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  report.log.info("in-process rounds: %s", [f"{t:.2f}" for t in times])
  return {"first_round_s": times[0], **harness.median_rate(times[1:])}


def _flower(report, rounds: int, key_file, workdir: pathlib.Path) -> dict:
  from infl_jax.flower.local import LocalFederation, write_app

  sites = [{"data": "proteomics", "partition-id": i, "key-file": str(key_file), "cache-dir": str(workdir / f"site{i}")}
           for i in range(3)]
  run_config = {"preset": "proteomics", "rounds": rounds, "n-clients": 3, "workdir": str(workdir / "server"),
                "checkpoint-every": rounds}
  t0 = time.perf_counter()
  with LocalFederation(sites, workdir / "logs") as fed:
    fed.run(write_app(workdir / "app"), run_config, timeout=1800)
  wall = time.perf_counter() - t0
  history = json.loads((workdir / "server" / "result.json").read_text())["history"]
  times = [row["seconds"] for row in history]
  report.log.info("flower rounds: %s (run wall %.1f s)", [f"{t:.2f}" for t in times], wall)
  return {"first_round_s": times[0], **harness.median_rate(times[1:]), "run_wall_s": wall}


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=4, help="rounds per side (the first is not timed)")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  if args.rounds < 2:
    parser.exit(2, "error: --rounds must be >= 2 (the first round compiles and is not timed)\n")
  os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
  tmp = pathlib.Path(tempfile.mkdtemp(prefix="infl-flower-bench-"))
  os.environ.setdefault("INFL_JAX_CACHE_DIR", str(tmp / "xla"))  # shared by this process and the sites
  from infl_jax import keys as keylib
  from runkit.cli import enable_compilation_cache

  enable_compilation_cache()
  report = harness.Report("infl_flower_overhead", {
      "workload": {"preset": "proteomics", "clients": 3, "rounds": args.rounds},
      "environment": harness.environment(),
  }, args.out)
  key = keylib.generate_key(seed=5)
  key_file = keylib.save_key(key, tmp / "key.json")

  def body():
    report.data["in_process"] = report.attempt("in_process", lambda: _in_process(report, args.rounds, key))
    report.data["flower"] = report.attempt("flower", lambda: _flower(report, args.rounds, key_file, tmp / "flower"))

  def summarise():
    a, b = report.data.get("in_process", {}), report.data.get("flower", {})
    if "seconds_per_round" in a and "seconds_per_round" in b:
      report.data["ratio"] = b["seconds_per_round"] / a["seconds_per_round"]

  return report.run(body, summarize=summarise)


if __name__ == "__main__":
  main()
