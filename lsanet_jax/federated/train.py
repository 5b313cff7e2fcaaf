"""Federated LSANet: hospitals train the model of ``lsanet-train`` together on the omics engine's rounds.

Everything a central run does, per round instead of per epoch: the same data routes, model, heads and losses
(``lsanet_jax.train``, ``lsanet_jax.federated.task``); the rounds are the engine's ``fedavg`` (hospitals sampled,
trained under ``vmap`` in one jitted round, or on CPU step by step by ``host_round``, updates averaged by sample
count), driven by the one round loop
``run_rounds`` (metrics.jsonl, orbax checkpoints, resume); validation every ``--eval-every`` rounds picks the round
whose global model the test split scores. With ``--batch-norm fedbn`` each hospital keeps its BatchNorm layers,
and a model is scored as the mean over the hospitals' own models (each hospital's BatchNorm with the shared rest).
docs/design.md, "Federated LSANet".
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from infl_jax.federated.client_data import stack_clients
from infl_jax.federated.engine import FederatedAlgorithm, ServerState, fedavg
from infl_jax.federated.host_round import host_round
from infl_jax.federated.loop import RoundsResult, RunDir, jit_round, run_rounds
from infl_jax import keys as keylib
from infl_jax.federated.site_local import SiteLocal, site_variables
from runkit.config import resume_fingerprint
from runkit.metrics_log import write_json_atomic

from lsanet_jax import plots
from lsanet_jax import train as central
from lsanet_jax.data.medmnist import MULTI_LABEL
from lsanet_jax.federated.config import FederatedConfig
from lsanet_jax.federated.hospitals import Hospitals, split_hospitals
from lsanet_jax.federated.keys import keyed_lsanet, load_or_create_key
from lsanet_jax.federated.task import batch_norm_site_local, lsanet_task
from lsanet_jax.steps import make_predict, resolve_epoch_loop

__all__ = ["build_algorithm", "hospital_clients", "round_lr_factor", "train_and_evaluate"]


def round_lr_factor(rounds: int):
  """Central training's step schedule over rounds: x0.1 after half and after three quarters of the rounds, a drop
  that falls on round 0 skipped (as ``lsanet_jax.train.learning_rate_schedule`` skips one at epoch 0)."""
  milestones = [m for m in (int(0.5 * rounds), int(0.75 * rounds)) if m > 0]

  def factor(r):
    return jnp.prod(jnp.asarray([jnp.where(r >= m, 0.1, 1.0) for m in milestones] or [1.0]))
  return factor


def build_algorithm(config: FederatedConfig, model, data_task: str, variables: dict) -> FederatedAlgorithm:
  """``fedavg`` of the LSANet task with Adam at each hospital, FedBN's split where asked."""
  site_local = batch_norm_site_local(variables) if config.batch_norm == "fedbn" else None
  task = lsanet_task(model, data_task, dynamic_weights=config.dynamic_aux_weights, synergy=config.synergy,
                     augment=config.augment)
  return fedavg(task, optax.adam(config.learning_rate), local_epochs=config.epochs, batch_size=config.batch_size,
                client_fraction=config.client_fraction, weighting="samples",
                client_chunk_size=config.client_chunk_size or None, client_lr_schedule=round_lr_factor(config.rounds),
                site_local=site_local, wrap_last_batch=True)


def hospital_clients(data, hospitals: Hospitals):
  """The hospitals' labelled images stacked on a client axis (padded to the largest), on the device once."""
  return stack_clients([{"images": data.train_images[rows], "labels": data.train_labels[rows]}
                        for rows in hospitals.rows])


def model_variables(state: ServerState, site_local: SiteLocal | None, hospital: int | None = None) -> dict:
  """The global model's variables, or with FedBN hospital ``hospital``'s own."""
  if site_local is None or hospital is None:
    return {"params": state.params, **state.model_state}
  params, model_state = site_variables(site_local, state.sites, hospital, state.params, state.model_state)
  return {"params": params, **model_state}


