"""``train_and_evaluate`` for the tasks beyond classification: multi-omics mosaic clustering,
spatial clustering and perturbation-response regression.

Each runner builds its clients as a pytree with leaves [C, N, ...], trains with the federated
engine (one jit-compiled round, clients vmapped), checkpoints like the classification run
(server state + metrics history; resume repeats exactly the rounds an uninterrupted run
would), then evaluates with the right key, two wrong keys and without the INR path, writes
``summary.json`` and an ``.h5ad`` with the results (embeddings in ``obsm["X_infl"]``, clusters
in ``obs``, predictions in ``layers``).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from infl_jax import keys as keylib
from infl_jax.common.cli import UserInputError
from infl_jax.common.metrics_log import write_json_atomic
from infl_jax.config import TrainConfig
from infl_jax.federated import ClientData, fedavg, server_optimizer, stack_clients
from infl_jax.train import create_client_optimizer, evaluation_keys, global_variables, run_rounds

TASKS = ("classification", "multiomics", "spatial", "perturbation")

__all__ = ["TASKS", "run_federated", "train_and_evaluate", "train_multiomics"]


def _algorithm(config: TrainConfig, task, batch_size: int):
  return fedavg(task, create_client_optimizer(config), local_epochs=config.local_epochs, batch_size=batch_size,
                client_fraction=config.client_fraction, weighting=config.weighting, prox_mu=config.prox_mu,
                server_opt=server_optimizer(config.server_optimizer, config.server_learning_rate))


def run_federated(config: TrainConfig, workdir: pathlib.Path, algo, variables, clients: ClientData, coords,
                  *, resume: bool, stop_after_round: int | None = None, show_progress: bool | None = None,
                  rng: jax.Array):
  """Initialises the server state and runs ``infl_jax.train.run_rounds``; returns its result."""
  state = algo.init(variables, rng, key_version=config.key_version)
  return run_rounds(config, workdir, algo, state, clients, coords, resume=resume, stop_after_round=stop_after_round,
                    show_progress=show_progress)


def _check_key(config: TrainConfig, key: keylib.SecretKey):
  if key.version != config.key_version:
    raise UserInputError(f"the key file holds key version {key.version} but the run expects version "
                         f"{config.key_version}; pass --key-version {key.version} or the matching key file")


def _write_h5ad(path: pathlib.Path, x: np.ndarray, obs: dict, var_names, obsm: dict, layers: dict | None = None,
                uns: dict | None = None):
  import anndata
  import pandas as pd

  frame = pd.DataFrame({k: (pd.Categorical(v) if np.asarray(v).dtype.kind in "OUi" and k.endswith(("cluster", "client", "label"))
                            else v) for k, v in obs.items()})
  frame.index = [str(i) for i in range(len(frame))] if "sample_id" not in obs else [str(s) for s in obs["sample_id"]]
  adata = anndata.AnnData(np.asarray(x, np.float32), obs=frame, var=pd.DataFrame(index=[str(v) for v in var_names]))
  for k, v in obsm.items():
    adata.obsm[k] = np.asarray(v, np.float32)
  for k, v in (layers or {}).items():
    adata.layers[k] = np.asarray(v, np.float32)
  adata.uns.update(uns or {})
  adata.write_h5ad(path)
  return path


# --------------------------------------------------------------------------------------------
# Multi-omics mosaic clustering


def train_multiomics(config: TrainConfig, workdir, key: keylib.SecretKey, *, resume: bool = False,
                     stop_after_round: int | None = None, show_progress: bool | None = None) -> dict:
  from infl_jax.data.multiomics import load_mosaic
  from infl_jax.tasks.clustering import cluster_embedding, clustering_scores
  from infl_jax.tasks.multiomics import make_mosaic_model, mosaic_embed, mosaic_task

  workdir = pathlib.Path(workdir)
  _check_key(config, key)
  data = load_mosaic(config.dataset, seed=config.seed,
                     label_keys=(config.label_key,) if config.label_key else ("label",))
  if config.mosaic_anchor is not None and config.mosaic_anchor not in data.modality_names:
    raise UserInputError(f"--mosaic-anchor {config.mosaic_anchor!r} is not a modality of {config.dataset!r}; "
                         f"choose one of {data.modality_names}, or 'none' for the mean of the present modalities' codes")
  dims = [data.modalities[m].shape[1] for m in data.modality_names]
  model = make_mosaic_model(data.modality_names, dims, hidden=config.hidden[0], embed_dim=config.embed_dim,
                            key_strength=config.key_strength, variant=config.variant, anchor=config.mosaic_anchor)
  task = mosaic_task(model, data.modality_names, input_dropout=config.dropout, align_weight=config.align_weight,
                     isometry_weight=config.isometry_weight,
                     isometry_modalities=None if config.mosaic_anchor is None else (config.mosaic_anchor,))
  per_client = data.client_arrays()
  clients = stack_clients(per_client, key_version=config.key_version)
  # Full-batch local steps: a client's whole (small) cohort per step.
  algo = _algorithm(config, task, batch_size=min(config.batch_size, clients.max_samples))
  coords = jnp.asarray(key.coords)
  init_rng, server_rng = jax.random.split(jax.random.key(config.seed))
  dummy = ({m: jnp.zeros((2, d), jnp.float32) for m, d in zip(data.modality_names, dims)},
           jnp.ones((2, len(dims)), jnp.float32))
  variables = model.init(init_rng, dummy, key_coords=None)
  init_variables = variables
  out = run_federated(config, workdir, algo, variables, clients, coords, resume=resume,
                      stop_after_round=stop_after_round, show_progress=show_progress, rng=server_rng)
  if out is None:
    return {"stopped_after_round": stop_after_round}
  state, history, seconds = out
  variables = global_variables(state)

  embed = jax.jit(lambda v, x, p, c: mosaic_embed(model, v, x, p, c), static_argnums=())
  full_present = np.ones_like(data.present, np.float32)
  label_sets = {name: (values, len(data.label_names[name])) for name, values in data.labels.items()}

  def scores(z):
    out = {}
    for name, (truth, k) in label_sets.items():
      pred = cluster_embedding(np.asarray(z), k, config.cluster_method, seed=config.seed)
      out[name] = clustering_scores(truth, pred)
    return out

  results, embeddings = {}, {}
  for name, c in evaluation_keys(key).items():
    z = np.asarray(embed(variables, data.modalities, data.present.astype(np.float32), None if c is None else jnp.asarray(c)))
    embeddings[name] = z
    results[name] = {"mosaic": scores(z)}
    if name == "right_key" and data.modalities_all is not None:
      # A model check, not the mosaic setting: every sample with every modality the source holds.
      results[name]["all_modalities"] = scores(embed(variables, data.modalities_all, full_present, jnp.asarray(c)))
  untrained = np.asarray(embed(init_variables, data.modalities, data.present.astype(np.float32), coords))
  baselines = {"untrained_encoder_right_key": scores(untrained)}
  for j, m in enumerate(data.modality_names):
    have = data.present[:, j]
    baselines[f"kmeans_{m}_on_clients_holding_it"] = {
        name: clustering_scores(truth[have], cluster_embedding(data.modalities[m][have], k, "kmeans", config.seed))
        for name, (truth, k) in label_sets.items()}
  right = embeddings["right_key"]
  clusters = {f"infl_{name}_cluster": cluster_embedding(right, k, config.cluster_method, seed=config.seed)
              for name, (_, k) in label_sets.items()}
  x_concat = np.concatenate([data.modalities[m] for m in data.modality_names], 1)
  var_names = [f"{m}:{f}" for m in data.modality_names for f in data.feature_names[m]]
  obs = {"sample_id": data.sample_ids, "client": np.array(data.client_names)[data.client], **clusters,
         **{f"{name}_label": np.array(data.label_names[name])[v] for name, v in data.labels.items()}}
  for j, m in enumerate(data.modality_names):
    obs[f"has_{m}"] = data.present[:, j]
  h5ad = _write_h5ad(workdir / "infl_multiomics.h5ad", x_concat, obs, var_names, {"X_infl": right})
  summary = {
      "task": "multiomics", "dataset": config.dataset, "description": data.description,
      "client_names": data.client_names,
      "client_sizes": [int((data.client == k).sum()) for k in range(len(data.client_names))],
      "client_modalities": {c: [m for j, m in enumerate(data.modality_names) if data.present[data.client == k, j].all()]
                            for k, c in enumerate(data.client_names)},
      "rounds": int(state.round), "federated_train_seconds_this_session": seconds,
      "final_train_loss": history[-1]["train_loss"] if history else None,
      "clustering": results, "baselines": baselines, "h5ad": str(h5ad),
      "config": dataclasses.asdict(config),
  }
  write_json_atomic(workdir / "summary.json", summary)
  return summary


# --------------------------------------------------------------------------------------------
# Spatial clustering


def spatial_client_graphs(data, k: int):
  """Per client: its spots' features and its own kNN graph (edges to other regions cut)."""
  from infl_jax.tasks.graph import knn_graph, restrict_graph

  neighbors, weights = knn_graph(data.coords, k)
  per_client, nodes = [], []
  for c in range(len(data.client_names)):
    idx = np.flatnonzero(data.client == c)
    nb, w = restrict_graph(neighbors, weights, idx)
    per_client.append({"x": data.x[idx], "neighbors": nb, "weights": w, "row": np.arange(len(idx), dtype=np.int32)})
    nodes.append(idx)
  return per_client, nodes


