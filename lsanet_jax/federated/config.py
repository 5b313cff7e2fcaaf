"""Run settings of ``lsanet-federated``: ``lsanet-train``'s, plus how the images are spread over hospitals and how
the hospitals train together (docs/design.md, "Federated LSANet").

The model, data, label and seed settings are ``lsanet_jax.config.TrainConfig``'s, with the same flags and the same
meaning, so a central and a federated run of one model differ only in the settings below. The flags shared with
``infl-train`` (``--n-clients``, ``--partition``, ``--alpha``, ``--classes-per-client``, ``--rounds``,
``--local-epochs``, ``--client-fraction``) mean what they mean there (``--n-clients`` defaults to 10 hospitals, or
one per site with ``--partition sites``); a client is a hospital.
"""
from __future__ import annotations

import dataclasses

from runkit.config import option

from lsanet_jax.config import EPOCH_LOOPS, TrainConfig

__all__ = ["BATCH_NORM_MODES", "FederatedConfig", "PARTITIONS"]

# How the training images go to the hospitals: by label at random (IID, Dirichlet label skew, a few classes
# each), or by the site each image came from (an npz's train_sites).
PARTITIONS = ("iid", "dirichlet", "label-skew", "sites")
# BatchNorm across hospitals: averaged like every other variable (FedAvg), or kept at each hospital, affine
# parameters and statistics (FedBN, Li et al. 2021).
BATCH_NORM_MODES = ("fedavg", "fedbn")
_NOT_FEDERATED = "not a setting of a federated run"
DEFAULT_HOSPITALS = 10


@dataclasses.dataclass(frozen=True)
class FederatedConfig(TrainConfig):
  # Redeclared: a federated run's local epochs, validation and checkpoints count rounds.
  epochs: int = option(1, "local epochs: passes each sampled hospital makes over its labelled images per round",
                       flag="--local-epochs", group="federated", minimum=1)
  batch_size: int = option(32, "each hospital's training batch size (a hospital with fewer labelled images "
                           "repeats them to fill its batch)", group="training", minimum=1)
  learning_rate: float = option(1e-3, "hospitals' Adam step size, x0.1 after half and after three quarters of "
                                "the rounds", flag="--lr", group="training", above=0)
  eval_every: int = option(1, "validate the global model every N rounds and at the last round (the best "
                           "validation round is kept; test is scored once, with it)", group="training", minimum=1)
  checkpoint_every: int = option(5, "rounds between checkpoints; the last round (and the one --stop-after-rounds "
                                 "stops at) is always saved", group="run", minimum=1, resume=False)
  # Both loops compute the same round (up to summation order), so a run may resume with the other.
  epoch_loop: str = option("auto", "one jit-compiled round (scan), or each hospital's local steps driven from "
                           "Python, one jitted step at a time (host); auto: scan except on CPU, where XLA runs "
                           "convolutions inside a compiled loop several times slower", flag="--round-loop",
                           group="federated", choices=EPOCH_LOOPS, resume=False)
  data_parallel: bool = option(False, _NOT_FEDERATED, cli=False, resume=False)
  n_clients: int = option(0, "hospitals the training images are split over; with --partition sites, more than the "
                          "sites splits the largest", group="federated", minimum=0,
                          default_help="0 = 10, or one per site with --partition sites")
  partition: str = option("dirichlet", "how training images go to hospitals: IID, Dirichlet label skew (--alpha), "
                          "--classes-per-client classes each, or by the site column of your npz (train_sites)",
                          group="federated", choices=PARTITIONS)
  alpha: float = option(0.5, "Dirichlet concentration of --partition dirichlet (small: few classes per hospital)",
                        group="federated", above=0)
  classes_per_client: int = option(2, "classes each hospital holds with --partition label-skew", group="federated",
                                   minimum=1)
  client_label_fractions: tuple[float, ...] = option(
      (), "one labelled fraction per hospital, e.g. 0.1,0.1,1,... (each stratified within the hospital)",
      group="federated", default_help="--label-fraction at every hospital")
  # Part of the resume check: the step drops fall at half and three quarters of --rounds.
  rounds: int = option(50, "federated rounds", group="federated", minimum=1)
  client_fraction: float = option(1.0, "share of hospitals sampled each round", group="federated", above=0,
                                  maximum=1)
  batch_norm: str = option("fedavg", "BatchNorm across hospitals: averaged (fedavg) or kept at each hospital, "
                           "scale, bias and statistics (fedbn; for hospitals whose images differ in look)",
                           group="federated", choices=BATCH_NORM_MODES)
  # Chunks change the order of a sum only: a run may resume with another chunk size.
  client_chunk_size: int = option(0, "hospitals trained at once (vmapped) by --round-loop scan; more are scanned in "
                                  "chunks of this size to bound memory", group="federated", minimum=0, resume=False,
                                  default_help="0 = all at once")

  key_scheme: str = option("none", "INFL's key on the CNN: none, or faithful (every Dense of the heads and LSA "
                           "keyed; the key file WORKDIR/client_secret.key stays with the hospitals)", group="key",
                           choices=("none", "faithful"))
  key_strength: float = option(1.0, "strength of the key's modulation of the keyed layers (--key-scheme faithful)",
                               group="key", above=0)

  def validate(self) -> None:
    """TrainConfig's checks and the federated settings' (ValueError naming the flag and the fix)."""
    super().validate()
    if self.client_label_fractions:
      bad = [f for f in self.client_label_fractions if not 0 <= f <= 1]
      if bad:
        raise ValueError(f"--client-label-fractions holds {bad[0]}; each fraction is in [0, 1]")
      if self.partition != "sites" and len(self.client_label_fractions) != self.hospitals:
        raise ValueError(f"--client-label-fractions gives {len(self.client_label_fractions)} fractions for "
                         f"{self.hospitals} hospitals (--n-clients); give one per hospital")

  @property
  def hospitals(self) -> int:
    """The number of hospitals of a partition by label (--n-clients, 0 meaning 10)."""
    return self.n_clients or DEFAULT_HOSPITALS
