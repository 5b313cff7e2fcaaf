"""The run's settings from Flower's run config (server and sites alike) and a site's own from its node config.

A run config key is an INFL flag without its dashes' meaning changed (``local-epochs``); 0 or "" keeps the
preset's value. Every bad value meets a ``UserInputError`` naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Mapping, NamedTuple

from infl_jax.config import TrainConfig
from runkit.errors import UserInputError

__all__ = ["FlowerRun", "SiteSpec", "run_settings", "site_spec"]

DRIFT_CORRECTIONS = ("none", "scaffold")

# The run config keys and their defaults (also the [tool.flwr.app.config] of the generated Flower app).
RUN_DEFAULTS: dict[str, Any] = {
    "preset": "proteomics",  # a built-in's preset, or "generic" for .h5ad sites
    "rounds": 0,
    "local-epochs": 0,
    "n-clients": 0,  # built-in data: how many shares it is split into (one per site)
    "seed": 0,
    "workdir": "infl-flower-run",  # the server's folder: checkpoints, metrics, result.json
    "checkpoint-every": 1,
    "keep-checkpoints": 3,
    "stop-after-round": 0,  # end the run after this round's checkpoint (0: run all rounds)
    "min-sites": 3,
    "wait-seconds": 120.0,  # how long the server waits for min-sites sites to connect
    "secagg": False,
    # SecAgg+ clips each n_k/sum(n)-scaled value to this range: 64 covers a round's change of BatchNorm
    # variances (tens on standardised omics); 2^24 levels make a step of 7.6e-6.
    "secagg-clipping-range": 64.0,
    "secagg-quantization-range": 1 << 24,
    # Model state (BatchNorm statistics) goes into the masked vector times this factor: a round moves a variance
    # from 1 to thousands, beyond any clipping range that keeps the parameters' step small.
    "secagg-state-scale": 1.0 / 1024,
    # "scaffold": SCAFFOLD's control variates, each site keeping its own c_i in its state-dir. The simulation's
    # "auto" is not offered: it chooses by the clients' labels, which a deployment's server never sees.
    "drift-correction": "none",
    # A site's control change goes into the masked vector times this factor; SecAgg+ clips it to the clipping
    # range and quantises it in steps of 2 * 64 / 2^24 = 7.6e-6 (divided by this factor after unmasking). 1 leaves
    # room: a proteomics site's change reached 2.2 in the first three rounds.
    "secagg-control-scale": 1.0,
    "audit-patterns": "",  # test/audit only: a file of byte patterns the server must never receive
    "evaluate": True,
}


class FlowerRun(NamedTuple):
  config: TrainConfig
  workdir: pathlib.Path
  checkpoint_every: int
  keep_checkpoints: int
  stop_after_round: int
  min_sites: int
  wait_seconds: float
  secagg: bool
  clipping_range: float
  quantization_range: int
  state_scale: float
  control_scale: float
  audit_patterns: str
  evaluate: bool


def _get(run_config: Mapping[str, Any], name: str, kind):
  value = run_config.get(name, RUN_DEFAULTS[name])
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
    raise UserInputError(f"run config {name}={value!r} must be a {kind.__name__}; pass --run-config "
                         f"'{name}=<{kind.__name__}>'")
  return value


def run_settings(run_config: Mapping[str, Any]) -> FlowerRun:
  """The run's TrainConfig and deployment settings; the sites build the same TrainConfig from the same keys."""
  unknown = sorted(set(run_config) - set(RUN_DEFAULTS))
  if unknown:
    raise UserInputError(f"unknown run config key(s) {unknown}; the keys are {sorted(RUN_DEFAULTS)}")
  overrides = {"rounds": _get(run_config, "rounds", int), "local_epochs": _get(run_config, "local-epochs", int),
               "n_clients": _get(run_config, "n-clients", int)}
  for name, value in overrides.items():
    if value < 0:
      raise UserInputError(f"run config {name.replace('_', '-')}={value} must be >= 0 (0 keeps the preset's)")
  drift = _get(run_config, "drift-correction", str)
  if drift not in DRIFT_CORRECTIONS:
    raise UserInputError(f"run config drift-correction={drift!r} must be one of {', '.join(DRIFT_CORRECTIONS)} (a "
                         "deployment does not choose by the clients' labels, which its server never sees)")
  control_scale = _get(run_config, "secagg-control-scale", float)
  if control_scale <= 0:
    raise UserInputError(f"run config secagg-control-scale={control_scale} must be > 0")
  preset = _get(run_config, "preset", str)
  try:
    config = TrainConfig.for_dataset(preset, seed=_get(run_config, "seed", int), drift_correction=drift,
                                     **{k: (v or None) for k, v in overrides.items()}).validate()
  except ValueError as error:
    raise UserInputError(f"run config: {error}") from None
  if config.task != "classification":
    raise UserInputError(f"run config preset={preset!r} is a {config.task} preset; the Flower deployment runs "
                         "classification (preset=proteomics, pbmc or generic)")
  if config.shard_clients:
    raise UserInputError("run config: shard_clients has no meaning on Flower (each site is one client)")
  every = _get(run_config, "checkpoint-every", int)
  if every < 1:
    raise UserInputError(f"run config checkpoint-every={every} must be >= 1")
  return FlowerRun(config=config, workdir=pathlib.Path(_get(run_config, "workdir", str)).expanduser(),
                   checkpoint_every=every, keep_checkpoints=max(1, _get(run_config, "keep-checkpoints", int)),
                   stop_after_round=_get(run_config, "stop-after-round", int),
                   min_sites=max(1, _get(run_config, "min-sites", int)),
                   wait_seconds=_get(run_config, "wait-seconds", float), secagg=_get(run_config, "secagg", bool),
                   clipping_range=_get(run_config, "secagg-clipping-range", float),
                   quantization_range=_get(run_config, "secagg-quantization-range", int),
                   state_scale=_get(run_config, "secagg-state-scale", float), control_scale=control_scale,
                   audit_patterns=_get(run_config, "audit-patterns", str),
                   evaluate=_get(run_config, "evaluate", bool))