def train_spatial(config: TrainConfig, workdir, key: keylib.SecretKey, *, resume: bool = False,
                  stop_after_round: int | None = None, show_progress: bool | None = None) -> dict:
  from infl_jax.data.spatial import load_spatial
  from infl_jax.tasks.clustering import (cluster_embedding, clustering_scores, make_spatial_model,
                                         pca_kmeans_baseline, spatial_task)

  workdir = pathlib.Path(workdir)
  _check_key(config, key)
  data = load_spatial(config.dataset, n_clients=config.n_clients or 3, n_top_genes=config.n_top_features or 1000,
                      label_key=config.label_key, client_key=config.client_key)
  if data.labels is None:
    raise UserInputError("spatial clustering is scored against annotated domains: pass --label-key <obs column>")
  n_clusters = len(data.label_names)
  model = make_spatial_model(data.x.shape[1], hidden=config.hidden[0], embed_dim=config.embed_dim,
                             key_strength=config.key_strength, variant=config.variant)
  per_client, nodes = spatial_client_graphs(data, config.graph_neighbors)
  clients = stack_clients(per_client, key_version=config.key_version)
  # One step = one client's whole graph (see clustering.whole_graph).
  algo = _algorithm(config, spatial_task(model, input_dropout=config.dropout), batch_size=clients.max_samples)
  coords = jnp.asarray(key.coords)
  init_rng, server_rng = jax.random.split(jax.random.key(config.seed))
  g0 = per_client[0]
  init_variables = model.init(init_rng, jnp.asarray(g0["x"]), jnp.asarray(g0["neighbors"]), jnp.asarray(g0["weights"]),
                              key_coords=None)
  out = run_federated(config, workdir, algo, init_variables, clients, coords, resume=resume,
                      stop_after_round=stop_after_round, show_progress=show_progress, rng=server_rng)
  if out is None:
    return {"stopped_after_round": stop_after_round}
  state, history, seconds = out
  variables = global_variables(state)

  apply = jax.jit(lambda v, x, nb, w, c: model.apply(v, x, nb, w, key_coords=c)[0])

  def embed(v, c):
    z = np.zeros((len(data.x), config.embed_dim), np.float32)
    for g, idx in zip(per_client, nodes):  # evaluation only: each client embeds its own spots
      z[idx] = np.asarray(apply(v, g["x"], g["neighbors"], g["weights"], c))
    return z

  def scores(z):
    return clustering_scores(data.labels, cluster_embedding(z, n_clusters, config.cluster_method, seed=config.seed))

  results, right = {}, None
  for name, c in evaluation_keys(key).items():
    z = embed(variables, None if c is None else jnp.asarray(c))
    results[name] = scores(z)
    if name == "right_key":
      right = z
  baselines = {
      "scanpy_style_pca_kmeans": pca_kmeans_baseline(data.log_expression, data.labels, n_clusters, seed=config.seed),
      "untrained_encoder_right_key": scores(embed(init_variables, coords)),
  }
  clusters = cluster_embedding(right, n_clusters, config.cluster_method, seed=config.seed)
  obs = {"sample_id": data.spot_ids, "client": np.array(data.client_names)[data.client],
         "infl_cluster": clusters.astype(str), "domain_label": np.array(data.label_names)[data.labels]}
  h5ad = _write_h5ad(workdir / "infl_spatial.h5ad", data.log_expression, obs, data.gene_names,
                     {"X_infl": right, "spatial": data.coords})
  summary = {
      "task": "spatial", "dataset": config.dataset, "description": data.description,
      "client_names": data.client_names, "client_sizes": [len(i) for i in nodes],
      "n_clusters": n_clusters, "graph_neighbors": config.graph_neighbors,
      "rounds": int(state.round), "federated_train_seconds_this_session": seconds,
      "final_train_loss": history[-1]["train_loss"] if history else None,
      "clustering": results, "baselines": baselines, "h5ad": str(h5ad), "config": dataclasses.asdict(config),
  }
  write_json_atomic(workdir / "summary.json", summary)
  return summary


