"""Clients that hold few classes (label skew): the warning, and what ``--drift-correction auto`` resolves to
(docs/design.md, "Clients that hold few classes" and "Drift correction")."""

from __future__ import annotations

import dataclasses
import sys

import jax
import numpy as np

from infl_jax.config import TrainConfig

__all__ = ["SKEWED_ROUNDS_FACTOR", "fit_to_federation", "say_federation_choice", "warn_single_class_clients"]


def warn_single_class_clients(split, config: TrainConfig) -> None:
  single = [name for name, (_, y) in zip(split.client_names, split.client_arrays()) if len(np.unique(y)) == 1]
  if not single:
    return
  batch_norm = config.model == "proteomics" or config.norm == "batch"
  what = "their BatchNorm statistics and updates see" if batch_norm else "their updates see"
  advice = "; --model mlp --norm layer normalises each sample on its own" if batch_norm else ""
  names = ", ".join(map(str, single[:5])) + (", ..." if len(single) > 5 else "")
  print(f"warning: {len(single)} of {split.n_clients} clients hold a single class ({names}): {what} one class "
        f"only{advice}", file=sys.stderr)


# How much longer than its preset a label-skewed federation trains under --drift-correction auto. Chosen on seeds
# 10-12 (docs/design.md, "Clients that hold few classes"): at its preset's rounds the generic settings left PBMC's
# label-built patient sites 2.8 points under central, at twice them 0.7; the other skewed PBMC splits stayed
# within 2.5 points either way.
SKEWED_ROUNDS_FACTOR = 2


def fit_to_federation(config: TrainConfig, split) -> tuple[TrainConfig, dict | None]:
  """Resolves ``--drift-correction auto`` from the partition (docs/design.md, "Clients that hold few classes"):
  where a client holds a single class or fewer than half of the classes, SCAFFOLD and, unless the user set
  ``--rounds``, ``SKEWED_ROUNDS_FACTOR`` times the preset's rounds; plain FedAvg otherwise (an unskewed run is
  unchanged). Returns the config and, where the partition made the choice, ``{"drift_correction", "rounds",
  "reason"}`` for summary.json."""
  if config.drift_correction != "auto":
    return config, None
  held = [len(np.unique(y)) for _, y in split.client_arrays()]
  few = sum(1 for n in held if n == 1 or n < split.n_classes / 2)
  if not few:
    return dataclasses.replace(config, drift_correction="none"), None
  reason = (f"{few} of {split.n_clients} clients hold a single class or fewer than half of the "
            f"{split.n_classes} classes")
  # SCAFFOLD's per-client variates are not sharded over devices or processes yet.
  if config.shard_clients or jax.process_count() > 1:
    return dataclasses.replace(config, drift_correction="none"), {"drift_correction": "none", "rounds": config.rounds,
                                                                  "reason": reason}
  rounds = config.rounds * SKEWED_ROUNDS_FACTOR if config.rounds_from_preset else config.rounds
  return (dataclasses.replace(config, drift_correction="scaffold", rounds=rounds, rounds_from_preset=False),
          {"drift_correction": "scaffold", "rounds": rounds, "reason": reason})


def say_federation_choice(choice: dict, preset_rounds: int) -> None:
  if choice["drift_correction"] == "scaffold":
    longer = (f" and {choice['rounds']} rounds instead of the preset's {preset_rounds}"
              if choice["rounds"] != preset_rounds else "")
    print(f"note: {choice['reason']}: training with SCAFFOLD drift correction{longer} (--drift-correction none, "
          f"--rounds N override; docs/design.md, \"Drift correction\")", file=sys.stderr)
  else:
    print(f"note: {choice['reason']}, but SCAFFOLD does not run with the clients sharded yet: training without "
          "drift correction", file=sys.stderr)
