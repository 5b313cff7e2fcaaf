"""How much of an lsanet-train run goes to evaluation at 1% labels, with the default settings.

Synthetic PathMNIST-shaped data (9 classes, 28x28x3 uint8, the real split proportions scaled by --scale)
go through the real pieces of a run (lsanet_jax.train.device_data, make_train_epoch, make_predict); each
of a training epoch, a validation pass and a test pass is compiled and run once untimed, then timed
--repeats times, waiting for its result (jax.block_until_ready). The run's evaluation share follows from
the medians and the schedule the config gives (--eval-every, default auto: validation every N epochs and
at the last, one test pass with the best weights):

  share = (validations x val_s + test_s) / (epochs x train_s + validations x val_s + test_s)

`before` is the same share when every epoch scored validation and test, as lsanet-train did before
--eval-every. Checkpoints and plots are left out of both (they are not evaluation).

  PYTHONPATH=. python benchmarks/lsanet_eval_share.py --scale 0.05 --out lsanet_eval_share.json
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from harness import environment, get_logger, median_seconds  # noqa: E402

from lsanet_jax import train  # noqa: E402
from lsanet_jax.config import TrainConfig  # noqa: E402
from lsanet_jax.data.medmnist import INFO, MedMNISTData, label_fraction_subset  # noqa: E402
from lsanet_jax.steps import make_predict, make_train_epoch  # noqa: E402

log = get_logger("lsanet_eval_share")


def synthetic_pathmnist(scale: float, seed: int = 0) -> MedMNISTData:
  info, rng, arrays = INFO["pathmnist"], np.random.default_rng(seed), {}
  for split, n in info["n_samples"].items():
    n = max(info["n_classes"], int(n * scale))
    arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8)
    arrays[f"{split}_labels"] = (np.arange(n) % info["n_classes"]).astype(np.int32)[:, None]
  return MedMNISTData(flag="pathmnist (synthetic)", task=info["task"], n_classes=info["n_classes"], **arrays)


def measure(config: TrainConfig, data: MedMNISTData, repeats: int) -> dict:
  rows = label_fraction_subset(data.train_labels, config.label_fraction, config.data_seed, data.task)
  model = train.build_model(config, data.n_classes)
  tx = optax.adam(train.learning_rate_schedule(config, 1))
  state = train.create_train_state(model, tx, data.train_images.shape[1:], train.init_key(config.seed))
  on_device = train.device_data(data, rows, config.eval_batch_size)
  train_epoch, steps = make_train_epoch(model, tx, config, data.task, len(rows), config.epoch_loop)
  predict = make_predict(model, data.task, on_device["eval_batch"], on_device["max_eval_batches"])
  holder = {"state": state}

  def one_epoch():
    holder["state"], metrics = train_epoch(holder["state"], *on_device["train"], train.epoch_key(0, 1))
    return metrics

  def one_pass(split):
    where = on_device["splits"][split]
    return lambda: predict(train.current_variables(holder["state"]), on_device["eval_images"],
                           where["first_batch"], where["num_batches"])

  log.info("training set %d images (%d steps), val %d, test %d", len(rows), steps, data.val_images.shape[0],
           data.test_images.shape[0])
  train_s = median_seconds(one_epoch, repeats)
  log.info("epoch %.3f s", train_s)
  val_s, test_s = median_seconds(one_pass("val"), repeats), median_seconds(one_pass("test"), repeats)
  log.info("validation %.3f s, test %.3f s", val_s, test_s)
  every = config.validation_interval(len(rows), data.val_images.shape[0], data.test_images.shape[0])
  validations = len([e for e in range(1, config.epochs + 1) if e == config.epochs or e % every == 0])
  evaluation = validations * val_s + test_s
  before = config.epochs * (val_s + test_s)
  return {
      "num_train": len(rows), "num_val": int(data.val_images.shape[0]), "num_test": int(data.test_images.shape[0]),
      "train_epoch_s": train_s, "val_pass_s": val_s, "test_pass_s": test_s,
      "train_s_per_image_over_eval_s_per_image": (train_s / len(rows)) / (val_s / data.val_images.shape[0]),
      "epochs": config.epochs, "validation_interval": every, "validations": validations,
      "eval_share": evaluation / (config.epochs * train_s + evaluation),
      "eval_share_before": before / (config.epochs * train_s + before),
  }


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--scale", type=float, default=0.1, help="fraction of PathMNIST's split sizes (default 0.1)")
  parser.add_argument("--label-fraction", type=float, default=0.01)
  parser.add_argument("--width", type=float, default=1.0, help="--width of the run (default 1, lsanet-train's)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  config = TrainConfig(flag="pathmnist", label_fraction=args.label_fraction, width=args.width)
  report = {"environment": environment(), "scale": args.scale, "label_fraction": args.label_fraction,
            "width": args.width, **measure(config, synthetic_pathmnist(args.scale), args.repeats)}
  text = json.dumps(report, indent=2)
  if args.out:
    pathlib.Path(args.out).write_text(text + "\n")
  print(text)
  return report


if __name__ == "__main__":
  main()
