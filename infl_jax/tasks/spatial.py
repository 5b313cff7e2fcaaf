"""Spatial domain clustering: a keyed graph autoencoder over each client's spatial neighbour graph, and
its runner (federated training, then clustering of the embeddings under the four ways to run the model,
against a scanpy-style PCA + k-means baseline)."""

from __future__ import annotations

import dataclasses
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from infl_jax import keys as keylib
from infl_jax.config import TrainConfig
from infl_jax.federated import Task, algorithm_from_config, global_variables, stack_clients
from infl_jax.key_scheme import KeyView, client_view, study_views
from infl_jax.keyed import keyed
from infl_jax.tasks.clustering import (cluster_embedding, clustering_scores, format_clustering_summary,
                                       pca_kmeans_baseline)
from infl_jax.tasks.common import (check_key_version, stopped_early, train_federated,
                                   training_record, write_h5ad, write_summary)
from infl_jax.tasks.graph import knn_graph, mean_aggregate, restrict_graph
from runkit.errors import UserInputError

__all__ = ["SpatialGraphAutoencoder", "format_summary", "make_spatial_model", "run", "spatial_client_graphs",
           "spatial_task", "whole_graph"]

format_summary = format_clustering_summary


class SpatialGraphAutoencoder(nn.Module):
  """Dense -> neighbour mean -> Dense -> neighbour mean = embedding; MLP decoder back to the genes.

  ``__call__(x [N, G], neighbors [N, K], weights [N, K]) -> (z [N, E], reconstruction [N, G])``.
  """

  num_genes: int
  hidden: int = 128
  embed_dim: int = 16
  linear_encoder: bool = False

  @nn.compact
  def __call__(self, x, neighbors, weights):
    h = nn.Dense(self.hidden, name="enc_0")(x)
    if not self.linear_encoder:
      h = nn.silu(h)
    h = mean_aggregate(h, neighbors, weights)
    z = nn.Dense(self.embed_dim, name="enc_1")(h)
    z = mean_aggregate(z, neighbors, weights)
    out = nn.Dense(self.num_genes, name="dec_1")(nn.silu(nn.Dense(self.hidden, name="dec_0")(z)))
    return z, out


def make_spatial_model(num_genes: int, *, hidden: int = 128, embed_dim: int = 16, key_strength: float = 1.0,
                       variant: str = "modulation"):
  return keyed(SpatialGraphAutoencoder(num_genes, hidden, embed_dim), key_strength=key_strength, variant=variant,
               film_skip=("dec_1",))


def whole_graph(batch, mask):
  """Undoes the engine's row shuffle: with batch size = the client's padded node count, a batch
  holds every row once, so scattering by ``row`` restores the client's node order (padding adds 0)."""
  rows = batch["row"]
  n = rows.shape[0]

  def place(a):
    m = mask.reshape((-1,) + (1,) * (a.ndim - 1)).astype(a.dtype)
    return jnp.zeros_like(a).at[rows].add(a * m)

  return {k: place(v) for k, v in batch.items() if k != "row"}, jnp.zeros((n,), mask.dtype).at[rows].add(mask)


def spatial_task(model, *, input_dropout: float = 0.2) -> Task:
  """Denoising reconstruction of every real spot's genes through the graph encoder."""

  def loss(params, model_state, batch, mask, rng, context):
    graph, node_mask = whole_graph(batch, mask)
    x = graph["x"]
    noisy = x * jax.random.bernoulli(rng, 1.0 - input_dropout, x.shape) / (1.0 - input_dropout)
    _, recon = model.apply({"params": params, **model_state}, noisy, graph["neighbors"].astype(jnp.int32),
                           graph["weights"], key_coords=context)
    err = jnp.mean(jnp.square(recon - x), -1)
    return jnp.sum(err * node_mask) / jnp.maximum(node_mask.sum(), 1.0), model_state

  return Task(loss=loss)


# --------------------------------------------------------------------------------------------
# The runner


def spatial_client_graphs(data, k: int):
  """Per client: its spots' features and its own kNN graph (edges to other regions cut)."""
  neighbors, weights = knn_graph(data.coords, k)
  per_client, nodes = [], []
  for c in range(len(data.client_names)):
    idx = np.flatnonzero(data.client == c)
    nb, w = restrict_graph(neighbors, weights, idx)
    per_client.append({"x": data.x[idx], "neighbors": nb, "weights": w, "row": np.arange(len(idx), dtype=np.int32)})
    nodes.append(idx)
  return per_client, nodes


