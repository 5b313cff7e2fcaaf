#!/usr/bin/env python
"""Label-efficiency study: test ACC/AUC of the plain backbone and of LSANet (main head alone, fused head)
over label fractions and seeds, with parameters and FLOPs of every model and head.

    PYTHONPATH=. nice -n 10 python scripts/lsanet_label_study.py --out runs/label_study_digits \\
        --figure docs/figures/lsanet_label_study_digits.png -- --flag digits
    PYTHONPATH=. python scripts/lsanet_label_study.py --out runs/study_blood --width 1 --lsa-dim 128 \\
        --epochs 100 --eval-every 1 -- --flag bloodmnist
    PYTHONPATH=. python scripts/lsanet_label_study.py --out runs/study_mine -- --data my_set.npz

Everything after ``--`` is passed to ``lsanet-train`` as it is (the data: ``--flag``/``--data``/``--root``,
and e.g. ``--backbone``); the study sets ``--workdir``, ``--variant``, ``--label-fraction``, ``--epochs``,
``--eval-every``, ``--seed``, ``--label-seed``, ``--width``, ``--lsa-dim`` and the checkpoints (the last epoch
only: ``--checkpoint-every EPOCHS --keep-checkpoints 1``) itself.

Cells: every label fraction x variant x replicate. Replicate r trains with ``--seed seeds[r]``
(initialisation and batch order) and ``--label-seed label_seeds[r]`` (which training images keep their
labels); both variants of a replicate share both seeds, so their scores form pairs. Each cell runs the
real training entry point in this process (``lsanet_jax.main.run``, the whole ``lsanet-train`` command)
in its own workdir ``OUT/runs/<variant>_f<fraction>_s<seed>_l<label seed>``; a cell whose summary.json
is there with the same settings (those that change the result: every setting a resume must share) is
reused and a cell cut short runs again, so an interrupted study continues where it stopped. Model selection: ``lsanet-train`` validates every
``--eval-every`` epochs (and at the last), keeps the weights of the best validation AUC of its selection
head (``fused`` for LSANet, ``main`` for plain) and scores the test split once with them; the study
reads those test scores from summary.json.

``--flag digits`` (scikit-learn's digits; the built-in split is drawn with the label seed) is written
once to ``OUT/data/digits.npz`` with the split of ``--digits-split-seed`` so that every cell has the same
validation and test images and the label seed only picks the labelled subset.

Costs (``model_costs``): parameters each head needs, and FLOPs per image from XLA's cost analysis of the
compiled evaluation-mode forward pass, ``jax.jit(f).lower(...).compile().cost_analysis()["flops"]``, with
f returning one head's logits, so that XLA drops the branches the head does not need (the main head alone
against the fused head, which needs every branch).

Outputs in --out: ``study.json`` (command, settings, hardware, every cell, the aggregates, paired
differences, costs, LSA layer weights), ``study.md`` (the tables, also printed) and ``label_study.png``
(ACC and AUC against label fraction, log x axis, mean +- std over replicates, one line per model/head).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import platform
import shlex
import shutil
import sys
import time

import numpy as np

DEFAULT_FRACTIONS = (0.01, 0.05, 0.1, 1.0)
# Per label fraction: epochs and validation interval (the same for every variant). The small subsets are
# one batch per epoch, so their "epochs" are optimizer steps; these keep the digits study CPU-sized.
DEFAULT_EPOCHS = {0.01: 150, 0.05: 100, 0.1: 80, 1.0: 6}
DEFAULT_EVAL_EVERY = {0.01: 15, 0.05: 10, 0.1: 8, 1.0: 2}
# (variant, head) series compared; plain has only the main head.
SERIES = (("plain", "main"), ("lsanet", "main"), ("lsanet", "fused"))
BASELINE = ("plain", "main")
METRICS = ("test_acc", "test_auc")
STUDY_FLAGS = ("--workdir", "--variant", "--label-fraction", "--epochs", "--eval-every", "--seed", "--label-seed",
               "--width", "--lsa-dim", "--checkpoint-every", "--keep-checkpoints", "--resume", "--stop-after-epochs")


# ---------------------------------------------------------------------------------------------------------
# Aggregation (pure functions of the per-cell rows; tested without training)

def series_name(variant: str, head: str) -> str:
  return f"{variant}/{head}"


def mean_std(values) -> tuple[float, float | None]:
  """Mean and sample standard deviation (ddof 1; None for a single value)."""
  values = np.asarray(values, dtype=float)
  return float(values.mean()), (float(values.std(ddof=1)) if values.size > 1 else None)


def aggregate(rows: list[dict], series=SERIES, metrics=METRICS) -> list[dict]:
  """One entry per (series, fraction, metric): n, mean, std (ddof 1), the per-replicate values and their
  (seed, label seed), in replicate order (sorted by seed, then label seed)."""
  out = []
  fractions = sorted({r["fraction"] for r in rows})
  for variant, head in series:
    for fraction in fractions:
      cells = sorted((r for r in rows if r["variant"] == variant and r["fraction"] == fraction
                      and head in r["heads"]), key=lambda r: (r["seed"], r["label_seed"]))
      if not cells:
        continue
      for metric in metrics:
        values = [float(r["heads"][head][metric]) for r in cells]
        mean, std = mean_std(values)
        out.append({"series": series_name(variant, head), "variant": variant, "head": head, "fraction": fraction,
                    "metric": metric, "n": len(values), "mean": mean, "std": std, "values": values,
                    "replicates": [[r["seed"], r["label_seed"]] for r in cells],
                    "num_train": sorted({r["num_train"] for r in cells})})
  return out


def paired_differences(rows: list[dict], series=SERIES, baseline=BASELINE, metrics=METRICS) -> list[dict]:
  """For every series other than the baseline: the per-replicate difference series - baseline (same seed and
  label seed, so the same labelled images and the same initialisation seed), its mean, std (ddof 1) and how
  many replicates it wins, ties and loses."""
  index = {(r["variant"], r["fraction"], r["seed"], r["label_seed"]): r for r in rows}
  out = []
  for variant, head in series:
    if (variant, head) == baseline:
      continue
    for fraction in sorted({r["fraction"] for r in rows}):
      pairs = []
      for (v, f, seed, label_seed), r in sorted(index.items(), key=lambda kv: kv[0][2:]):
        base = index.get((baseline[0], fraction, seed, label_seed))
        if v == variant and f == fraction and base is not None and head in r["heads"]:
          pairs.append((seed, label_seed, r, base))
      if not pairs:
        continue
      for metric in metrics:
        diffs = [float(r["heads"][head][metric]) - float(b["heads"][baseline[1]][metric]) for _, _, r, b in pairs]
        mean, std = mean_std(diffs)
        out.append({"series": series_name(variant, head), "baseline": series_name(*baseline), "fraction": fraction,
                    "metric": metric, "n": len(diffs), "mean": mean, "std": std, "values": diffs,
                    "replicates": [[s, ls] for s, ls, _, _ in pairs],
                    "wins": sum(d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs),
                    "losses": sum(d < 0 for d in diffs)})
  return out


def lsa_weight_summary(rows: list[dict]) -> list[dict]:
  """Per fraction: the LSA layer weights at the end of training (mean over the last epoch's training
  batches, then over replicates), with their smallest and largest value over replicates."""
  out = []
  for fraction in sorted({r["fraction"] for r in rows}):
    cells = [r for r in rows if r["fraction"] == fraction and r.get("lsa_weights")]
    if not cells:
      continue
    branches = list(cells[0]["lsa_weights"])
    entry = {"fraction": fraction, "n": len(cells), "branches": {}}
    for b in branches:
      values = [r["lsa_weights"][b] for r in cells]
      entry["branches"][b] = {"mean": float(np.mean(values)), "min": float(np.min(values)),
                              "max": float(np.max(values))}
    out.append(entry)
  return out


def fraction_label(fraction: float) -> str:
  return f"{fraction * 100:g}%"


def _cell(entry: dict | None, digits: int = 3, signed: bool = False) -> str:
  if entry is None:
    return "–"
  fmt = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
  text = fmt.format(entry["mean"])
  text += f" ± {entry['std']:.{digits}f}" if entry["std"] is not None else " (n=1)"
  return text + " [" + ", ".join(fmt.format(v) for v in entry["values"]) + "]"


def markdown_tables(aggregates: list[dict], paired: list[dict], rows: list[dict], series=SERIES,
                    metrics=METRICS, baseline=BASELINE) -> str:
  """One markdown table per metric: a row per label fraction, a column per series (mean ± std (ddof 1)
  [per-replicate values]) and a column per paired difference against the baseline."""
  by_key = {(a["series"], a["fraction"], a["metric"]): a for a in aggregates}
  diff_key = {(d["series"], d["fraction"], d["metric"]): d for d in paired}
  names = [series_name(*s) for s in series]
  others = [n for n in names if n != series_name(*baseline)]
  fractions = sorted({a["fraction"] for a in aggregates})
  labelled = {f: sorted({r["num_train"] for r in rows if r["fraction"] == f}) for f in fractions}
  epochs = {f: sorted({r["epochs"] for r in rows if r["fraction"] == f}) for f in fractions}
  parts = []
  for metric in metrics:
    title = metric.replace("test_", "test ").upper().replace("TEST", "test")
    header = ["label fraction", "labelled images", "epochs", *names,
              *[f"{n} − {series_name(*baseline)} (paired; wins/ties/losses)" for n in others]]
    lines = [f"**{title}** — mean ± std (ddof 1) [per replicate, in seed order]", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for f in fractions:
      cells = [fraction_label(f), "/".join(map(str, labelled[f])), "/".join(map(str, epochs[f]))]
      cells += [_cell(by_key.get((n, f, metric))) for n in names]
      for n in others:
        d = diff_key.get((n, f, metric))
        cells.append("–" if d is None else f"{_cell(d, signed=True)} {d['wins']}/{d['ties']}/{d['losses']}")
      lines.append("| " + " | ".join(cells) + " |")
    parts.append("\n".join(lines))
  return "\n\n".join(parts)


def cost_table(costs: dict) -> str:
  """Markdown: parameters and FLOPs per image of every model and head."""
  base = next((e for e in costs["heads"] if e["series"] == series_name(*BASELINE)), None)
  lines = ["| model / head | parameters needed | FLOPs per image (XLA) | FLOPs / plain's | what runs |",
           "|---|---|---|---|---|"]
  for entry in costs["heads"]:
    ratio = f"{entry['flops'] / base['flops']:.2f}×" if base else "–"
    lines.append(f"| {entry['series']} | {entry['params']:,} | {entry['flops']:,.0f} | {ratio} | {entry['what']} |")
  return "\n".join(lines)


def lsa_table(summary: list[dict]) -> str:
  if not summary:
    return ""
  branches = list(summary[0]["branches"])
  lines = ["| label fraction | runs | " + " | ".join(f"α {b} mean [min, max]" for b in branches) + " |",
           "|" + "---|" * (2 + len(branches))]
  for entry in summary:
    cells = [f"{entry['branches'][b]['mean']:.4f} [{entry['branches'][b]['min']:.4f}, "
             f"{entry['branches'][b]['max']:.4f}]" for b in branches]
    lines.append(f"| {fraction_label(entry['fraction'])} | {entry['n']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(aggregates: list[dict], path, *, title: str, series=SERIES, metrics=METRICS) -> pathlib.Path:
  """ACC (and AUC) against label fraction: log x axis, mean ± std error bars, one line per series."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), squeeze=False)
  names = [series_name(*s) for s in series]
  fractions = sorted({a["fraction"] for a in aggregates})
  for ax, metric in zip(axes[0], metrics):
    for k, name in enumerate(names):
      entries = sorted((a for a in aggregates if a["series"] == name and a["metric"] == metric),
                       key=lambda a: a["fraction"])
      if not entries:
        continue
      shift = 1.06 ** (k - (len(names) - 1) / 2)  # side by side, so the error bars do not hide each other
      xs = [a["fraction"] * shift for a in entries]
      ax.errorbar(xs, [a["mean"] for a in entries], yerr=[a["std"] or 0.0 for a in entries], marker="o",
                  capsize=3, label=f"{name} (n={entries[0]['n']})")
      for x, a in zip(xs, entries):
        ax.scatter([x] * len(a["values"]), a["values"], s=8, alpha=0.35, color=ax.lines[-1].get_color())
    ax.set_xscale("log")
    ax.set_xticks(fractions, [fraction_label(f) for f in fractions])
    ax.minorticks_off()
    ax.set(xlabel="labelled fraction of the training set", ylabel=metric.replace("_", " "),
           title=metric.replace("test_", "test ").upper().replace("TEST", "test"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f"{title}\nmean ± std (ddof 1) over replicates (bars), each replicate (dots)", fontsize=9)
  fig.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


# ---------------------------------------------------------------------------------------------------------
# Costs: parameters and FLOPs of every model and head

def _flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
    analysis = analysis[0]
  return float(analysis["flops"])


def head_param_counts(params: dict) -> dict:
  """Parameters each head needs at inference, from the parameter tree's names: ``main`` uses the stem,
  the backbone stages and the main classifier (``head``); ``fused`` uses everything except the classifiers
  of the main and auxiliary heads (it reads their pooled features, not their logits); ``all`` is every
  parameter (BatchNorm statistics are not parameters and are not counted)."""
  import jax

  def count(keep) -> int:
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
      names = [getattr(k, "key", str(k)) for k in path]
      if keep(names):
        total += int(np.prod(leaf.shape))
    return total

  counts = {"all": count(lambda n: True),
            "main": count(lambda n: not n[0].startswith("aux") and n[0] != "lsa")}
  if "lsa" in params:
    counts["fused"] = count(lambda n: n[0] == "lsa" or "classifier" not in n)
  return counts


def model_costs(train_argv: list[str], variants=("plain", "lsanet"), heads=("main", "fused")) -> dict:
  """Parameters and FLOPs per image of each variant's heads: the forward pass in evaluation mode for one
  image, jit-compiled for the CPU; FLOPs are XLA's cost analysis of the compiled program
  (``jax.jit(f).lower(...).compile().cost_analysis()["flops"]``, a multiply-add counting 2, element-wise
  ops included), where f returns one head's logits, so XLA's dead-code elimination leaves out the
  branches that head does not need, or all heads' logits (``all``)."""
  import jax
  import jax.numpy as jnp

  from lsanet_jax import main as lsanet_main
  from lsanet_jax import train

  entries, totals = [], {}
  for variant in variants:
    args = lsanet_main.build_parser().parse_args([*train_argv, "--workdir", "unused", "--variant", variant])
    config = lsanet_main.config_from_args(args)
    data = train.load_data(config)
    model = train.build_model(config, data.n_classes).clone(dtype=jnp.float32)
    image = jax.ShapeDtypeStruct((1, *data.train_images.shape[1:]), jnp.float32)
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0, impl="rbg"), image)
    params = head_param_counts(variables["params"])
    logits = jax.eval_shape(functools.partial(model.apply, train=False), variables, image)["logits"]

    def flops_of(select):
      return _flops(jax.jit(lambda v, x: select(model.apply(v, x, train=False)["logits"]))
                    .lower(variables, image).compile())

    for head in heads:
      if head not in logits:
        continue
      what = ("stem + backbone stages + main classifier" if head == "main" else
              "stem + backbone + every auxiliary branch + LSA + fused classifier")
      entries.append({"series": series_name(variant, head), "variant": variant, "head": head,
                      "params": params[head], "flops": flops_of(lambda out, h=head: out[h]), "what": what})
    if len(logits) > 1:
      entries.append({"series": series_name(variant, "all heads"), "variant": variant, "head": "all",
                      "params": params["all"], "flops": flops_of(lambda out: out),
                      "what": "every head at once (what evaluation runs), " + ", ".join(logits)})
    totals[variant] = {"params_total": params["all"], "head_params": params,
                       "image_shape": list(data.train_images.shape[1:]), "num_classes": data.n_classes}
  return {"method": "XLA cost analysis of the compiled forward pass (evaluation mode, batch 1, float32, "
                    "this machine's backend): jax.jit(f).lower(variables, image).compile().cost_analysis()"
                    "['flops']; f returns the head's logits only, so the branches it does not need are "
                    "removed by XLA's dead-code elimination; a multiply-add counts 2 FLOPs; element-wise "
                    "ops (BatchNorm, ReLU, softmax) included",
          "params_method": "parameter leaves by name: main = stem, stages, main classifier; fused = all but the "
                           "main and auxiliary classifiers; BatchNorm statistics not counted",
          "heads": entries, "models": totals}


