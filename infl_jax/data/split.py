"""``FederatedSplit``: train data partitioned over clients, plus held-out validation and test.

Order of operations (``make_federated_split``), chosen so central and federated training see
exactly the same training samples:

1. hold out test and validation samples, stratified by label (seeded);
2. partition the remaining training samples over clients (by a column, IID, Dirichlet label skew,
   or K classes per client), with its own seed stream, so changing the partition never moves a sample
   between train and held-out;
3. fit preprocessing on the pooled training samples only and apply it to all three splits.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from infl_jax.data import partition as partition_lib
from infl_jax.data.errors import DataError, preview
from infl_jax.data.preprocess import Preprocessor, check_finite

__all__ = ["PARTITIONS", "FederatedSplit", "make_federated_split"]

PARTITIONS = ("column", "iid", "dirichlet", "dirichlet-balanced", "label-skew")


@dataclasses.dataclass
class FederatedSplit:
  """Preprocessed arrays of one federated experiment (numpy; move them to device yourself).

  Training rows are grouped by client (client 0's rows first); ``train_client[i]`` is the
  client holding row i. ``*_ids`` are the sample names (AnnData obs_names) of each row.
  """

  train_x: np.ndarray  # float32 [N, F]
  train_y: np.ndarray  # int32 [N]
  train_client: np.ndarray  # int32 [N]
  val_x: np.ndarray
  val_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray
  feature_names: list[str]
  class_names: list[str]
  client_names: list[str]
  preprocessing: Preprocessor
  description: str = ""
  train_ids: np.ndarray | None = None
  val_ids: np.ndarray | None = None
  test_ids: np.ndarray | None = None
  config: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def n_clients(self) -> int:
    return len(self.client_names)

  @property
  def n_features(self) -> int:
    return int(self.train_x.shape[1])

  @property
  def n_classes(self) -> int:
    return len(self.class_names)

  def client_sizes(self) -> np.ndarray:
    """Training samples per client, int64 [n_clients] (the n_k of weighted FedAvg)."""
    return np.bincount(self.train_client, minlength=self.n_clients)

  def client_arrays(self) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(x_k, y_k)]`` per client, in client order."""
    return [(self.train_x[self.train_client == k], self.train_y[self.train_client == k])
            for k in range(self.n_clients)]

  def padded_client_arrays(self, pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clients stacked for ``jax.vmap``: x [K, M, F], y [K, M], mask [K, M] (True = real row).

    M is the largest client size (or ``pad_to``); padding rows are zeros with label 0.
    """
    sizes = self.client_sizes()
    m = int(sizes.max()) if pad_to is None else int(pad_to)
    if m < sizes.max():
      raise DataError(f"pad_to={pad_to} is smaller than the largest client ({sizes.max()} samples)")
    x = np.zeros((self.n_clients, m, self.n_features), np.float32)
    y = np.zeros((self.n_clients, m), np.int32)
    mask = np.zeros((self.n_clients, m), bool)
    for k, (xk, yk) in enumerate(self.client_arrays()):
      x[k, :len(xk)], y[k, :len(yk)], mask[k, :len(xk)] = xk, yk, True
    return x, y, mask

  def client_label_counts(self) -> np.ndarray:
    """int64 [n_clients, n_classes]: how skewed the partition is."""
    counts = np.zeros((self.n_clients, self.n_classes), np.int64)
    np.add.at(counts, (self.train_client, self.train_y), 1)
    return counts

  def summary(self) -> str:
    """A readable table: one line per client with its size and class counts."""
    counts = self.client_label_counts()
    width = max(len(n) for n in self.client_names + ["client"])
    lines = [self.description, f"{'client':<{width}}  {'n':>5}  class counts ({', '.join(self.class_names)})"]
    for name, row in zip(self.client_names, counts):
      lines.append(f"{name:<{width}}  {row.sum():>5}  {' '.join(str(c) for c in row)}")
    lines.append(f"{'val':<{width}}  {len(self.val_y):>5}  {' '.join(str(c) for c in np.bincount(self.val_y, minlength=self.n_classes))}")
    lines.append(f"{'test':<{width}}  {len(self.test_y):>5}  {' '.join(str(c) for c in np.bincount(self.test_y, minlength=self.n_classes))}")
    return "\n".join(lines)


def make_federated_split(
    x,
    y,
    *,
    partition: str = "iid",
    n_clients: int | None = None,
    groups: Sequence | None = None,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    seed: int = 0,
    preprocessor: Preprocessor | None = None,
    min_client_size: int = 2,
    feature_names: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    sample_ids: Sequence[str] | None = None,
    description: str = "",
) -> FederatedSplit:
  """Builds a ``FederatedSplit`` from plain arrays: x [N, F] numeric, y [N] class ids 0..C-1.

  ``groups`` (per-sample site/plate/patient values) is required for ``partition="column"``;
  ``alpha`` is used by ``"dirichlet"`` and ``"dirichlet-balanced"``, ``classes_per_client`` by ``"label-skew"``.
  ``preprocessor`` is an unfitted ``Preprocessor`` (default: standardise only); it is
  fitted here on the training rows.
  """
  if partition not in PARTITIONS:
    raise DataError(f"unknown partition {partition!r}; choose --partition from {', '.join(PARTITIONS)}")
  x, y, feature_names, class_names = _checked_arrays(x, y, feature_names, class_names)
  n, f = x.shape
  sample_ids = np.asarray(sample_ids, dtype=str) if sample_ids is not None else np.array([str(i) for i in range(n)])
  preprocessor = _unfitted_preprocessor(preprocessor)
  # Check all rows up front so the error counts every bad value, not only the training ones.
  check_finite(x, feature_names, allow_nan=preprocessor.impute is not None)

  holdout_seed, partition_seed = np.random.SeedSequence(seed).spawn(2)
  train, val, test = partition_lib.stratified_holdout(
      y, val_fraction, test_fraction, np.random.default_rng(holdout_seed), class_names=class_names)
  client, client_names = _partition_training_rows(
      partition, y[train], train, groups, n_samples=n, n_clients=n_clients, alpha=alpha,
      classes_per_client=classes_per_client, min_client_size=min_client_size, rng=np.random.default_rng(partition_seed))
  sizes = _nonempty_client_sizes(client, client_names)

  # Group the training rows by client (client 0's first), as FederatedSplit promises.
  order = np.argsort(client, kind="stable")
  train, client = train[order], client[order]
  train_x, val_x, test_x = _fit_on_train_and_transform(preprocessor, x, feature_names, train, val, test)
  kept_names = preprocessor.selected_names(feature_names)
  detail = {"dirichlet": f", alpha={alpha}", "dirichlet-balanced": f", alpha={alpha}",
            "label-skew": f", {classes_per_client} classes per client"}
  auto = (f"{n} samples x {f} features, {len(class_names)} classes; train {len(train)} over {len(client_names)}"
          f" clients ({partition}{detail.get(partition, '')}; sizes"
          f" {', '.join(map(str, sizes))}), val {len(val)}, test {len(test)}; seed {seed}; preprocessing:"
          f" {preprocessor.describe()}; {len(kept_names)} features kept")
  return FederatedSplit(
      train_x=train_x, train_y=y[train].astype(np.int32), train_client=client.astype(np.int32),
      val_x=val_x, val_y=y[val].astype(np.int32),
      test_x=test_x, test_y=y[test].astype(np.int32),
      feature_names=kept_names, class_names=list(class_names), client_names=list(client_names),
      preprocessing=preprocessor, description=f"{description}: {auto}" if description else auto,
      train_ids=sample_ids[train], val_ids=sample_ids[val], test_ids=sample_ids[test],
      config={"partition": partition, "n_clients": len(client_names), "alpha": alpha,
              "classes_per_client": classes_per_client if partition == "label-skew" else None,
              "val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed,
              "min_client_size": min_client_size})


def _checked_arrays(x, y, feature_names, class_names):
  """(x, y, feature names, class names) as arrays and lists, or an error naming what is wrong."""
  x = np.asarray(x)
  y = np.asarray(y)
  if x.ndim != 2:
    raise DataError(f"x must be 2-D [samples, features], got shape {x.shape}")
  if y.shape != (x.shape[0],):
    raise DataError(f"y must have one label per row of x: x has {x.shape[0]} rows, y has shape {y.shape}")
  if not np.issubdtype(y.dtype, np.integer):
    raise DataError(f"y must hold integer class ids, got dtype {y.dtype}")
  n, f = x.shape
  feature_names = [str(v) for v in feature_names] if feature_names is not None else [f"f{i}" for i in range(f)]
  if len(feature_names) != f:
    raise DataError(f"{len(feature_names)} feature_names for {f} features")
  n_classes = int(y.max()) + 1 if n else 0
  class_names = [str(c) for c in class_names] if class_names is not None else [str(c) for c in range(n_classes)]
  if y.min(initial=0) < 0 or n_classes > len(class_names):
    raise DataError(f"y must hold class ids in 0..{len(class_names) - 1}, got range {y.min()}..{y.max()}")
  if len(np.unique(y)) < 2:
    raise DataError(f"the labels hold a single class ({class_names[int(y[0])] if n else 'no samples'}); a classifier needs at least 2")
  return x, y, feature_names, class_names


def _unfitted_preprocessor(preprocessor: Preprocessor | None) -> Preprocessor:
  """The caller's preprocessor (default: standardise only), which must not be fitted yet."""
  preprocessor = preprocessor if preprocessor is not None else Preprocessor()
  if preprocessor.fitted:
    raise DataError("pass an unfitted Preprocessor: it is fitted here on the training split only")
  return preprocessor


def _partition_training_rows(partition, train_y, train, groups, *, n_samples, n_clients, alpha, classes_per_client,
                             min_client_size, rng) -> tuple[np.ndarray, list[str]]:
  """(client id per training row, client names) for the chosen partition."""
  if partition == "column":
    return _partition_by_groups(groups, train, train_y, n_samples=n_samples, n_clients=n_clients, rng=rng)
  if n_clients is None:
    raise DataError(f"--partition {partition} needs n_clients: pass --n-clients N (n_clients=N in Python)")
  if partition == "iid":
    client = partition_lib.partition_iid(train_y, n_clients, rng)
  elif partition == "label-skew":
    client = partition_lib.partition_label_skew(train_y, n_clients, classes_per_client, rng)
  elif partition == "dirichlet-balanced":
    client = partition_lib.partition_dirichlet_balanced(train_y, n_clients, alpha, rng)
  else:
    client = partition_lib.partition_dirichlet(train_y, n_clients, alpha, rng, min_size=min_client_size)
  return client, [f"client{k}" for k in range(int(n_clients))]


def _partition_by_groups(groups, train, train_y, *, n_samples, n_clients, rng) -> tuple[np.ndarray, list[str]]:
  """Clients from per-sample group values (site/plate/patient); every group must keep training rows."""
  if groups is None:
    # Only reachable from Python: load_dataset always passes the --client-key column's values.
    raise DataError("partition 'column' needs the per-sample group values: pass groups= (one site/plate/patient"
                    " value per sample)")
  groups = np.asarray(groups, dtype=object)
  if len(groups) != n_samples:
    raise DataError(f"groups has {len(groups)} values for {n_samples} samples")
  train_groups = groups[train]
  lost = sorted(set(map(str, groups)) - set(map(str, train_groups)))
  if lost:
    raise DataError(
        f"client group(s) {preview([repr(g) for g in lost])} have no training samples after holding out"
        " val/test (too few samples); merge or drop those groups, or lower --val-fraction/--test-fraction")
  return partition_lib.partition_by_column(train_groups, n_clients, rng, y=train_y)


def _nonempty_client_sizes(client: np.ndarray, client_names: Sequence[str]) -> np.ndarray:
  """Training rows per client; a client without any is an error (it could not train)."""
  sizes = np.bincount(client, minlength=len(client_names))
  if (sizes == 0).any():
    empty = [client_names[k] for k in np.flatnonzero(sizes == 0)]
    raise DataError(f"client(s) {preview(empty)} got no training samples; lower --n-clients or change --partition")
  return sizes


def _fit_on_train_and_transform(preprocessor: Preprocessor, x: np.ndarray, feature_names: list[str], train: np.ndarray,
                                val: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Fits ``preprocessor`` on the training rows only (no held-out leakage) and applies it to all three splits."""
  preprocessor.fit(x[train], feature_names)
  return tuple(preprocessor.transform(x[rows], feature_names) for rows in (train, val, test))
