"""The training images spread over simulated hospitals, each with its own labelled fraction.

The partitions are the omics engine's (``infl_jax.data.partition``), on the images' class ids: IID, Dirichlet
label skew, a few classes per hospital, or the site column an npz carries (``train_sites``). Each hospital then
keeps a stratified, seeded fraction of its own images as labelled (``--label-fraction``, or one per hospital with
``--client-label-fractions``); the rest are unlabelled and, LSANet being supervised, not used. Validation and
test images stay pooled with the evaluator. Every draw comes from the run's data seed (``--label-seed``, else
``--seed``), so a resumed run rebuilds the same hospitals.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from infl_jax.data.partition import (partition_by_column, partition_dirichlet, partition_iid,
                                     partition_label_skew)
from runkit.errors import UserInputError

from lsanet_jax.data.medmnist import MULTI_LABEL, MedMNISTData, label_fraction_subset
from lsanet_jax.federated.config import FederatedConfig

__all__ = ["Hospitals", "split_hospitals"]

_LABEL_PARTITIONS = ("dirichlet", "label-skew")


class Hospitals(NamedTuple):
  rows: list[np.ndarray]  # each hospital's labelled training rows (indices into data.train_images)
  names: list[str]
  images_held: list[int]  # each hospital's training images, labelled or not


def _assign(data: MedMNISTData, config: FederatedConfig, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
  """Hospital id per training image, and the hospitals' names."""
  classes = data.train_labels[:, 0].astype(np.int64)
  if config.partition in _LABEL_PARTITIONS and data.task == MULTI_LABEL:
    raise UserInputError(f"--partition {config.partition} splits by class, and {data.flag} is multi-label (an "
                         "image has several labels): use --partition iid or sites")
  if config.partition == "sites":
    if data.train_sites is None:
      raise UserInputError("--partition sites needs the site of every training image: add a train_sites array "
                           "(one site name or number per training image) to your --data npz, or choose "
                           "--partition iid, dirichlet or label-skew")
    return partition_by_column(data.train_sites, config.n_clients or None, rng,
                               y=None if data.task == MULTI_LABEL else classes)
  if config.partition == "iid":
    assignment = partition_iid(classes, config.hospitals, rng)
  elif config.partition == "dirichlet":
    assignment = partition_dirichlet(classes, config.hospitals, config.alpha, rng)
  else:
    assignment = partition_label_skew(classes, config.hospitals, config.classes_per_client, rng)
  return assignment, [f"hospital{k}" for k in range(config.hospitals)]


def split_hospitals(data: MedMNISTData, config: FederatedConfig) -> Hospitals:
  """The hospitals of this run (see the module doc); a hospital left without a labelled image is an error."""
  rng = np.random.default_rng(config.data_seed)
  assignment, names = _assign(data, config, rng)
  fractions = config.client_label_fractions or (config.label_fraction,) * len(names)
  if len(fractions) != len(names):
    raise UserInputError(f"--client-label-fractions gives {len(fractions)} fractions for the {len(names)} "
                         f"hospitals of --partition {config.partition}; give one per hospital")
  rows, held = [], []
  for k, (name, fraction) in enumerate(zip(names, fractions)):
    members = np.flatnonzero(assignment == k)
    held.append(len(members))
    if len(members) == 0 or fraction == 0:
      why = "no training image" if len(members) == 0 else "--client-label-fractions 0"
      raise UserInputError(f"hospital {k} ({name}) has no labelled image ({why}); every hospital trains on its "
                           "own labels: raise its labelled fraction, use fewer --n-clients or a larger --alpha")
    # One stream per hospital, so a hospital's labelled subset does not depend on the others' sizes.
    keep = label_fraction_subset(data.train_labels[members], fraction, config.data_seed + 7919 * (k + 1), data.task)
    rows.append(members[keep])
  return Hospitals(rows=rows, names=list(names), images_held=held)
