"""The privacy evaluation: train the models, attack them, measure utility, write the table and plots.

Models (all federated with the engine, the data set's preset settings):
  - keyed models at each lambda of ``lambdas`` (lambda 0 is the plain model: plain FedAvg);
  - the hardened variant (``privacy.hardened``) at the main lambda;
  - DP-FedAvg (``privacy.dp``) of the plain model at each target epsilon.

Attacks, on batch-1 gradients of ``num_targets`` held-out (test) samples at the final global
model (inference mode: BatchNorm running statistics, no dropout), computed by a client with the
right key:
  - gradient inversion (``attacks.gradient_inversion``) by attackers holding the right key, a
    wrong key of the same mode, a wrong key of another mode, no key (no INR path), and the
    adaptive attacker (key vector fitted jointly with the input);
  - the analytic first-layer attack (``attacks.analytic``), which needs no key;
  - for DP-FedAvg the observed gradient is clipped and noised as the mechanism would
    (noise ``z * C`` per coordinate for one client's clipped contribution);
  - membership inference (``attacks.membership``): loss threshold and LiRA with shadow models.
Utility: test accuracy under each attacker's view (their key; adaptive: key vector fitted on
n in ``adaptive_samples`` labelled validation samples).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from infl_jax import keys as keylib
from infl_jax.attacks import adaptive, analytic, gradient_inversion as gi, membership, metrics
from infl_jax.common.cli import UserInputError, progress
from infl_jax.common.metrics_log import write_json_atomic
from infl_jax.config import TrainConfig
from infl_jax.keyed import key_vector
from infl_jax.federated import LocalConfig, fedavg, server_optimizer, stack_clients
from infl_jax.privacy import dp as dplib
from infl_jax.privacy import hardened as hardlib
from infl_jax.tasks.classification import classification_metrics, classification_task
from infl_jax import train as trainlib

ATTACKERS = ("right_key", "wrong_key_same_mode", "wrong_key_other_mode", "no_inr", "adaptive")


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
  dataset: str = "proteomics"
  rounds: int | None = None  # None: the data set's preset
  local_epochs: int | None = None
  lambdas: tuple[float, ...] = (0.0, 1.0, 5.0, 20.0, 50.0)
  main_lambda: float | None = None  # None: the preset's key_strength
  dp_epsilons: tuple[float, ...] = (1.0, 3.0, 10.0)
  dp_delta: float = 1e-5
  dp_clip_norm: float = 1.0
  num_targets: int = 20
  # Cosine matching, normalised gradient steps of decaying length: on trained models the
  # reference's Adam(0.1) with L2 + cosine stalls where the softmax saturates (docs/privacy.md).
  inversion_steps: int = 800
  inversion_restarts: int = 2
  inversion_lr: float = 5.0
  inversion_optimizer: str = "normalized_gd"
  inversion_l2_weight: float = 0.0
  adaptive_samples: tuple[int, ...] = (0, 5, 20)
  num_shadows: int = 8
  shadow_epochs: int = 200
  hardened: bool = True
  key_seed: int = 0
  key_mode: str = "uniform"
  seed: int = 0

  def validate(self) -> "PrivacyConfig":
    if not self.lambdas or any(not (math.isfinite(l) and l >= 0) for l in self.lambdas):
      raise UserInputError(f"lambdas must be finite numbers >= 0, got {self.lambdas}")
    if any(not e > 0 for e in self.dp_epsilons):
      raise UserInputError(f"dp_epsilons must be > 0, got {self.dp_epsilons}")
    if self.num_targets < 1:
      raise UserInputError(f"num_targets must be >= 1, got {self.num_targets}")
    if any(n < 0 for n in self.adaptive_samples):
      raise UserInputError(f"adaptive_samples must be >= 0, got {self.adaptive_samples}")
    if self.num_shadows and (self.num_shadows < 2 or self.num_shadows % 2):
      raise UserInputError(f"num_shadows must be 0 (no LiRA) or an even number >= 2, got {self.num_shadows}")
    return self

  def train_config(self, key_strength: float) -> TrainConfig:
    return TrainConfig.for_dataset(self.dataset, rounds=self.rounds, local_epochs=self.local_epochs,
                                   key_strength=float(key_strength), key_seed=self.key_seed,
                                   key_mode=self.key_mode, seed=self.seed, central_baseline=False)


# ----------------------------------------------------------------------------------------------
# Training


class _Trainer:
  """Builds and jits one federated round per (lambda, dp) and reuses it (the hardened model
  shares the faithful one's; every DP epsilon shares one)."""

  def __init__(self, config: PrivacyConfig, num_classes: int):
    self.config = config
    self.num_classes = num_classes
    self.cache: dict = {}

  def model(self, key_strength: float):
    tc = self.config.train_config(key_strength)
    return trainlib.create_model(tc, self.num_classes), tc

  def _round(self, key_strength: float, dp: bool):
    cache_key = (float(key_strength), dp)
    if cache_key not in self.cache:
      model, tc = self.model(key_strength)
      task = classification_task(model)
      hooks = {}
      weighting = tc.weighting
      if dp:
        task = dplib.dp_task(task)
        hooks = dict(zip(("update_transform", "aggregate_noise"), dplib.dp_fedavg_hooks()))
        weighting = "uniform"  # the sensitivity analysis of the noise needs equal client weights
      algo = fedavg(task, trainlib.create_client_optimizer(tc), local_epochs=tc.local_epochs,
                    batch_size=tc.batch_size, client_fraction=tc.client_fraction, weighting=weighting,
                    prox_mu=tc.prox_mu, server_opt=server_optimizer(tc.server_optimizer, tc.server_learning_rate),
                    **hooks)
      self.cache[cache_key] = (model, tc, algo, jax.jit(algo.round))
    return self.cache[cache_key]

  def train(self, key_strength: float, split, coords, *, dp_noise: float | None = None):
    model, tc, algo, round_fn = self._round(key_strength, dp_noise is not None)
    clients = trainlib.client_data(split, tc.key_version)
    rng = jax.random.key(tc.seed)
    init_rng, server_rng = jax.random.split(rng)
    state = algo.init(trainlib.init_variables(model, split.n_features, init_rng), server_rng,
                      key_version=tc.key_version)
    context = jnp.asarray(coords)
    if dp_noise is not None:
      context = dplib.DPContext.make(context, self.config.dp_clip_norm, dp_noise)
    for _ in range(tc.rounds):
      state, _ = round_fn(state, clients, context)
    return model, trainlib.global_variables(jax.device_get(state)), tc


# ----------------------------------------------------------------------------------------------
# Attacks


def _split_variables(variables):
  variables = dict(variables)
  return variables.pop("params"), variables


def _loss_grad(model, params, state, x, label_probs, coords=None, k=None):
  def loss(p):
    v = {"params": p, **state}
    if k is not None:
      logits = adaptive.apply_with_key_vector(model, v, x[None], k, train=False)
    else:
      logits = model.apply(v, x[None], key_coords=coords, train=False)
    return gi.soft_cross_entropy(logits.astype(jnp.float32), label_probs[None])[0]

  return jax.grad(loss)(params)


class _Attacks:
  """Jitted attacks for one model architecture; variables are arguments, so models of the same
  lambda (faithful and hardened) share the compiled programs."""

  def __init__(self, model, num_features: int, num_classes: int, config: gi.InversionConfig):
    self.model = model
    shape = (num_features,)

    def observe(variables, x, y, coords):
      params, state = _split_variables(variables)
      return jax.vmap(lambda xi, yi: _loss_grad(model, params, state, xi, jax.nn.one_hot(yi, num_classes),
                                                coords=coords))(x, y)

    # Right key, wrong keys and the adaptive attacker share one program: the model runs with a key
    # vector k (right/wrong key: k of their coordinates, held fixed; adaptive: k optimised jointly).
    def invert_key_vector(variables, observed, labels, k0, fit_k, rng):
      params, state = _split_variables(variables)
      fn = lambda x, yp, k: _loss_grad(model, params, state, x, yp, k=k0 + fit_k * (k - k0))
      return gi.invert(fn, observed, rng, shape, num_classes, config, labels=labels, extra_init=k0)

    def invert_no_inr(variables, observed, labels, rng):
      params, state = _split_variables(variables)
      fn = lambda x, yp, _: _loss_grad(model, params, state, x, yp, coords=None)
      return gi.invert(fn, observed, rng, shape, num_classes, config, labels=labels)

    self.observe = jax.jit(observe)
    self.invert_key_vector = jax.jit(invert_key_vector)
    self.invert_no_inr = jax.jit(invert_no_inr)


def inversion_config(cfg: PrivacyConfig) -> gi.InversionConfig:
  return gi.InversionConfig(steps=cfg.inversion_steps, learning_rate=cfg.inversion_lr, restarts=cfg.inversion_restarts,
                            l2_weight=cfg.inversion_l2_weight, cosine_weight=1.0, relative_l2=True,
                            optimizer=cfg.inversion_optimizer, cosine_decay=True).validate()


def _accuracy(model, variables, x, y, num_classes, coords=None, k=None) -> float:
  if k is not None:
    logits = jax.jit(lambda v, x, k: adaptive.apply_with_key_vector(model, v, x, k, train=False))(variables, x, k)
    return classification_metrics(y, np.asarray(logits), num_classes)["accuracy"]
  return trainlib.evaluate(model, variables, x, y, num_classes, coords)["accuracy"]


@dataclasses.dataclass
class _Context:
  config: PrivacyConfig
  split: Any
  key: keylib.SecretKey
  attacker_keys: dict
  targets_x: np.ndarray
  targets_y: np.ndarray
  feature_std: np.ndarray
  num_classes: int
  rows: list
  attacks: dict
  rng: jax.Array


def _observed_for_dp(observed, rng, clip_norm: float, noise_multiplier: float):
  """What DP-FedAvg releases of one client's gradient: clipped, plus N(0, (z C)^2) per coordinate
  (the noise on the sum; on the mean both are divided by the number of clients)."""
  clipped = jax.vmap(lambda g: dplib.clip_by_global_norm(g, clip_norm))(observed)
  leaves, treedef = jax.tree_util.tree_flatten(clipped)
  rngs = jax.random.split(rng, len(leaves))
  noisy = [g + noise_multiplier * clip_norm * jax.random.normal(r, g.shape) for g, r in zip(leaves, rngs)]
  return jax.tree_util.tree_unflatten(treedef, noisy)


def _score(ctx: _Context, x_rec, labels_rec=None) -> dict:
  x_rec = np.asarray(x_rec, np.float64)
  if not np.all(np.isfinite(x_rec)):
    x_rec = np.nan_to_num(x_rec, nan=0.0, posinf=0.0, neginf=0.0)
  m = metrics.omics_metrics(ctx.targets_x, x_rec, feature_std=ctx.feature_std, y_true=ctx.targets_y,
                            y_rec=labels_rec)
  return metrics.summarise(m)


def attack_model(ctx: _Context, name: str, model, variables, *, key_strength: float, hardened: bool,
                 dp: tuple[float, float] | None = None, attackers=ATTACKERS):
  """Runs the attacks on one trained model and appends table rows to ``ctx.rows``."""
  cfg = ctx.config
  n_classes = ctx.num_classes
  attacks = ctx.attacks.setdefault(float(key_strength), None)
  if attacks is None:
    attacks = _Attacks(model, ctx.split.n_features, n_classes,
                       inversion_config(cfg))
    ctx.attacks[float(key_strength)] = attacks
  scramblers = {}
  if hardened:
    scramblers = {a: hardlib.input_scrambler(k, ctx.split.n_features) for a, k in ctx.attacker_keys.items()
                  if k is not None}
  split = hardlib.harden_split(ctx.split, ctx.key) if hardened else ctx.split
  client_x = hardlib.scramble(ctx.targets_x, scramblers["right_key"]) if hardened else ctx.targets_x
  right = jnp.asarray(ctx.key.coords)
  rng_obs, rng_attack, rng_dp = jax.random.split(jax.random.fold_in(ctx.rng, hash(name) % (2**31)), 3)
  observed = attacks.observe(variables, jnp.asarray(client_x, jnp.float32), jnp.asarray(ctx.targets_y), right)
  if dp is not None:
    observed = _observed_for_dp(observed, rng_dp, cfg.dp_clip_norm, dp[1])
  head_bias = _last_bias(observed)
  labels = gi.idlg_label(head_bias)
  first = trainlib_first_dense(model, ctx.split.n_features)
  x_analytic = np.asarray(analytic.recover_first_layer_input(*analytic.find_first_layer(observed, first)))

  # What an attacker without the key sees: raw features. Their own key's scramble is their guess.
  def view(attacker, x_rec):
    if hardened and attacker in scramblers:
      return hardlib.unscramble(np.asarray(x_rec), scramblers[attacker])
    return np.asarray(x_rec)

  def test_view_x(attacker):
    if hardened and attacker in scramblers:
      return hardlib.scramble(ctx.split.test_x, scramblers[attacker]).astype(np.float32)
    return ctx.split.test_x

  holder_acc = _accuracy(model, variables, test_view_x("right_key"), ctx.split.test_y, n_classes,
                         jnp.asarray(ctx.key.coords))
  base = {"model": name, "lambda": key_strength, "hardened": hardened, "key_holder_accuracy": holder_acc,
          "dp_epsilon": None if dp is None else dp[0], "dp_noise_multiplier": None if dp is None else dp[1]}
  for attacker in attackers:
    attacker_key = ctx.attacker_keys.get(attacker)
    coords = None if attacker_key is None else attacker_key.coords
    if attacker == "adaptive":
      k0 = adaptive.prior_key_vector(variables, cfg.key_mode)
      res = attacks.invert_key_vector(variables, observed, labels, k0, jnp.float32(1.0), rng_attack)
      accs = {}
      for n in cfg.adaptive_samples:
        k = adaptive.fit_key_vector(model, variables, ctx.split.val_x[:n], ctx.split.val_y[:n], k0,
                                    model_kwargs={"train": False})
        accs[n] = _accuracy(model, variables, ctx.split.test_x, ctx.split.test_y, n_classes, k=k)
      acc = accs.get(0, next(iter(accs.values()), float("nan")))
      extra = {f"test_accuracy_adaptive_n{n}": a for n, a in accs.items()}
    elif attacker == "no_inr":
      res = attacks.invert_no_inr(variables, observed, labels, rng_attack)
      acc = _accuracy(model, variables, test_view_x(attacker), ctx.split.test_y, n_classes, None)
      extra = {}
    else:
      c = jnp.asarray(coords)
      k = key_vector(variables, c)
      res = attacks.invert_key_vector(variables, observed, labels, k, jnp.float32(0.0), rng_attack)
      acc = _accuracy(model, variables, test_view_x(attacker), ctx.split.test_y, n_classes, c)
      extra = {}
    ctx.rows.append({**base, "attacker": attacker, "attack": "gradient_inversion", "test_accuracy": acc,
                     **_score(ctx, view(attacker, res.x), labels), **extra})
    ctx.rows.append({**base, "attacker": attacker, "attack": "analytic", "test_accuracy": acc,
                     **_score(ctx, view(attacker, x_analytic), labels), **extra})


def _last_bias(grads):
  """The bias gradient of the output layer (the 'head' of the task models)."""
  if "head" in grads and "bias" in grads["head"]:
    return grads["head"]["bias"]
  raise UserInputError("the privacy evaluation expects the model's output layer to be named 'head'")


def trainlib_first_dense(model, num_features: int) -> str:
  from infl_jax.keyed import dense_call_order

  inner = getattr(model, "model", model)
  return dense_call_order(inner, jnp.zeros((1, num_features), jnp.float32))[0]


# ----------------------------------------------------------------------------------------------
# Membership inference


def membership_rows(ctx: _Context, name: str, model, variables, coords, x_member, y_member, x_non, y_non,
                    shadows=None) -> dict:
  x = np.concatenate([x_member, x_non]).astype(np.float32)
  y = np.concatenate([y_member, y_non])
  is_member = np.r_[np.ones(len(y_member), bool), np.zeros(len(y_non), bool)]
  logits = trainlib.predict_logits(model, variables, x, coords)
  out = {f"mia_loss_{k}": v for k, v in membership.attack_metrics(is_member, membership.loss_threshold_scores(logits, y)).items()}
  if shadows is not None:
    shadow_vars, shadow_in = shadows
    shadow_logits = jax.jit(jax.vmap(lambda v: model.apply(v, x, key_coords=coords, train=False)))(shadow_vars)
    phi_target = membership.logit_confidence(logits, y)
    phi_shadow = membership.logit_confidence(shadow_logits, y)
    scores = membership.lira_scores(phi_target, phi_shadow, shadow_in)
    out.update({f"mia_lira_{k}": v for k, v in membership.attack_metrics(is_member, scores).items()})
  return out


def train_shadows(ctx: _Context, model, tc: TrainConfig, x_pool, y_pool, coords, rng):
  k = ctx.config.num_shadows
  shadow_in = membership.shadow_membership(rng, k, len(y_pool))
  variables = trainlib.init_variables(model, x_pool.shape[1], jax.random.fold_in(rng, 1))
  local = LocalConfig(local_epochs=ctx.config.shadow_epochs, batch_size=tc.batch_size)
  shadow_vars = membership.train_shadow_models(classification_task(model), trainlib.create_client_optimizer(tc),
                                               local, variables, x_pool, y_pool, shadow_in,
                                               jax.random.fold_in(rng, 2), jnp.asarray(coords))
  return shadow_vars, shadow_in


# ----------------------------------------------------------------------------------------------
# The whole evaluation


TABLE_COLUMNS = ("model", "lambda", "hardened", "dp_epsilon", "dp_noise_multiplier", "attacker", "attack",
                 "test_accuracy", "abs_pearson", "abs_spearman", "mse", "nmse", "top50_overlap", "label_recovered")


def run_evaluation(config: PrivacyConfig, workdir, *, show_progress: bool | None = None) -> dict:
  """Trains, attacks and measures; writes ``results.json``, ``table.csv``, ``table.md`` and the plots
  into ``workdir``; returns the results."""
  config = config.validate()
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  t_start = time.perf_counter()
  main_lambda = float(config.main_lambda if config.main_lambda is not None
                      else TrainConfig.for_dataset(config.dataset).key_strength)
  lambdas = sorted(set(float(l) for l in config.lambdas) | {main_lambda})
  split = trainlib.load_data(config.train_config(main_lambda))
  if len(split.test_y) < config.num_targets:
    raise UserInputError(f"num_targets={config.num_targets} but the test split has only {len(split.test_y)} samples; "
                         "lower --num-targets")
  key = keylib.generate_key(config.key_seed, config.key_mode)
  attacker_keys = {"right_key": key, "wrong_key_same_mode": keylib.wrong_key_like(key),
                   "wrong_key_other_mode": keylib.other_mode_key(key), "no_inr": None, "adaptive": None}
  ctx = _Context(config=config, split=split, key=key,
                 attacker_keys=attacker_keys,
                 targets_x=split.test_x[:config.num_targets].astype(np.float32),
                 targets_y=split.test_y[:config.num_targets], feature_std=np.std(split.train_x, axis=0),
                 num_classes=split.n_classes, rows=[], attacks={}, rng=jax.random.key(config.seed + 1))
  trainer = _Trainer(config, split.n_classes)
  tc0 = config.train_config(0.0)
  sampling_rate = max(1, round(tc0.client_fraction * len(split.client_sizes()))) / len(split.client_sizes())
  dp_runs = [(eps, dplib.noise_multiplier_for_epsilon(eps, sampling_rate, tc0.rounds, config.dp_delta))
             for eps in config.dp_epsilons]

  stages = [("faithful", l) for l in lambdas] + ([("hardened", main_lambda)] if config.hardened else [])
  stages += [("dp", run) for run in dp_runs]
  mia = {}
  timings = {}
  members = (split.train_x, split.train_y)
  non_members = (np.concatenate([split.val_x, split.test_x]), np.concatenate([split.val_y, split.test_y]))
  shadow_sets = {}

  def shadows_for(model, tc, lam, x_pool, y_pool, coords, tag):
    if not config.num_shadows:
      return None
    if tag not in shadow_sets:
      shadow_sets[tag] = train_shadows(ctx, model, tc, x_pool, y_pool, coords, jax.random.key(config.seed + 7))
    return shadow_sets[tag]

  bar = progress(stages, total=len(stages), desc="privacy evaluation",
                 disable=None if show_progress is None else not show_progress)
  for kind, arg in bar:
    t0 = time.perf_counter()
    coords = key.coords
    if kind == "faithful":
      lam = arg
      name = "plain FedAvg (lambda 0)" if lam == 0 else f"INFL lambda {lam:g}"
      bar.set_postfix(stage=name)
      model, variables, tc = trainer.train(lam, split, coords)
      # lambda 0 has no key in the model (every attacker is the same); the other lambdas of the
      # sweep get the realistic attacker only, to keep the evaluation within its time budget.
      attackers = ATTACKERS if lam == main_lambda else ("right_key",) if lam == 0.0 else ("wrong_key_same_mode",)
      attack_model(ctx, name, model, variables, key_strength=lam, hardened=False, attackers=attackers)
      x_pool = np.concatenate([members[0], non_members[0]])
      y_pool = np.concatenate([members[1], non_members[1]])
      # LiRA (shadow training is the costly part) for the main lambda; loss threshold for every model.
      shadows = shadows_for(model, tc, lam, x_pool, y_pool, coords, lam) if lam == main_lambda else None
      mia[name] = membership_rows(ctx, name, model, variables, jnp.asarray(coords), *members, *non_members,
                                  shadows=shadows)
    elif kind == "hardened":
      lam = arg
      name = f"hardened INFL lambda {lam:g}"
      bar.set_postfix(stage=name)
      hsplit = hardlib.harden_split(split, key)
      model, variables, tc = trainer.train(lam, hsplit, coords)
      attack_model(ctx, name, model, variables, key_strength=lam, hardened=True)
      mia[name] = membership_rows(ctx, name, model, variables, jnp.asarray(coords), hsplit.train_x, split.train_y,
                                  np.concatenate([hsplit.val_x, hsplit.test_x]), non_members[1])
    else:
      eps, noise = arg
      name = f"DP-FedAvg eps {eps:g}"
      bar.set_postfix(stage=name)
      model, variables, tc = trainer.train(0.0, split, coords, dp_noise=noise)
      attack_model(ctx, name, model, variables, key_strength=0.0, hardened=False, dp=(eps, noise),
                   attackers=("right_key",))
      mia[name] = membership_rows(ctx, name, model, variables, jnp.asarray(coords), *members, *non_members)
    timings[name] = time.perf_counter() - t0

  for row in ctx.rows:
    row.update(mia.get(row["model"], {}))
  results = {
      "dataset": config.dataset, "description": split.description,
      "n_train": int(len(split.train_y)), "n_test": int(len(split.test_y)), "num_targets": config.num_targets,
      "chance_accuracy": float(np.bincount(split.test_y).max() / len(split.test_y)),
      "main_lambda": main_lambda, "dp": {"delta": config.dp_delta, "clip_norm": config.dp_clip_norm,
                                         "sampling_rate": sampling_rate, "rounds": tc0.rounds,
                                         "runs": [{"epsilon": e, "noise_multiplier": z} for e, z in dp_runs]},
      "membership": mia, "rows": ctx.rows, "seconds": timings,
      "total_seconds": time.perf_counter() - t_start, "config": dataclasses.asdict(config),
  }
  write_json_atomic(workdir / "results.json", results)
  write_tables(results, workdir)
  plot_privacy_utility(results, workdir)
  return results


def _fmt(v):
  if v is None:
    return ""
  if isinstance(v, float):
    return "nan" if not math.isfinite(v) else f"{v:.3g}"
  return str(v)


def write_tables(results: dict, workdir) -> None:
  import csv

  workdir = pathlib.Path(workdir)
  rows = results["rows"]
  extra = sorted({k for r in rows for k in r} - set(TABLE_COLUMNS))
  columns = list(TABLE_COLUMNS) + extra
  with open(workdir / "table.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for r in rows:
      writer.writerow({c: r.get(c) for c in columns})
  md_cols = ["model", "attacker", "attack", "test_accuracy", "abs_pearson", "abs_spearman", "nmse", "top50_overlap",
             "label_recovered"]
  lines = ["| " + " | ".join(md_cols) + " |", "|" + "---|" * len(md_cols)]
  lines += ["| " + " | ".join(_fmt(r.get(c)) for c in md_cols) + " |" for r in rows]
  lines += ["", "Adaptive attacker's test accuracy with n labelled samples:", "",
            "| model | " + " | ".join(f"n={n}" for n in results["config"]["adaptive_samples"]) + " |",
            "|---|" + "---|" * len(results["config"]["adaptive_samples"])]
  for r in rows:
    if r["attacker"] == "adaptive" and r["attack"] == "analytic":
      lines.append(f"| {r['model']} | " + " | ".join(
          _fmt(r.get(f"test_accuracy_adaptive_n{n}")) for n in results["config"]["adaptive_samples"]) + " |")
  mia_cols = sorted({k for m in results["membership"].values() for k in m})
  lines += ["", "Membership inference on the final global model (members: training set; non-members: "
            "validation + test; queried with the right key):", "",
            "| model | " + " | ".join(mia_cols) + " |", "|---|" + "---|" * len(mia_cols)]
  for name, m in results["membership"].items():
    lines.append(f"| {name} | " + " | ".join(_fmt(m.get(c)) for c in mia_cols) + " |")
  lines += ["", f"chance accuracy (majority class of the test split): {results['chance_accuracy']:.3f}; "
            f"total time {results['total_seconds']:.0f} s"]
  (workdir / "table.md").write_text("\n".join(lines) + "\n")


def plot_privacy_utility(results: dict, workdir) -> None:
  """Two PNGs: attack success (median |Pearson|) against the key holder's test accuracy, over
  lambda (faithful, with hardened at the main lambda) and over DP epsilon."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  workdir = pathlib.Path(workdir)
  rows = results["rows"]

  def pick(pred):
    return [r for r in rows if pred(r)]

  def save(fig, ax, xlabel: str, title: str, filename: str):
    ax.set_xlabel(xlabel)
    ax.set_ylabel("attack success: median |Pearson r|")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title(f"{results['dataset']}: {title}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(workdir / filename, dpi=120)
    plt.close(fig)

  fig, ax = plt.subplots(figsize=(6, 4.5))
  for attack, marker in (("gradient_inversion", "o"), ("analytic", "^")):
    for hardened, color in ((False, "tab:blue"), (True, "tab:red")):
      # The realistic attacker: a wrong key of the same mode (at lambda 0 every attacker is the same).
      sel = pick(lambda r: r["dp_epsilon"] is None and r["hardened"] == hardened and r["attack"] == attack
                 and (r["attacker"] == "wrong_key_same_mode" or (r["lambda"] == 0 and r["attacker"] == "right_key")))
      if not sel:
        continue
      xs = [r["key_holder_accuracy"] for r in sel]
      ys = [r["abs_pearson"] for r in sel]
      ax.scatter(xs, ys, marker=marker, color=color,
                 label=f"{'hardened' if hardened else 'faithful'}: {attack.replace('_', ' ')}, wrong key (same mode)")
      for r, x, y in zip(sel, xs, ys):
        ax.annotate(f"λ{r['lambda']:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
  save(fig, ax, "key holder's test accuracy", "privacy vs utility over λ", "privacy_utility_lambda.png")

  fig, ax = plt.subplots(figsize=(6, 4.5))
  for attack, marker in (("gradient_inversion", "o"), ("analytic", "^")):
    sel = pick(lambda r: r["attack"] == attack and r["attacker"] == "right_key" and
               (r["dp_epsilon"] is not None or (r["lambda"] == 0 and not r["hardened"])))
    xs = [r["test_accuracy"] for r in sel]
    ys = [r["abs_pearson"] for r in sel]
    ax.scatter(xs, ys, marker=marker, label=attack.replace("_", " "))
    for r, x, y in zip(sel, xs, ys):
      ax.annotate("no DP" if r["dp_epsilon"] is None else f"ε{r['dp_epsilon']:g}", (x, y), fontsize=7,
                  xytext=(3, 3), textcoords="offset points")
  save(fig, ax, "test accuracy", "DP-FedAvg, privacy vs utility", "privacy_utility_dp.png")
