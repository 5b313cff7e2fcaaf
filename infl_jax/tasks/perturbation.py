"""Perturbation-response regression, GEARS-style (Roohani et al. 2023), in Flax.

* gene embeddings propagated over a gene co-expression graph built from control cells;
* perturbation embeddings propagated over a perturbation graph (co-expression too: the Gene
  Ontology graph GEARS uses is not available offline); a perturbed gene's embedding also takes its
  propagated *gene* embedding, so a gene never perturbed in training still gets a representation
  from its co-expression neighbourhood;
* each perturbed gene's embedding passes through an MLP; a cell's perturbation vector is their
  sum (as in GEARS);
* a decoder maps every gene's propagated embedding, plus a gene-specific weight vector (GEARS's
  gene-specific output layer), to a gene code; a gene's change is the inner product of the cell's
  perturbation vector with that code, times a response gain computed from the cell's control
  expression; prediction = control expression + change. Because the change is linear in the
  summed perturbation vector, a combination's change is the sum of its genes' changes (the
  additive prior that held-out combinations of seen genes need); pairwise interactions are not
  modelled. Two direct terms, with per-target-gene scales shared by all perturbations, carry over
  to genes never perturbed in training: the perturbed gene's own change, and its spread to its
  signed co-expression neighbours. (This low-rank decoder replaces GEARS's per-gene MLP on [gene, perturbation]
  features, which cost batch x genes x width^2 per layer: too slow for the CPU budget.)

Every Dense is keyed (lambda 5 by the reference). Loss: mean squared error of the predicted
post-perturbation expression (GEARS adds a direction term; the plain MSE is kept here).
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from infl_jax import keys as keylib
from infl_jax.config import FAITHFUL_BY_DEFAULT, NO_MIXING, TrainConfig
from infl_jax.federated import Task, algorithm_from_config, global_variables, stack_clients
from infl_jax.key_scheme import InputScrambler, KeyView, client_view, study_views, unscramble
from infl_jax.keyed import keyed
from infl_jax.tasks.common import (check_key_version, stopped_early, train_federated,
                                   training_record, write_h5ad, write_summary)
from infl_jax.tasks.graph import mean_aggregate, sparsify_similarity
from runkit.errors import UserInputError

__all__ = ["GearsLite", "format_summary", "make_perturbation_model", "perturbation_metrics", "perturbation_task",
           "run", "top_de_genes"]


# Under --key-scheme hardened the cells' genes are permuted, not sign-flipped: the model's decoder gives
# co-expressed genes similar codes, a prior that a flipped gene's change (of the opposite sign) breaks, and the
# flips hide nothing on expression, which is non-negative, so a flipped gene shows as negative in any cell.
# With flips the key holder lost 0.10 +- 0.05 Pearson delta over seeds 10-13, without them 0.024 +- 0.050 over
# seeds 10-19 (docs/privacy.md), which still keeps the task's default faithful (config.FAITHFUL_BY_DEFAULT).
SIGNED_SCRAMBLE = False


class GearsLite(nn.Module):
  """``__call__((x [B, G] control expression, perts [B, P] gene indices, -1 = none)) -> [B, G]``."""

  num_genes: int
  gene_neighbors: np.ndarray  # [G, K] co-expression graph
  gene_weights: np.ndarray
  pert_neighbors: np.ndarray  # [G, K] perturbation graph
  pert_weights: np.ndarray
  dim: int = 32
  # Signed co-expression neighbourhood [G, K'] of each gene: a perturbation's direct spread to the
  # genes co-expressed with it (None: left out).
  spread_neighbors: np.ndarray | None = None
  spread_weights: np.ndarray | None = None

  @nn.compact
  def __call__(self, inputs):
    x, perts = inputs
    gnb, gw = jnp.asarray(self.gene_neighbors), jnp.asarray(self.gene_weights)
    pnb, pw = jnp.asarray(self.pert_neighbors), jnp.asarray(self.pert_weights)
    init = nn.initializers.normal(0.3)
    gene_emb = self.param("gene_embedding", init, (self.num_genes, self.dim))
    # Zero start: a gene never perturbed in training keeps a zero own embedding and is represented
    # only through its graph neighbours and its gene embedding, not by untrained noise.
    pert_emb = self.param("pert_embedding", nn.initializers.zeros, (self.num_genes, self.dim))
    h = nn.silu(nn.Dense(self.dim, name="gene_gnn_0")(mean_aggregate(gene_emb, gnb, gw)))
    h = nn.Dense(self.dim, name="gene_gnn_1")(mean_aggregate(h, gnb, gw))  # [G, D]
    p = nn.silu(nn.Dense(self.dim, name="pert_gnn_0")(mean_aggregate(pert_emb, pnb, pw) + h))
    p = nn.Dense(self.dim, name="pert_gnn_1")(mean_aggregate(p, pnb, pw))  # [G, D]
    valid = (perts >= 0).astype(p.dtype)  # [B, P]
    slot_pert = p[jnp.maximum(perts, 0)]  # [B, P, D]
    slot_pert = nn.Dense(self.dim, name="pert_mlp_1")(nn.silu(nn.Dense(self.dim, name="pert_mlp_0")(slot_pert)))
    cell_pert = jnp.sum(slot_pert * valid[..., None], axis=1)  # [B, D]: additive over perturbed genes
    gene_w = self.param("gene_out_weight", nn.initializers.normal(0.3), (self.num_genes, self.dim))
    gene_code = nn.Dense(self.dim, name="decoder_1")(nn.silu(nn.Dense(self.dim, name="decoder_0")(h))) + gene_w
    # Cell state sets a response gain in [0.5, 1.5] (cell types respond with different strengths); bounded
    # away from 0 so that a saturated gain cannot switch every change off.
    gain = 1.0 + 0.5 * jnp.tanh(nn.Dense(1, name="gain_1")(nn.silu(nn.Dense(self.dim, name="gain_0")(x))))  # [B, 1]
    change = cell_pert @ gene_code.T  # [B, G]
    # Direct terms, per target gene and shared by all perturbations, so they carry over to genes
    # never perturbed in training: the perturbed gene itself, and its signed co-expression spread.
    onehot = jnp.sum(jax.nn.one_hot(perts, self.num_genes) * valid[..., None], axis=1)  # [B, G]
    change = change + self.param("self_effect", nn.initializers.zeros, (self.num_genes,)) * onehot
    if self.spread_neighbors is not None:
      snb, sw = jnp.asarray(self.spread_neighbors), jnp.asarray(self.spread_weights)
      rows = jnp.maximum(perts, 0)  # [B, P]
      contrib = sw[rows] * valid[..., None]  # [B, P, K']
      spread = jax.vmap(lambda idx, c: jnp.zeros((self.num_genes,), x.dtype).at[idx.reshape(-1)].add(c.reshape(-1)))(
          snb[rows], contrib)
      change = change + self.param("spread_effect", nn.initializers.zeros, (self.num_genes,)) * spread
    return x + gain * change


def make_perturbation_model(num_genes, gene_graph, pert_graph, *, dim: int = 32, key_strength: float = 5.0,
                            variant: str = "modulation", spread_graph=None):
  spread = spread_graph if spread_graph is not None else (None, None)
  plain = GearsLite(num_genes, gene_graph[0], gene_graph[1], pert_graph[0], pert_graph[1], dim, spread[0], spread[1])
  return keyed(plain, key_strength=key_strength, variant=variant, film_skip=("decoder_1", "gain_1"))


def perturbation_task(model) -> Task:
  """Client data ``{"x": [N, G] control, "perts": [N, 2] int, "y": [N, G] perturbed}``; masked MSE."""

  def loss(params, model_state, batch, mask, rng, context):
    pred = model.apply({"params": params, **model_state}, (batch["x"], batch["perts"]), key_coords=context)
    err = jnp.mean(jnp.square(pred - batch["y"]), -1)
    return jnp.sum(err * mask) / jnp.maximum(mask.sum(), 1.0), model_state

  return Task(loss=loss)


def top_de_genes(control_mean: np.ndarray, perturbed_mean: np.ndarray, n: int = 20) -> np.ndarray:
  """The n genes of largest absolute mean change from control (GEARS uses a test; the simulation knows the truth)."""
  return np.argsort(-np.abs(perturbed_mean - control_mean), kind="stable")[:n]


def perturbation_metrics(control_mean: np.ndarray, true_mean: np.ndarray, pred_mean: np.ndarray,
                         n_de: int = 20) -> dict[str, float]:
  """MSE over all genes, MSE on the top-``n_de`` DE genes, Pearson of predicted vs true change from control."""
  de = top_de_genes(control_mean, true_mean, n_de)
  true_delta, pred_delta = true_mean - control_mean, pred_mean - control_mean
  if np.std(pred_delta) < 1e-12 or np.std(true_delta) < 1e-12:
    pearson = 0.0
  else:
    pearson = float(np.corrcoef(true_delta, pred_delta)[0, 1])
  return {"mse": float(np.mean((pred_mean - true_mean) ** 2)),
          "mse_top20_de": float(np.mean((pred_mean[de] - true_mean[de]) ** 2)),
          "pearson_delta": pearson}


# --------------------------------------------------------------------------------------------
# The runner


def _paired_controls(data, cell_types: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """A random control cell for each perturbed cell, of the same cell type where one exists (GEARS pairs randomly)."""
  rows = np.empty(len(cell_types), np.int64)
  for t in np.unique(cell_types):
    pool = np.flatnonzero(data.control_cell_type == t)
    pool = pool if len(pool) else np.arange(len(data.control))
    where = np.flatnonzero(cell_types == t)
    rows[where] = rng.choice(pool, len(where))
  return rows


def condition_name(cond: tuple) -> str:
  return "+".join(cond) if len(cond) == 2 else f"{cond[0]}+ctrl"


def _perturbation_examples(data, conditions, rng):
  xs, ps, ys, conds = [], [], [], []
  for cond in conditions:
    y = data.cells[cond]
    idx = data.gene_index(cond)
    xs.append(data.control[_paired_controls(data, data.cell_type[cond], rng)])
    ps.append(np.tile(np.array(idx + [-1] * (2 - len(idx)), np.int32), (len(y), 1)))
    ys.append(y)
    conds += [condition_name(cond)] * len(y)
  return {"x": np.concatenate(xs).astype(np.float32), "perts": np.concatenate(ps), "y": np.concatenate(ys)}, conds


def _build_model(config: TrainConfig, data):
  # Co-expression in control cells: the gene graph, and (no Gene Ontology offline) the perturbation graph.
  corr = np.nan_to_num(np.corrcoef(data.control.T))
  graph = sparsify_similarity(np.abs(corr), config.graph_neighbors)
  spread_nb, _ = sparsify_similarity(np.abs(corr), 2 * config.graph_neighbors)
  spread = (spread_nb, np.take_along_axis(corr, spread_nb, 1).astype(np.float32))
  return make_perturbation_model(data.n_genes, graph, graph, dim=config.embed_dim,
                                 key_strength=config.key_strength, variant=config.variant, spread_graph=spread)


def run(config: TrainConfig, workdir, key: keylib.SecretKey, *, resume: bool = False,
        stop_after_round: int | None = None, show_progress: bool | None = None) -> dict:
  from infl_jax.data.perturbation import load_perturbation

  workdir = pathlib.Path(workdir)
  check_key_version(config, key)
  data = load_perturbation(config.dataset, seed=config.seed)
  n_clients = config.n_clients or 3
  if len(data.train_conditions) < n_clients:
    raise UserInputError(f"{len(data.train_conditions)} training conditions cannot fill {n_clients} clients;"
                         " lower --n-clients")
  if config.key_scheme == "faithful" and not resume:
    print(f"note: the perturbation task trains under the published (faithful) key scheme, where a guessed key scores "
          f"as the right one; {FAITHFUL_BY_DEFAULT['perturbation']} (docs/privacy.md); --key-scheme hardened "
          "chooses it", file=sys.stderr)
  rng = np.random.default_rng(config.seed)
  raw = data
  data = client_data_view(raw, client_view(key, config.key_scheme, raw.n_genes, signed=SIGNED_SCRAMBLE))
  model = _build_model(config, data)  # from the clients' data: under hardened, its gene graph is scrambled too
  # Each client (lab) holds its own perturbations: training conditions dealt round-robin.
  order = rng.permutation(len(data.train_conditions))
  per_client = [_perturbation_examples(data, [data.train_conditions[i] for i in order[c::n_clients]], rng)[0]
                for c in range(n_clients)]
  clients = stack_clients(per_client, key_version=config.key_version)
  algo = algorithm_from_config(config, perturbation_task(model))
  init_rng, server_rng = jax.random.split(jax.random.key(config.seed))
  dummy = (jnp.zeros((2, data.n_genes), jnp.float32), jnp.array([[0, -1], [0, 1]], jnp.int32))
  result = train_federated(config, workdir, algo, model.init(init_rng, dummy, key_coords=None), clients,
                           jnp.asarray(key.coords), rng=server_rng, resume=resume, stop_after_round=stop_after_round,
                           show_progress=show_progress)
  if stopped := stopped_early(result, config):
    return stopped
  summary = _evaluate(config, workdir, key, model, raw, global_variables(result.state))
  summary.update(client_sizes=[len(c["y"]) for c in per_client], **training_record(result, config))
  return write_summary(workdir, summary)


def client_data_view(data, view: KeyView):
  """``data`` as ``view`` holds it: under ``hardened`` every cell's genes scrambled and the gene names in the
  scrambled order, so a perturbation's gene indices point where its genes now sit; unchanged otherwise."""
  if view.scramblers is None:
    return data
  if not isinstance(view.scramblers[""], InputScrambler):  # TrainConfig.validate refuses it for the CLI
    raise UserInputError(f"--key-scheme mixed is not available for --task perturbation: {NO_MIXING['perturbation']}")
  order = view.scramblers[""].permutation
  return dataclasses.replace(data, gene_names=[data.gene_names[i] for i in order], control=view.inputs(data.control),
                             cells={cond: view.inputs(cells) for cond, cells in data.cells.items()})


