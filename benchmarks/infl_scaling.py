"""Benchmark: time and peak memory of our vmapped INFL round against the number of clients.

    python benchmarks/infl_scaling.py --out benchmarks/results/infl_scaling_cpu_2core.json \\
        --plot docs/figures/infl_scaling_cpu_2core.png                 # 8, 16, ..., 4096 clients
    python benchmarks/infl_scaling.py --small --out /tmp/infl_scaling_small.json   # CPU smoke run
    python benchmarks/infl_scaling.py --replot results.json --plot curve.png       # redraw a saved run

The workload is infl_round.py's (infl_workload.py: the keyed proteomics network, the ``proteomics``
preset, 32 synthetic samples per client, 5,207 features). Per client count, ascending: the round from
``algorithm_from_config``, clients vmapped, in chunks of ``--chunk`` scanned one after another above
that count (``client_chunk_size``), compiled as runs compile it (``jit_round``), run through
``run_rounds`` (infl_workload.timed_rounds): one untimed round (none where a round is predicted to
outlast ``--warmup-max-s``), then up to ``--repeats`` timed ones within ``--budget-s``. Recorded:
compile seconds, median seconds per round and per client, XLA's memory analysis of the compiled round
(the memory figure to compare), the device allocator's peak where the backend keeps one, the host's
peak RSS (weak: monotonic over the process); the summary fits seconds per round = a + b * clients and
the memory likewise by least squares. The JSON goes to ``--out`` after every count (harness.Report).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import math
import os
import pathlib
import resource
import sys
import time
from typing import Any, Sequence

# Allocate device memory as it is needed, so the allocator's peak means something (as infl_round.py).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

if __name__ == "__main__":  # run as a file: make the repository's packages importable without PYTHONPATH
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import harness  # noqa: E402
from infl_jax.federated import jit_round  # noqa: E402
from infl_round import FAST_COMPILE_FLAG  # noqa: E402
from infl_workload import (SMALL, BenchConfig, build_workload, client_data, param_count,  # noqa: E402
                           synthetic_arrays, timed_rounds, workload_description)
from runkit.xla import ONCE, compiler_options  # noqa: E402

if __name__ == "__main__" and "--small" in sys.argv and "--no-fast-compile" not in sys.argv:
  # As infl_round.py --small: compiling dominates a smoke run (the model's init most, which the round's
  # compile options do not reach). XLA reads its flags when the backend starts, which no import above does.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE_FLAG).strip()

DEFAULT_CLIENTS = tuple(2 ** k for k in range(3, 13))  # 8, 16, ..., 4096

MEMORY_FIGURES = {
    "xla_peak_bytes": ("XLA's memory analysis of the compiled round (all of it in xla_memory): argument + "
                       "output + temp - alias bytes, every buffer of the round at once. Arguments hold the "
                       "state and the stacked client data; temp is the training scratch, which chunking "
                       "bounds. The figure the summary fits. xla_memory's peak_memory_in_bytes (jaxlib's own) "
                       "leaves the temporaries out on CPU (jaxlib 0.10), so it is not used."),
    "device_peak_bytes": ("the device allocator's process-wide peak_bytes_in_use after the count's rounds "
                          "(harness.device_memory), never reset: this count's peak unless an earlier count "
                          "peaked higher (counts run ascending, earlier data freed). None on CPU."),
    "host_peak_rss_bytes": ("the process's peak RSS (getrusage) after the count: monotonic over the process and "
                            "it includes the host copies made while building the data (about 3 times the data); "
                            "weak, for CPU runs. host_peak_rss_growth_bytes: its growth during the count."),
}


@dataclasses.dataclass(frozen=True)
class ScalingConfig:
  workload: BenchConfig  # infl_workload's settings: features, samples per client, network, local training, seed
  clients: tuple[int, ...] = DEFAULT_CLIENTS
  chunk: int = 256  # client_chunk_size above this many clients; at or below it the round is unchunked
  repeats: int = 3  # timed rounds, at most, per count (after the untimed one)
  budget_s: float = 60.0  # per count: no new timed round once this much timed-round time has passed
  warmup_max_s: float = 30.0  # no untimed round where a round is predicted to take longer than this
  time_limit_s: float = 3600.0  # the whole script: counts not started by then are skipped
  fit_from: int = 64  # the summary's fits use the counts from this one up
  compile_kind: str = "loop"  # "loop": as runs compile a round (jit_round); "once": LLVM optimisation off
  small: bool = False


SMALL_SCALING = dict(clients=(2, 4, 8), chunk=4, repeats=2, budget_s=5.0, fit_from=2, compile_kind="once", small=True)


# ------------------------------------------------------------------------------------------------
# One client count.


def host_peak_rss_bytes() -> int:
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def xla_peak_bytes(memory: dict | None) -> int | None:
  """Arguments + outputs + temporaries - aliased bytes of XLA's memory analysis: every buffer of the
  compiled round at once, an upper bound of what it holds. Not jaxlib's ``peak_memory_in_bytes``, kept in
  ``xla_memory``: on CPU (jaxlib 0.10) it leaves the temporaries out (arguments + outputs + a few bytes)."""
  parts = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
  if not memory or not all(name in memory for name in parts):
    return None
  return sum(memory[name] for name in parts) - memory.get("alias_size_in_bytes", 0)


def measure_count(cfg: ScalingConfig, report: harness.Report, work, count: int) -> dict:
  w = cfg.workload
  chunk = cfg.chunk if count > cfg.chunk else None
  row: dict[str, Any] = {"clients": count, "client_chunk_size": chunk,
                         "chunks": 1 if chunk is None else math.ceil(count / chunk),
                         "data_bytes": count * w.samples_per_client * (w.features * 4 + 4) + count * 8}
  rss_before = host_peak_rss_bytes()
  row["device_memory_before"] = harness.device_memory()

  t0 = time.perf_counter()
  x, y = synthetic_arrays(w, count, w.seed + count)
  clients = client_data(x, y)
  del x, y  # the host copies; the round reads the stacked device arrays
  jax.block_until_ready(clients)
  row["data_s"] = time.perf_counter() - t0

  state = work.fresh_state()
  t0 = time.perf_counter()
  # As runs compile a round (jit_round), or with LLVM optimisation off on CPU (runkit.xla.ONCE) for --small.
  jit = functools.partial(jax.jit, compiler_options=compiler_options(ONCE)) if cfg.compile_kind == "once" else jit_round
  compiled = jit(work.algorithm(client_chunk_size=chunk).round).lower(state, clients, work.coords).compile()
  row["compile_s"] = time.perf_counter() - t0
  row["xla_memory"] = harness.memory_analysis(compiled)
  row["xla_peak_bytes"] = xla_peak_bytes(row["xla_memory"])
  report.log.info("%d clients: compiled in %.1f s, XLA peak %s", count, row["compile_s"],
                  f"{row['xla_peak_bytes'] / 2**20:.0f} MiB" if row["xla_peak_bytes"] else "unknown")

  # This count's round from the largest count so far, scaled by clients: a long round skips the warm-up.
  measured = [r for r in report.data["results"].values() if r.get("seconds_per_client")]
  predicted = max(measured, key=lambda r: r["clients"])["seconds_per_client"] * count if measured else None
  row["predicted_round_s"] = predicted
  warmup = 0 if predicted is not None and predicted > cfg.warmup_max_s else 1
  rounds = timed_rounds(compiled, state, clients, work.coords, warmup_rounds=warmup, max_timed_rounds=cfg.repeats,
                        budget_s=cfg.budget_s)
  timed = rounds.seconds[warmup:]
  row.update(warmup_rounds=warmup, first_round_s=rounds.seconds[0], timed_rounds=len(timed),
             **harness.median_rate(timed))
  row["seconds_per_client"] = row["seconds_per_round"] / count
  row["train_loss_last_round"] = rounds.last_metrics["train_loss"]
  row["params_finite"] = bool(all(bool(np.all(np.isfinite(p)))
                                  for p in jax.tree_util.tree_leaves(jax.device_get(rounds.state.params))))
  row["device_memory_after"] = harness.device_memory()
  row["device_peak_bytes"] = (row["device_memory_after"] or {}).get("peak_bytes_in_use")
  row["host_peak_rss_bytes"] = host_peak_rss_bytes()
  row["host_peak_rss_growth_bytes"] = row["host_peak_rss_bytes"] - rss_before
  report.log.info("%d clients: %.3g s per round (%d timed, %s warm-up), %.3g ms per client", count,
                  row["seconds_per_round"], len(timed), warmup, 1e3 * row["seconds_per_client"])
  return row


# ------------------------------------------------------------------------------------------------
# Summary and figure.


def linear_fit(xs: Sequence[float], ys: Sequence[float], unit: str) -> dict | None:
  """Least squares y = a + b x: ``fixed_<unit>`` a, ``per_client_<unit>`` b, ``r2``; None under 2 points."""
  if len(set(xs)) < 2:
    return None
  x, y = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
  b, a = np.polyfit(x, y, 1)
  residual, total = float(np.sum((y - (a + b * x)) ** 2)), float(np.sum((y - y.mean()) ** 2))
  return {f"fixed_{unit}": float(a), f"per_client_{unit}": float(b),
          "r2": 1.0 - residual / total if total > 0 else 1.0, "clients": [int(c) for c in xs]}


def summarise(report: harness.Report, cfg: ScalingConfig) -> None:
  rows = sorted((row for row in report.data.get("results", {}).values() if "seconds_per_round" in row),
                key=lambda row: row["clients"])
  table = [{"clients": r["clients"], "client_chunk_size": r["client_chunk_size"], "compile_s": r["compile_s"],
            "seconds_per_round": r["seconds_per_round"], "seconds_per_client": r["seconds_per_client"],
            "timed_rounds": r["timed_rounds"], "xla_peak_bytes": r["xla_peak_bytes"],
            "xla_temp_bytes": (r["xla_memory"] or {}).get("temp_size_in_bytes"),
            "xla_argument_bytes": (r["xla_memory"] or {}).get("argument_size_in_bytes"),
            "device_peak_bytes": r["device_peak_bytes"], "host_peak_rss_bytes": r["host_peak_rss_bytes"]}
           for r in rows]
  fitted = [r for r in table if r["clients"] >= cfg.fit_from]
  chunked = [r for r in fitted if r["client_chunk_size"] is not None]

  def fit(key: str, unit: str, over: list[dict] = fitted) -> dict | None:
    points = [(r["clients"], r[key]) for r in over if r.get(key) is not None]
    return linear_fit([c for c, _ in points], [v for _, v in points], unit)

  seconds_fit = fit("seconds_per_round", "s")
  summary = {
      "fit": f"least squares, value = fixed + per_client * clients, over the counts >= {cfg.fit_from}",
      "seconds_per_round_fit": seconds_fit,
      "xla_peak_bytes_fit": fit("xla_peak_bytes", "bytes"),
      "device_peak_bytes_fit": fit("device_peak_bytes", "bytes"),
      # Memory is two lines: unchunked, every client's scratch at once; chunked, one chunk's scratch (flat)
      # plus the client data. Fitted over the chunked counts, per_client_bytes is the data a client adds.
      "chunked_fit": (f"the same fits over the counts >= {cfg.fit_from} above the chunk ({cfg.chunk}), where "
                      "one chunk trains at a time"),
      "xla_peak_bytes_fit_chunked": fit("xla_peak_bytes", "bytes", chunked),
      "xla_temp_bytes_fit_chunked": fit("xla_temp_bytes", "bytes", chunked),
      "device_peak_bytes_fit_chunked": fit("device_peak_bytes", "bytes", chunked),
      "table": table,
  }
  if seconds_fit:
    summary["per_client_ms"] = 1e3 * seconds_fit["per_client_s"]
    summary["fixed_s"] = seconds_fit["fixed_s"]
  for name, row in (("smallest", table[:1]), ("largest", table[-1:])):
    summary[name] = row[0] if row else None
  report.data["summary"] = summary


def plot_scaling(data: dict, png: str | os.PathLike) -> pathlib.Path:
  """Seconds per round and peak memory against clients (log-log) from this benchmark's JSON."""
  import matplotlib
  matplotlib.use("Agg")  # files only
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  table = data.get("summary", {}).get("table") or []
  if not table:
    raise ValueError("the JSON has no measured client count (summary.table is empty)")
  clients = np.array([r["clients"] for r in table], np.float64)
  fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))

  ax_t.plot(clients, [r["seconds_per_round"] for r in table], "o-", label="seconds per round (median)")
  ax_t.plot(clients, [r["compile_s"] for r in table], "s:", color="grey", alpha=0.7, label="compile seconds")
  seconds_fit = data["summary"].get("seconds_per_round_fit")
  title = "round time"
  if seconds_fit:
    c = np.geomspace(min(seconds_fit["clients"]), clients.max(), 50)
    ax_t.plot(c, seconds_fit["fixed_s"] + seconds_fit["per_client_s"] * c, "--", color="C3",
              label=f"fit {seconds_fit['fixed_s']:.3g} s + {1e3 * seconds_fit['per_client_s']:.3g} ms x clients")
    title = f"round time: {1e3 * seconds_fit['per_client_s']:.3g} ms per client, {seconds_fit['fixed_s']:.2g} s fixed"
  ax_t.set(title=title, xlabel="clients", ylabel="seconds")

  mib = lambda key: [r[key] / 2**20 if r.get(key) is not None else np.nan for r in table]
  ax_m.plot(clients, mib("xla_peak_bytes"), "o-", label="XLA peak (arguments + outputs + temp)")
  ax_m.plot(clients, mib("xla_argument_bytes"), "^:", label="XLA arguments (mostly client data)")
  ax_m.plot(clients, mib("xla_temp_bytes"), "v:", label="XLA temp (training scratch)")
  if any(r.get("device_peak_bytes") for r in table):
    ax_m.plot(clients, mib("device_peak_bytes"), "D-", label="device allocator peak")
  ax_m.plot(clients, mib("host_peak_rss_bytes"), "x--", color="grey", alpha=0.6, label="host peak RSS (weak)")
  memory_fit, which = data["summary"].get("xla_peak_bytes_fit_chunked"), "chunked"
  if not memory_fit:
    memory_fit, which = data["summary"].get("xla_peak_bytes_fit"), "all fitted counts"
  title = "peak memory"
  if memory_fit:
    c = np.geomspace(min(memory_fit["clients"]), clients.max(), 50)
    ax_m.plot(c, (memory_fit["fixed_bytes"] + memory_fit["per_client_bytes"] * c) / 2**20, "--", color="C3",
              label=(f"fit ({which}) {memory_fit['fixed_bytes'] / 2**20:.0f} MiB + "
                     f"{memory_fit['per_client_bytes'] / 2**20:.2f} MiB x clients"))
    title = f"peak memory (XLA): {memory_fit['per_client_bytes'] / 2**20:.2f} MiB per client ({which})"
  ax_m.set(title=title, xlabel="clients", ylabel="MiB")

  chunk = data.get("config", {}).get("chunk")
  for ax in (ax_t, ax_m):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(clients, [str(int(c)) for c in clients], fontsize=8)
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    if chunk and clients.min() <= chunk < clients.max():
      ax.axvline(chunk, color="k", alpha=0.25, lw=1)
      ax.text(chunk, ax.get_ylim()[1], f" chunk {chunk}", va="top", fontsize=8, alpha=0.6)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
  environment = data.get("environment", {})
  cpu = environment.get("backend") == "cpu"
  device = f"CPU, {environment.get('cpu_count', '?')} cores" if cpu else environment.get("device_kind", "?")
  fig.suptitle(f"INFL round (keyed proteomics network) vs clients: {data.get('workload_short', '')}; {device}",
               fontsize=10)
  fig.tight_layout()
  path = pathlib.Path(png)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


