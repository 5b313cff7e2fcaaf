"""Runs the privacy evaluation: trains each stage's model (``experiment.plan_stages``), attacks it
(``attack_models``; the hardened model's scramble also ``hardened_attacks``), measures membership inference,
and writes the report (``report``).

Membership inference (``attacks.membership``) on each final global model: the loss threshold for
every model, LiRA with shadow models where the stage asks for it; members are the training set,
non-members validation + test, queried with the right key.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from infl_jax.attacks import membership
from infl_jax.config import TrainConfig
from infl_jax.federated import (FederatedAlgorithm, LocalConfig, algorithm_from_config, client_optimizer_from_config,
                                global_variables, run_rounds)
from infl_jax.privacy import dp as dplib
from infl_jax.privacy import hardened as hardlib
from infl_jax.privacy import report
from infl_jax.privacy.attack_models import AttackPrograms, AttackSetup, attack_programs, attack_rows, attack_setup
from infl_jax.privacy.experiment import (PrivacyConfig, Stage, dp_runs, inversion_config, plan_stages,
                                         resolve_main_lambda)
from infl_jax.privacy.hardened_attacks import check_panel_settings, hardened_attack_rows
from infl_jax.tasks.classification import classification_task, client_data, create_model, init_variables, load_data
from runkit.cli import progress
from runkit.errors import UserInputError
from runkit.metrics_log import write_json_atomic

__all__ = ["ModelPrograms", "membership_metrics", "model_programs", "run_evaluation"]


class ModelPrograms(NamedTuple):
  """What is built (and jitted) once per key strength and shared by its stages: the hardened model
  has the faithful one's architecture (only its data are scrambled), and every DP epsilon shares
  one round (the noise level travels in the round's context)."""

  model: nn.Module
  train_config: TrainConfig
  init: Callable  # rng -> freshly initialised variables
  fedavg: FederatedAlgorithm
  fedavg_round: Callable
  dp_fedavg: FederatedAlgorithm
  dp_round: Callable
  attacks: AttackPrograms


def model_programs(config: PrivacyConfig, key_strength: float, num_features: int, num_classes: int) -> ModelPrograms:
  train_config = config.train_config(key_strength)
  model = create_model(train_config, num_classes)
  task = classification_task(model)
  plain, private = algorithm_from_config(train_config, task), dplib.dp_fedavg(train_config, task)
  init = jax.jit(functools.partial(init_variables, model, num_features))
  # jax.jit compiles on the first call: a key strength without a DP stage never compiles the DP round.
  return ModelPrograms(model, train_config, init, plain, jax.jit(plain.round), private, jax.jit(private.round),
                       attack_programs(model, num_features, num_classes, inversion_config(config)))


@dataclasses.dataclass
class _Evaluation:
  """The evaluation's fixed inputs, and the programs of each key strength, built on first use."""

  config: PrivacyConfig
  setup: AttackSetup
  programs: dict[float, ModelPrograms] = dataclasses.field(default_factory=dict)
  seed_search: dict[str, dict] = dataclasses.field(default_factory=dict)  # per stage: every candidate's score

  @property
  def coords(self) -> jax.Array:
    return jnp.asarray(self.setup.key.coords)

  def programs_for(self, key_strength: float) -> ModelPrograms:
    if key_strength not in self.programs:
      split = self.setup.split
      self.programs[key_strength] = model_programs(self.config, key_strength, split.n_features, split.n_classes)
    return self.programs[key_strength]


def _train(programs: ModelPrograms, algorithm: FederatedAlgorithm, round_fn: Callable, split, context) -> dict:
  """The final global variables of ``train_config.rounds`` rounds of ``algorithm`` on ``split``'s clients."""
  train_config = programs.train_config
  init_rng, server_rng = jax.random.split(jax.random.key(train_config.seed))
  state = algorithm.init(programs.init(init_rng), server_rng, key_version=train_config.key_version)
  result = run_rounds(round_fn, state, client_data(split, train_config.key_version), context,
                      rounds=train_config.rounds)
  return global_variables(jax.device_get(result.state))


def _membership_pool(split) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(x, y, is_member)``: the training set (members), then validation + test (non-members)."""
  x = np.concatenate([split.train_x, split.val_x, split.test_x]).astype(np.float32)
  y = np.concatenate([split.train_y, split.val_y, split.test_y])
  is_member = np.arange(len(y)) < len(split.train_y)
  return x, y, is_member


def _train_shadows(config: PrivacyConfig, programs: ModelPrograms, split, coords) -> tuple[Any, np.ndarray]:
  """LiRA's shadow models: each trained like one client on a random half of the membership pool."""
  x_pool, y_pool, _ = _membership_pool(split)
  rng = jax.random.key(config.seed + 7)
  shadow_in = membership.shadow_membership(rng, config.num_shadows, len(y_pool))
  variables = programs.init(jax.random.fold_in(rng, 1))
  local = LocalConfig(local_epochs=config.shadow_epochs, batch_size=programs.train_config.batch_size)
  shadow_variables = membership.train_shadow_models(
      classification_task(programs.model), client_optimizer_from_config(programs.train_config), local, variables,
      x_pool, y_pool, shadow_in, jax.random.fold_in(rng, 2), coords)
  return shadow_variables, shadow_in


def membership_metrics(logits_fn: Callable, variables, split, coords, shadows=None) -> dict:
  """Loss-threshold membership inference, and LiRA given ``shadows = (shadow variables, shadow_in)``;
  ``logits_fn(variables, x, coords)`` is the model's inference."""
  x, y, is_member = _membership_pool(split)
  logits = logits_fn(variables, x, coords)
  scores = membership.loss_threshold_scores(logits, y)
  out = {f"mia_loss_{k}": v for k, v in membership.attack_metrics(is_member, scores).items()}
  if shadows is not None:
    shadow_variables, shadow_in = shadows
    shadow_logits = jax.vmap(lambda v: logits_fn(v, x, coords))(shadow_variables)
    scores = membership.lira_scores(membership.logit_confidence(logits, y),
                                    membership.logit_confidence(shadow_logits, y), shadow_in)
    out.update({f"mia_lira_{k}": v for k, v in membership.attack_metrics(is_member, scores).items()})
  return out


def _measure(ev: _Evaluation, stage: Stage, programs: ModelPrograms, variables, split, shadows=None):
  """``(attack rows, membership metrics)`` of one trained model; ``split`` is the data it was trained on."""
  rows = attack_rows(ev.setup, stage, programs.attacks, programs.model, variables)
  return rows, membership_metrics(programs.attacks.logits, variables, split, ev.coords, shadows)


# One function per stage kind: how its model is trained and what is measured on it.


def _run_faithful(ev: _Evaluation, stage: Stage):
  programs, split = ev.programs_for(stage.key_strength), ev.setup.split
  variables = _train(programs, programs.fedavg, programs.fedavg_round, split, ev.coords)
  shadows = _train_shadows(ev.config, programs, split, ev.coords) if stage.lira else None
  return _measure(ev, stage, programs, variables, split, shadows)


def _run_hardened(ev: _Evaluation, stage: Stage):
  programs = ev.programs_for(stage.key_strength)
  split = hardlib.harden_split(ev.setup.split, ev.setup.key)  # the clients scramble their data with the key
  variables = _train(programs, programs.fedavg, programs.fedavg_round, split, ev.coords)
  rows, mia = _measure(ev, stage, programs, variables, split)
  # The attacks on the scramble itself: the public-panel attacker, its baselines, the seed search.
  scramble_rows, record = hardened_attack_rows(ev.setup, stage, programs.attacks, variables,
                                               rows[0]["key_holder_accuracy"])
  if record:
    ev.seed_search[stage.name] = record
  return rows + scramble_rows, mia


def _run_dp(ev: _Evaluation, stage: Stage):
  programs, split = ev.programs_for(stage.key_strength), ev.setup.split
  context = dplib.DPContext.make(ev.coords, ev.config.dp_clip_norm, stage.dp.noise_multiplier)
  variables = _train(programs, programs.dp_fedavg, programs.dp_round, split, context)
  return _measure(ev, stage, programs, variables, split)


_STAGE_RUNNERS = {"faithful": _run_faithful, "hardened": _run_hardened, "dp": _run_dp}


def run_evaluation(config: PrivacyConfig, workdir, *, show_progress: bool | None = None) -> dict:
  """Trains, attacks and measures; writes ``results.json``, ``table.csv``, ``table.md`` and the plots
  into ``workdir``; returns the results."""
  config = config.validate()
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  started = time.perf_counter()
  main_lambda = resolve_main_lambda(config)
  split = load_data(config.train_config(main_lambda))
  if len(split.test_y) < config.num_targets:
    raise UserInputError(f"--num-targets {config.num_targets} but the test split has only {len(split.test_y)} "
                         "samples; lower --num-targets")
  check_panel_settings(config, split)
  sampling_rate, runs = dp_runs(config, split.n_clients)
  stages = plan_stages(config, main_lambda, runs)
  ev = _Evaluation(config, attack_setup(config, split))
  rows, mia, seconds = [], {}, {}
  bar = progress(stages, total=len(stages), desc="privacy evaluation",
                 disable=None if show_progress is None else not show_progress)
  for stage in bar:
    bar.set_postfix(stage=stage.name)
    stage_started = time.perf_counter()
    stage_rows, mia[stage.name] = _STAGE_RUNNERS[stage.kind](ev, stage)
    rows += [{**row, **mia[stage.name]} for row in stage_rows]
    seconds[stage.name] = time.perf_counter() - stage_started
  results = {
      "dataset": config.dataset, "description": split.description,
      "n_train": int(len(split.train_y)), "n_test": int(len(split.test_y)), "num_targets": config.num_targets,
      "chance_accuracy": float(np.bincount(split.test_y).max() / len(split.test_y)),
      "main_lambda": main_lambda,
      "dp": {"delta": config.dp_delta, "clip_norm": config.dp_clip_norm, "sampling_rate": sampling_rate,
             "rounds": config.train_config(0.0).rounds, "runs": [run._asdict() for run in runs]},
      "membership": mia, "rows": rows, "seed_search": ev.seed_search, "seconds": seconds,
      "total_seconds": time.perf_counter() - started, "config": dataclasses.asdict(config),
  }
  write_json_atomic(workdir / "results.json", results)
  report.write_tables(results, workdir)
  report.plot_privacy_utility(results, workdir)
  return results
