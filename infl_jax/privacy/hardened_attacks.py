"""The attacks on the hardened model's scramble itself, beyond ``attack_models``' (docs/privacy.md,
"Attacks on the hardened scheme's scramble"). Rows of the hardened stage, one per attacker, all from the
analytic attack:

  - ``public_panel`` (``attacks.public_panel``): no key; the analytic reconstructions of the targets (and of
    ``panel_extra_samples`` training samples) on one common scale, unscrambled by matching them against a
    panel of unscrambled samples that are none of those: the rest of train, validation and test;
  - ``random_guess``: the same reconstructions unscrambled by a random signed permutation (chance);
  - ``public_prior``: no observation at all, the panel's first principal axis as every target (the |r| an
    attack has to beat where one factor dominates the data);
  - ``seed_search`` (``attacks.seed_search``): the evaluation's key is seeded (``--key-seed``), so the attacker
    tries seeds 0..N-1, testing each candidate's scramble on the same reconstructions and panel: does its
    unscrambling reproduce the panel's strongest feature correlations (``seed_search.correlation_test``)?

The panel and random-guess attackers query the model through their guessed scramble with the adaptive
attacker's prior key vector (they hold no key); the seed searcher with the key it found. None of them
uses a label.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from infl_jax import keys as keylib
from infl_jax.attacks import adaptive, analytic, gradient_inversion as gi, public_panel as panel_lib, seed_search
from infl_jax.privacy import hardened as hardlib
from infl_jax.privacy.attack_models import (AttackPrograms, AttackSetup, output_bias, score_reconstruction,
                                            split_test_accuracy)
from infl_jax.privacy.experiment import Stage
from runkit.errors import UserInputError

__all__ = ["check_panel_settings", "hardened_attack_rows"]


def _panel_split(setup: AttackSetup) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(recovered x, recovered y, panel x)``: the targets then ``panel_extra_samples`` random training samples
  (seeded), and every other sample of train, validation and test, raw."""
  config, split = setup.config, setup.split
  order = np.random.default_rng(config.seed + 11).permutation(len(split.train_y))
  extra, rest = order[:config.panel_extra_samples], order[config.panel_extra_samples:]
  x = np.concatenate([setup.targets_x, split.train_x[extra]]).astype(np.float32)
  y = np.concatenate([setup.targets_y, split.train_y[extra]])
  panel = np.concatenate([split.train_x[rest], split.val_x, split.test_x[config.num_targets:]]).astype(np.float32)
  return x, y, panel


def check_panel_settings(config, split) -> None:
  """Raises UserInputError before anything is trained if the sets of the attacks on the scramble are too
  small."""
  if not (config.hardened and (config.public_panel or config.seed_search)):
    return
  if config.panel_extra_samples > len(split.train_y):
    raise UserInputError(f"--panel-extra-samples {config.panel_extra_samples} but the training split has only "
                         f"{len(split.train_y)} samples")
  panel = len(split.train_y) - config.panel_extra_samples + len(split.val_y) + len(split.test_y) - config.num_targets
  if panel < 4 or config.num_targets + config.panel_extra_samples < 4:
    raise UserInputError(f"the attacks on the scramble need >= 4 recovered and >= 4 panel samples, got "
                         f"{config.num_targets + config.panel_extra_samples} and {panel}; lower "
                         "--panel-extra-samples or --num-targets, or pass --no-public-panel --seed-search 0")


class _Observed(NamedTuple):
  """The analytic attack's view of the targets (then any extra samples): batch-1 first-layer gradients,
  each sample's input on one common scale (``attacks.public_panel.common_scale_inputs``)."""

  recovered: np.ndarray  # [T + extra, F], scrambled
  labels: np.ndarray  # [T] iDLG labels of the targets


def _observe(setup: AttackSetup, programs: AttackPrograms, variables, x, y, truth) -> _Observed:
  observed = programs.observe(variables, jnp.asarray(hardlib.scramble(x, truth)), jnp.asarray(y),
                              jnp.asarray(setup.key.coords))
  kernel, bias = analytic.find_first_layer(observed, programs.first_layer)
  recovered = np.asarray(panel_lib.common_scale_inputs(kernel, bias), np.float64)
  return _Observed(recovered, np.asarray(gi.idlg_label(output_bias(observed)))[:setup.config.num_targets])


