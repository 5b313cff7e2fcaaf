"""Sample classification (cohort, cell type): the task (cross-entropy; accuracy, weighted F1 and AUC) and
its runner: federated training with checkpoints, then the key study and a central baseline."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import inspect
import sys
import threading
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from infl_jax import keys as keylib
from infl_jax import models
from infl_jax.config import GENERIC_N_CLIENTS, TrainConfig
from infl_jax.federated import (ClientData, ServerState, Task, algorithm_from_config, global_variables, jit_round,
                                run_rounds, stack_clients)
from infl_jax.key_scheme import KeyView, client_view, study_views
from infl_jax.tasks.common import (check_key_version, check_memory, split_clients, stopped_early, train_federated,
                                   write_summary)
from infl_jax.tasks.label_skew import fit_to_federation, say_federation_choice, warn_single_class_clients
from runkit.errors import UserInputError
from runkit.xla import LOOP, ONCE, compiler_options

__all__ = ["accepts_kwarg", "accepts_mask", "binary_auc", "check_model_fits", "classification_metrics",
           "classification_task", "client_data", "client_split", "create_model", "cross_entropy", "evaluate",
           "format_summary", "init_variables", "load_data", "predict_logits", "run", "softmax",
           "train_central"]


def accepts_kwarg(model: nn.Module, name: str) -> bool:
  """Whether the model (or the user model that ``keyed`` wraps) takes keyword ``name``."""
  inner = getattr(model, "model", model)
  return name in inspect.signature(type(inner).__call__).parameters


def accepts_mask(model: nn.Module) -> bool:
  """Whether the model takes ``mask=`` to keep padding rows out of BatchNorm statistics."""
  return accepts_kwarg(model, "mask")


def _mode_kwargs(model: nn.Module, train: bool) -> dict:
  return {"train": train} if accepts_kwarg(model, "train") else {}


def classification_task(model: nn.Module, *, absent_class_scale: float = 1.0) -> Task:
  """Mask-weighted softmax cross-entropy; ``context`` is the key coordinates (None: no INR path).

  ``train=`` and ``mask=`` are passed only to models whose ``__call__`` takes them, so a
  plain user model keyed with ``keyed(...)`` works as it is. ``absent_class_scale`` < 1: FedRS's restricted
  softmax (Li & Zhan 2021; docs/design.md, "Clients that hold few classes"), the logits of the classes a client
  holds no sample of multiplied by it in its loss; the batch then carries ``"held"`` (``common.class_presence``).
  """
  extra_kwargs = _mode_kwargs(model, True)
  mask_kwarg = accepts_mask(model)

  def loss(params, model_state, batch, mask, rng, context):
    extra = dict(extra_kwargs, **({"mask": mask > 0} if mask_kwarg else {}))
    logits, updates = model.apply({"params": params, **model_state}, batch["x"], key_coords=context,
                                  rngs={"dropout": rng}, mutable=list(model_state.keys()), **extra)
    logits = logits.astype(jnp.float32)
    if absent_class_scale != 1.0:
      logits = logits * jnp.where(batch["held"] > 0, 1.0, absent_class_scale)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0), updates

  return Task(loss=loss)


def _inference(model: nn.Module, variables, x: jax.Array, key_coords: Any) -> jax.Array:
  return model.apply(variables, x, key_coords=key_coords, **_mode_kwargs(model, False))


@functools.cache
def _inference_program():
  # ``model`` is static (flax modules hash by their settings), so every call with the same model and
  # shapes reuses one compiled function: the key study's keys, validation and test alike. LOOP options:
  # validation runs it every round (runkit/xla.py).
  return jax.jit(_inference, static_argnums=(0,), compiler_options=compiler_options(LOOP))


def predict_logits(model: nn.Module, variables, x: np.ndarray, key_coords: Any = None,
                   batch_size: int = 4096) -> np.ndarray:
  """Inference-mode logits, in fixed-size batches so one compiled function serves any input size.

  Inputs are padded to a shape bucket (the next power of two, at least 32 rows, at most ``batch_size`` per
  call), so one compiled function serves every set of a size class (the key study's four conditions, the
  central baseline). The floor is small because validation runs every round: padding a 30-sample set to
  256 rows cost more than the round's training on a 200 x 10,000 file (benchmarks/infl_time_to_result.py).
  """
  x = np.asarray(x, np.float32)
  n = x.shape[0]
  size = min(batch_size, max(32, 1 << max(n - 1, 0).bit_length()))
  coords = None if key_coords is None else jnp.asarray(key_coords, jnp.float32)
  out = []
  for start in range(0, n, size):
    xb = x[start:start + size]
    pad = size - xb.shape[0]
    xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)]) if pad else xb
    out.append(np.asarray(_inference_program()(model, variables, xb, coords))[: size - pad])
  return np.concatenate(out)


def softmax(logits: np.ndarray) -> np.ndarray:
  z = np.asarray(logits, np.float64)
  z = np.exp(z - z.max(axis=-1, keepdims=True))
  return z / z.sum(axis=-1, keepdims=True)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
  """Mean softmax cross-entropy, in numpy (metrics run on the host, no JAX op to compile)."""
  z = np.asarray(logits, np.float64)
  z = z - z.max(axis=-1, keepdims=True)
  log_probs = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
  return float(-log_probs[np.arange(len(labels)), np.asarray(labels)].mean())


def binary_auc(positive: np.ndarray, scores: np.ndarray) -> float:
  """ROC AUC as the Mann-Whitney statistic (ties count one half): scikit-learn's ``roc_auc_score``."""
  positive = np.asarray(positive, bool)
  order = np.argsort(scores, kind="mergesort")
  sorted_scores = np.asarray(scores)[order]
  # Average ranks (1-based) over runs of tied scores.
  starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
  ends = np.r_[starts[1:], len(sorted_scores)]
  ranks = np.empty(len(sorted_scores))
  ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
  n_pos = positive.sum()
  n_neg = len(positive) - n_pos
  return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def classification_metrics(y_true: np.ndarray, logits: np.ndarray, num_classes: int) -> dict[str, float]:
  """Accuracy, weighted F1, and one-vs-rest ROC AUC weighted by class prevalence.

  AUC is averaged over the classes present in ``y_true`` (a class absent from a small
  test split has no defined AUC), each weighted by its count, as scikit-learn's
  ``average="weighted"`` does; the figures equal scikit-learn's (tested), computed in numpy because
  validation scores every round and scikit-learn's input checks cost more than the arithmetic.
  """
  y_true = np.asarray(y_true)
  logits = np.asarray(logits, np.float64)
  if logits.shape != (y_true.shape[0], num_classes):
    raise ValueError(f"logits have shape {logits.shape}, expected ({y_true.shape[0]}, {num_classes})")
  probs = softmax(logits)
  pred = probs.argmax(-1)
  counts = np.bincount(y_true, minlength=num_classes).astype(np.float64)
  if num_classes == 2 and 0 < counts[1] < len(y_true):
    auc = binary_auc(y_true == 1, probs[:, 1])
  else:
    present = [c for c in range(num_classes) if 0 < counts[c] < len(y_true)]
    aucs = [binary_auc(y_true == c, probs[:, c]) for c in present]
    auc = float(np.dot(aucs, counts[present]) / counts[present].sum()) if present else float("nan")
  true_positives = np.bincount(y_true[pred == y_true], minlength=num_classes).astype(np.float64)
  predicted = np.bincount(pred, minlength=num_classes).astype(np.float64)
  denominator = predicted + counts  # F1 = 2 TP / (predicted + actual); 0 where both are 0
  f1 = np.divide(2 * true_positives, denominator, out=np.zeros(num_classes), where=denominator > 0)
  return {
      "accuracy": float(np.mean(pred == y_true)),
      "f1_weighted": float(np.dot(f1, counts) / counts.sum()),
      "auc_weighted": auc,
  }


