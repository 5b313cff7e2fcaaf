"""`lsanet-train`: train LSANet or one of its ablations on a MedMNIST dataset.

  lsanet-train --flag bloodmnist --workdir runs/blood             # LSANet, ResNet-18, official recipe
  lsanet-train --flag digits --epochs 8 --width 0.125 --workdir runs/digits   # no MedMNIST needed
  lsanet-train ... --variant plain|ds|ds_lsa|lsanet               # the ablation ladder
  lsanet-train ... --resume                                       # continue an interrupted run

Outputs in --workdir: metrics.jsonl (one line per epoch), summary.json (test ACC/AUC of every
head at the best validation epoch), curves.png, lsa_weights.png, checkpoints/ (orbax).
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

from infl_jax.common.checkpoint import Checkpointer
from infl_jax.common.cli import UserInputError, prepare_workdir, progress, run_cli
from infl_jax.common.metrics_log import MetricsWriter, read_metrics, write_json_atomic

from lsanet_jax.backbones import ATTENTION_KINDS, BACKBONES
from lsanet_jax.data.medmnist import DEFAULT_ROOT, INFO, SIZES, MedMNISTError, load_medmnist
from lsanet_jax.models import AUX_KINDS


def parse_args(argv=None) -> argparse.Namespace:
  from lsanet_jax.train import VARIANTS
  p = argparse.ArgumentParser(
      prog="lsanet-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  d = p.add_argument_group("data")
  d.add_argument("--flag", default="pathmnist", help=f"dataset: {', '.join(INFO)} "
                 "('digits' = scikit-learn's digits in MedMNIST format, not medical)")
  d.add_argument("--root", default=DEFAULT_ROOT, help="folder holding {flag}.npz / {flag}_{size}.npz")
  d.add_argument("--size", type=int, default=28, choices=SIZES)
  d.add_argument("--download", action="store_true",
                 help="fetch the npz from Zenodo (MD5-verified) if it is not in --root")
  d.add_argument("--download-url-template", default=None,
                 help="mirror URL with a {filename} placeholder (default: the Zenodo record)")
  d.add_argument("--label-fraction", type=float, default=1.0,
                 help="stratified fraction of training labels to use, e.g. 0.01 0.05 0.1 0.25 1")
  d.add_argument("--as-rgb", action="store_true", help="repeat grey images to 3 channels")
  m = p.add_argument_group("model")
  m.add_argument("--backbone", default="resnet18", choices=BACKBONES)
  m.add_argument("--attention", default="none", choices=ATTENTION_KINDS)
  m.add_argument("--width", type=float, default=1.0, help="channel width multiplier")
  m.add_argument("--stem", default="", choices=["", "28", "224"],
                 help="'28': 3x3/1 stem; '224': torchvision 7x7/2 + max-pool (default by --size)")
  m.add_argument("--variant", default="lsanet", choices=list(VARIANTS),
                 help="ablation rung: plain backbone, + deep supervision (ds), + LSA, + synergy")
  m.add_argument("--aux", default=None, choices=AUX_KINDS, help="auxiliary branches (overrides --variant)")
  m.add_argument("--aux-stages", default="", help="1-based stages to branch after, e.g. '2,3'")
  m.add_argument("--lsa", action=argparse.BooleanOptionalAction, default=None)
  m.add_argument("--dynamic-aux-weights", action=argparse.BooleanOptionalAction, default=None,
                 help="weight auxiliary losses by the LSA layer weights")
  m.add_argument("--synergy", action=argparse.BooleanOptionalAction, default=None,
                 help="DKS knowledge synergy between all heads")
  m.add_argument("--lsa-dim", type=int, default=128)
  t = p.add_argument_group("training")
  t.add_argument("--epochs", type=int, default=100)
  t.add_argument("--batch-size", type=int, default=128)
  t.add_argument("--lr", type=float, default=1e-3)
  t.add_argument("--seed", type=int, default=0)
  t.add_argument("--augment", action="store_true", help="random flips and padded crops")
  t.add_argument("--bf16", action="store_true", help="bfloat16 compute (parameters stay float32)")
  t.add_argument("--epoch-loop", default="auto", choices=["auto", "scan", "host"])
  t.add_argument("--data-parallel", action="store_true",
                 help="split every batch over all local devices (batch size divisible by their "
                      "number); the same training as on one device, BatchNorm over the whole batch")
  r = p.add_argument_group("run")
  r.add_argument("--workdir", required=True, help="folder for metrics, summary, plots, checkpoints")
  r.add_argument("--resume", action="store_true", help="continue the run in --workdir")
  r.add_argument("--keep-checkpoints", type=int, default=2)
  r.add_argument("--stop-after-epochs", type=int, default=None,
                 help="stop (checkpointed) after this many epochs of this invocation; --resume later")
  return p.parse_args(argv)


def config_from_args(args):
  from lsanet_jax.train import VARIANTS, TrainConfig
  parts = dict(VARIANTS[args.variant])
  for name in ("aux", "lsa", "dynamic_aux_weights", "synergy"):
    if getattr(args, name) is not None:
      parts[name] = getattr(args, name)
  # Switching LSA off by hand also switches off what depends on it, unless asked for explicitly.
  if not parts["lsa"] and args.dynamic_aux_weights is None:
    parts["dynamic_aux_weights"] = False
  if parts["aux"] == "none" and args.synergy is None:
    parts["synergy"] = False
  try:
    aux_stages = tuple(int(s) for s in args.aux_stages.split(",") if s.strip())
  except ValueError:
    raise UserInputError(f"--aux-stages must be comma-separated stage numbers like '2,3', got {args.aux_stages!r}")
  config = TrainConfig(
      flag=args.flag, root=str(args.root), size=args.size, backbone=args.backbone,
      attention=args.attention, width=args.width, stem=args.stem, aux_stages=aux_stages,
      lsa_dim=args.lsa_dim, label_fraction=args.label_fraction, epochs=args.epochs,
      batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed, augment=args.augment,
      bf16=args.bf16, as_rgb=args.as_rgb, epoch_loop=args.epoch_loop,
      data_parallel=args.data_parallel, **parts)
  try:
    config.validate()
  except ValueError as e:
    raise UserInputError(str(e)) from None
  return config


def run(argv=None) -> dict | None:
  """The whole command; returns the summary (None when stopped early by --stop-after-epochs)."""
  import jax
  from lsanet_jax import plots, train

  args = parse_args(argv)
  config = config_from_args(args)
  if args.stop_after_epochs is not None and args.stop_after_epochs < 1:
    raise UserInputError("--stop-after-epochs must be at least 1")
  if config.data_parallel:
    try:
      train.data_parallel_mesh(config.batch_size)
    except ValueError as e:
      raise UserInputError(str(e)) from None
  if args.download and not INFO[config.flag].get("builtin"):
    from lsanet_jax.data.download import ZENODO_URL_TEMPLATE, download_medmnist
    download_medmnist(config.flag, config.root, config.size,
                      url_template=args.download_url_template or ZENODO_URL_TEMPLATE)
  data = load_medmnist(config.flag, config.root, config.size, as_rgb=config.as_rgb, seed=config.seed)
  workdir = prepare_workdir(args.workdir, resume=args.resume)

  # The checkpoint refuses a resume whose settings differ from the run that wrote it; data
  # parallelism is left out because it trains what one device trains (up to summation order).
  ckpt_config = {k: v for k, v in dataclasses.asdict(config).items()
                 if k not in ("root", "data_parallel")}
  ckpt = Checkpointer(workdir / "checkpoints", keep=args.keep_checkpoints, config=ckpt_config)
  model = train.build_model(config, data.n_classes)
  start_epoch, best, state = 1, None, None
  if args.resume:
    template = _state_template(config, data, model)
    restored, extra = ckpt.restore(train.state_to_checkpoint(template))
    state = train.state_from_checkpoint(template, restored)
    start_epoch, best = int(extra["epoch"]) + 1, extra["best"]
  writer = MetricsWriter(workdir, resume_from_step=start_epoch - 1 if args.resume else None)
  stop_at = None if args.stop_after_epochs is None else start_epoch - 1 + args.stop_after_epochs
  bar = progress(total=config.epochs, initial=start_epoch - 1, desc=f"{config.flag} {args.variant}")

  def on_epoch_end(epoch, state, record, best):
    writer.write(epoch, record)
    ckpt.save(epoch, train.state_to_checkpoint(state), extra={"epoch": epoch, "best": best},
              force=True)
    bar.update(1)
    bar.set_postfix(loss=f"{record['loss']:.4f}",
                    val_auc=f"{record[f'val_auc_{config.selection_head}']:.4f}")

  started = time.perf_counter()
  try:
    state, best, _ = train.train_and_evaluate(
        config, data, state=state, start_epoch=start_epoch, best=best,
        callbacks=train.Callbacks(on_epoch_end=on_epoch_end,
                                  should_stop=lambda e: stop_at is not None and e >= stop_at))
  except train.DataParallelError as e:
    raise UserInputError(str(e)) from None
  finally:
    bar.close()
    writer.close()
    ckpt.close()
  rows = read_metrics(workdir / "metrics.jsonl")
  last_epoch = rows[-1]["epoch"] if rows else start_epoch - 1
  if last_epoch < config.epochs:
    print(f"stopped after epoch {last_epoch} of {config.epochs}; continue with --resume", file=sys.stderr)
    return None
  plots.plot_training_curves(rows, workdir / "curves.png")
  plots.plot_lsa_weights(rows, workdir / "lsa_weights.png")
  summary = {
      "dataset": config.flag, "task": data.task, "data_source": data.source,
      "variant": args.variant, "config": dataclasses.asdict(config),
      "selection_head": config.selection_head, "best_epoch": best["epoch"],
      "heads": {h: {"test_acc": best["test"][h]["acc"], "test_auc": best["test"][h]["auc"],
                    "val_acc": best["val"][h]["acc"], "val_auc": best["val"][h]["auc"]}
                for h in best["test"]},
      "num_train": int(len(train.label_fraction_subset(
          data.train_labels, config.label_fraction, config.seed, data.task))),
      "params": train.param_summary(state),
      "backend": jax.default_backend(),
      "seconds_this_invocation": time.perf_counter() - started,
  }
  write_json_atomic(workdir / "summary.json", summary)
  head = summary["heads"][config.selection_head]
  print(f"best epoch {best['epoch']}: test ACC {head['test_acc']:.4f} AUC {head['test_auc']:.4f} "
        f"({config.selection_head} head); summary in {workdir / 'summary.json'}")
  return summary


def _state_template(config, data, model):
  import optax
  from lsanet_jax import train
  rows = len(train.label_fraction_subset(data.train_labels, config.label_fraction, config.seed, data.task))
  steps = -(-rows // min(config.batch_size, rows))
  tx = optax.adam(train.learning_rate_schedule(config, steps))
  return train.create_train_state(model, tx, data.train_images.shape[1:], train.init_key(config.seed))


def main(argv=None) -> int:
  return run_cli(run, argv)


if __name__ == "__main__":
  sys.exit(main())
