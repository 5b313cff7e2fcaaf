"""A site: its data, its key and the simulation's jit-compiled local update (no flwr here).

A site loads its data as the simulation's client of the same id holds it: a built-in is split into the run's
shares exactly as the simulation splits it, scrambled with the site's key under ``hardened``, and padded to the
largest share (every client of a vmapped round is padded to the largest, and a step's minibatch shape fixes its
dropout bits; docs/design.md, "Deploying on Flower"). An .h5ad site is one client of its own file.

With SCAFFOLD a site keeps its control variate ``c_i`` in its own state folder (``SiteControls``), trains with the
simulation's ``corrected_client_update`` and tells the server only the change of ``c_i``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import re
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from infl_jax import keys as keylib
from infl_jax.config import TrainConfig
from infl_jax.federated import (client_optimizer_from_config, client_update, corrected_client_update,
                                cosine_round_schedule)
from infl_jax.federated.local import LocalConfig
from infl_jax.flower.records import flat_leaves, leaf_names, unflatten_leaves
from infl_jax.flower.settings import SiteSpec, site_config
from infl_jax.key_scheme import client_view
from infl_jax.tasks import classification as cls
from infl_jax.tasks.common import class_presence
from runkit.errors import UserInputError
from runkit.xla import LOOP, compiler_options

__all__ = ["Site", "SiteControls", "SiteData", "load_site_data"]


class SiteData(NamedTuple):
  client_id: int
  x: np.ndarray  # float32 [pad_to, F], as the site feeds its model (scrambled under hardened)
  y: np.ndarray  # int32 [pad_to]
  num_samples: int
  val_x: np.ndarray
  val_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray
  n_classes: int
  features_digest: str  # SHA-256 of the feature names: sites must share one panel
  classes_digest: str


def _digest(names) -> str:
  return hashlib.sha256(json.dumps([str(n) for n in names]).encode()).hexdigest()[:16]


def _prepare(config: TrainConfig, spec: SiteSpec, key: keylib.SecretKey) -> dict[str, np.ndarray]:
  raw = cls.load_data(config)
  if spec.partition_id >= raw.n_clients:
    raise UserInputError(f"node config partition-id={spec.partition_id} but {config.dataset} is split into "
                         f"{raw.n_clients} shares; use 0..{raw.n_clients - 1} (run config n-clients sets the count)")
  split = cls.client_split(raw, client_view(key, config.key_scheme, raw.n_features))
  clients = cls.client_data(split, config.key_version)
  k = spec.partition_id
  return {"x": np.asarray(clients.data["x"][k]), "y": np.asarray(clients.data["y"][k]),
          "num_samples": np.asarray(clients.num_samples[k]), "val_x": split.val_x.astype(np.float32),
          "val_y": split.val_y.astype(np.int32), "test_x": split.test_x.astype(np.float32),
          "test_y": split.test_y.astype(np.int32), "n_classes": np.asarray(split.n_classes),
          "features_digest": np.asarray(_digest(raw.feature_names)),
          "classes_digest": np.asarray(_digest(raw.class_names))}


def _save_private(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
  """``arrays`` as an .npz only the site's user can read, whole or not at all (a temporary file, then renamed)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(f".{os.getpid()}.tmp")
  with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)


def load_site_data(config: TrainConfig, spec: SiteSpec, key: keylib.SecretKey) -> SiteData:
  """The site's arrays; with a cache folder, prepared once and read back by the later messages of a run (Flower
  starts a fresh ClientApp process per message). The cache is the site's own: its mode is 0o600, like the key's."""
  config = site_config(config, spec)
  arrays = None
  path = None
  if spec.cache_dir is not None:
    source = pathlib.Path(spec.data)
    stamp = source.stat().st_mtime_ns if source.is_file() else 0
    ident = json.dumps([repr(config), spec.data, spec.partition_id, stamp, key.fingerprint], sort_keys=True)
    path = spec.cache_dir / f"site-{hashlib.sha256(ident.encode()).hexdigest()[:24]}.npz"
    if path.is_file():
      with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
  if arrays is None:
    arrays = _prepare(config, spec, key)
    if path is not None:
      _save_private(path, arrays)
  return SiteData(client_id=spec.partition_id, x=arrays["x"], y=arrays["y"], num_samples=int(arrays["num_samples"]),
                  val_x=arrays["val_x"], val_y=arrays["val_y"], test_x=arrays["test_x"], test_y=arrays["test_y"],
                  n_classes=int(arrays["n_classes"]), features_digest=str(arrays["features_digest"]),
                  classes_digest=str(arrays["classes_digest"]))