# --------------------------------------------------------------------------------------------
# The runner


COMPUTE_DTYPES = ("float32", "bfloat16")


def load_data(config: TrainConfig):
  """The data of ``config``'s data options; a file split without a client column gets
  ``GENERIC_N_CLIENTS`` clients where ``--n-clients`` is not given, and a note on stderr saying so."""
  from infl_jax.data import load_dataset

  split = load_dataset(config.dataset, label_key=config.label_key, client_key=config.client_key,
                       n_clients=config.n_clients, partition=config.partition, alpha=config.alpha,
                       classes_per_client=config.classes_per_client, val_fraction=config.val_fraction,
                       test_fraction=config.test_fraction, seed=config.seed, layer=config.layer,
                       log_transform=config.log_transform, impute=config.impute,
                       n_top_features=config.n_top_features, min_class_count=config.min_class_count,
                       drop_unlabelled=config.drop_unlabelled, default_n_clients=GENERIC_N_CLIENTS)
  if config.partition is None and config.client_key is None and split.config["partition"] == "iid":
    # Chosen for the user: say so, since a file usually has a site/patient column worth using.
    print(f"no --client-key given: split into {split.n_clients} IID clients (set --client-key COLUMN or "
          "--partition/--n-clients)", file=sys.stderr)
  warn_single_class_clients(split, config)
  return split