def score(state: ServerState, site_local: SiteLocal | None, num_hospitals: int, evaluate) -> tuple[dict, list]:
  """{head: {acc, auc}} of the run's model on a split, and with FedBN each hospital's scores (the model's are
  their mean)."""
  if site_local is None:
    return evaluate(model_variables(state, None)), []
  per_hospital = [evaluate(model_variables(state, site_local, k)) for k in range(num_hospitals)]
  mean = {head: {m: float(np.mean([s[head][m] for s in per_hospital])) for m in ("acc", "auc")}
          for head in per_hospital[0]}
  return mean, per_hospital


def _validation_hook(config: FederatedConfig, evaluate_val, site_local, num_hospitals: int):
  """extra_metrics for run_rounds: validation scores every --eval-every rounds and the seconds the round took."""
  last = [time.perf_counter()]

  def extra(state: ServerState, done: int) -> dict:
    row = {"round_time_s": time.perf_counter() - last[0]}
    if done % config.eval_every == 0 or done == config.rounds:
      val, _ = score(state, site_local, num_hospitals, evaluate_val)
      row.update({f"val_{m}_{h}": r[m] for h, r in val.items() for m in ("acc", "auc")})
    last[0] = time.perf_counter()
    return row

  return extra


class _Run(NamedTuple):
  """What a run builds from its config before the rounds (every piece from the config's seeds and key file)."""
  data: Any
  hospitals: Hospitals
  model: Any
  algorithm: FederatedAlgorithm
  site_local: SiteLocal | None
  state: ServerState
  key: Any  # infl_jax.keys.SecretKey with --key-scheme faithful, else None
  evaluate: Callable  # (split, key_coords) -> (variables -> {head: {acc, auc}})


def build_run(config: FederatedConfig, workdir: pathlib.Path, resume: bool) -> _Run:
  data = central.load_data(config)
  hospitals = split_hospitals(data, config)
  model = central.build_model(config, data.n_classes)
  image_shape = data.train_images.shape[1:]
  key = None
  if config.key_scheme == "faithful":
    model = keyed_lsanet(model, image_shape, config.key_strength)
    variables = jax.jit(functools.partial(model.init, train=False))(central.init_key(config.seed),
                                                                    jnp.zeros((1, *image_shape)))
    key = load_or_create_key(workdir, resume=resume)
  else:
    variables = central.init_variables(model, image_shape, central.init_key(config.seed))
  algorithm = build_algorithm(config, model, data.task, variables)
  site_local = algorithm.spec.site_local
  state = algorithm.init(variables, jax.random.fold_in(jax.random.key(config.seed), 2),
                         num_clients=len(hospitals.rows))
  on_device = central.evaluation_data(data, config.eval_batch_size)
  predict = make_predict(model, data.task, on_device["eval_batch"], on_device["max_eval_batches"])
  evaluate = lambda split, coords: lambda variables: central.evaluate(predict, variables, on_device, split,
                                                                      data.task, coords)
  return _Run(data, hospitals, model, algorithm, site_local, state, key, evaluate)


def train_and_evaluate(config: FederatedConfig, workdir, *, variant: str | None = None, resume: bool = False,
                       stop_after_rounds: int | None = None, show_progress: bool | None = None) -> dict | None:
  """Trains in workdir and returns the summary (None when stopped before the last round).

  Writes metrics.jsonl (one line per round), checkpoints/ (every --checkpoint-every rounds and the last), and
  after the last round curves.png and summary.json. Resume order: data, hospitals, model and the fresh server
  state are rebuilt from config (every draw from its seeds), the key read back from the workdir's key file;
  ``run_rounds`` restores the newest checkpoint's server state, selected round and metrics into them (a
  checkpoint of other settings is refused) and continues with the next round, whose randomness is
  ``fold_in(run key, round)`` alone, so the run ends as an uninterrupted one would.
  """
  started = time.perf_counter()
  config.validate()
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  run = build_run(config, workdir, resume)
  coords = None if run.key is None else jnp.asarray(run.key.coords, jnp.float32)
  fingerprint, defaults = resume_fingerprint(config)
  run_dir = RunDir(workdir, config.checkpoint_every, config.keep_checkpoints, fingerprint, defaults, resume,
                   learning_rate_flag="--lr")
  head, num_hospitals = config.selection_head, len(run.hospitals.rows)
  first_round = [None]

  def should_stop(state: ServerState, done: int) -> bool:
    first_round[0] = first_round[0] or done
    return (stop_after_rounds is not None and done - first_round[0] + 1 >= stop_after_rounds
            and done < config.rounds)

  round_fn = host_round(run.algorithm) if resolve_epoch_loop(config.epoch_loop) == "host" else \
      jit_round(run.algorithm.round)
  result = run_rounds(round_fn, run.state, hospital_clients(run.data, run.hospitals), coords,
                      rounds=config.rounds, run_dir=run_dir,
                      extra_metrics=_validation_hook(config, run.evaluate("val", coords), run.site_local,
                                                     num_hospitals),
                      should_stop=should_stop, select=lambda row: row.get(f"val_auc_{head}"),
                      show_progress=show_progress)
  if int(result.state.round) < config.rounds:
    print(f"stopped after round {int(result.state.round)} of {config.rounds}; continue with --resume",
          file=sys.stderr)
    return None
  test, per_hospital = score(result.best_or_last, run.site_local, num_hospitals, run.evaluate("test", coords))
  rows = [{"round": r["round"], "loss": r["train_loss"], **{k: v for k, v in r.items() if k.startswith("val_")}}
          for r in result.history]
  plots.plot_training_curves(rows, workdir / "curves.png", step="round")
  summary = run_summary(config, run.data, run.hospitals, result, test, per_hospital, variant=variant,
                        seconds=time.perf_counter() - started)
  if run.key is not None:
    summary["key"] = key_study(run, result.best_or_last, num_hospitals, config.key_strength)
  write_json_atomic(workdir / "summary.json", summary)
  return summary


