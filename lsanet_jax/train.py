"""Training and evaluation of LSANet (and its ablations) on MedMNIST: state, checkpoints and resume,
the epoch loop, the run's summary.

Default recipe = the official MedMNIST one: Adam 1e-3, 100 epochs, batch 128, lr x0.1 after 50%
and 75% of the epochs, inputs normalised with mean 0.5 / std 0.5, no augmentation, the epoch with
the best validation AUC kept (of the fused head when LSA is on, else the main head), BCE for
multi-label. The compiled pieces (step, epoch, prediction) are in lsanet_jax.steps.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from runkit.checkpoint import Checkpointer
from runkit.cli import CHECKPOINT_SUBDIR, progress
from runkit.config import resume_fingerprint
from runkit.errors import TrainingDiverged
from runkit.metrics_log import MetricsWriter, read_metrics, write_json_atomic

from lsanet_jax import metrics as official_metrics
from lsanet_jax import plots
from lsanet_jax.backbones import count_params
from lsanet_jax.config import TrainConfig
from lsanet_jax.data.medmnist import MedMNISTData, label_fraction_subset, load_medmnist
from lsanet_jax.data.own_data import load_own_data
from lsanet_jax.models import LSANet
from lsanet_jax.steps import data_parallel_mesh, make_predict, make_train_epoch, replicate, steps_per_epoch


def build_model(config: TrainConfig, num_classes: int) -> LSANet:
  return LSANet(backbone=config.backbone, num_classes=num_classes, stem=config.resolved_stem,
                width=config.width, attention=config.attention, aux=config.aux,
                aux_stages=tuple(config.aux_stages) or None, lsa=config.lsa,
                lsa_dim=config.lsa_dim, dtype=jnp.bfloat16 if config.bf16 else jnp.float32)


def learning_rate_schedule(config: TrainConfig, steps_per_epoch: int):
  """lr x0.1 after 50% and 75% of the epochs (PyTorch MultiStepLR stepped once per epoch)."""
  milestones = [int(0.5 * config.epochs), int(0.75 * config.epochs)]
  boundaries = {}
  for m in milestones:
    if m > 0:
      boundaries[m * steps_per_epoch] = boundaries.get(m * steps_per_epoch, 1.0) * 0.1
  return optax.piecewise_constant_schedule(config.learning_rate, boundaries)


def init_key(seed: int):
  # RBG keys: XLA compiles the ~200 parameter initialisers of a ResNet with aux branches in about
  # 3 s instead of 11 s with threefry (CPU). Draws are deterministic per backend.
  return jax.random.key(seed, impl="rbg")


def epoch_key(seed: int, epoch: int):
  # Derived from (seed, epoch) alone, so a resumed run draws exactly the batches it would have.
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), epoch)


def init_variables(model: LSANet, image_shape, key) -> dict:
  """{"params", "batch_stats"} of a fresh model, float32 whatever the compute dtype."""
  # The float32 twin initialises them (XLA:CPU compiles a bf16 init several times slower).
  init_model = model.clone(dtype=jnp.float32)
  return jax.jit(functools.partial(init_model.init, train=False))(key, jnp.zeros((1, *image_shape)))


def create_train_state(model: LSANet, tx, image_shape, key, variables=None) -> dict:
  """The whole training state as one pytree of arrays (checkpointed as is).

  variables: initial {"params", "batch_stats"} to start from instead of initialising with key
  (they are copied, so donating the state never frees the caller's arrays)."""
  if variables is None:
    variables = init_variables(model, image_shape, key)
  else:
    variables = jax.tree_util.tree_map(jnp.copy, variables)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  return {
      "params": params,
      "batch_stats": batch_stats,
      "opt_state": tx.init(params),
      "step": jnp.zeros((), jnp.int32),
      # Copies: the epoch function donates params, which must not free the kept best ones.
      "best_params": jax.tree_util.tree_map(jnp.copy, params),
      "best_batch_stats": jax.tree_util.tree_map(jnp.copy, batch_stats),
  }


def state_to_checkpoint(state) -> dict:
  """Nested dicts of arrays only (optax states are namedtuples), the form orbax stores."""
  return flax.serialization.to_state_dict(state)


def state_from_checkpoint(template, restored) -> dict:
  return flax.serialization.from_state_dict(template, restored)


def restore_checkpoint(checkpointer: Checkpointer, template) -> tuple[dict, int, dict]:
  """(state, first epoch still to train, best record) from the newest checkpoint."""
  restored, extra = checkpointer.restore(state_to_checkpoint(template))
  return state_from_checkpoint(template, restored), int(extra["epoch"]) + 1, extra["best"]


def param_summary(state) -> dict:
  params = state["params"]
  per_part = {}
  for name, sub in params.items():
    part = "lsa" if name == "lsa" else name.split("_")[0] if name.startswith("aux") else "backbone"
    per_part[part] = per_part.get(part, 0) + count_params(sub)
  return {"total": count_params(params), **per_part}


def load_data(config: TrainConfig) -> MedMNISTData:
  """The run's data: --data (own npz or image folder), --flag from the TFDS dataset, or --flag's npz."""
  if config.data:
    return load_own_data(config.data, config.size, as_rgb=config.as_rgb, task=config.task,
                         num_classes=config.num_classes, seed=config.data_seed)
  if config.source == "tfds":
    from lsanet_jax.data.tfds_builder import load_tfds  # imports tensorflow_datasets only when called
    return load_tfds(config.flag, config.size, config.tfds_data_dir, manual_dir=config.root, as_rgb=config.as_rgb)
  return load_medmnist(config.flag, config.root, config.size, as_rgb=config.as_rgb, seed=config.data_seed)


def device_data(data: MedMNISTData, train_rows: np.ndarray, eval_batch_size: int, mesh=None) -> dict:
  """The training rows and the val and test images moved to the device once (to every device of mesh);
  see evaluation_data."""
  put = jax.device_put if mesh is None else functools.partial(replicate, mesh=mesh)
  return {"train": (put(data.train_images[train_rows]), put(data.train_labels[train_rows])),
          **evaluation_data(data, eval_batch_size, put)}


def evaluation_data(data: MedMNISTData, eval_batch_size: int, put=jax.device_put) -> dict:
  """The val and test images moved to the device once, in one array, each padded to whole evaluation
  batches, so one compiled prediction function scores either (make_predict's batch range)."""
  batch = min(eval_batch_size, max(data.val_images.shape[0], data.test_images.shape[0]))
  blocks, splits, first = [], {}, 0
  for split in ("val", "test"):
    images, labels = data.split(split)
    num_batches = math.ceil(images.shape[0] / batch)
    padding = np.zeros((num_batches * batch - images.shape[0], *images.shape[1:]), images.dtype)
    blocks += [images, padding]
    splits[split] = {"first_batch": first, "num_batches": num_batches, "labels": labels}
    first += num_batches
  return {
      "eval_images": put(np.concatenate(blocks)),
      "eval_batch": batch,
      "max_eval_batches": max(s["num_batches"] for s in splits.values()),
      "splits": splits,
  }


_DIVERGED_FIX = "lower --lr (or leave out --bf16) and start again in a new --workdir"


def evaluate(predict, variables: dict, on_device: dict, split: str, task: str, key_coords=None) -> dict:
  """{head: {acc, auc}} of variables on split ("val" or "test"), every head from one pass (a keyed model's
  with key_coords)."""
  where = on_device["splits"][split]
  probs = predict(variables, on_device["eval_images"], where["first_batch"], where["num_batches"], key_coords)
  labels = where["labels"]
  probs = {head: np.asarray(p)[:labels.shape[0]] for head, p in probs.items()}
  for head, p in probs.items():
    if not np.isfinite(p).all():
      raise TrainingDiverged(f"the {head} head's {split} predictions are NaN or infinite (the model diverged); "
                             f"{_DIVERGED_FIX}")
  return {head: official_metrics.evaluate(labels, p, task) for head, p in probs.items()}


def current_variables(state) -> dict:
  return {"params": state["params"], "batch_stats": state["batch_stats"]}


def best_variables(state) -> dict:
  return {"params": state["best_params"], "batch_stats": state["best_batch_stats"]}


def keep_best(state) -> dict:
  return dict(state, best_params=jax.tree_util.tree_map(jnp.copy, state["params"]),
              best_batch_stats=jax.tree_util.tree_map(jnp.copy, state["batch_stats"]))


def _better(new, old) -> bool:
  new = -math.inf if new is None or math.isnan(new) else new
  old = -math.inf if old is None or math.isnan(old) else old
  return new > old


def epoch_record(epoch: int, lr: float, train_metrics: dict, val: dict | None, best_epoch: int,
                 times: dict) -> dict:
  """One line of metrics.jsonl; validation scores only on validation epochs."""
  return {"epoch": epoch, "lr": lr, **{k: float(v) for k, v in train_metrics.items()},
          **{f"val_{m}_{h}": r[m] for h, r in (val or {}).items() for m in ("acc", "auc")},
          "best_epoch": best_epoch, **times}


def run_summary(config: TrainConfig, data: MedMNISTData, state, best: dict, test: dict, *, variant: str | None,
                num_train: int, validation_interval: int, seconds: float) -> dict:
  """summary.json: every head's scores at the best epoch, with what produced them."""
  return {
      "dataset": config.flag or data.flag, "task": data.task, "data_source": data.source,
      "data": {"kind": data.source_kind, "path": data.source, "task": data.task, "n_classes": data.n_classes,
               "image_shape": list(data.train_images.shape[1:]),
               "split_sizes": {s: int(data.split(s)[0].shape[0]) for s in ("train", "val", "test")},
               **{k: v for k, v in data.details.items() if k not in ("kind", "path")}},
      "variant": variant, "config": dataclasses.asdict(config),
      "seeds": {"init_and_batches": config.seed, "data_draws": config.data_seed,
                "label_seed_given": config.label_seed is not None},
      "selection_head": config.selection_head, "best_epoch": best["epoch"],
      "validation_interval": validation_interval,
      "heads": {h: {"test_acc": test[h]["acc"], "test_auc": test[h]["auc"],
                    "val_acc": best["val"][h]["acc"], "val_auc": best["val"][h]["auc"]}
                for h in test},
      "num_train": num_train,
      "params": param_summary(state),
      "backend": jax.default_backend(),
      "seconds_this_invocation": seconds,
  }


def run_epoch(config: TrainConfig, epoch: int, state, best: dict | None, *, train_epoch, predict, on_device: dict,
              task: str, schedule, validate: bool) -> tuple[dict, dict | None, dict]:
  """One epoch: train, validate when asked (keeping the weights of the best validation AUC), and the
  epoch's metrics.jsonl line with the seconds spent training and evaluating."""
  started = time.perf_counter()
  state, train_metrics = train_epoch(state, *on_device["train"], epoch_key(config.seed, epoch))
  train_metrics = jax.device_get(train_metrics)  # waits for the epoch, so the two times below are apart
  if not math.isfinite(train_metrics["loss"]):
    raise TrainingDiverged(f"training diverged in epoch {epoch} (train loss {float(train_metrics['loss'])}); "
                           f"{_DIVERGED_FIX}")
  trained = time.perf_counter()
  val = None
  if validate:
    val = evaluate(predict, current_variables(state), on_device, "val", task)
    head = config.selection_head
    if best is None or _better(val[head]["auc"], best["val"][head]["auc"]):
      best = {"epoch": epoch, "val": val}
      state = keep_best(state)
  finished = time.perf_counter()
  times = {"train_time_s": trained - started, "eval_time_s": finished - trained, "epoch_time_s": finished - started}
  record = epoch_record(epoch, float(schedule(int(state["step"]) - 1)), train_metrics, val,
                        best["epoch"] if best else None, times)
  return state, best, record


def train_and_evaluate(config: TrainConfig, workdir, *, variant: str | None = None, resume: bool = False,
                       stop_after_epochs: int | None = None, show_progress: bool | None = None) -> dict | None:
  """Trains on config's data in workdir and returns the summary (None when stopped before the last epoch).

  Writes metrics.jsonl (one line per epoch), checkpoints/ (the whole state every
  config.checkpoint_every epochs and after the last one),
  and after the last epoch curves.png, lsa_weights.png and summary.json (every head's scores at
  the epoch with the best validation AUC of config.selection_head).

  Validation runs every config.validation_interval(...) epochs (--eval-every) and at the last epoch;
  the best validation epoch's weights are kept in the state, and the test split is scored once, with
  them, after the last epoch.

  Resuming (resume=True) continues the run in workdir, in this order:
    1. the newest checkpoint must come from a run with the same settings (every TrainConfig field
       not declared resume=False), else CheckpointError;
    2. its state replaces the freshly initialised one: parameters, BatchNorm statistics, optimizer
       state, step and the best epoch's weights, with the best epoch's scores and its epoch number;
    3. metrics.jsonl keeps only the lines up to that epoch;
    4. training continues with the next epoch, whose batches come from (seed, epoch) alone, so the
       run ends as an uninterrupted one would.

  variant: the --variant name recorded in summary.json (the switches themselves are in config).
  stop_after_epochs: stop, checkpointed, after this many epochs of this call (resume later).
  show_progress: the progress bar; None shows it when stderr is a terminal.
  """
  started = time.perf_counter()
  config.validate()
  workdir = pathlib.Path(workdir)
  data = load_data(config)
  train_rows = label_fraction_subset(data.train_labels, config.label_fraction, config.data_seed, data.task)
  num_train = len(train_rows)
  interval = config.validation_interval(num_train, data.val_images.shape[0], data.test_images.shape[0])
  mesh = data_parallel_mesh(config.batch_size, num_train=num_train) if config.data_parallel else None
  model = build_model(config, data.n_classes)
  schedule = learning_rate_schedule(config, steps_per_epoch(config.batch_size, num_train))
  tx = optax.adam(schedule)
  state = create_train_state(model, tx, data.train_images.shape[1:], init_key(config.seed))
  fingerprint, defaults = resume_fingerprint(config)
  workdir.mkdir(parents=True, exist_ok=True)
  with Checkpointer(workdir / CHECKPOINT_SUBDIR, keep=config.keep_checkpoints, config=fingerprint,
                    config_defaults=defaults) as checkpointer:
    start_epoch, best = 1, None
    if resume:
      state, start_epoch, best = restore_checkpoint(checkpointer, state)
    last_epoch = config.epochs
    if stop_after_epochs is not None:
      last_epoch = min(last_epoch, start_epoch - 1 + stop_after_epochs)
    on_device = device_data(data, train_rows, config.eval_batch_size, mesh)
    train_epoch, _ = make_train_epoch(model, tx, config, data.task, num_train, config.epoch_loop, mesh)
    predict = make_predict(model, data.task, on_device["eval_batch"], on_device["max_eval_batches"], mesh)
    state = replicate(state, mesh)
    bar = progress(total=config.epochs, initial=start_epoch - 1, desc=f"{data.flag} {variant or ''}".strip(),
                   disable=None if show_progress is None else not show_progress)
    with MetricsWriter(workdir, resume_from_step=start_epoch - 1 if resume else None) as writer, bar:
      for epoch in range(start_epoch, last_epoch + 1):
        state, best, record = run_epoch(config, epoch, state, best, train_epoch=train_epoch, predict=predict,
                                        on_device=on_device, task=data.task, schedule=schedule,
                                        validate=epoch == config.epochs or epoch % interval == 0)
        writer.write(epoch, record)
        if epoch % config.checkpoint_every == 0 or epoch == last_epoch:
          checkpointer.save(epoch, state_to_checkpoint(state), extra={"epoch": epoch, "best": best}, force=True)
        bar.update(1)
        if best is not None:
          bar.set_postfix(loss=f"{record['loss']:.4f}", best_val_auc=f"{best['val'][config.selection_head]['auc']:.4f}")
  if last_epoch < config.epochs:
    print(f"stopped after epoch {last_epoch} of {config.epochs}; continue with --resume", file=sys.stderr)
    return None
  test = evaluate(predict, best_variables(state), on_device, "test", data.task)
  rows = read_metrics(workdir / "metrics.jsonl")
  plots.plot_training_curves(rows, workdir / "curves.png")
  plots.plot_lsa_weights(rows, workdir / "lsa_weights.png")
  summary = run_summary(config, data, state, best, test, variant=variant, num_train=num_train,
                        validation_interval=interval, seconds=time.perf_counter() - started)
  write_json_atomic(workdir / "summary.json", summary)
  return summary