def create_model(config: TrainConfig, num_classes: int):
  if config.compute_dtype not in COMPUTE_DTYPES:
    raise UserInputError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {config.compute_dtype!r} "
                         "(--bf16 selects bfloat16)")
  if config.model == "proteomics":
    return models.make_proteomics_net(num_classes, key_strength=config.key_strength, dropout_rate=config.dropout,
                                      variant=config.variant, dtype=config.compute_dtype,
                                      residual_relu=config.residual_relu)
  if config.model == "mlp":
    return models.make_mlp_classifier(config.hidden, num_classes, key_strength=config.key_strength,
                                      norm=config.norm, dropout_rate=config.dropout, variant=config.variant,
                                      dtype=config.compute_dtype)
  raise UserInputError(f"unknown model {config.model!r}; choose --model proteomics or --model mlp")


def init_variables(model, num_features: int, rng: jax.Array):
  """The model's initial variables: called eagerly, from one compiled program (cached on disk) rather than one
  small compile per initialiser op; inside a caller's jit or eval_shape, traced into the caller's program."""
  if isinstance(rng, jax.core.Tracer):  # compiler options belong to a top-level jit only
    return _init(model, num_features, rng)
  return _init_program()(model, num_features, rng)


def _init(model, num_features: int, rng: jax.Array):
  dummy = jnp.zeros((2, num_features), jnp.float32)
  return model.init({"params": rng, "dropout": rng}, dummy, key_coords=None, train=False)


@functools.cache
def _init_program():
  return jax.jit(_init, static_argnums=(0, 1), compiler_options=compiler_options(ONCE))


def client_split(split, view: KeyView):
  """``split`` as the clients hold it under their key scheme: every input through ``view`` (scrambled under
  ``hardened``; the same under ``faithful``)."""
  if view.scramblers is None:
    return split
  return dataclasses.replace(split, train_x=view.inputs(split.train_x), val_x=view.inputs(split.val_x),
                             test_x=view.inputs(split.test_x))


def client_data(split, key_version: int) -> ClientData:
  per_client = [{"x": x.astype(np.float32), "y": y.astype(np.int32)} for x, y in split.client_arrays()]
  return stack_clients(per_client, key_version=key_version)


def evaluate(model, variables, x, y, num_classes: int, key_coords) -> dict[str, float]:
  return classification_metrics(y, predict_logits(model, variables, x, key_coords), num_classes)