def load_site_key(spec: SiteSpec, config: TrainConfig) -> keylib.SecretKey:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", keylib.InsecureKeyWarning)  # a seeded test key; the key file says so itself
    key = keylib.load_key(spec.key_file, allow_shared=spec.allow_shared_key_file)
  if key.version != config.key_version:
    # Not an error: the site trains and the server rejects its stale update, as the engine does.
    warnings.warn(f"the site's key file holds key version {key.version}, the run expects {config.key_version}: "
                  "its updates will be rejected", stacklevel=2)
  return key


class SiteControls:
  """A site's SCAFFOLD control variate ``c_i``, kept on the site's own disk and nowhere else (docs/design.md, "Drift
  correction"): one private file per round the site trained in, under ``<state-dir>/scaffold-<run>/``.

  Versions by round make a restarted server's repeated rounds exact: a server resumed from its checkpoint at round
  s repeats rounds the sites may have trained already, and each must start from ``c_i`` as it stood then. ``run``
  is the server's name for the run (kept in its checkpoint), so another run at this site starts from zeros.
  """

  def __init__(self, state_dir: pathlib.Path, run: str):
    if not re.fullmatch(r"[0-9a-f]{8,64}", run):
      raise UserInputError(f"the server named its run {run!r}; a site expects a hex name for its state folder")
    self.folder = state_dir / f"scaffold-{run}"

  def _versions(self) -> dict[int, pathlib.Path]:
    found = self.folder.glob("round-*.npz") if self.folder.is_dir() else []
    return {int(p.stem.split("-")[1]): p for p in found if p.stem.split("-")[1].isdigit()}

  def load(self, round_: int, template):
    """``c_i`` as round ``round_`` (0-based) starts with it: the newest version of an earlier round; zeros before
    the site's first."""
    versions = self._versions()
    earlier = [r for r in versions if r < round_]
    if not earlier:
      return jax.tree_util.tree_map(lambda t: np.zeros(np.shape(t), t.dtype), template)
    with np.load(versions[max(earlier)]) as f:
      return unflatten_leaves(template, [f[name] for name in leaf_names(template)])

  def store(self, round_: int, control, resume_round: int) -> None:
    """Writes ``c_i`` after round ``round_`` and drops what no server can ask for again: versions of later rounds
    (a restarted server's lost ones, which it repeats) and those older than what round ``resume_round`` (the
    server's newest checkpoint, where a restart would resume) loads."""
    _save_private(self.folder / f"round-{round_:08d}.npz", dict(zip(leaf_names(control), flat_leaves(control))))
    versions = self._versions()
    needed_from = max((r for r in versions if r < min(resume_round, round_)), default=0)
    for r, path in versions.items():
      if r < needed_from or r > round_:
        path.unlink(missing_ok=True)


@functools.cache
def _local_program(config: TrainConfig, n_classes: int):
  """The site's local update, compiled once per process: ``client_update`` as the simulation's round calls it, or
  with SCAFFOLD's ``controls = (c, c_i)`` its ``corrected_client_update``, which also returns ``c_i+ - c_i``."""
  model = cls.create_model(config, n_classes)
  task = cls.classification_task(model, absent_class_scale=config.absent_class_scale)
  optimizer = client_optimizer_from_config(config)
  local = LocalConfig(local_epochs=config.local_epochs, batch_size=config.batch_size, prox_mu=config.prox_mu)
  schedule = cosine_round_schedule(config.rounds) if config.lr_schedule == "cosine" else None

  def update(params, model_state, data, num_samples, rng_data, round_, coords, controls=None):
    lr_factor = 1.0 if schedule is None else schedule(round_)
    args = (task, optimizer, local, params, model_state, data, num_samples, jax.random.wrap_key_data(rng_data),
            coords)
    control_delta = None
    if controls is None:
      params_k, model_state_k, loss = client_update(*args, lr_factor=lr_factor)
    else:
      server_control, own = controls
      correction = jax.tree_util.tree_map(jnp.subtract, server_control, own)
      params_k, model_state_k, loss, new_control = corrected_client_update(*args, correction, lr_factor=lr_factor)
      control_delta = jax.tree_util.tree_map(jnp.subtract, new_control, own)
    delta = jax.tree_util.tree_map(lambda p, g: p - g, params_k, params)
    return delta, model_state_k, loss, control_delta

  return model, jax.jit(update, compiler_options=compiler_options(LOOP))