def run(config: TrainConfig, workdir, key: keylib.SecretKey, *, resume: bool = False,
        stop_after_round: int | None = None, show_progress: bool | None = None) -> dict:
  from infl_jax.data.spatial import load_spatial

  workdir = pathlib.Path(workdir)
  check_key_version(config, key)
  data = load_spatial(config.dataset, n_clients=config.n_clients or 3, n_top_genes=config.n_top_features or 1000,
                      label_key=config.label_key, client_key=config.client_key)
  if data.labels is None:
    raise UserInputError("spatial clustering is scored against annotated domains: pass --label-key <obs column>")
  raw = data
  data = dataclasses.replace(raw, x=client_view(key, config.key_scheme, raw.x.shape[1]).inputs(raw.x))
  model = make_spatial_model(data.x.shape[1], hidden=config.hidden[0], embed_dim=config.embed_dim,
                             key_strength=config.key_strength, variant=config.variant)
  per_client, nodes = spatial_client_graphs(data, config.graph_neighbors)
  clients = stack_clients(per_client, key_version=config.key_version)
  # One step = one client's whole graph (see whole_graph).
  algo = algorithm_from_config(config, spatial_task(model, input_dropout=config.dropout),
                               batch_size=clients.max_samples)
  coords = jnp.asarray(key.coords)
  init_rng, server_rng = jax.random.split(jax.random.key(config.seed))
  g0 = per_client[0]
  initial = model.init(init_rng, jnp.asarray(g0["x"]), jnp.asarray(g0["neighbors"]), jnp.asarray(g0["weights"]),
                       key_coords=None)
  result = train_federated(config, workdir, algo, initial, clients, coords, rng=server_rng, resume=resume,
                           stop_after_round=stop_after_round, show_progress=show_progress)
  if stopped := stopped_early(result, config):
    return stopped
  summary = _evaluate(config, workdir, key, model, raw, per_client, nodes, global_variables(result.state), initial)
  summary.update(training_record(result, config))
  return write_summary(workdir, summary)


def _evaluate(config: TrainConfig, workdir, key, model, data, per_client, nodes, variables, initial) -> dict:
  """Clusters each way of running the model, the baselines, and the .h5ad of the right key's result."""
  n_clusters = len(data.label_names)
  apply = jax.jit(lambda v, x, nb, w, c: model.apply(v, x, nb, w, key_coords=c)[0])

  def embed(v, view: KeyView):
    c = None if view.coords is None else jnp.asarray(view.coords)
    z = np.zeros((len(data.x), config.embed_dim), np.float32)
    for g, idx in zip(per_client, nodes):  # evaluation only: each client embeds its own spots
      z[idx] = np.asarray(apply(v, view.inputs(data.x[idx]), g["neighbors"], g["weights"], c))
    return z

  def scores(z):
    return clustering_scores(data.labels, cluster_embedding(z, n_clusters, config.cluster_method, seed=config.seed))

  views = study_views(key, config.key_scheme, data.x.shape[1], seed=config.seed)
  embeddings = {name: embed(variables, view) for name, view in views.items()}
  results = {name: scores(z) for name, z in embeddings.items()}
  baselines = {
      "scanpy_style_pca_kmeans": pca_kmeans_baseline(data.log_expression, data.labels, n_clusters, seed=config.seed),
      "untrained_encoder_right_key": scores(embed(initial, views["right_key"])),
  }
  right = embeddings["right_key"]
  clusters = cluster_embedding(right, n_clusters, config.cluster_method, seed=config.seed)
  obs = {"sample_id": data.spot_ids, "client": np.array(data.client_names)[data.client],
         "infl_cluster": clusters.astype(str), "domain_label": np.array(data.label_names)[data.labels]}
  h5ad = write_h5ad(workdir / "infl_spatial.h5ad", data.log_expression, obs, data.gene_names,
                    {"X_infl": right, "spatial": data.coords})
  return {"task": "spatial", "dataset": config.dataset, "key_scheme": config.key_scheme, "description": data.description,
          "client_names": data.client_names, "client_sizes": [len(i) for i in nodes],
          "n_clusters": n_clusters, "graph_neighbors": config.graph_neighbors,
          "clustering": results, "baselines": baselines, "h5ad": str(h5ad)}