def train_central(config: TrainConfig, model, split, coords, rng: jax.Array, *,
                  abandoned: threading.Event | None = None) -> dict | None:
  """The utility reference: the same network, optimizer, schedule and model selection on the pooled
  training data, i.e. the federated protocol with one client that holds every training sample. Returns its
  test metrics, right key, at the round selected on validation; None if ``abandoned`` was set mid-run.

  Each round that client trains ``local_epochs`` epochs from the previous round's model (FedAvg over
  one client keeps its model), so central and federated training differ only in the split of the data.
  ``run`` trains it in a background thread alongside the federated rounds: on CPU the rounds' many small
  kernels leave a core idle, so compiling and running both at once shortens a run (time to result,
  benchmarks/infl_time_to_result.py); each is deterministic on its own, so the figures do not change.
  """
  pooled = stack_clients([{"x": split.train_x.astype(np.float32), "y": split.train_y.astype(np.int32)}],
                         key_version=config.key_version)
  central = dataclasses.replace(config, client_fraction=1.0, server_optimizer="fedavg", server_learning_rate=None,
                                prox_mu=0.0, drift_correction="none")
  algo = algorithm_from_config(central, classification_task(model))
  init_rng, server_rng = jax.random.split(rng)
  state = algo.init(init_variables(model, split.n_features, init_rng), server_rng, key_version=config.key_version)
  coords = jnp.asarray(coords)
  stop = None if abandoned is None else (lambda *_: abandoned.is_set())
  result = run_rounds(jit_round(algo.round), state, pooled, coords, rounds=config.rounds,
                      extra_metrics=validation_metrics(config, model, split, coords),
                      select=validation_score(config), should_stop=stop)
  if abandoned is not None and abandoned.is_set():
    return None
  return evaluate(model, global_variables(result.best_or_last), split.test_x, split.test_y, split.n_classes, coords)


def validation_metrics(config: TrainConfig, model, split, coords) -> Callable[[ServerState, int], dict]:
  """Validation accuracy, F1, AUC and loss of the global model every ``eval_every`` rounds and at the last."""

  def metrics(state: ServerState, done: int) -> dict:
    if done % config.eval_every and done != config.rounds:
      return {}
    logits = predict_logits(model, global_variables(state), split.val_x, coords)
    scores = classification_metrics(split.val_y, logits, split.n_classes)
    scores["loss"] = cross_entropy(logits, split.val_y)
    return {f"val_{k}": v for k, v in scores.items()}

  return metrics


def validation_score(config: TrainConfig):
  """The round score of ``--model-selection best-val``: validation accuracy, the later round winning ties
  (docs/design.md, "Federated protocol"); None for ``last``."""
  if config.model_selection == "last":
    return None
  return lambda row: row.get("val_accuracy")


def check_model_fits(config: TrainConfig, model, algo, num_features: int, clients, init_rng: jax.Array,
                     server_rng: jax.Array, *, client_chunk_size: int | None = None) -> None:
  """``check_memory`` before anything of the model is allocated (its variables from ``jax.eval_shape``): a
  model too large for the machine is refused in one line naming the setting, where XLA aborted the process.
  ``clients``: a ``ClientSource`` (its data counted as ``num_features`` float32 inputs and a label)."""
  abstract = jax.eval_shape(functools.partial(init_variables, model, num_features), init_rng)
  max_samples = int(np.max(clients.num_samples))
  if config.model == "proteomics":
    what = f"--model proteomics on {num_features} input features"
    fix = "keep fewer features (--n-top-features), or use --model mlp with a small --hidden"
  else:
    what, fix = f"--hidden {','.join(map(str, config.hidden))}", "choose a smaller --hidden"
  check_memory(config, algo, abstract, clients, server_rng, model=what, model_fix=fix,
               data_bytes=clients.num_clients * max_samples * (num_features * 4 + 4),
               client_chunk_size=client_chunk_size)


