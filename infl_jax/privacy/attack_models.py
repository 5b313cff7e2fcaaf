"""The attacks on one trained model of the privacy evaluation, and each attacker's utility.

On batch-1 gradients of ``num_targets`` held-out (test) samples at the final global model
(inference mode: BatchNorm running statistics, no dropout), computed by a client with the right key:
  - gradient inversion (``attacks.gradient_inversion``) by attackers holding the right key, a
    wrong key of the same mode, a wrong key of another mode, no key (no INR path), and the
    adaptive attacker (key vector fitted jointly with the input);
  - the analytic first-layer attack (``attacks.analytic``), which needs no key;
  - for DP-FedAvg the observed gradient is clipped and noised as the mechanism would
    (noise ``z * C`` per coordinate for one client's clipped contribution).
Utility: test accuracy under each attacker's view (their key; adaptive: key vector fitted on
n in ``adaptive_samples`` labelled validation samples).
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from infl_jax import keys as keylib
from infl_jax.attacks import adaptive, analytic, gradient_inversion as gi, metrics
from infl_jax.keyed import dense_call_order, key_vector
from infl_jax.privacy import dp as dplib
from infl_jax.privacy import hardened as hardlib
from infl_jax.privacy.experiment import PrivacyConfig, Stage
from infl_jax.tasks.classification import classification_metrics
from runkit.errors import UserInputError

__all__ = ["AttackPrograms", "AttackSetup", "adaptive_key_vector", "attack_programs", "attack_rows", "attack_setup",
           "observed_for_dp", "output_bias", "score_reconstruction", "split_test_accuracy"]


class AttackPrograms(NamedTuple):
  """Jitted attacks for one model architecture. Variables are arguments, so models of the same
  lambda (faithful and hardened, every DP epsilon) share the compiled programs."""

  logits: Callable  # (variables, x, coords) -> inference-mode logits (coords None: no INR path)
  observe: Callable  # (variables, x [T, F], y [T], coords) -> per-target gradient trees
  # Right key, wrong keys and the adaptive attacker share one program: the model runs with a key
  # vector k (right/wrong key: k of their coordinates, held fixed; adaptive: k optimised jointly).
  invert_key_vector: Callable  # (variables, observed, labels, k0, fit_k, rng) -> InversionResult
  invert_no_inr: Callable  # (variables, observed, labels, rng) -> InversionResult
  logits_with_key_vector: Callable  # (variables, x, k) -> logits
  first_layer: str  # the dense layer the analytic attack reads the input from


def _loss_grad(model, params, model_state, x, label_probs, coords=None, k=None):
  def loss(p):
    variables = {"params": p, **model_state}
    if k is not None:
      logits = adaptive.apply_with_key_vector(model, variables, x[None], k, train=False)
    else:
      logits = model.apply(variables, x[None], key_coords=coords, train=False)
    return gi.soft_cross_entropy(logits.astype(jnp.float32), label_probs[None])[0]

  return jax.grad(loss)(params)


def _split_variables(variables):
  variables = dict(variables)
  return variables.pop("params"), variables


def first_dense_layer(model: nn.Module, num_features: int) -> str:
  inner = getattr(model, "model", model)  # the user model inside ``keyed(...)``
  return dense_call_order(inner, jnp.zeros((1, num_features), jnp.float32))[0]


def attack_programs(model: nn.Module, num_features: int, num_classes: int,
                    inversion: gi.InversionConfig) -> AttackPrograms:
  shape = (num_features,)

  def logits(variables, x, coords):
    return model.apply(variables, x, key_coords=coords, train=False)

  def observe(variables, x, y, coords):
    params, state = _split_variables(variables)
    one_target = lambda xi, yi: _loss_grad(model, params, state, xi, jax.nn.one_hot(yi, num_classes), coords=coords)
    return jax.vmap(one_target)(x, y)

  def invert_key_vector(variables, observed, labels, k0, fit_k, rng):
    params, state = _split_variables(variables)
    gradient_fn = lambda x, yp, k: _loss_grad(model, params, state, x, yp, k=k0 + fit_k * (k - k0))
    return gi.invert(gradient_fn, observed, rng, shape, num_classes, inversion, labels=labels, extra_init=k0)

  def invert_no_inr(variables, observed, labels, rng):
    params, state = _split_variables(variables)
    gradient_fn = lambda x, yp, _: _loss_grad(model, params, state, x, yp, coords=None)
    return gi.invert(gradient_fn, observed, rng, shape, num_classes, inversion, labels=labels)

  def logits_with_key_vector(variables, x, k):
    return adaptive.apply_with_key_vector(model, variables, x, k, train=False)

  return AttackPrograms(jax.jit(logits), jax.jit(observe), jax.jit(invert_key_vector), jax.jit(invert_no_inr),
                        jax.jit(logits_with_key_vector), first_dense_layer(model, num_features))


class AttackSetup(NamedTuple):
  """What is the same for every stage: the data, the clients' key, the attackers' keys, the targets."""

  config: PrivacyConfig
  split: Any  # the raw FederatedSplit: test split for utility, validation samples for the adaptive attacker
  key: keylib.SecretKey
  attacker_keys: dict[str, keylib.SecretKey]  # the attackers holding a key (right or wrong)
  targets_x: np.ndarray  # [T, F] raw features of the attacked samples
  targets_y: np.ndarray
  feature_std: np.ndarray  # per feature, for the normalised reconstruction error
  rng: jax.Array


def attack_setup(config: PrivacyConfig, split) -> AttackSetup:
  key = keylib.generate_key(seed=config.key_seed, mode=config.key_mode)
  # The wrong keys are guesses made from the evaluation's --seed, not from the clients' key.
  attacker_keys = {"right_key": key, "wrong_key_same_mode": keylib.wrong_key_like(key, seed=config.seed),
                   "wrong_key_other_mode": keylib.other_mode_key(key, seed=config.seed)}
  return AttackSetup(config, split, key, attacker_keys, split.test_x[:config.num_targets].astype(np.float32),
                     split.test_y[:config.num_targets], np.std(split.train_x, axis=0), jax.random.key(config.seed + 1))


@jax.jit  # one program rather than a dispatch per operation on each of the gradient's leaves
def observed_for_dp(observed, rng, clip_norm: float, noise_multiplier: float):
  """What DP-FedAvg releases of one client's gradient: clipped, plus N(0, (z C)^2) per coordinate
  (the noise on the sum; on the mean both are divided by the number of clients)."""
  clipped = jax.vmap(lambda g: dplib.clip_by_global_norm(g, clip_norm))(observed)
  leaves, treedef = jax.tree_util.tree_flatten(clipped)
  rngs = jax.random.split(rng, len(leaves))
  noisy = [g + noise_multiplier * clip_norm * jax.random.normal(r, g.shape) for g, r in zip(leaves, rngs)]
  return jax.tree_util.tree_unflatten(treedef, noisy)


def output_bias(grads):
  """The bias gradient of the output layer (the 'head' of the task models)."""
  if "head" in grads and "bias" in grads["head"]:
    return grads["head"]["bias"]
  raise UserInputError("the privacy evaluation expects the model's output layer to be named 'head'")


class _AttackerView(NamedTuple):
  """How an attacker maps raw features to the model's inputs and back: on a hardened model through
  their own key's scramble (their guess of the clients'), otherwise unchanged."""

  scrambler: hardlib.InputScrambler | None = None

  def model_inputs(self, x):
    return x if self.scrambler is None else hardlib.scramble(x, self.scrambler).astype(np.float32)

  def reconstruction(self, x_model):
    x_model = np.asarray(x_model)
    return x_model if self.scrambler is None else hardlib.unscramble(x_model, self.scrambler)


def _view(setup: AttackSetup, attacker: str, hardened: bool) -> _AttackerView:
  if hardened and attacker in setup.attacker_keys:
    return _AttackerView(hardlib.input_scrambler(setup.attacker_keys[attacker], setup.split.n_features))
  return _AttackerView()


class _StageAttack(NamedTuple):
  """One trained model under attack: what every attacker of a stage shares."""

  setup: AttackSetup
  programs: AttackPrograms
  model: nn.Module
  variables: dict
  observed: Any  # per-target gradient trees
  labels: jax.Array  # recovered from the output bias's gradient (iDLG)
  rng: jax.Array


def split_test_accuracy(split, logits) -> float:
  return classification_metrics(split.test_y, np.asarray(logits), split.n_classes)["accuracy"]


def _view_accuracy(attack: _StageAttack, view: _AttackerView, coords) -> float:
  """Test accuracy of queries through ``view`` with key coordinates ``coords`` (None: no INR path)."""
  split = attack.setup.split
  return split_test_accuracy(split, attack.programs.logits(attack.variables, view.model_inputs(split.test_x), coords))


def _keyed_attacker(attack: _StageAttack, attacker: str, view: _AttackerView):
  coords = jnp.asarray(attack.setup.attacker_keys[attacker].coords)
  k = key_vector(attack.variables, coords)
  result = attack.programs.invert_key_vector(attack.variables, attack.observed, attack.labels, k, jnp.float32(0.0),
                                             attack.rng)
  return result.x, _view_accuracy(attack, view, coords), {}


def _no_inr_attacker(attack: _StageAttack, attacker: str, view: _AttackerView):
  del attacker
  result = attack.programs.invert_no_inr(attack.variables, attack.observed, attack.labels, attack.rng)
  return result.x, _view_accuracy(attack, view, None), {}


def adaptive_key_vector(model: nn.Module, variables, x, y, k0: jax.Array) -> jax.Array:
  """The adaptive attacker's key vector after seeing labelled samples ``(x [n, F], y [n])``: fitted from its
  prior ``k0`` (``adaptive.prior_key_vector`` of the key's mode) with the model in inference mode, as the
  attacker then queries it (n = 0: ``k0``). ``x`` as the attacker holds it: raw features, on a hardened model
  too, since without the key it cannot apply the clients' scramble (``_view`` gives it none). Shared with
  ``scripts/infl_seed_study.py`` so that both measure the same attacker."""
  return adaptive.fit_key_vector(model, variables, x, y, k0, model_kwargs={"train": False})


def _adaptive_attacker(attack: _StageAttack, attacker: str, view: _AttackerView):
  del attacker
  setup, variables = attack.setup, attack.variables
  k0 = adaptive.prior_key_vector(variables, setup.config.key_mode)
  result = attack.programs.invert_key_vector(variables, attack.observed, attack.labels, k0, jnp.float32(1.0),
                                             attack.rng)
  split = setup.split
  accuracies = {}
  for n in setup.config.adaptive_samples:
    k = adaptive_key_vector(attack.model, variables, view.model_inputs(split.val_x[:n]), split.val_y[:n], k0)
    logits = attack.programs.logits_with_key_vector(variables, view.model_inputs(split.test_x), k)
    accuracies[n] = split_test_accuracy(split, logits)
  accuracy = accuracies.get(0, next(iter(accuracies.values()), float("nan")))
  return result.x, accuracy, {f"test_accuracy_adaptive_n{n}": a for n, a in accuracies.items()}


# Each returns (reconstructed model inputs, the attacker's test accuracy, extra row fields).
_ATTACKERS = {"right_key": _keyed_attacker, "wrong_key_same_mode": _keyed_attacker,
              "wrong_key_other_mode": _keyed_attacker, "no_inr": _no_inr_attacker, "adaptive": _adaptive_attacker}


def score_reconstruction(setup: AttackSetup, x_rec, labels) -> dict:
  x_rec = np.nan_to_num(np.asarray(x_rec, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
  return metrics.summarise(metrics.omics_metrics(setup.targets_x, x_rec, feature_std=setup.feature_std,
                                                 y_true=setup.targets_y, y_rec=labels))


def _stage_rng(setup: AttackSetup, stage: Stage) -> jax.Array:
  # From the stage's name, not ``hash(name)`` (salted per process): the same seed gives the same
  # attacks in every process, whichever other stages run.
  return jax.random.fold_in(setup.rng, zlib.crc32(stage.name.encode()) & 0x7FFFFFFF)


def attack_rows(setup: AttackSetup, stage: Stage, programs: AttackPrograms, model: nn.Module, variables) -> list[dict]:
  """The stage's table rows: gradient inversion and the analytic attack by each of its attackers."""
  hardened = stage.kind == "hardened"
  inversion_rng, dp_rng = jax.random.split(_stage_rng(setup, stage))
  client_view = _view(setup, "right_key", hardened)
  right = jnp.asarray(setup.key.coords)
  observed = programs.observe(variables, jnp.asarray(client_view.model_inputs(setup.targets_x)),
                              jnp.asarray(setup.targets_y), right)
  if stage.dp is not None:
    observed = observed_for_dp(observed, dp_rng, setup.config.dp_clip_norm, stage.dp.noise_multiplier)
  labels = gi.idlg_label(output_bias(observed))
  x_analytic = analytic.recover_first_layer_input(*analytic.find_first_layer(observed, programs.first_layer))
  attack = _StageAttack(setup, programs, model, variables, observed, labels, inversion_rng)
  base = {"model": stage.name, "lambda": stage.key_strength, "hardened": hardened,
          "key_holder_accuracy": _view_accuracy(attack, client_view, right),
          "dp_epsilon": None if stage.dp is None else stage.dp.epsilon,
          "dp_noise_multiplier": None if stage.dp is None else stage.dp.noise_multiplier}
  rows = []
  for attacker in stage.attackers:
    view = _view(setup, attacker, hardened)
    x_inverted, accuracy, extra = _ATTACKERS[attacker](attack, attacker, view)
    for name, x_rec in (("gradient_inversion", x_inverted), ("analytic", x_analytic)):
      rows.append({**base, "attacker": attacker, "attack": name, "test_accuracy": accuracy,
                   **score_reconstruction(setup, view.reconstruction(x_rec), labels), **extra})
  return rows
