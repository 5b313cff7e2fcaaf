"""What the privacy evaluation runs: its settings (``PrivacyConfig``, from which ``infl-privacy``'s
command line is built) and its stages, one trained model each.

Stages (every model federated with the engine and the data set's preset settings):
  - faithful: keyed models at each lambda of ``lambdas`` (lambda 0 is the plain model: plain FedAvg);
  - hardened: the input-scrambling variant (``privacy.hardened``) at the main lambda;
  - dp: DP-FedAvg (``privacy.dp``) of the plain model at each target epsilon.
See docs/design.md, "Privacy evaluation" for why these models and attackers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

from infl_jax.attacks import gradient_inversion as gi
from infl_jax.config import TrainConfig
from infl_jax.privacy import dp as dplib
from runkit.config import check_ranges, option
from runkit.errors import UserInputError

__all__ = ["ATTACKERS", "DPRun", "PrivacyConfig", "Stage", "dp_runs", "inversion_config", "plan_stages",
           "resolve_main_lambda"]

ATTACKERS = ("right_key", "wrong_key_same_mode", "wrong_key_other_mode", "no_inr", "adaptive")

_PRESET = "the data set's preset"


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
  # data
  dataset: str = option("proteomics", "built-in data set (proteomics, pbmc) or an .h5ad path", group="data")
  label_key: str | None = option(None, "obs column holding the class label (needed for an .h5ad path)",
                                 group="data", default_help="the built-in's label")
  client_key: str | None = option(None, "obs column whose values are the clients (site, plate, patient)",
                                  group="data", default_help=_PRESET)
  # training
  rounds: int | None = option(None, "federated rounds", group="training", minimum=1, default_help=_PRESET)
  local_epochs: int | None = option(None, "local epochs per round", group="training", minimum=1,
                                    default_help=_PRESET)
  seed: int = option(0, "seed of the data split, training and attacks", group="training")
  # models
  lambdas: tuple[float, ...] = option((0.0, 1.0, 5.0, 20.0, 50.0), "key strengths of the sweep", group="models")
  main_lambda: float | None = option(None, "lambda attacked by every attacker", group="models", minimum=0,
                                     default_help="the preset's key strength")
  hardened: bool = option(True, "also evaluate the hardened (input-scrambling) variant", group="models")
  # DP-FedAvg
  dp_epsilons: tuple[float, ...] = option((1.0, 3.0, 10.0), "target epsilons of DP-FedAvg", group="dp")
  dp_delta: float = option(1e-5, "delta of the DP guarantee", group="dp", above=0)
  dp_clip_norm: float = option(1.0, "L2 norm each client's update is clipped to", group="dp", above=0)
  # attacks
  num_targets: int = option(20, "held-out samples attacked", group="attacks", minimum=1)
  # Cosine matching, normalised gradient steps of decaying length: on trained models the
  # reference's Adam(0.1) with L2 + cosine stalls where the softmax saturates (docs/privacy.md).
  inversion_steps: int = option(800, "gradient-inversion steps", group="attacks", minimum=1)
  inversion_restarts: int = option(2, "gradient-inversion restarts per target", group="attacks", minimum=1)
  inversion_lr: float = option(5.0, "gradient-inversion step size", group="attacks", above=0)
  inversion_optimizer: str = option("normalized_gd", "gradient-inversion optimizer", group="attacks",
                                    choices=("normalized_gd", "adam"))
  inversion_l2_weight: float = option(0.0, "weight of the (relative) L2 term next to 1 - cosine",
                                      group="attacks", minimum=0)
  adaptive_samples: tuple[int, ...] = option((0, 5, 20), "labelled samples the adaptive attacker fits the key "
                                             "vector on", group="attacks")
  # On the hardened model only (privacy.hardened_attacks).
  public_panel: bool = option(True, "attack the hardened model's scramble with the public-panel attacker",
                              group="attacks")
  panel_extra_samples: int = option(0, "training samples whose batch-1 gradients the public-panel attacker "
                                    "recovers besides the targets' (the other samples are its panel)",
                                    group="attacks", minimum=0)
  seed_search: int = option(1024, "seeds 0..N-1 the brute-force attacker tries against the hardened model's "
                            "seeded key (0: none)", group="attacks", minimum=0)
  # membership inference
  num_shadows: int = option(8, "LiRA shadow models (0: no LiRA)", group="membership", minimum=0)
  shadow_epochs: int = option(200, "training epochs of each shadow model", group="membership", minimum=1)
  # key
  # A seeded key, unlike infl-train's: the same settings give the same tables, and the evaluation's key
  # protects no model once it ends (docs/design.md, "Keys").
  key_seed: int = option(0, "seed of the clients' key in this evaluation: reproducible but INSECURE (anyone who "
                         "knows the seed rebuilds the key), so never for a deployed model", group="key", minimum=0)
  key_mode: str = option("uniform", "distribution of the key's coordinates", group="key",
                         choices=("uniform", "normal", "ones", "zeros", "constant"))

  def validate(self) -> "PrivacyConfig":
    """Raises UserInputError naming the setting that is out of range, before anything is trained."""
    try:
      check_ranges(self)
    except ValueError as error:
      raise UserInputError(str(error)) from None
    if not self.lambdas or any(not (math.isfinite(l) and l >= 0) for l in self.lambdas):
      raise UserInputError(f"--lambdas must be finite numbers >= 0, got {self.lambdas}")
    if any(not e > 0 for e in self.dp_epsilons):
      raise UserInputError(f"--dp-epsilons must be > 0, got {self.dp_epsilons}")
    if any(n < 0 for n in self.adaptive_samples):
      raise UserInputError(f"--adaptive-samples must be >= 0, got {self.adaptive_samples}")
    if self.num_shadows % 2:
      raise UserInputError(f"--num-shadows must be 0 (no LiRA) or an even number >= 2, got {self.num_shadows}")
    inversion_config(self)
    return self

  def train_config(self, key_strength: float) -> TrainConfig:
    # faithful: the evaluation applies the hardened scheme itself, per stage (privacy.hardened).
    return TrainConfig.for_dataset(self.dataset, label_key=self.label_key, client_key=self.client_key,
                                   rounds=self.rounds, local_epochs=self.local_epochs,
                                   key_strength=float(key_strength), key_mode=self.key_mode, seed=self.seed,
                                   central_baseline=False, key_scheme="faithful")


def inversion_config(config: PrivacyConfig) -> gi.InversionConfig:
  return gi.InversionConfig(steps=config.inversion_steps, learning_rate=config.inversion_lr,
                            restarts=config.inversion_restarts, l2_weight=config.inversion_l2_weight,
                            cosine_weight=1.0, relative_l2=True, optimizer=config.inversion_optimizer,
                            cosine_decay=True).validate()


def resolve_main_lambda(config: PrivacyConfig) -> float:
  """The lambda every attacker attacks (and the hardened variant uses)."""
  if config.main_lambda is not None:
    return float(config.main_lambda)
  return float(TrainConfig.for_dataset(config.dataset).key_strength)


class DPRun(NamedTuple):
  epsilon: float
  noise_multiplier: float


def dp_runs(config: PrivacyConfig, num_clients: int) -> tuple[float, list[DPRun]]:
  """``(sampling_rate, runs)``: the share of clients sampled per round and, per target epsilon,
  the noise multiplier that reaches it over the training's rounds."""
  train_config = config.train_config(0.0)
  sampling_rate = max(1, round(train_config.client_fraction * num_clients)) / num_clients
  return sampling_rate, [
      DPRun(eps, dplib.noise_multiplier_for_epsilon(eps, sampling_rate, train_config.rounds, config.dp_delta))
      for eps in config.dp_epsilons]