def key_study(run: _Run, state: ServerState, num_hospitals: int, strength: float) -> dict:
  """The selected model's test scores without the key (the plain layers, no INR path) and with a guessed key of
  the same mode: what a holder of the shared model but not the key gets."""
  wrong = keylib.wrong_key_like(run.key)
  conditions = {"no_key": None, "wrong_key": jnp.asarray(wrong.coords, jnp.float32)}
  return {"scheme": "faithful", "strength": strength, "fingerprint": run.key.fingerprint,
          **{f"test_{name}": score(state, run.site_local, num_hospitals, run.evaluate("test", coords))[0]
             for name, coords in conditions.items()}}


def run_summary(config: FederatedConfig, data, hospitals: Hospitals, result: RoundsResult, test: dict,
                per_hospital: list, *, variant: str | None, seconds: float) -> dict:
  """summary.json: every head's test scores at the selected round, the hospitals, what produced them."""
  selected = max((r for r in result.history if f"val_auc_{config.selection_head}" in r),
                 key=lambda r: (r[f"val_auc_{config.selection_head}"], r["round"]), default=result.history[-1])
  round_times = [r["round_time_s"] for r in result.history[1:] if "round_time_s" in r]
  labels = lambda rows: np.bincount(data.train_labels[rows][:, 0], minlength=data.n_classes).tolist() \
      if data.task != MULTI_LABEL else None
  return {
      "dataset": config.flag or data.flag, "task": data.task, "data_source": data.source,
      "data": {"kind": data.source_kind, "n_classes": data.n_classes, "image_shape": list(data.train_images.shape[1:]),
               "split_sizes": {s: int(data.split(s)[0].shape[0]) for s in ("train", "val", "test")}},
      "variant": variant, "config": dataclasses.asdict(config),
      "hospitals": [{"name": n, "images": held, "labelled": int(len(rows)), "labelled_per_class": labels(rows)}
                    for n, held, rows in zip(hospitals.names, hospitals.images_held, hospitals.rows)],
      "batch_norm": config.batch_norm, "selection_head": config.selection_head,
      "selected_round": int(selected["round"]), "rounds": config.rounds,
      "heads": {h: {"test_acc": test[h]["acc"], "test_auc": test[h]["auc"],
                    "val_acc": selected.get(f"val_acc_{h}"), "val_auc": selected.get(f"val_auc_{h}")} for h in test},
      "per_hospital_test": [{h: {"acc": s[h]["acc"], "auc": s[h]["auc"]} for h in s} for s in per_hospital] or None,
      "num_train_labelled": int(sum(len(r) for r in hospitals.rows)),
      "params": central.param_summary({"params": result.state.params}),
      "seconds_per_round_median": float(np.median(round_times)) if round_times else None,
      "backend": jax.default_backend(),
      "seconds_this_invocation": seconds,
  }