# ---------------------------------------------------------------------------------------------------------
# Running the cells

def parse_fraction_map(text: str, fractions) -> dict:
  """'0.01:60,0.05:40' -> {0.01: 60, 0.05: 40}; one number applies to every fraction."""
  text = text.strip()
  if ":" not in text:
    return {f: int(text) for f in fractions}
  out = {}
  for item in text.split(","):
    f, n = item.split(":")
    out[float(f)] = int(n)
  missing = [f for f in fractions if f not in out]
  if missing:
    raise SystemExit(f"error: no value given for label fraction(s) {missing} in {text!r}")
  return out


def hardware() -> dict:
  import jax
  model = ""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        model = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  try:
    usable = len(os.sched_getaffinity(0))
  except AttributeError:
    usable = os.cpu_count()
  return {"cpu": model or platform.processor(), "cpus_usable": usable, "os_cpu_count": os.cpu_count(),
          "platform": platform.platform(), "python": platform.python_version(), "jax": jax.__version__,
          "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
          "niceness": os.nice(0) if hasattr(os, "nice") else None}


def load_average() -> list[float] | None:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def cell_dir(out: pathlib.Path, variant: str, fraction: float, seed: int, label_seed: int) -> pathlib.Path:
  return out / "runs" / f"{variant}_f{fraction:g}_s{seed}_l{label_seed}"