class Stage(NamedTuple):
  """One trained model of the evaluation and who attacks it."""

  kind: str  # "faithful", "hardened" or "dp"
  name: str  # the model's label in the tables
  key_strength: float
  attackers: tuple[str, ...]
  dp: DPRun | None = None
  lira: bool = False  # membership inference with shadow models (the costly part) besides the loss threshold


def plan_stages(config: PrivacyConfig, main: float, runs: list[DPRun]) -> list[Stage]:
  stages = []
  for lam in sorted({float(l) for l in config.lambdas} | {main}):
    # lambda 0 has no key in the model (every attacker is the same); the other lambdas of the
    # sweep get the realistic attacker only, to keep the evaluation within its time budget.
    attackers = ATTACKERS if lam == main else ("right_key",) if lam == 0.0 else ("wrong_key_same_mode",)
    name = "plain FedAvg (lambda 0)" if lam == 0 else f"INFL lambda {lam:g}"
    stages.append(Stage("faithful", name, lam, attackers, lira=lam == main and config.num_shadows > 0))
  if config.hardened:
    stages.append(Stage("hardened", f"hardened INFL lambda {main:g}", main, ATTACKERS))
  stages += [Stage("dp", f"DP-FedAvg eps {run.epsilon:g}", 0.0, ("right_key",), dp=run) for run in runs]
  return stages