# ------------------------------------------------------------------------------------------------
# Driver.


def measure_or_error(cfg: ScalingConfig, report: harness.Report, work, count: int) -> dict:
  try:
    return measure_count(cfg, report, work, count)
  except Exception as e:  # noqa: BLE001 - out of memory is a result here, not only an error
    return {"clients": count, "out_of_memory": harness.is_out_of_memory(e),
            "error": report.error(f"clients {count}", e), "device_memory_after": harness.device_memory()}


def run(cfg: ScalingConfig, report: harness.Report) -> None:
  data = report.data
  data["environment"] = harness.environment()
  report.log.info("device: %s (%s)", data["environment"]["device_kind"], data["environment"]["backend"])
  work = build_workload(cfg.workload)
  data["model"] = {"jax_param_count": param_count(work.variables["params"]),
                   "jax_model_state_count": param_count({k: v for k, v in work.variables.items() if k != "params"})}
  data["results"] = {}
  for count in cfg.clients:
    if report.elapsed() > cfg.time_limit_s:
      report.log.info("%d clients: skipped, the time limit (%s s) is spent", count, cfg.time_limit_s)
      data["results"][str(count)] = {"clients": count, "skipped": "time limit"}
    else:
      report.log.info("%d clients%s", count, f", chunks of {cfg.chunk}" if count > cfg.chunk else ", unchunked")
      data["results"][str(count)] = report.attempt(f"clients {count}", lambda: measure_or_error(cfg, report, work,
                                                                                                count))
    gc.collect()  # this count's client data and compiled round go before the next count's
    summarise(report, cfg)
    report.save()


