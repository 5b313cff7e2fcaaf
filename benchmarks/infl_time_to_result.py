#!/usr/bin/env python
"""Time to result of ``infl-train`` as a user meets it: wall seconds of whole command-line runs.

  PYTHONPATH=. python benchmarks/infl_time_to_result.py --out benchmarks/results/infl_time_to_result_cpu.json

Sections, each a fresh ``infl-train`` process (what a user waits for, start-up and data loading included):
  generic/cold   a generic .h5ad, 200 samples x 10,000 features, 4 classes, 4 sites (``--client-key site``):
                 the generic defaults (50 rounds, MLP 256-128), the central baseline and the key study,
                 with an empty compilation cache folder;
  generic/warm   the same run in a new workdir, the cache now filled by the cold run;
  proteomics/cold, proteomics/warm   the ``proteomics`` preset (80 rounds x 10 local epochs) the same way.

The .h5ad holds SYNTHETIC values (class-dependent means plus noise): the time does not depend on them. Each
entry gives wall seconds, the child process's CPU seconds (user + system) and the run's own federated
training seconds from its summary.json. Run it on an otherwise idle machine: a loaded one stretches
every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

import harness

GENERIC_SHAPE = (200, 10_000)


def write_generic_h5ad(path: pathlib.Path, seed: int = 0) -> pathlib.Path:
  import anndata
  import pandas as pd

  rng = np.random.default_rng(seed)
  n, f = GENERIC_SHAPE
  labels = rng.integers(0, 4, n)
  x = rng.normal(size=(n, f)).astype(np.float32) + 0.3 * rng.normal(size=(4, f)).astype(np.float32)[labels]
  obs = pd.DataFrame({"label": pd.Categorical([f"type_{c}" for c in labels]),
                      "site": pd.Categorical([f"site_{i % 4}" for i in range(n)])},
                     index=[f"cell_{i}" for i in range(n)])
  anndata.AnnData(x, obs=obs, var=pd.DataFrame(index=[f"gene_{j}" for j in range(f)])).write_h5ad(path)
  return path


def timed_run(flags: list[str], workdir: pathlib.Path, cache_dir: pathlib.Path) -> dict:
  env = dict(os.environ, INFL_JAX_CACHE_DIR=str(cache_dir))
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  t0 = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", "infl_jax.main", *flags, "--workdir", str(workdir)],
                        env=env, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  if proc.returncode != 0:
    raise RuntimeError(f"infl-train exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
  summary = json.loads((workdir / "summary.json").read_text())
  return {"wall_seconds": round(wall, 1),
          "cpu_seconds": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1),
          "federated_train_seconds": round(summary["federated_train_seconds_this_session"], 1),
          "right_key_test_accuracy": summary["test"]["right_key"]["accuracy"]}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", help="write the JSON here too")
  args = p.parse_args()
  report = harness.Report("infl_time_to_result", {"environment": harness.environment(), "results": {}}, args.out)
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    h5ad = write_generic_h5ad(tmp / "generic.h5ad")
    runs = {"generic": ["--dataset", str(h5ad), "--label-key", "label", "--client-key", "site"],
            "proteomics": ["--dataset", "proteomics"]}
    for name, flags in runs.items():
      cache = tmp / f"cache_{name}"
      for temperature in ("cold", "warm"):
        section = f"{name}/{temperature}"
        report.log.info("running %s", section)
        report.data["results"][section] = report.attempt(
            section, lambda: timed_run(flags, tmp / f"run_{name}_{temperature}", cache))
        report.log.info("%s: %s", section, report.data["results"][section])
  report.save()
  print(json.dumps(report.data, indent=1))


if __name__ == "__main__":
  main()
