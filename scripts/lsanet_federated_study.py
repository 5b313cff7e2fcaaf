#!/usr/bin/env python
"""Federated vs central LSANet: test ACC/AUC of the plain network, LSANet (main and fused heads) and a plain
network with as many parameters as LSANet with its auxiliary branches, trained by hospitals together and
centrally on the same images, over label fractions and seeds.

    PYTHONPATH=. nice -n 10 python scripts/lsanet_federated_study.py --out runs/fed_study \\
        --figure docs/figures/lsanet_federated_digits.png -- --flag digits

Everything after ``--`` is passed to both commands (the data: ``--flag``/``--data``/``--root``). ``--flag
digits`` is written once to ``OUT/data/digits.npz`` in MedMNIST's npz layout and read from there by every cell
(the MedMNIST-format npz route, with one validation and test split for all cells).

Cells: every label fraction x model x seed x {federated (FedAvg), federated (FedBN; ``--fedbn-models``), central}.
Federated: ``lsanet-federated`` with
``--n-clients`` hospitals, Dirichlet ``--alpha``, each hospital labelling ``fraction`` of its own images,
``--rounds`` rounds of one local epoch. Central: ``lsanet-train`` on ``fraction`` of the pooled training images
(stratified) for as many epochs as rounds, the same batch size and step schedule. Both select the epoch/round of
the best validation AUC (fused head for LSANet, main otherwise) and score the test split once with it. Seed s
fixes initialisation, batches, the hospitals and the labelled images of both arms. A cell whose summary.json
exists is reused (an interrupted study continues).

The parameter-matched plain network (``plain_wide``) is the plain backbone at the width whose parameter count is
closest to LSANet's with every branch and LSA (``matched_width``).

Outputs in --out: ``study.json`` (settings, hardware, every cell, aggregates, paired differences), ``study.md``
(the tables, also printed) and the figure.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import lsanet_label_study as label_study  # noqa: E402  (the sibling script's aggregation and plotting)

MODELS = ("plain", "lsanet", "plain_wide")
ARMS = ("fed", "fedbn", "central")  # FedAvg of every variable; FedBN (BatchNorm kept per hospital); pooled
SERIES = tuple((f"{arm}:{model}", head) for arm in ARMS for model, heads in
               (("plain", ("main",)), ("lsanet", ("main", "fused")), ("plain_wide", ("main",))) for head in heads)


def matched_width(train_argv: list[str], width: float) -> float:
  """The plain backbone's width (a multiple of 1/64) whose parameter count is closest to LSANet's at ``width``."""
  import jax
  from lsanet_jax import main as central_main
  from lsanet_jax import train as central
  from lsanet_jax.backbones import count_params

  def params(variant: str, w: float) -> int:
    config = central_main.config_from_args(central_main.build_parser().parse_args(
        [*train_argv, "--variant", variant, "--width", f"{w:g}", "--workdir", "unused"]))
    data = central.load_data(config)
    model = central.build_model(config, data.n_classes)
    shapes = jax.eval_shape(lambda: central.init_variables(model, data.train_images.shape[1:], central.init_key(0)))
    return count_params(shapes["params"])

  target = params("lsanet", width)
  widths = [k / 64 for k in range(int(width * 64), int(width * 64) * 3)]
  return min(widths, key=lambda w: abs(params("plain", w) - target))


def cell(out: pathlib.Path, arm: str, model: str, fraction: float, seed: int, rounds: int, argv: list[str]) -> dict:
  """Runs (or reuses) one cell and returns its row."""
  workdir = out / "runs" / f"{arm}_{model}_f{fraction:g}_s{seed}"
  summary_path = workdir / "summary.json"
  wall = time.perf_counter()
  if summary_path.exists():
    summary = json.loads(summary_path.read_text())
  else:
    if workdir.exists():  # cut short: start the cell again
      import shutil
      shutil.rmtree(workdir)
    if arm in ("fed", "fedbn"):
      from lsanet_jax.federated import main as entry
    else:
      from lsanet_jax import main as entry
    summary = entry.run([*argv, "--workdir", str(workdir)])
  seconds = time.perf_counter() - wall
  return {"variant": f"{arm}:{model}", "arm": arm, "model": model, "fraction": fraction, "seed": seed,
          "label_seed": seed, "epochs": rounds, "heads": summary["heads"], "params": summary["params"]["total"],
          "num_train": summary.get("num_train", summary.get("num_train_labelled")),
          "seconds_per_round": summary.get("seconds_per_round_median"), "seconds": seconds,
          "workdir": str(workdir)}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, type=pathlib.Path)
  parser.add_argument("--figure", type=pathlib.Path, default=None)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 1.0])
  parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
  parser.add_argument("--fedbn-models", nargs="*", default=["lsanet"], choices=MODELS,
                      help="models also trained with --batch-norm fedbn")
  parser.add_argument("--rounds", default="20", help="rounds (central: epochs), or per fraction, e.g. 0.1:30,1:5")
  parser.add_argument("--n-clients", type=int, default=10)
  parser.add_argument("--alpha", type=float, default=0.5)
  parser.add_argument("--width", type=float, default=0.125)
  parser.add_argument("--lsa-dim", type=int, default=32)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--eval-every", default="2", help="validation interval, or per fraction, e.g. 0.1:3,1:1")
  parser.add_argument("--digits-split-seed", type=int, default=0)
  parser.add_argument("--finished-only", action="store_true",
                      help="tabulate the cells that have finished (their summary.json) and run none")
  parser.add_argument("train_argv", nargs=argparse.REMAINDER)
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  train_argv = [a for a in args.train_argv if a != "--"]
  args.out.mkdir(parents=True, exist_ok=True)
  train_argv = label_study.prepare_digits(train_argv, args.out, args.digits_split_seed)
  wide = matched_width(train_argv, args.width)
  widths = {"plain": args.width, "lsanet": args.width, "plain_wide": wide}
  rounds_of = label_study.parse_fraction_map(args.rounds, args.fractions)
  eval_every_of = label_study.parse_fraction_map(args.eval_every, args.fractions)
  rows = []
  for fraction in args.fractions:
    rounds, eval_every = rounds_of[fraction], eval_every_of[fraction]
    for seed in args.seeds:
      for model in args.models:
        common = [*train_argv, "--variant", "lsanet" if model == "lsanet" else "plain", "--width", f"{widths[model]:g}",
                  "--lsa-dim", str(args.lsa_dim), "--label-fraction", f"{fraction:g}", "--seed", str(seed),
                  "--batch-size", str(args.batch_size), "--eval-every", str(eval_every),
                  "--checkpoint-every", str(rounds), "--keep-checkpoints", "1", "--no-compile-cache"]
        fed = [*common, "--n-clients", str(args.n_clients), "--alpha", f"{args.alpha:g}", "--rounds", str(rounds)]
        arms = [("fed", fed), ("central", [*common, "--epochs", str(rounds)])]
        if model in args.fedbn_models:
          arms.insert(1, ("fedbn", [*fed, "--batch-norm", "fedbn"]))
        for arm, argv_ in arms:
          if args.finished_only and not (args.out / "runs" / f"{arm}_{model}_f{fraction:g}_s{seed}" /
                                         "summary.json").exists():
            continue
          rows.append(cell(args.out, arm, model, fraction, seed, rounds, argv_))
          r = rows[-1]
          print(f"{arm:7s} {model:10s} f={fraction:g} seed={seed}: " + ", ".join(
              f"{h} AUC {v['test_auc']:.4f} ACC {v['test_acc']:.4f}" for h, v in r["heads"].items()) +
              f" ({r['seconds']:.0f} s)", flush=True)
  present = {r["variant"] for r in rows}
  series = [s for s in SERIES if s[0] in present]
  aggregates = label_study.aggregate(rows, series=series)
  paired = label_study.paired_differences(rows, series=series, baseline=("central:plain", "main"))
  table = label_study.markdown_tables(aggregates, paired, rows, series=series,
                                     baseline=("central:plain", "main"))
  seconds = {f"{arm}:{m}": float(np.median([r["seconds_per_round"] for r in rows
                                            if r["arm"] == arm and r["model"] == m and r["seconds_per_round"]]))
             for arm in ("fed", "fedbn") for m in args.models
             if any(r["arm"] == arm and r["model"] == m and r["seconds_per_round"] for r in rows)}
  study = {"command": sys.argv, "settings": {k: str(v) if isinstance(v, pathlib.Path) else v
                                             for k, v in vars(args).items()},
           "widths": widths, "params": {r["model"]: r["params"] for r in rows},
           "median_seconds_per_round": seconds, "hardware": label_study.hardware(),
           "rows": rows, "aggregates": aggregates, "paired": paired}
  (args.out / "study.json").write_text(json.dumps(study, indent=1) + "\n")
  (args.out / "study.md").write_text(table + "\n")
  print(table)
  print("median CPU seconds per federated round:", seconds)
  if args.figure:
    label_study.plot(aggregates, args.figure, series=series,
                     title=f"digits, {args.n_clients} hospitals, Dirichlet alpha {args.alpha:g}, rounds (= central "
                     f"epochs) per fraction {args.rounds}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
