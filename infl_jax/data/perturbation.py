"""Perturbation-response data: control cells, perturbed cells, and their conditions.

Real data: a GEARS / scPerturb-style AnnData whose ``obs["condition"]`` reads ``ctrl``,
``A+ctrl`` (single) or ``A+B`` (combination), with log-normalised expression in ``X``.

Built-in ``perturbation_sim`` is SIMULATED: real PBMC control cells (scanpy's pbmc68k_reduced,
log1p-normalised) with perturbation effects we define, so the truth is known. Perturbing gene A
shifts a sparse downstream set of genes: the genes most co-expressed with A in the control cells,
each by ``strength * corr(A, g)`` and scaled per cell type (cell types respond with different
gains). A combination A+B adds both single effects plus, for some pairs, an interaction on the
genes downstream of both. Held out: some single perturbations and some combinations (with both,
one or none of their singles seen in training).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from infl_jax.data.errors import DataError

__all__ = ["PerturbationData", "parse_condition", "load_perturbation", "simulate_pbmc_perturbations"]

CONTROL = "ctrl"


def parse_condition(condition: str) -> tuple[str, ...]:
  """``"ctrl"`` -> (), ``"A+ctrl"``/``"ctrl+A"`` -> ("A",), ``"A+B"`` -> ("A", "B") (sorted)."""
  parts = [p.strip() for p in str(condition).split("+") if p.strip()]
  if not parts:
    raise DataError(f"empty condition {condition!r}; use 'ctrl', 'GENE+ctrl' or 'GENE1+GENE2'")
  genes = tuple(sorted(p for p in parts if p != CONTROL))
  if len(genes) > 2:
    raise DataError(f"condition {condition!r} perturbs {len(genes)} genes; at most 2 are supported")
  return genes


@dataclasses.dataclass
class PerturbationData:
  """Cells by condition. ``control``: [n_ctrl, G] log expression; ``cells[cond]``: [n, G] perturbed cells."""

  gene_names: list[str]
  control: np.ndarray
  control_cell_type: np.ndarray  # int [n_ctrl] (zeros when unknown)
  cells: dict[tuple[str, ...], np.ndarray]
  cell_type: dict[tuple[str, ...], np.ndarray]
  train_conditions: list[tuple[str, ...]]
  test_conditions: list[tuple[str, ...]]
  simulated: bool
  description: str

  @property
  def n_genes(self) -> int:
    return len(self.gene_names)

  def gene_index(self, genes) -> list[int]:
    lookup = {g: i for i, g in enumerate(self.gene_names)}
    missing = [g for g in genes if g not in lookup]
    if missing:
      raise DataError(f"perturbed gene(s) {missing} are not in the expression panel; keep them among the genes")
    return [lookup[g] for g in genes]


def simulate_pbmc_perturbations(*, seed: int = 0, n_perturbed_genes: int = 24, n_downstream: int = 25,
                                strength: float = 1.5, cells_per_condition: int = 120, n_combos: int = 24,
                                noise: float = 0.1) -> PerturbationData:
  """The SIMULATED built-in (see the module docstring)."""
  from infl_jax.data.builtin import load_builtin_anndata

  adata = load_builtin_anndata("pbmc")
  x = np.asarray(adata.X, np.float64)
  types, cell_type = np.unique(adata.obs["bulk_labels"].astype(str).to_numpy(), return_inverse=True)
  genes = [str(g) for g in adata.var_names]
  rng = np.random.default_rng(seed)
  corr = np.nan_to_num(np.corrcoef(x.T))
  np.fill_diagonal(corr, 0.0)
  # Perturb well-expressed genes with clear co-expression partners.
  candidates = np.argsort(-(x > 0).mean(0) * np.sort(np.abs(corr), 1)[:, -n_downstream:].mean(1))[:4 * n_perturbed_genes]
  perturbed = np.sort(rng.choice(candidates, n_perturbed_genes, replace=False))
  type_gain = rng.uniform(0.6, 1.4, len(types))

  def single_effect(a):
    down = np.argsort(-np.abs(corr[a]))[:n_downstream]
    e = np.zeros(x.shape[1])
    e[down] = strength * corr[a, down] / np.abs(corr[a, down]).max()
    e[a] = -strength  # the knocked-down gene itself
    return e

  effects = {(genes[a],): single_effect(a) for a in perturbed}
  pairs = set()
  while len(pairs) < n_combos:
    a, b = sorted(rng.choice(perturbed, 2, replace=False))
    pairs.add((genes[a], genes[b]))
  pairs = sorted(pairs)
  for a, b in pairs:
    e = effects[(a,)] + effects[(b,)]
    if rng.random() < 0.5:  # interaction on the genes downstream of both
      shared = (effects[(a,)] != 0) & (effects[(b,)] != 0)
      e = e + 0.5 * np.where(shared, np.sign(e), 0.0)
    effects[(a, b)] = e

  def cells_for(condition):
    rows = rng.choice(len(x), cells_per_condition)
    gain = type_gain[cell_type[rows]][:, None]
    y = x[rows] + gain * effects[condition][None] + rng.normal(0, noise, (len(rows), x.shape[1]))
    return np.clip(y, 0.0, None).astype(np.float32), cell_type[rows]

  cells, ctypes = {}, {}
  for condition in effects:
    cells[condition], ctypes[condition] = cells_for(condition)
  singles = [c for c in effects if len(c) == 1]
  held_singles = set(rng.choice(len(singles), len(singles) // 4, replace=False).tolist())
  test_singles = [singles[i] for i in sorted(held_singles)]
  unseen = {g for (g,) in test_singles}
  combos = [c for c in effects if len(c) == 2]
  rng.shuffle(combos)
  # Hold out every combination with an unseen single, and a third of the others.
  test_combos = [c for c in combos if set(c) & unseen]
  rest = [c for c in combos if not set(c) & unseen]
  test_combos += rest[: len(rest) // 3]
  train = [c for c in singles if c not in test_singles] + rest[len(rest) // 3:]
  test = test_singles + sorted(test_combos)
  return PerturbationData(
      genes, x.astype(np.float32), cell_type, cells, ctypes, sorted(train), test, True,
      f"SIMULATED perturbations on real PBMC control cells (pbmc68k_reduced, {x.shape[0]} cells x {x.shape[1]} genes):"
      f" {len(singles)} single-gene and {len(combos)} two-gene perturbations with known effects; train"
      f" {len(train)} conditions, held out {len(test_singles)} singles and {len(test_combos)} combinations")


def load_perturbation(source="perturbation_sim", *, seed: int = 0, condition_key: str = "condition",
                      test_fraction: float = 0.25, cell_type_key: str | None = None,
                      split_key: str | None = "split") -> PerturbationData:
  """The simulated built-in, or a GEARS/scPerturb-style AnnData/h5ad (log-normalised X).

  Held-out conditions: those whose cells ``obs[split_key]`` marks ``"test"`` if that column exists,
  else a seeded ``test_fraction`` of the conditions.
  """
  if isinstance(source, str) and source == "perturbation_sim":
    return simulate_pbmc_perturbations(seed=seed)
  from infl_jax.data import anndata_io

  adata = anndata_io.as_anndata(source)
  conditions = anndata_io.obs_column(adata, condition_key, "condition").astype(str)
  x, genes = anndata_io.feature_matrix(adata)
  if not np.isfinite(x).all():
    raise DataError("X holds NaN/inf; perturbation regression needs complete log-normalised expression")
  parsed = np.array([parse_condition(c) for c in conditions], dtype=object)
  is_ctrl = np.array([len(p) == 0 for p in parsed])
  if is_ctrl.sum() < 2:
    raise DataError(f"no control cells: obs[{condition_key!r}] needs cells labelled 'ctrl'")
  if cell_type_key is not None:
    _, ctype = np.unique(anndata_io.obs_column(adata, cell_type_key, "cell type").astype(str), return_inverse=True)
  else:
    ctype = np.zeros(len(x), np.int64)
  cells, ctypes = {}, {}
  for cond in sorted({p for p in parsed if len(p)}):
    rows = np.array([p == cond for p in parsed])
    cells[cond], ctypes[cond] = x[rows], ctype[rows]
  data = PerturbationData([str(g) for g in genes], x[is_ctrl], ctype[is_ctrl], cells, ctypes, [], [], False, "")
  data.gene_index({g for c in cells for g in c})  # every perturbed gene must be in the panel
  rng = np.random.default_rng(seed)
  conds = list(cells)
  if len(conds) < 2:
    raise DataError("need at least 2 perturbation conditions (one to train on, one to hold out)")
  if split_key is not None and split_key in adata.obs.columns:
    # A given split (GEARS-style): a condition is held out if its cells are marked "test".
    split = anndata_io.obs_column(adata, split_key, "split").astype(str)
    held = {p for p, s_ in zip(parsed, split) if len(p) and s_ == "test"}
    if not held or held == set(conds):
      raise DataError(f"obs[{split_key!r}] must mark some but not all conditions 'test'")
    data.test_conditions = sorted(held)
    data.train_conditions = sorted(c for c in conds if c not in held)
  else:
    order = rng.permutation(len(conds))
    n_test = max(1, int(round(test_fraction * len(conds))))
    data.test_conditions = sorted(conds[i] for i in order[:n_test])
    data.train_conditions = sorted(conds[i] for i in order[n_test:])
  data.description = (f"{source if isinstance(source, str) else 'AnnData'}: {int(is_ctrl.sum())} control cells,"
                      f" {len(conds)} conditions ({len(data.train_conditions)} train, {len(data.test_conditions)} held out)")
  return data