def _predict(model, variables, test: dict, key_coords, batch: int = 256) -> np.ndarray:
  """Predictions in fixed-size batches, so one compiled function serves every batch."""
  apply = jax.jit(lambda v, x, p, c: model.apply(v, (x, p), key_coords=c))
  outs = []
  for start in range(0, len(test["x"]), batch):
    x, p = test["x"][start:start + batch], test["perts"][start:start + batch]
    pad = batch - len(x)
    x = np.concatenate([x, np.zeros((pad, x.shape[1]), x.dtype)]) if pad else x
    p = np.concatenate([p, -np.ones((pad, 2), p.dtype)]) if pad else p
    outs.append(np.asarray(apply(variables, x, p, key_coords))[: batch - pad])
  return np.concatenate(outs)


def _score(data, control_mean, pred_mean_of) -> dict:
  """Mean metrics over held-out single and combo conditions; ``pred_mean_of(cond)`` None skips one."""
  rows = {"single": [], "combo": []}
  for cond in data.test_conditions:
    pred_mean = pred_mean_of(cond)
    if pred_mean is not None:
      rows["single" if len(cond) == 1 else "combo"].append(
          perturbation_metrics(control_mean, data.cells[cond].mean(0), pred_mean))
  summary = {}
  for kind, metrics in list(rows.items()) + [("all", rows["single"] + rows["combo"])]:
    if metrics:
      summary[kind] = {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]} | {"n_conditions": len(metrics)}
  return summary