def parse_args(argv: Sequence[str] | None) -> tuple[ScalingConfig, argparse.Namespace]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", type=pathlib.Path, help="also write the JSON here (after every client count)")
  parser.add_argument("--plot", type=pathlib.Path, help="draw the curves into this PNG at the end")
  parser.add_argument("--replot", type=pathlib.Path, metavar="JSON", help="measure nothing: draw --plot from it")
  parser.add_argument("--small", action="store_true", help="CPU smoke run: 2, 4, 8 clients, chunk 4, 64 features")
  parser.add_argument("--clients", type=str, help="client counts, comma-separated (default 8,16,...,4096)")
  parser.add_argument("--chunk", type=int, help="client_chunk_size above this many clients (default 256)")
  parser.add_argument("--repeats", type=int, help="timed rounds, at most, per count (default 3)")
  parser.add_argument("--budget-s", type=float, help="per count: no new timed round after this (default 60)")
  parser.add_argument("--warmup-max-s", type=float, help="no untimed round where one is predicted longer (30)")
  parser.add_argument("--time-limit-s", type=float, help="counts not started by then are skipped (default 3600)")
  parser.add_argument("--fit-from", type=int, help="fit over the counts from this one up (default 64)")
  parser.add_argument("--compile", dest="compile_kind", choices=("loop", "once"),
                      help="loop: as runs compile a round (default); once: LLVM optimisation off (--small)")
  parser.add_argument("--no-fast-compile", action="store_true",
                      help=f"with --small, keep XLA's optimisation level (--small otherwise adds {FAST_COMPILE_FLAG})")
  for name in ("samples-per-client", "features", "local-epochs", "batch-size", "num-blocks", "seed"):
    parser.add_argument(f"--{name}", type=int)
  args = parser.parse_args(argv)
  if args.replot is not None:
    return None, args if args.plot is not None else parser.error("--replot needs --plot PNG")

  workload = {k: SMALL[k] for k in ("features", "num_blocks", "local_epochs")} if args.small else {}
  names = ("samples_per_client", "features", "local_epochs", "batch_size", "num_blocks", "seed")
  workload.update({name: getattr(args, name) for name in names if getattr(args, name) is not None})
  values: dict[str, Any] = dict(SMALL_SCALING) if args.small else {}
  for name in ("chunk", "repeats", "budget_s", "warmup_max_s", "time_limit_s", "fit_from", "compile_kind"):
    if getattr(args, name) is not None:
      values[name] = getattr(args, name)
  if args.clients is not None:
    try:
      values["clients"] = tuple(sorted({int(c) for c in args.clients.split(",") if c.strip()}))
    except ValueError:
      parser.error(f"--clients takes comma-separated integers such as 8,64,512, got {args.clients!r}")
  clients = values.get("clients", DEFAULT_CLIENTS)
  cfg = ScalingConfig(workload=BenchConfig(clients=clients, use_torch=False, **workload), **values)
  for name, value in (("chunk", cfg.chunk), ("repeats", cfg.repeats), *((n, getattr(cfg.workload, n)) for n in (
      "samples_per_client", "features", "local_epochs", "batch_size"))):
    if value < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
  if not cfg.clients or min(cfg.clients) < 1:
    parser.error(f"--clients needs at least one count, each >= 1, got {args.clients!r}")
  return cfg, args


