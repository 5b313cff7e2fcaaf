"""INFL classification: federated training with checkpoints, then the key study and a central baseline.

Resume order: the checkpoint holds the server state (parameters, BatchNorm statistics,
server optimizer state, round, run PRNG key, key version) and the metrics so far; the
data split and the client stacking are rebuilt deterministically from the config's seed,
and each round's randomness is ``fold_in(run key, round)``, so a resumed run repeats
exactly the rounds an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from infl_jax import keys as keylib
from infl_jax import models
from infl_jax.common.checkpoint import Checkpointer
from infl_jax.common.cli import CHECKPOINT_SUBDIR, UserInputError, progress
from infl_jax.common.metrics_log import MetricsWriter, write_json_atomic
from infl_jax.config import TrainConfig
from infl_jax.federated import (ClientData, FederatedAlgorithm, ServerState, client_mesh, fedavg, server_optimizer,
                                shard_clients, stack_clients)
from infl_jax.tasks.classification import classification_metrics, classification_task, predict_logits


def load_data(config: TrainConfig):
  from infl_jax.data import load_dataset

  return load_dataset(config.dataset, label_key=config.label_key, client_key=config.client_key,
                      n_clients=config.n_clients, partition=config.partition, alpha=config.alpha,
                      seed=config.seed, n_top_features=config.n_top_features)


COMPUTE_DTYPES = ("float32", "bfloat16")


def create_model(config: TrainConfig, num_classes: int):
  if config.compute_dtype not in COMPUTE_DTYPES:
    raise UserInputError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {config.compute_dtype!r} "
                         "(--bf16 selects bfloat16)")
  if config.model == "proteomics":
    return models.make_proteomics_net(num_classes, key_strength=config.key_strength, dropout_rate=config.dropout,
                                      variant=config.variant, dtype=config.compute_dtype)
  if config.model == "mlp":
    return models.make_mlp_classifier(config.hidden, num_classes, key_strength=config.key_strength,
                                      use_batch_norm=True, dropout_rate=config.dropout, variant=config.variant,
                                      dtype=config.compute_dtype)
  raise UserInputError(f"unknown model {config.model!r}; choose 'proteomics' or 'mlp'")


def create_client_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  # PyTorch-style Adam weight decay (L2 added to the gradient), as the reference trains.
  return optax.chain(optax.add_decayed_weights(config.weight_decay), optax.adam(config.learning_rate))


def create_algorithm(config: TrainConfig, model) -> FederatedAlgorithm:
  return fedavg(
      classification_task(model),
      create_client_optimizer(config),
      local_epochs=config.local_epochs,
      batch_size=config.batch_size,
      client_fraction=config.client_fraction,
      weighting=config.weighting,
      prox_mu=config.prox_mu,
      server_opt=server_optimizer(config.server_optimizer, config.server_learning_rate),
  )


def init_variables(model, num_features: int, rng: jax.Array):
  dummy = jnp.zeros((2, num_features), jnp.float32)
  return model.init({"params": rng, "dropout": rng}, dummy, key_coords=None, train=False)


def client_data(split, key_version: int) -> ClientData:
  per_client = [{"x": x.astype(np.float32), "y": y.astype(np.int32)} for x, y in split.client_arrays()]
  return stack_clients(per_client, key_version=key_version)


def global_variables(state: ServerState) -> dict:
  return {"params": state.params, **state.model_state}


def evaluation_keys(key: keylib.SecretKey) -> dict[str, Any]:
  """The four ways to run a trained model: right key, two kinds of wrong key, no INR path."""
  return {
      "right_key": key.coords,
      "wrong_key_same_mode": keylib.wrong_key_like(key).coords,
      "wrong_key_other_mode": keylib.other_mode_key(key).coords,
      "no_inr": None,
  }


def evaluate(model, variables, x, y, num_classes: int, key_coords) -> dict[str, float]:
  return classification_metrics(y, predict_logits(model, variables, x, key_coords), num_classes)


def train_central(config: TrainConfig, model, split, coords, rng: jax.Array) -> dict:
  """The utility reference: the same architecture and optimizer on the pooled training data,
  for as many epochs as a federated client trains in all (rounds x local epochs).

  It is one engine round over a single client holding all training data, with plain
  averaging, which is exactly that client's uninterrupted local training.
  """
  pooled = stack_clients([{"x": split.train_x.astype(np.float32), "y": split.train_y.astype(np.int32)}],
                         key_version=config.key_version)
  central = dataclasses.replace(config, local_epochs=config.rounds * config.local_epochs, client_fraction=1.0,
                                server_optimizer="fedavg", server_learning_rate=None, prox_mu=0.0)
  algo = create_algorithm(central, model)
  init_rng, server_rng = jax.random.split(rng)
  state = algo.init(init_variables(model, split.n_features, init_rng), server_rng, key_version=config.key_version)
  state, _ = jax.jit(algo.round)(state, pooled, jnp.asarray(coords))
  return evaluate(model, global_variables(state), split.test_x, split.test_y, split.n_classes, coords)


def run_rounds(config: TrainConfig, workdir, algo: FederatedAlgorithm, state: ServerState, clients: ClientData,
               context: Any, *, resume: bool, stop_after_round: int | None = None,
               show_progress: bool | None = None,
               extra_metrics: Callable[[ServerState, int], dict] | None = None):
  """The round loop of every INFL task: rounds, metrics.jsonl, checkpoints, resume.

  ``state`` is the freshly initialised server state (the template a resume restores into);
  ``extra_metrics(state, rounds_done)`` adds e.g. validation metrics to a round's line.
  ``config.shard_clients`` splits ``clients`` over all local devices for the rounds.
  Returns ``(state, history, seconds)``, or None when stopped after ``stop_after_round``.
  """
  workdir = pathlib.Path(workdir)
  checkpointer = Checkpointer(workdir / CHECKPOINT_SUBDIR, save_every=config.checkpoint_every,
                              keep=config.keep_checkpoints, config=config.resume_fingerprint())
  history: list[dict] = []
  if resume:
    restored, extra = checkpointer.restore(state._asdict())
    state = ServerState(**restored)
    history = extra.get("history", [])
  start = int(state.round)
  writer = MetricsWriter(workdir, resume_from_step=start if resume else None)
  round_fn = jax.jit(algo.round)
  if config.shard_clients:
    clients = shard_clients(clients, client_mesh())
  bar = progress(range(start, config.rounds), total=config.rounds, initial=start, desc="rounds",
                 disable=None if show_progress is None else not show_progress)
  t0 = time.perf_counter()
  try:
    for r in bar:
      state, round_metrics = round_fn(state, clients, context)
      row = {k: float(v) for k, v in jax.device_get(round_metrics).items()}
      done = r + 1
      if extra_metrics is not None:
        row.update(extra_metrics(state, done))
      bar.set_postfix({k: f"{row[k]:.3f}" for k in ("train_loss", "val_accuracy") if k in row})
      writer.write(done, row)
      history.append({"round": done, **row})
      checkpointer.save(done, state._asdict(), extra={"history": history},
                        force=(done == config.rounds or done == stop_after_round))
      if stop_after_round is not None and done >= stop_after_round:
        return None
  finally:
    writer.close()
    checkpointer.close()
  return state, history, time.perf_counter() - t0


def train_and_evaluate(config: TrainConfig, workdir, key: keylib.SecretKey, *, resume: bool = False,
                       stop_after_round: int | None = None, show_progress: bool | None = None) -> dict:
  """Runs (or resumes) the federated training in ``workdir`` and writes metrics.jsonl and summary.json.

  ``stop_after_round`` ends the run early after that round's checkpoint (used to test resume).
  """
  workdir = pathlib.Path(workdir)
  if key.version != config.key_version:
    raise UserInputError(f"the key file holds key version {key.version} but the run expects version "
                         f"{config.key_version}; pass --key-version {key.version} or the matching key file")
  split = load_data(config)
  model = create_model(config, split.n_classes)
  algo = create_algorithm(config, model)
  clients = client_data(split, config.key_version)
  coords = jnp.asarray(key.coords)

  rng = jax.random.key(config.seed)
  init_rng, server_rng, central_rng = jax.random.split(rng, 3)
  state = algo.init(init_variables(model, split.n_features, init_rng), server_rng, key_version=config.key_version)

  eval_logits = jax.jit(lambda v, x: model.apply(v, x, key_coords=coords, train=False))
  val_x, val_y = jnp.asarray(split.val_x, jnp.float32), split.val_y

  def validation_metrics(state: ServerState, done: int) -> dict:
    if done % config.eval_every and done != config.rounds:
      return {}
    logits = np.asarray(eval_logits(global_variables(state), val_x))
    return {f"val_{k}": v for k, v in classification_metrics(val_y, logits, split.n_classes).items()}

  out = run_rounds(config, workdir, algo, state, clients, coords, resume=resume, stop_after_round=stop_after_round,
                   show_progress=show_progress, extra_metrics=validation_metrics)
  if out is None:
    return {"stopped_after_round": stop_after_round}
  state, _, train_seconds = out

  variables = global_variables(state)
  test = {name: evaluate(model, variables, split.test_x, split.test_y, split.n_classes, c)
          for name, c in evaluation_keys(key).items()}
  summary = {
      "dataset": config.dataset,
      "description": split.description,
      "n_train": int(len(split.train_y)), "n_val": int(len(split.val_y)), "n_test": int(len(split.test_y)),
      "client_sizes": [int(n) for n in split.client_sizes()],
      "classes": list(split.class_names),
      "majority_class_test_fraction": float(np.bincount(split.test_y).max() / len(split.test_y)),
      "rounds": int(state.round),
      "federated_train_seconds_this_session": train_seconds,
      "test": test,
      "config": dataclasses.asdict(config),
  }
  if config.central_baseline:
    summary["central_right_key_test"] = train_central(config, model, split, key.coords, central_rng)
  write_json_atomic(workdir / "summary.json", summary)
  return summary


def format_summary(summary: dict) -> str:
  lines = [f"test metrics after {summary['rounds']} rounds on {summary['dataset']} "
           f"({summary['n_test']} test samples; majority class {summary['majority_class_test_fraction']:.2f}):"]
  for name, m in summary["test"].items():
    lines.append(f"  federated {name:<22s} accuracy {m['accuracy']:.3f}  F1 {m['f1_weighted']:.3f}  "
                 f"AUC {m['auc_weighted']:.3f}")
  if "central_right_key_test" in summary:
    m = summary["central_right_key_test"]
    lines.append(f"  central   {'right_key':<22s} accuracy {m['accuracy']:.3f}  F1 {m['f1_weighted']:.3f}  "
                 f"AUC {m['auc_weighted']:.3f}")
  return "\n".join(lines)
