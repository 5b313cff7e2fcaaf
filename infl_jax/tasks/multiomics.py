"""Multi-omics clustering with missing modalities ("mosaic"): one encoder per modality into a
shared embedding, trained without labels.

Per sample, each present modality m is encoded to a code ``z_m``. The joint embedding ``z`` is
either the mean over present modalities' codes (``anchor=None``) or, with an ``anchor`` modality,
the anchor's code wherever the sample holds it and the mean of the other codes elsewhere: the
bridge design, where samples that hold both modalities teach the other encoders to land where
the anchor would have put the sample. The loss (per sample, averaged over real samples):

  * reconstruction of every present modality: from ``z`` (mean fusion) or from its own code
    (anchored, so the anchor's code is not bent to reconstruct the other modalities);
  * cross-reconstruction of each present modality from the other present modalities' codes
    (anchored: the anchor's code enters other decoders without gradient);
  * alignment ``||z_m - z||^2`` of each code to the joint code (only samples holding two or more);
  * isometry (optional): pairwise RMS distances between a modality's codes match those between
    its inputs, so the embedding keeps the geometry that KMeans reads; an autoencoder's code
    space otherwise stretches arbitrarily.

Clients that lack a modality never run its encoder on real data (its rows are masked out),
and its encoder's parameters are updated only by clients that hold it.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from infl_jax import keys as keylib
from infl_jax.config import TrainConfig
from infl_jax.federated import Task, algorithm_from_config, global_variables, stack_clients
from infl_jax.key_scheme import KeyView, client_view, study_views
from infl_jax.keyed import keyed
from infl_jax.tasks.clustering import cluster_embedding, clustering_scores, format_clustering_summary
from infl_jax.tasks.common import (check_key_version, stopped_early, train_federated,
                                   training_record, write_h5ad, write_summary)
from runkit.errors import UserInputError

__all__ = ["MosaicAutoencoder", "format_summary", "make_mosaic_model", "mosaic_embed", "mosaic_task", "run"]

format_summary = format_clustering_summary


class MosaicAutoencoder(nn.Module):
  """``__call__(inputs)`` with ``inputs = (x: {modality: [B, F_m]}, present: [B, M])``.

  Returns ``(z [B, E], codes [M, B, E], recon {m: [B, F_m]}, cross {m: [B, F_m]})``; ``cross[m]``
  decodes modality m from the mean code of the *other* present modalities (anchored: modalities
  other than the anchor are decoded from the anchor's code).
  """

  modality_names: Sequence[str]
  modality_dims: Sequence[int]
  hidden: int = 64
  embed_dim: int = 16
  anchor: str | None = None

  @nn.compact
  def __call__(self, inputs):
    x, present = inputs
    codes = []
    for m in self.modality_names:
      h = nn.silu(nn.Dense(self.hidden, name=f"enc_{m}_0")(x[m]))
      codes.append(nn.Dense(self.embed_dim, name=f"enc_{m}_1")(h))
    codes = jnp.stack(codes)  # [M, B, E]
    w = present.T[..., None]  # [M, B, 1]
    count = jnp.maximum(w.sum(0), 1.0)
    z = (codes * w).sum(0) / count
    a = None if self.anchor is None else list(self.modality_names).index(self.anchor)
    if a is not None:
      z = jnp.where(w[a] > 0, codes[a], z)
    others = ((codes * w).sum(0, keepdims=True) - codes * w) / jnp.maximum(count - w, 1.0)  # [M, B, E]
    recon, cross = {}, {}
    for j, (m, dim) in enumerate(zip(self.modality_names, self.modality_dims)):
      dec_0 = nn.Dense(self.hidden, name=f"dec_{m}_0")
      dec_1 = nn.Dense(dim, name=f"dec_{m}_1")
      if a is None:
        source, translate = z, others[j]
      else:
        source = codes[j]
        translate = others[j] if j == a else jax.lax.stop_gradient(codes[a])
      both = jnp.concatenate([source, translate], 0)
      out = dec_1(nn.silu(dec_0(both)))
      recon[m], cross[m] = out[: z.shape[0]], out[z.shape[0]:]
    return z, codes, recon, cross


def make_mosaic_model(modality_names, modality_dims, *, hidden: int = 64, embed_dim: int = 16,
                      key_strength: float = 1.0, variant: str = "modulation", anchor: str | None = None):
  """The keyed mosaic autoencoder (every Dense keyed; FiLM after all but the decoders' outputs)."""
  if anchor is not None and anchor not in modality_names:
    raise ValueError(f"anchor {anchor!r} is not one of the modalities {list(modality_names)}")
  plain = MosaicAutoencoder(tuple(modality_names), tuple(int(d) for d in modality_dims), hidden, embed_dim, anchor)
  skip = tuple(f"dec_{m}_1" for m in modality_names)
  return keyed(plain, key_strength=key_strength, variant=variant, film_skip=skip)


def _rms_distances(x: jax.Array) -> jax.Array:
  """[B, D] -> [B, B] root-mean-square differences (a distance on the scale of one feature)."""
  sq = jnp.mean(jnp.square(x[:, None, :] - x[None, :, :]), -1)
  return jnp.sqrt(sq + 1e-8)


def isometry_loss(code: jax.Array, x: jax.Array, have: jax.Array) -> jax.Array:
  """Mean squared mismatch of pairwise RMS distances between ``code`` and ``x`` over the pairs of
  rows that both hold the modality: keeps the input's geometry, which KMeans then reads."""
  pair = have[:, None] * have[None, :] * (1.0 - jnp.eye(have.shape[0]))
  err = jnp.square(_rms_distances(code) - _rms_distances(x))
  return jnp.sum(err * pair) / jnp.maximum(pair.sum(), 1.0)


def mosaic_task(model, modality_names: Sequence[str], *, input_dropout: float = 0.2,
                self_weight: float = 1.0, cross_weight: float = 1.0, align_weight: float = 0.1,
                isometry_weight: float = 0.0, isometry_modalities: Sequence[str] | None = None) -> Task:
  """Unsupervised loss for client data ``{"x": {m: [N, F_m]}, "present": [N, M]}``.

  ``isometry_modalities``: the modalities whose codes keep their inputs' distances (default all;
  with an anchor, the anchor alone, since the others are aligned to it).
  """
  isometric = set(modality_names if isometry_modalities is None else isometry_modalities)
  if not isometric <= set(modality_names):
    raise ValueError(f"isometry_modalities {sorted(isometric)} are not all among {list(modality_names)}")

  def loss(params, model_state, batch, mask, rng, context):
    present = batch["present"] * mask[:, None]
    keep_rngs = jax.random.split(rng, len(modality_names))
    noisy = {m: batch["x"][m] * jax.random.bernoulli(r, 1.0 - input_dropout, batch["x"][m].shape) / (1.0 - input_dropout)
             for m, r in zip(modality_names, keep_rngs)}
    z, codes, recon, cross = model.apply({"params": params, **model_state}, (noisy, present), key_coords=context)
    total = 0.0
    n_real = jnp.maximum(mask.sum(), 1.0)
    for j, m in enumerate(modality_names):
      have = present[:, j]
      err = jnp.mean(jnp.square(recon[m] - batch["x"][m]), -1)
      total += self_weight * jnp.sum(err * have) / n_real
      # Cross-reconstruction only where another modality is present too.
      other = (present.sum(1) - have) > 0
      cross_err = jnp.mean(jnp.square(cross[m] - batch["x"][m]), -1)
      total += cross_weight * jnp.sum(cross_err * have * other) / n_real
      align = jnp.sum(jnp.square(codes[j] - jax.lax.stop_gradient(z)), -1)
      total += align_weight * jnp.sum(align * have * other) / n_real
      if isometry_weight > 0 and m in isometric:
        total += isometry_weight * isometry_loss(codes[j], batch["x"][m], have)
    return total, model_state

  return Task(loss=loss)


def mosaic_embed(model, variables, x: dict, present, key_coords):
  """Joint embeddings [N, E] (inference: no input noise)."""
  z, _, _, _ = model.apply(variables, (x, jnp.asarray(present, jnp.float32)), key_coords=key_coords)
  return z


# --------------------------------------------------------------------------------------------
# The runner


def run(config: TrainConfig, workdir, key: keylib.SecretKey, *, resume: bool = False,
        stop_after_round: int | None = None, show_progress: bool | None = None) -> dict:
  from infl_jax.data.multiomics import load_mosaic

  workdir = pathlib.Path(workdir)
  check_key_version(config, key)
  data = load_mosaic(config.dataset, seed=config.seed,
                     label_keys=(config.label_key,) if config.label_key else ("label",))
  if config.mosaic_anchor is not None and config.mosaic_anchor not in data.modality_names:
    raise UserInputError(f"--mosaic-anchor {config.mosaic_anchor!r} is not a modality of {config.dataset!r}; "
                         f"choose one of {data.modality_names}, or 'none' for the mean of the present modalities' codes")
  dims = [data.modalities[m].shape[1] for m in data.modality_names]
  raw = data
  data = dataclasses.replace(raw, modalities=_inputs(client_view(key, config.key_scheme, _widths(raw)),
                                                     raw.modalities))
  model = make_mosaic_model(data.modality_names, dims, hidden=config.hidden[0], embed_dim=config.embed_dim,
                            key_strength=config.key_strength, variant=config.variant, anchor=config.mosaic_anchor)
  task = mosaic_task(model, data.modality_names, input_dropout=config.dropout, align_weight=config.align_weight,
                     isometry_weight=config.isometry_weight,
                     isometry_modalities=None if config.mosaic_anchor is None else (config.mosaic_anchor,))
  clients = stack_clients(data.client_arrays(), key_version=config.key_version)
  # Full-batch local steps: a client's whole (small) cohort per step.
  algo = algorithm_from_config(config, task, batch_size=min(config.batch_size, clients.max_samples))
  init_rng, server_rng = jax.random.split(jax.random.key(config.seed))
  dummy = ({m: jnp.zeros((2, d), jnp.float32) for m, d in zip(data.modality_names, dims)},
           jnp.ones((2, len(dims)), jnp.float32))
  initial = model.init(init_rng, dummy, key_coords=None)
  result = train_federated(config, workdir, algo, initial, clients, jnp.asarray(key.coords), rng=server_rng,
                           resume=resume, stop_after_round=stop_after_round, show_progress=show_progress)
  if stopped := stopped_early(result, config):
    return stopped
  summary = _evaluate(config, workdir, key, model, raw, global_variables(result.state), initial)
  summary.update(training_record(result, config))
  return write_summary(workdir, summary)


def _widths(data) -> dict[str, int]:
  return {m: data.modalities[m].shape[1] for m in data.modality_names}


def _inputs(view: KeyView, modalities: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Each modality as ``view`` feeds it to the model (under ``hardened``, one scramble per modality)."""
  return {m: view.inputs(x, stream=m) for m, x in modalities.items()}


def _evaluate(config: TrainConfig, workdir: pathlib.Path, key, model, data, variables, initial) -> dict:
  """Clusters each way of running the model, the baselines, and the .h5ad of the right key's result."""
  embed = jax.jit(lambda v, x, p, c: mosaic_embed(model, v, x, p, c))
  present = data.present.astype(np.float32)
  label_sets = {name: (values, len(data.label_names[name])) for name, values in data.labels.items()}

  def scores(z):
    return {name: clustering_scores(truth, cluster_embedding(np.asarray(z), k, config.cluster_method,
                                                              seed=config.seed))
            for name, (truth, k) in label_sets.items()}

  def coords(view: KeyView):
    return None if view.coords is None else jnp.asarray(view.coords)

  views = study_views(key, config.key_scheme, _widths(data), seed=config.seed)
  results, embeddings = {}, {}
  for name, view in views.items():
    embeddings[name] = np.asarray(embed(variables, _inputs(view, data.modalities), present, coords(view)))
    results[name] = {"mosaic": scores(embeddings[name])}
  right_view = views["right_key"]
  if data.modalities_all is not None:
    # A model check, not the mosaic setting: every sample with every modality the source holds.
    full_present = np.ones_like(data.present, np.float32)
    results["right_key"]["all_modalities"] = scores(embed(variables, _inputs(right_view, data.modalities_all),
                                                          full_present, coords(right_view)))
  baselines = {"untrained_encoder_right_key": scores(embed(initial, _inputs(right_view, data.modalities),
                                                           present, coords(right_view)))}
  for j, m in enumerate(data.modality_names):
    have = data.present[:, j]
    baselines[f"kmeans_{m}_on_clients_holding_it"] = {
        name: clustering_scores(truth[have], cluster_embedding(data.modalities[m][have], k, "kmeans", config.seed))
        for name, (truth, k) in label_sets.items()}
  right = embeddings["right_key"]
  obs = {"sample_id": data.sample_ids, "client": np.array(data.client_names)[data.client],
         **{f"infl_{name}_cluster": cluster_embedding(right, k, config.cluster_method, seed=config.seed)
            for name, (_, k) in label_sets.items()},
         **{f"{name}_label": np.array(data.label_names[name])[v] for name, v in data.labels.items()},
         **{f"has_{m}": data.present[:, j] for j, m in enumerate(data.modality_names)}}
  x_concat = np.concatenate([data.modalities[m] for m in data.modality_names], 1)
  var_names = [f"{m}:{f}" for m in data.modality_names for f in data.feature_names[m]]
  h5ad = write_h5ad(workdir / "infl_multiomics.h5ad", x_concat, obs, var_names, {"X_infl": right})
  clients = range(len(data.client_names))
  return {
      "task": "multiomics", "dataset": config.dataset, "key_scheme": config.key_scheme, "description": data.description,
      "client_names": data.client_names,
      "client_sizes": [int((data.client == k).sum()) for k in clients],
      "client_modalities": {data.client_names[k]: [m for j, m in enumerate(data.modality_names)
                                                   if data.present[data.client == k, j].all()] for k in clients},
      "clustering": results, "baselines": baselines, "h5ad": str(h5ad),
  }