def _guess_row(setup: AttackSetup, seen: _Observed, scrambler, truth, query) -> dict:
  """Scores of the targets unscrambled by ``scrambler``, the test accuracy of ``query(x_model) -> logits``
  and how much of the scramble the guess recovers."""
  split, t = setup.split, setup.config.num_targets
  accuracy = panel_lib.match_accuracy(scrambler, truth)
  return {"test_accuracy": split_test_accuracy(split, query(hardlib.scramble(split.test_x, scrambler)
                                                            .astype(np.float32))),
          **score_reconstruction(setup, hardlib.unscramble(seen.recovered[:t], scrambler), seen.labels),
          "scramble_position_recovered": accuracy["position"],
          "scramble_position_sign_recovered": accuracy["position_and_sign"]}


def _panel_rows(setup: AttackSetup, programs: AttackPrograms, variables, seen: _Observed, panel, truth,
                base: dict) -> list[dict]:
  config, split = setup.config, setup.split
  usable = np.any(seen.recovered != 0, axis=1)  # a zero gradient (saturated softmax) shows the attacker nothing
  random_guess = panel_lib.random_scrambler(split.n_features, np.random.default_rng(config.seed + 12))
  # Under 4 usable reconstructions (saturated softmax everywhere) there is nothing to match: a guess.
  if usable.sum() >= 4:
    guess = panel_lib.public_panel_attack(seen.recovered[usable], panel, panel_lib.PanelConfig(seed=config.seed))
    guess = guess.scrambler
  else:
    guess = panel_lib.random_scrambler(split.n_features, np.random.default_rng(config.seed + 13))
  k0 = adaptive.prior_key_vector(variables, config.key_mode)  # no key: the adaptive attacker's prior
  query = lambda x: programs.logits_with_key_vector(variables, x, k0)
  sizes = {"panel_recovered_samples": int(usable.sum()), "panel_samples": len(panel)}
  rows = []
  for attacker, scrambler in (("public_panel", guess), ("random_guess", random_guess)):
    rows.append({**base, "attacker": attacker, "attack": "analytic",
                 **_guess_row(setup, seen, scrambler, truth, query), **sizes})
  prior = score_reconstruction(setup, panel_lib.public_prior(panel, config.num_targets), seen.labels)
  rows.append({**base, "attacker": "public_prior", "attack": "none", "test_accuracy": None, **prior, **sizes})
  return rows


def _seed_search_row(setup: AttackSetup, programs: AttackPrograms, variables, seen: _Observed, panel, truth,
                     base: dict):
  """The seed searcher's row and its record (every candidate's score, for the report's plot)."""
  config, split, key = setup.config, setup.split, setup.key
  usable = seen.recovered[np.any(seen.recovered != 0, axis=1)]
  found = seed_search.search_seeds(seed_search.correlation_test(usable, panel), range(config.seed_search),
                                   split.n_features, derivation="seeded", mode=key.mode, version=key.version)
  found_key = keylib.generate_key(found.best_seed, key.mode, key.version)
  coords = jnp.asarray(found_key.coords)
  query = lambda x: programs.logits(variables, x, coords)
  row = {**base, "attacker": "seed_search", "attack": "analytic",
         **_guess_row(setup, seen, hardlib.input_scrambler(found_key, split.n_features), truth, query),
         "seed_search_candidates": len(found.seeds), "seed_search_found": bool(found_key == key)}
  # Timings stay out of the rows: the same settings give the same table.csv on any machine.
  record = {"seeds": found.seeds.tolist(), "scores": found.scores.tolist(), "key_seed": key.seed,
            "best_seed": found.best_seed, "derive_per_second": found.derive_per_second,
            "score_per_second": found.score_per_second, "per_second": found.per_second}
  return row, record


def hardened_attack_rows(setup: AttackSetup, stage: Stage, programs: AttackPrograms, variables,
                         key_holder_accuracy: float) -> tuple[list[dict], dict[str, Any]]:
  """``(rows, seed-search record or {})`` of the hardened stage's attacks on its scramble."""
  config = setup.config
  truth = hardlib.input_scrambler(setup.key, setup.split.n_features)
  base = {"model": stage.name, "lambda": stage.key_strength, "hardened": True,
          "key_holder_accuracy": key_holder_accuracy, "dp_epsilon": None, "dp_noise_multiplier": None}
  x, y, panel = _panel_split(setup)
  seen = _observe(setup, programs, variables, x, y, truth)
  rows, record = [], {}
  if config.public_panel:
    rows += _panel_rows(setup, programs, variables, seen, panel, truth, base)
  if config.seed_search and setup.key.seeded:
    row, record = _seed_search_row(setup, programs, variables, seen, panel, truth, base)
    rows.append(row)
  return rows, record