# --------------------------------------------------------------------------------------------
# Perturbation-response regression


def _paired_controls(data, cell_types: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """A random control cell for each perturbed cell, of the same cell type where one exists (GEARS pairs randomly)."""
  rows = np.empty(len(cell_types), np.int64)
  for t in np.unique(cell_types):
    pool = np.flatnonzero(data.control_cell_type == t)
    pool = pool if len(pool) else np.arange(len(data.control))
    where = np.flatnonzero(cell_types == t)
    rows[where] = rng.choice(pool, len(where))
  return rows


def _perturbation_examples(data, conditions, rng):
  xs, ps, ys, conds = [], [], [], []
  for cond in conditions:
    y = data.cells[cond]
    idx = data.gene_index(cond)
    xs.append(data.control[_paired_controls(data, data.cell_type[cond], rng)])
    ps.append(np.tile(np.array(idx + [-1] * (2 - len(idx)), np.int32), (len(y), 1)))
    ys.append(y)
    conds += ["+".join(cond) if len(cond) == 2 else f"{cond[0]}+ctrl"] * len(y)
  return {"x": np.concatenate(xs).astype(np.float32), "perts": np.concatenate(ps), "y": np.concatenate(ys)}, conds


def train_perturbation(config: TrainConfig, workdir, key: keylib.SecretKey, *, resume: bool = False,
                       stop_after_round: int | None = None, show_progress: bool | None = None) -> dict:
  from infl_jax.data.perturbation import load_perturbation
  from infl_jax.tasks.graph import sparsify_similarity
  from infl_jax.tasks.perturbation import make_perturbation_model, perturbation_metrics, perturbation_task

  workdir = pathlib.Path(workdir)
  _check_key(config, key)
  data = load_perturbation(config.dataset, seed=config.seed)
  n_clients = config.n_clients or 3
  if len(data.train_conditions) < n_clients:
    raise UserInputError(f"{len(data.train_conditions)} training conditions cannot fill {n_clients} clients;"
                         " lower --n-clients")
  rng = np.random.default_rng(config.seed)
  # Co-expression in control cells: the gene graph, and (no Gene Ontology offline) the perturbation graph.
  corr = np.nan_to_num(np.corrcoef(data.control.T))
  graph = sparsify_similarity(np.abs(corr), config.graph_neighbors)
  spread_nb, _ = sparsify_similarity(np.abs(corr), 2 * config.graph_neighbors)
  spread = (spread_nb, np.take_along_axis(corr, spread_nb, 1).astype(np.float32))
  model = make_perturbation_model(data.n_genes, graph, graph, dim=config.embed_dim,
                                  key_strength=config.key_strength, variant=config.variant, spread_graph=spread)
  # Each client (lab) holds its own perturbations: training conditions dealt round-robin.
  order = rng.permutation(len(data.train_conditions))
  per_client = []
  for c in range(n_clients):
    conds = [data.train_conditions[i] for i in order[c::n_clients]]
    per_client.append(_perturbation_examples(data, conds, rng)[0])
  clients = stack_clients(per_client, key_version=config.key_version)
  algo = _algorithm(config, perturbation_task(model), batch_size=config.batch_size)
  coords = jnp.asarray(key.coords)
  init_rng, server_rng = jax.random.split(jax.random.key(config.seed))
  dummy = (jnp.zeros((2, data.n_genes), jnp.float32), jnp.array([[0, -1], [0, 1]], jnp.int32))
  variables = model.init(init_rng, dummy, key_coords=None)
  out = run_federated(config, workdir, algo, variables, clients, coords, resume=resume,
                      stop_after_round=stop_after_round, show_progress=show_progress, rng=server_rng)
  if out is None:
    return {"stopped_after_round": stop_after_round}
  state, history, seconds = out
  variables = global_variables(state)

  test, test_conditions = _perturbation_examples(data, data.test_conditions, np.random.default_rng(config.seed + 1))
  apply = jax.jit(lambda v, x, p, c: model.apply(v, (x, p), key_coords=c))

  def predict(c, batch=256):
    outs = []
    for start in range(0, len(test["x"]), batch):
      x, p = test["x"][start:start + batch], test["perts"][start:start + batch]
      pad = batch - len(x)
      x = np.concatenate([x, np.zeros((pad, x.shape[1]), x.dtype)]) if pad else x
      p = np.concatenate([p, -np.ones((pad, 2), p.dtype)]) if pad else p
      outs.append(np.asarray(apply(variables, x, p, c))[: batch - pad])
    return np.concatenate(outs)

  control_mean = data.control.mean(0)
  test_conditions = np.asarray(test_conditions)
  names = ["+".join(c) if len(c) == 2 else f"{c[0]}+ctrl" for c in data.test_conditions]
  train_set = set(data.train_conditions)

  def score(pred_cells=None, pred_mean_of=None):
    rows = {"single": [], "combo": []}
    for cond, name in zip(data.test_conditions, names):
      true_mean = data.cells[cond].mean(0)
      pred_mean = pred_cells[test_conditions == name].mean(0) if pred_cells is not None else pred_mean_of(cond)
      if pred_mean is None:
        continue
      rows["single" if len(cond) == 1 else "combo"].append(perturbation_metrics(control_mean, true_mean, pred_mean))
    summary = {}
    for kind, metrics in list(rows.items()) + [("all", rows["single"] + rows["combo"])]:
      if metrics:
        summary[kind] = {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]} | {"n_conditions": len(metrics)}
    return summary

  results, right_pred = {}, None
  for name, c in evaluation_keys(key).items():
    pred = predict(None if c is None else jnp.asarray(c))
    results[name] = score(pred)
    if name == "right_key":
      right_pred = pred

  def additive(cond):
    if len(cond) != 2 or not all((g,) in train_set for g in cond):
      return None
    return control_mean + sum(data.cells[(g,)].mean(0) - control_mean for g in cond)

  baselines = {"no_change_control_mean": score(pred_mean_of=lambda cond: control_mean),
               "sum_of_single_effects_combos_with_both_singles_seen": score(pred_mean_of=additive)}
  combos_both_seen = [c for c in data.test_conditions if additive(c) is not None]
  if combos_both_seen:
    keep = set(combos_both_seen)
    ours = [perturbation_metrics(control_mean, data.cells[c].mean(0),
                                 right_pred[test_conditions == ("+".join(c))].mean(0)) for c in data.test_conditions if c in keep]
    baselines["infl_right_key_on_the_same_combos"] = {k: float(np.mean([m[k] for m in ours])) for k in ours[0]}
  obs = {"condition": test_conditions, "paired_control_row": np.zeros(len(test_conditions), np.int32)}
  del obs["paired_control_row"]
  h5ad = _write_h5ad(workdir / "infl_perturbation.h5ad", test["y"], obs, data.gene_names, {},
                     layers={"infl_prediction": right_pred, "paired_control": test["x"]},
                     uns={"simulated": int(data.simulated)})
  summary = {
      "task": "perturbation", "dataset": config.dataset, "description": data.description,
      "simulated": data.simulated, "client_sizes": [len(c["y"]) for c in per_client],
      "train_conditions": ["+".join(c) for c in data.train_conditions], "held_out_conditions": names,
      "rounds": int(state.round), "federated_train_seconds_this_session": seconds,
      "final_train_loss": history[-1]["train_loss"] if history else None,
      "held_out": results, "baselines": baselines, "h5ad": str(h5ad), "config": dataclasses.asdict(config),
  }
  write_json_atomic(workdir / "summary.json", summary)
  return summary