def run(config: TrainConfig, workdir, key: keylib.SecretKey, *, resume: bool = False,
        stop_after_round: int | None = None, show_progress: bool | None = None) -> dict:
  """Runs (or resumes) the federated training in ``workdir`` and writes metrics.jsonl and summary.json.

  ``stop_after_round`` ends the run early after that round's checkpoint (used to test resume).
  """
  check_key_version(config, key)
  raw = load_data(config)
  preset_rounds = config.rounds
  config, federation_choice = fit_to_federation(config, raw)
  if federation_choice is not None and not resume:
    say_federation_choice(federation_choice, preset_rounds)
  split = client_split(raw, client_view(key, config.key_scheme, raw.n_features))
  model = create_model(config, split.n_classes)
  algo = algorithm_from_config(config, classification_task(model, absent_class_scale=config.absent_class_scale))
  coords = jnp.asarray(key.coords)
  init_rng, server_rng, central_rng = jax.random.split(jax.random.key(config.seed), 3)
  clients = split_clients(split, config.key_version, presence=config.absent_class_scale != 1.0)
  check_model_fits(config, model, algo, split.n_features, clients, init_rng, server_rng)

  # The central baseline trains in the background while the federated rounds run (not when the run is to
  # stop early: it would not be used); a failed federated run abandons it rather than wait for it.
  abandoned = threading.Event()
  with concurrent.futures.ThreadPoolExecutor(1) as background:
    central = (background.submit(train_central, config, model, split, key.coords, central_rng, abandoned=abandoned)
               if config.central_baseline and stop_after_round is None else None)
    try:
      result = train_federated(config, workdir, algo, init_variables(model, split.n_features, init_rng),
                               clients, coords, rng=server_rng, resume=resume,
                               stop_after_round=stop_after_round, show_progress=show_progress,
                               extra_metrics=validation_metrics(config, model, split, coords),
                               select=validation_score(config))
    except BaseException:
      abandoned.set()
      raise
    if stopped := stopped_early(result, config):
      return stopped
    central_test = None if central is None else central.result()

  variables = global_variables(result.best_or_last)
  test = {name: evaluate(model, variables, view.inputs(raw.test_x), split.test_y, split.n_classes, view.coords)
          for name, view in study_views(key, config.key_scheme, raw.n_features, seed=config.seed).items()}
  summary = {
      "task": "classification",
      "dataset": config.dataset,
      "description": split.description,
      "n_train": int(len(split.train_y)), "n_val": int(len(split.val_y)), "n_test": int(len(split.test_y)),
      "client_sizes": [int(n) for n in split.client_sizes()],
      "classes": list(split.class_names),
      "majority_class_test_fraction": float(np.bincount(split.test_y).max() / len(split.test_y)),
      "rounds": int(result.state.round),
      "evaluated_round": int(result.best_or_last.round),
      "model_selection": config.model_selection,
      "key_scheme": config.key_scheme,
      "federated_train_seconds_this_session": result.seconds,
      "test": test,
      "config": dataclasses.asdict(config),
  }
  if federation_choice is not None:
    summary["federation_choice"] = federation_choice
  if central_test is not None:
    summary["central_right_key_test"] = central_test
  return write_summary(workdir, summary)


def format_summary(summary: dict) -> str:
  chosen = summary.get("evaluated_round", summary["rounds"])
  chosen = f" (model of round {chosen}, best on validation)" if chosen != summary["rounds"] else ""
  lines = [f"test metrics after {summary['rounds']} rounds{chosen} on {summary['dataset']} "
           f"({summary['n_test']} test samples; majority class {summary['majority_class_test_fraction']:.2f}):"]
  rows = [("federated", name, m) for name, m in summary["test"].items()]
  if "central_right_key_test" in summary:
    rows.append(("central", "right_key", summary["central_right_key_test"]))
  for kind, name, m in rows:
    lines.append(f"  {kind:<9s} {name:<22s} accuracy {m['accuracy']:.3f}  F1 {m['f1_weighted']:.3f}  "
                 f"AUC {m['auc_weighted']:.3f}")
  return "\n".join(lines)