def _evaluate(config: TrainConfig, workdir: pathlib.Path, key, model, data, variables) -> dict:
  """Held-out conditions under the four ways to run the model, the baselines, and the .h5ad."""
  def examples(view: KeyView):  # the same paired controls for every view
    return _perturbation_examples(client_data_view(data, view), data.test_conditions,
                                  np.random.default_rng(config.seed + 1))

  def predict(view: KeyView):
    """Predicted cells in the genes' own order (a view's scrambled predictions unscrambled by its own key)."""
    pred = _predict(model, variables, examples(view)[0], None if view.coords is None else jnp.asarray(view.coords))
    return pred if view.scramblers is None else unscramble(pred, view.scramblers[""])

  test, test_conditions = examples(KeyView(None))
  test_conditions = np.asarray(test_conditions)
  control_mean = data.control.mean(0)
  train_set = set(data.train_conditions)

  def mean_of(pred_cells):
    return lambda cond: pred_cells[test_conditions == condition_name(cond)].mean(0)

  views = study_views(key, config.key_scheme, data.n_genes, seed=config.seed, signed=SIGNED_SCRAMBLE)
  predictions = {name: predict(view) for name, view in views.items()}
  results = {name: _score(data, control_mean, mean_of(pred)) for name, pred in predictions.items()}

  def additive(cond):
    if len(cond) != 2 or not all((g,) in train_set for g in cond):
      return None
    return control_mean + sum(data.cells[(g,)].mean(0) - control_mean for g in cond)

  baselines = {"no_change_control_mean": _score(data, control_mean, lambda cond: control_mean),
               "sum_of_single_effects_combos_with_both_singles_seen": _score(data, control_mean, additive)}
  right_pred = predictions["right_key"]
  ours = [perturbation_metrics(control_mean, data.cells[c].mean(0), mean_of(right_pred)(c))
          for c in data.test_conditions if additive(c) is not None]
  if ours:
    baselines["infl_right_key_on_the_same_combos"] = {k: float(np.mean([m[k] for m in ours])) for k in ours[0]}
  h5ad = write_h5ad(workdir / "infl_perturbation.h5ad", test["y"], {"condition": test_conditions}, data.gene_names,
                    {}, layers={"infl_prediction": right_pred, "paired_control": test["x"]},
                    uns={"simulated": int(data.simulated)})
  return {"task": "perturbation", "dataset": config.dataset, "key_scheme": config.key_scheme, "description": data.description,
          "simulated": data.simulated, "train_conditions": ["+".join(c) for c in data.train_conditions],
          "held_out_conditions": [condition_name(c) for c in data.test_conditions],
          "held_out": results, "baselines": baselines, "h5ad": str(h5ad)}


def format_summary(summary: dict) -> str:
  """Readable lines: MSE, top-20-DE MSE and Pearson of the change per way of running the model and baseline."""
  lines = [f"perturbation on {summary['dataset']} after {summary['rounds']} rounds:"
           + (" (SIMULATED data)" if summary["simulated"] else "")]
  for group, table in (("federated", summary["held_out"]), ("baseline", summary["baselines"])):
    for name, kinds in table.items():
      for kind, m in (kinds.items() if "mse" not in kinds else [("combos", kinds)]):
        lines.append(f"  {group:<9s} {name:<22s} {kind:<7s} MSE {m['mse']:.4f}  top-20 DE MSE {m['mse_top20_de']:.4f}"
                     f"  Pearson delta {m['pearson_delta']:.3f}")
  return "\n".join(lines)