RUNNERS: dict[str, Callable[..., dict]] = {"multiomics": train_multiomics, "spatial": train_spatial,
                                           "perturbation": train_perturbation}


def train_and_evaluate(config: TrainConfig, workdir, key: keylib.SecretKey, **kwargs) -> dict:
  """Runs ``config.task``; classification goes to ``infl_jax.train.train_and_evaluate``."""
  if config.task == "classification":
    from infl_jax import train

    return train.train_and_evaluate(config, workdir, key, **kwargs)
  if config.task not in RUNNERS:
    raise UserInputError(f"unknown task {config.task!r}; choose one of {', '.join(TASKS)}")
  return RUNNERS[config.task](config, workdir, key, **kwargs)


def format_summary(summary: dict) -> str:
  """Readable lines of a task summary (ARI/NMI per way of running the model, and the baselines)."""
  lines = [f"{summary['task']} on {summary['dataset']} after {summary['rounds']} rounds:"]
  if summary["task"] == "perturbation":
    lines[0] += " (SIMULATED data)" if summary["simulated"] else ""
    for group, table in (("federated", summary["held_out"]), ("baseline", summary["baselines"])):
      for name, kinds in table.items():
        for kind, m in (kinds.items() if "mse" not in kinds else [("combos", kinds)]):
          lines.append(f"  {group:<9s} {name:<22s} {kind:<7s} MSE {m['mse']:.4f}  top-20 DE MSE {m['mse_top20_de']:.4f}"
                       f"  Pearson delta {m['pearson_delta']:.3f}")
    return "\n".join(lines)

  def fmt(scores):
    if "ari" in scores:
      return f"ARI {scores['ari']:.3f}  NMI {scores['nmi']:.3f}"
    return "  ".join(f"{label}: {fmt(v)}" for label, v in scores.items() if v is not None)

  for name, scores in summary["clustering"].items():
    lines.append(f"  federated {name:<22s} {fmt(scores)}")
  for name, scores in summary.get("baselines", {}).items():
    lines.append(f"  baseline  {name:<22s} {fmt(scores)}")
  return "\n".join(lines)