def main(argv: Sequence[str] | None = None) -> dict:
  cfg, args = parse_args(argv)
  if cfg is None:  # --replot
    path = plot_scaling(json.loads(args.replot.read_text()), args.plot)
    harness.get_logger("infl_scaling").info("wrote %s", path)
    return {}
  config = dataclasses.asdict(cfg)
  config["workload"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config["workload"].items()
                        if k in ("samples_per_client", "features", "num_classes", "key_strength", "local_epochs",
                                 "batch_size", "learning_rate", "weight_decay", "dropout", "num_blocks",
                                 "client_optimizer", "seed")}
  config["clients"] = list(cfg.clients)
  report = harness.Report("infl_scaling", {
      "workload": workload_description(cfg.workload),
      "workload_short": (f"{cfg.workload.features} features, {cfg.workload.samples_per_client} samples per client, "
                         f"{cfg.workload.local_epochs} local epochs, chunk {cfg.chunk}"),
      "synthetic_data": True,
      "data_note": ("synthetic float32 N(0,1) features of the proteomics shape and labels from a random "
                    "linear rule (infl_workload.synthetic_arrays); speed does not depend on the values"),
      "timing": ("per count: compiled ahead of time (compile_s; jit_round, or runkit.xla.ONCE with compile_kind "
                 "'once'), one untimed round unless predicted longer than warmup_max_s, then timed rounds through "
                 "run_rounds until repeats or, after one, budget_s; seconds_per_round is their median"),
      "memory_figures": MEMORY_FIGURES,
      "compilation_cache_dir": jax.config.jax_compilation_cache_dir,  # None: every compile_s is a real compile
      "config": config,
  }, args.out)

  def summarise_and_plot() -> None:
    summarise(report, cfg)
    if args.plot is not None:
      try:
        report.data["plot"] = str(plot_scaling(report.data, args.plot))
      except Exception as e:  # noqa: BLE001 - the figure is an extra; the JSON must still come out
        report.error("plot", e)

  return report.run(lambda: run(cfg, report), summarize=summarise_and_plot)


if __name__ == "__main__":
  main()