class SiteSpec(NamedTuple):
  """What a SuperNode's node config says about its site: its data, its key file and its client id."""

  data: str  # a built-in name or an .h5ad path
  partition_id: int  # built-in: which share; also the site's client id (its PRNG stream)
  key_file: pathlib.Path
  label_key: str | None
  cache_dir: pathlib.Path | None  # where the site keeps its prepared arrays between messages (optional)
  allow_shared_key_file: bool
  state_dir: pathlib.Path | None = None  # what the site keeps between rounds: SCAFFOLD's control variate


_NODE_KEYS = ("data", "partition-id", "key-file", "label-key", "cache-dir", "allow-shared-key-file", "state-dir")


def site_spec(node_config: Mapping[str, Any]) -> SiteSpec:
  unknown = sorted(set(node_config) - set(_NODE_KEYS))
  if unknown:
    raise UserInputError(f"unknown node config key(s) {unknown}; a site's --node-config takes {list(_NODE_KEYS)}")
  for required in ("data", "partition-id", "key-file"):
    if required not in node_config:
      raise UserInputError(f"the site's --node-config lacks {required}; e.g. --node-config 'data=\"proteomics\" "
                           "partition-id=0 key-file=\"site.key\"'")
  pid = node_config["partition-id"]
  if isinstance(pid, bool) or not isinstance(pid, int) or pid < 0:
    raise UserInputError(f"node config partition-id={pid!r} must be an integer >= 0 (the site's client id)")
  folder = lambda name: None if not node_config.get(name) else pathlib.Path(str(node_config[name])).expanduser()
  return SiteSpec(data=str(node_config["data"]), partition_id=pid,
                  key_file=pathlib.Path(str(node_config["key-file"])).expanduser(),
                  label_key=node_config.get("label-key") or None, cache_dir=folder("cache-dir"),
                  allow_shared_key_file=bool(node_config.get("allow-shared-key-file", False)),
                  state_dir=folder("state-dir"))


def site_config(config: TrainConfig, spec: SiteSpec) -> TrainConfig:
  """The run's config as this site loads its data: a built-in split into the run's shares, or the site's own
  .h5ad as one client (its train/validation/test split drawn locally)."""
  if spec.data.endswith(".h5ad"):
    return dataclasses.replace(config, dataset=spec.data, label_key=spec.label_key, client_key=None, n_clients=1,
                               partition="iid")
  return dataclasses.replace(config, dataset=spec.data)