def cell_argv(train_argv, workdir, variant, fraction, seed, label_seed, epochs, eval_every, width, lsa_dim):
  return [*train_argv, "--workdir", str(workdir), "--variant", variant, "--label-fraction", f"{fraction:g}",
          "--epochs", str(epochs), "--eval-every", str(eval_every), "--seed", str(seed),
          "--label-seed", str(label_seed), "--width", f"{width:g}", "--lsa-dim", str(lsa_dim),
          # Saving the state takes seconds on a busy CPU, more than an epoch of a small subset: only the last.
          "--checkpoint-every", str(epochs), "--keep-checkpoints", "1"]


def _jsonable(obj):
  return json.loads(json.dumps(obj, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


CELL_TIMES = "study_cell_times.json"  # in each cell's workdir: the seconds the cell took when it ran


def run_cell(argv: list[str], workdir: pathlib.Path) -> tuple[dict, str, dict]:
  """(summary, how: "ran" | "resumed" | "reused", times) of one cell through lsanet_jax.main.run; times:
  wall and CPU seconds (this process, all threads) of the run, as recorded when it ran (None if unknown)."""
  from lsanet_jax import main as lsanet_main
  from runkit.cli import has_checkpoint

  from runkit.config import resume_fingerprint

  config = lsanet_main.config_from_args(lsanet_main.build_parser().parse_args(argv))
  # The settings that change the result (those a resume must share; not where the files lie).
  expected = _jsonable(resume_fingerprint(config)[0])
  summary_path, times_path = workdir / "summary.json", workdir / CELL_TIMES
  if summary_path.exists():
    summary = json.loads(summary_path.read_text())
    recorded = {**_jsonable(resume_fingerprint(type(config)())[1]), **summary.get("config", {})}
    if {k: recorded.get(k) for k in expected} != expected:
      raise SystemExit(f"error: {workdir} holds a finished run with other settings; choose another --out")
    times = (json.loads(times_path.read_text()) if times_path.exists() else
             {"seconds": summary.get("seconds_this_invocation"), "cpu_seconds": None})
    return summary, "reused", times
  how = "resumed" if has_checkpoint(workdir) else "ran"
  wall, cpu = time.perf_counter(), time.process_time()
  summary = lsanet_main.run([*argv, "--resume"] if how == "resumed" else argv)
  times = {"seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu,
           "load_average_after": load_average()}
  (workdir / CELL_TIMES).write_text(json.dumps(times) + "\n")
  return summary, how, times


def final_lsa_weights(workdir: pathlib.Path) -> dict | None:
  """The last epoch's LSA layer weights from metrics.jsonl (mean over that epoch's training batches and the
  channels), or None without LSA."""
  from runkit.metrics_log import read_metrics
  rows = read_metrics(workdir / "metrics.jsonl")
  if not rows:
    return None
  last = rows[-1]
  weights = {k[len("lsa_weight_"):]: float(v) for k, v in last.items() if k.startswith("lsa_weight_")}
  return weights or None


def cell_row(summary: dict, workdir: pathlib.Path, *, variant, fraction, seed, label_seed, epochs, eval_every,
             how: str, times: dict) -> dict:
  return {"dataset": summary["dataset"], "variant": variant, "fraction": fraction, "seed": seed, "label_seed": label_seed, "epochs": epochs,
          "eval_every": eval_every, "num_train": summary["num_train"], "best_epoch": summary["best_epoch"],
          "selection_head": summary["selection_head"], "heads": summary["heads"], "params": summary["params"],
          "lsa_weights": final_lsa_weights(workdir), "how": how, "seconds": times["seconds"],
          "cpu_seconds": times["cpu_seconds"],
          "seeds": summary.get("seeds"), "workdir": str(workdir)}


def prepare_digits(train_argv: list[str], out: pathlib.Path, split_seed: int) -> list[str]:
  """--flag digits without --root: write the split of split_seed to OUT/data/digits.npz and read it from there,
  so that every cell sees the same validation and test images (the built-in split follows --label-seed)."""
  if "--flag" not in train_argv or train_argv[train_argv.index("--flag") + 1] != "digits" or "--root" in train_argv:
    return train_argv
  from lsanet_jax.data.medmnist import digits_as_medmnist, write_medmnist_npz
  path = out / "data" / "digits.npz"
  if not path.exists():
    write_medmnist_npz(path, digits_as_medmnist(seed=split_seed))
  return [*train_argv, "--root", str(path.parent)]


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="study folder (cells in OUT/runs, study.json, study.md, the PNG)")
  p.add_argument("--fractions", default=",".join(f"{f:g}" for f in DEFAULT_FRACTIONS),
                 help="label fractions, comma-separated (default: %(default)s)")
  p.add_argument("--variants", default="plain,lsanet", help="lsanet-train --variant values (default: %(default)s)")
  p.add_argument("--seeds", default="0,1,2", help="--seed of each replicate: initialisation and batch order "
                 "(default: %(default)s)")
  p.add_argument("--label-seeds", default=None, help="--label-seed of each replicate: the labelled subset "
                 "(default: the same as --seeds)")
  p.add_argument("--epochs", default=",".join(f"{f:g}:{n}" for f, n in DEFAULT_EPOCHS.items()),
                 help="epochs per label fraction, 'FRACTION:EPOCHS,...' or one number (default: %(default)s)")
  p.add_argument("--eval-every", default=",".join(f"{f:g}:{n}" for f, n in DEFAULT_EVAL_EVERY.items()),
                 help="validation interval per label fraction (and always the last epoch) (default: %(default)s)")
  p.add_argument("--width", type=float, default=0.25, help="channel width multiplier (default: %(default)s)")
  p.add_argument("--lsa-dim", type=int, default=32, help="LSA projection width (default: %(default)s)")
  p.add_argument("--digits-split-seed", type=int, default=0,
                 help="seed of the fixed train/val/test split written for --flag digits (default: %(default)s)")
  p.add_argument("--figure", default=None, help="also copy the PNG here (e.g. docs/figures/...png)")
  p.add_argument("--skip-costs", action="store_true", help="leave out the parameter and FLOP counts")
  p.add_argument("train_flags", nargs=argparse.REMAINDER, help="lsanet-train flags, after --")
  return p


def main(argv=None) -> int:
  command = "python scripts/lsanet_label_study.py " + shlex.join(sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(argv)
  train_argv = [f for f in args.train_flags if f != "--"] or ["--flag", "digits"]
  clash = [f for f in train_argv if f.split("=")[0] in STUDY_FLAGS]
  if clash:
    raise SystemExit(f"error: the study sets {', '.join(clash)} itself; use the study's options instead")
  fractions = sorted(float(f) for f in args.fractions.split(","))
  variants = args.variants.split(",")
  seeds = [int(s) for s in args.seeds.split(",")]
  label_seeds = [int(s) for s in args.label_seeds.split(",")] if args.label_seeds else list(seeds)
  if len(label_seeds) != len(seeds):
    raise SystemExit("error: --label-seeds needs one value per --seeds value")
  epochs = parse_fraction_map(args.epochs, fractions)
  eval_every = parse_fraction_map(args.eval_every, fractions)
  out = pathlib.Path(args.out).expanduser()
  out.mkdir(parents=True, exist_ok=True)
  given_argv = train_argv
  train_argv = prepare_digits(train_argv, out, args.digits_split_seed)
  fixed_digits_split = train_argv != given_argv
  series = tuple(s for s in SERIES if s[0] in variants)

  started, load_before = time.perf_counter(), load_average()
  rows = []
  total = len(seeds) * len(fractions) * len(variants)
  for seed, label_seed in zip(seeds, label_seeds):  # replicate by replicate: a cut-short study keeps whole ones
    for fraction in fractions:
      for variant in variants:
        workdir = cell_dir(out, variant, fraction, seed, label_seed)
        argv = cell_argv(train_argv, workdir, variant, fraction, seed, label_seed, epochs[fraction],
                         eval_every[fraction], args.width, args.lsa_dim)
        print(f"[{len(rows) + 1}/{total}] lsanet-train {shlex.join(argv)}", file=sys.stderr, flush=True)
        summary, how, times = run_cell(argv, workdir)
        rows.append(cell_row(summary, workdir, variant=variant, fraction=fraction, seed=seed,
                             label_seed=label_seed, epochs=epochs[fraction], eval_every=eval_every[fraction],
                             how=how, times=times))
        head = summary["heads"]
        print(f"    {how} in {times['seconds'] or 0:.0f} s: " + ", ".join(f"{h} ACC {head[h]['test_acc']:.4f}"
                                                           for h in ("main", "fused") if h in head),
              file=sys.stderr, flush=True)
  # Every invocation of the study in this folder (a continued study reuses the cells already run).
  previous = out / "study.json"
  invocations = json.loads(previous.read_text()).get("invocations", []) if previous.exists() else []
  invocations = [inv for inv in invocations if inv["cells_ran"]]  # those that only reused cells say nothing
  this = {"wall_seconds": time.perf_counter() - started, "cells_ran": sum(r["how"] != "reused" for r in rows),
          "load_average_before": load_before, "load_average_after": load_average(),
          "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
  if this["cells_ran"] or not invocations:
    invocations.append(this)

  costs = None
  if not args.skip_costs:
    costs = model_costs([*train_argv, "--width", f"{args.width:g}", "--lsa-dim", str(args.lsa_dim)], variants)
  aggregates = aggregate(rows, series)
  paired = paired_differences(rows, series) if BASELINE in series else []
  lsa = lsa_weight_summary(rows)
  dataset = rows[0]["dataset"]
  title = (f"{dataset}: width {args.width:g}, LSA dim {args.lsa_dim}, {len(seeds)} replicates "
           f"(--seed {','.join(map(str, seeds))}; --label-seed {','.join(map(str, label_seeds))}); "
           f"epochs {', '.join(f'{fraction_label(f)}: {epochs[f]}' for f in fractions)}")
  png = plot(aggregates, out / "label_study.png", title=title, series=series)
  if args.figure:
    pathlib.Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(png, args.figure)

  settings = {"train_flags": train_argv, "fractions": fractions, "variants": variants,
              "replicates": [{"seed": s, "label_seed": ls} for s, ls in zip(seeds, label_seeds)],
              "seed_roles": {"--seed": "initialisation and batch order",
                             "--label-seed": "the labelled subset (stratified by class)"
                             + (f"; the digits train/val/test split is fixed by --digits-split-seed "
                                f"{args.digits_split_seed}" if fixed_digits_split else "")},
              "epochs": epochs, "eval_every": eval_every, "width": args.width, "lsa_dim": args.lsa_dim,
              "model_selection": "lsanet-train keeps the epoch of best validation AUC of the selection head "
                                 "(lsanet: fused, plain: main) among the validated epochs (every eval_every "
                                 "epochs and the last); test is scored once with those weights, every head"}
  hw = hardware()
  notes = (f"Replicates: `--seed` (initialisation and batch order) and `--label-seed` (the labelled subset, "
           f"stratified by class) per replicate: {', '.join(f'({s}, {ls})' for s, ls in zip(seeds, label_seeds))}; "
           "both variants of a replicate share them (paired). "
           + (f"Digits split fixed by --digits-split-seed {args.digits_split_seed} (every cell has the same "
              "validation and test images). " if fixed_digits_split else "")
           + "Model selection: the epoch of best validation AUC of the selection head (lsanet: fused, plain: "
           f"main), validated every {', '.join(f'{fraction_label(f)}: {eval_every[f]}' for f in fractions)} epochs "
           "and at the last; test scored once with those weights. "
           f"Hardware: {hw['cpu']}, {hw['cpus_usable']} usable CPUs, backend {hw['backend']}, jax {hw['jax']}.")
  text = "\n\n".join(x for x in [
      f"# Label-efficiency study: {title}", notes,
      markdown_tables(aggregates, paired, rows, series),
      ("Parameters and FLOPs per image\n\n" + cost_table(costs)) if costs else "",
      ("LSA layer weights at the end of training (last epoch, mean over its training batches and channels)\n\n"
       + lsa_table(lsa)) if lsa else "",
      f"Cells: {len(rows)}; training (sum over cells, each as recorded when it ran): "
      f"{sum(r['seconds'] or 0 for r in rows) / 60:.1f} min wall"
      + (f", {sum(r['cpu_seconds'] for r in rows) / 60:.1f} min CPU (all threads)"
         if all(r["cpu_seconds"] is not None for r in rows) else "") + "; " + "; ".join(
          f"invocation {i + 1}: {inv['cells_ran']} cells run in {inv['wall_seconds'] / 60:.1f} min wall, "
          f"load average before {inv['load_average_before']}, after {inv['load_average_after']}"
          for i, inv in enumerate(invocations)),
  ] if x)
  (out / "study.md").write_text(text + "\n")
  result = {"command": command, "settings": settings, "hardware": hw, "invocations": invocations,
            "cells_seconds_sum": sum(r["seconds"] or 0 for r in rows), "dataset": dataset, "cells": rows,
            "aggregates": aggregates, "paired_differences": paired, "lsa_weights": lsa, "costs": costs,
            "figure": str(png)}
  (out / "study.json").write_text(json.dumps(_jsonable(result), indent=1) + "\n")
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