class Site:
  """One site: what it tells the server about itself, its local update and its evaluation with its key."""

  def __init__(self, config: TrainConfig, spec: SiteSpec):
    self.config = config
    self.spec = spec
    if config.drift_correction == "scaffold" and spec.state_dir is None:
      raise UserInputError("run config drift-correction=scaffold keeps each site's control variate on its own disk: "
                           "give the site a folder, --node-config '... state-dir=\"site-state\"'")
    self.key = load_site_key(spec, config)
    self.data = load_site_data(config, spec, self.key)
    self.model, self._update = _local_program(config, self.data.n_classes)

  def describe(self) -> dict[str, Any]:
    """Public facts the server needs (no key material, no sample): sizes, panel and label digests, key version."""
    d = self.data
    return {"client-id": d.client_id, "num-samples": d.num_samples, "n-features": int(d.x.shape[1]),
            "n-classes": d.n_classes, "features-digest": d.features_digest, "classes-digest": d.classes_digest,
            "key-version": self.key.version}

  def train(self, params, model_state, rng_data: np.ndarray, round_: int, controls=None):
    """(delta, model_state_k, loss, control_delta) of one round's local training from the global ``params``;
    ``control_delta`` (``c_i+ - c_i``) is None unless ``controls`` is SCAFFOLD's ``(c, c_i)``."""
    data = {"x": jnp.asarray(self.data.x), "y": jnp.asarray(self.data.y)}
    if self.config.absent_class_scale != 1.0:  # FedRS: the classes this site holds (padding rows excluded)
      data["held"] = jnp.asarray(class_presence(self.data.y[:self.data.num_samples], self.data.n_classes,
                                                rows=len(self.data.y)))
    out = self._update(params, model_state, data, jnp.int32(self.data.num_samples), jnp.asarray(rng_data, jnp.uint32),
                       jnp.int32(round_), jnp.asarray(self.key.coords), controls)
    return jax.device_get(out)

  def train_corrected(self, params, model_state, rng_data: np.ndarray, round_: int, server_control, *, run: str,
                      resume_round: int, key_version: int):
    """SCAFFOLD's local training: loads ``c_i`` from the site's disk (zeros the first time), trains with ``c -
    c_i`` and stores ``c_i+``; returns ``train``'s four values, ``c_i+ - c_i`` the only trace of ``c_i`` that leaves.

    A site whose key version is not the server's trains as the simulation's rejected client does, and as there
    its variate stays and its change counts as zero."""
    store = SiteControls(self.spec.state_dir, run)
    own = store.load(round_, server_control)
    delta, model_state_k, loss, control_delta = self.train(params, model_state, rng_data, round_,
                                                           (server_control, own))
    if self.key.version != key_version:
      return delta, model_state_k, loss, jax.tree_util.tree_map(np.zeros_like, control_delta)
    # Stored as c_i + (c_i+ - c_i), the simulation's own sum, so the next round starts from its c_i to the bit.
    store.store(round_, jax.tree_util.tree_map(np.add, own, control_delta), resume_round)
    return delta, model_state_k, loss, control_delta

  def evaluate(self, variables) -> dict[str, float]:
    """The global model on the site's validation and test sets, run with the site's key (its view of the inputs)."""
    out = {}
    coords = jnp.asarray(self.key.coords)
    for name, x, y in (("val", self.data.val_x, self.data.val_y), ("test", self.data.test_x, self.data.test_y)):
      logits = cls.predict_logits(self.model, variables, x, coords)
      scores = cls.classification_metrics(y, logits, self.data.n_classes)
      scores["loss"] = cls.cross_entropy(logits, y)
      out.update({f"{name}-{k}": float(v) for k, v in scores.items()})
      out[f"{name}-n"] = float(len(y))
    return out
