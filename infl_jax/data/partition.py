"""Who gets which sample: stratified held-out splits and client partitions.

Every function takes integer labels ``y`` (or per-sample group values) and a seed or a
``numpy.random.Generator``, and returns plain integer arrays, so the same partition can be
rebuilt from the seed alone. Client ids run from 0 to ``n_clients - 1``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from infl_jax.data.errors import DataError, preview

__all__ = [
    "as_rng",
    "partition_by_column",
    "partition_dirichlet",
    "partition_dirichlet_balanced",
    "partition_iid",
    "partition_label_skew",
    "stratified_holdout",
]


def as_rng(rng: int | np.random.Generator | None) -> np.random.Generator:
  if isinstance(rng, np.random.Generator):
    return rng
  if rng is None or isinstance(rng, (int, np.integer)):
    return np.random.default_rng(rng)
  raise DataError(f"rng must be an int seed or a numpy.random.Generator, got {type(rng).__name__}")


def _check_labels(y) -> np.ndarray:
  y = np.asarray(y)
  if y.ndim != 1:
    raise DataError(f"labels must be a 1-D array of class ids, got shape {y.shape}")
  if y.size and not np.issubdtype(y.dtype, np.integer):
    raise DataError(f"labels must be integer class ids, got dtype {y.dtype}; encode them first")
  return y


def _check_n_clients(n_clients, n_samples: int, what: str = "samples") -> int:
  if not isinstance(n_clients, (int, np.integer)) or n_clients < 1:
    raise DataError(f"--n-clients must be a positive integer, got {n_clients!r}")
  if n_clients > n_samples:
    raise DataError(
        f"--n-clients {n_clients} is more than the {n_samples} training {what}, so some client would"
        " get no data; lower --n-clients or --val-fraction/--test-fraction (n_clients=, val_fraction=,"
        " test_fraction= in Python)")
  return int(n_clients)


def _check_alpha(alpha) -> None:
  if not alpha > 0 or not np.isfinite(alpha):
    raise DataError(f"Dirichlet --alpha must be a positive number (0.1 = strong skew, 100 = near IID), got {alpha}")


def stratified_holdout(y, val_fraction: float, test_fraction: float, rng=None,
                       class_names: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Splits sample indices into (train, val, test), each class in the same proportions.

  Per class: ``round(n_c * fraction)`` samples go to test and to val, at least one each when
  that fraction is positive, and at least one stays in train. Indices come back sorted.
  """
  y = _check_labels(y)
  for name, frac in (("val", val_fraction), ("test", test_fraction)):
    if not 0.0 <= frac < 1.0:
      raise DataError(f"--{name}-fraction ({name}_fraction= in Python) must be in [0, 1), got {frac}")
  if val_fraction + test_fraction >= 1.0:
    raise DataError(
        f"--val-fraction + --test-fraction = {val_fraction + test_fraction:.3g} leaves no training data;"
        " keep their sum below 1 (e.g. 0.15 and 0.2)")
  rng = as_rng(rng)
  need = 1 + (val_fraction > 0) + (test_fraction > 0)
  classes, counts = np.unique(y, return_counts=True)
  too_small = [(c, n) for c, n in zip(classes, counts) if n < need]
  if too_small:
    label = (lambda c: repr(class_names[c])) if class_names is not None else (lambda c: str(int(c)))
    listed = preview([f"{label(c)} ({n})" for c, n in too_small])
    raise DataError(
        f"too few samples to stratify: every class needs at least {need} samples (one each for"
        f" train{', val' if val_fraction > 0 else ''}{', test' if test_fraction > 0 else ''}),"
        f" but these have fewer: {listed}. Fix: drop rare classes with --min-class-count {need}"
        f" (min_class_count={need} in Python), merge them into a broader label, or lower --val-fraction")
  train, val, test = [], [], []
  for c, n in zip(classes, counts):
    idx = rng.permutation(np.flatnonzero(y == c))
    n_test = max(1, int(round(n * test_fraction))) if test_fraction > 0 else 0
    n_val = max(1, int(round(n * val_fraction))) if val_fraction > 0 else 0
    # Rounding up small classes must not eat the last training sample.
    while n_test + n_val > n - 1:
      if n_val > n_test or (n_val == n_test and n_val > 1):
        n_val -= 1
      else:
        n_test -= 1
    test.append(idx[:n_test])
    val.append(idx[n_test:n_test + n_val])
    train.append(idx[n_test + n_val:])
  cat = lambda parts: np.sort(np.concatenate(parts)).astype(np.int64)
  return cat(train), cat(val), cat(test)


def partition_iid(y, n_clients: int, rng=None) -> np.ndarray:
  """Client id per sample: a uniform random split into near-equal shares (sizes differ by <= 1)."""
  y = np.asarray(y)
  n = len(y)
  n_clients = _check_n_clients(n_clients, n)
  rng = as_rng(rng)
  client = np.empty(n, np.int32)
  for k, idx in enumerate(np.array_split(rng.permutation(n), n_clients)):
    client[idx] = k
  return client


def partition_dirichlet(y, n_clients: int, alpha: float = 0.5, rng=None, *, min_size: int = 2,
                        max_tries: int = 1000) -> np.ndarray:
  """Client id per sample with label skew: class c's samples split by proportions ~ Dir(alpha).

  Small alpha gives each client few classes; large alpha approaches IID. A draw that leaves a
  client with fewer than ``min_size`` samples is redrawn (up to ``max_tries`` times), so the
  result is a function of the seed alone.
  """
  y = _check_labels(y)
  n = len(y)
  n_clients = _check_n_clients(n_clients, n)
  _check_alpha(alpha)
  if min_size < 0:
    raise DataError(f"min_size must be >= 0, got {min_size}")
  if n_clients * min_size > n:
    raise DataError(
        f"{n_clients} clients x min_size {min_size} = {n_clients * min_size} samples needed, but only {n}"
        " training samples; lower n_clients (--n-clients) or min_size (min_client_size= in Python)")
  rng = as_rng(rng)
  class_indices = [np.flatnonzero(y == c) for c in np.unique(y)]
  sizes = None
  for _ in range(max_tries):
    client = np.empty(n, np.int32)
    for idx in class_indices:
      idx = rng.permutation(idx)
      shares = rng.dirichlet(np.full(n_clients, float(alpha)))
      cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
      for k, part in enumerate(np.split(idx, cuts)):
        client[part] = k
    sizes = np.bincount(client, minlength=n_clients)
    if sizes.min() >= min_size:
      return client
  worst = int(np.argmin(sizes))
  raise DataError(
      f"Dirichlet label skew (alpha={alpha}) left client {worst} with {sizes[worst]} samples (< min_size"
      f" {min_size}) in all {max_tries} draws; raise alpha (--alpha), lower --n-clients, or lower min_size"
      " (min_client_size= in Python)")


def partition_dirichlet_balanced(y, n_clients: int, alpha: float = 0.5, rng=None) -> np.ndarray:
  """Client id per sample with label skew at equal sizes: client k's class mix is ~ Dir(alpha) over the classes.

  The per-class ``partition_dirichlet`` leaves most clients empty once clients outnumber the samples of a
  class (100 sites, alpha 0.1); this is the scheme FL benchmarks use at that scale (Hsu et al. 2019): every
  client gets ``len(y) // n_clients`` samples (+1 for the first ``len(y) % n_clients``), drawn one at a time
  from its own class mix among the classes that still have samples left, so small alpha gives each client
  one or two classes and every sample is used. A function of the seed alone.
  """
  y = _check_labels(y)
  n = len(y)
  n_clients = _check_n_clients(n_clients, n)
  _check_alpha(alpha)
  rng = as_rng(rng)
  classes, y_class = np.unique(y, return_inverse=True)
  pools = [list(rng.permutation(np.flatnonzero(y_class == c))) for c in range(len(classes))]
  left = np.array([len(pool) for pool in pools], np.float64)
  mixes = rng.dirichlet(np.full(len(classes), float(alpha)), size=n_clients)
  capacity = np.full(n_clients, n // n_clients) + (np.arange(n_clients) < n % n_clients)
  client = np.empty(n, np.int32)
  # Clients draw in a random interleaving, so no client is left only the classes the others did not want.
  for k in rng.permutation(np.repeat(np.arange(n_clients), capacity)):
    weights = mixes[k] * (left > 0)
    if weights.sum() <= 0:  # its mix sits on exhausted classes only: take from what is left, by abundance
      weights = left
    c = rng.choice(len(classes), p=weights / weights.sum())
    client[pools[c].pop()] = k
    left[c] -= 1
  return client


def _label_skew_holders(counts: np.ndarray, n_clients: int, k: int, rng: np.random.Generator) -> list[list[int]]:
  """Per class, the clients holding it: ``n_clients * k`` slots dealt cyclically over the classes.

  Cycling through one class order makes any k consecutive slots (one client's) distinct classes and
  gives every class floor or ceil of slots / classes holders; the extra holders go to the largest
  classes, whose samples stretch furthest.
  """
  n_classes = len(counts)
  extra = (n_clients * k) % n_classes
  by_size = np.argsort(-(counts + rng.random(n_classes)), kind="stable")  # random tie-break
  order = np.concatenate([rng.permutation(by_size[:extra]), rng.permutation(by_size[extra:])])
  holders: list[list[int]] = [[] for _ in range(n_classes)]
  for slot in range(n_clients * k):
    holders[order[slot % n_classes]].append(slot // k)
  return holders


def partition_label_skew(y, n_clients: int, classes_per_client: int = 2, rng=None) -> np.ndarray:
  """Client id per sample with hard label skew: each client holds exactly ``classes_per_client`` classes.

  Classes are spread as evenly as possible (every class goes to at least one client) and each class's
  samples are split into near-equal shares between the clients holding it. A class with fewer
  samples than holders is dropped from the clients that hold other classes too (they keep fewer).
  """
  y = _check_labels(y)
  n_clients = _check_n_clients(n_clients, len(y))
  k = classes_per_client
  classes, counts = np.unique(y, return_counts=True)
  if not isinstance(k, (int, np.integer)) or k < 1:
    raise DataError(f"--classes-per-client must be a positive integer, got {k!r}")
  if k > len(classes):
    raise DataError(
        f"--classes-per-client {k} is more than the {len(classes)} classes in the training data; pass"
        f" --classes-per-client {len(classes)} or less (classes_per_client= in Python)")
  if n_clients * k < len(classes):
    raise DataError(
        f"{n_clients} clients x {k} class{'es' if k > 1 else ''} each cover only {n_clients * k} of the {len(classes)} classes, so"
        f" some class would be dropped; pass --classes-per-client {-(-len(classes) // n_clients)} or"
        f" --n-clients {-(-len(classes) // k)} (classes_per_client=/n_clients= in Python)")
  rng = as_rng(rng)
  holders = _label_skew_holders(counts, n_clients, int(k), rng)
  held = np.bincount(np.concatenate(holders), minlength=n_clients)
  for c, n_c in enumerate(counts):
    while len(holders[c]) > n_c:
      spare = [h for h in holders[c] if held[h] > 1]
      if not spare:
        raise DataError(
            f"class {classes[c]} has {n_c} training samples, too few to share between the clients that"
            " must hold it; lower --n-clients or raise --classes-per-client")
      holders[c].remove(spare[-1])
      held[spare[-1]] -= 1
  client = np.empty(len(y), np.int32)
  for c, label in enumerate(classes):
    for h, part in zip(holders[c], np.array_split(rng.permutation(np.flatnonzero(y == label)), len(holders[c]))):
      client[part] = h
  return client


def partition_by_column(values, n_clients: int | None = None, rng=None, *, y=None
                        ) -> tuple[np.ndarray, list[str]]:
  """Client id per sample from a grouping column (site, plate, patient), plus client names.

  ``n_clients=None`` makes one client per distinct value. A larger ``n_clients`` splits
  groups further: each group gets at least one client, and the extra clients go to the
  groups with the most samples per client, so 2 equal plates and ``n_clients=4`` give each
  plate two halves. Within a group the halves are dealt out label-stratified when ``y`` is
  given. Sub-clients are named ``"<value>/<i>"``.
  """
  values = np.asarray(values, dtype=object)
  missing = np.array([v is None or (isinstance(v, float) and np.isnan(v)) or v == "" for v in values], bool)
  if missing.any():
    raise DataError(
        f"client column has {int(missing.sum())} missing values; fill them (e.g. 'unknown') or drop those"
        " samples before loading")
  groups, group_of = np.unique(values.astype(str), return_inverse=True)
  group_sizes = np.bincount(group_of, minlength=len(groups))
  if n_clients is None:
    return group_of.astype(np.int32), [str(g) for g in groups]
  if not isinstance(n_clients, (int, np.integer)) or n_clients < 1:
    raise DataError(f"--n-clients must be a positive integer or None, got {n_clients!r}")
  if n_clients < len(groups):
    raise DataError(
        f"--n-clients {n_clients} is fewer than the {len(groups)} groups in the client column"
        f" ({preview(groups)}); drop --n-clients for one client per group (n_clients=None in Python), or pass"
        f" at least {len(groups)}")
  per_group = np.ones(len(groups), int)
  for _ in range(n_clients - len(groups)):
    per_group[np.argmax(group_sizes / per_group)] += 1
  too_many = np.flatnonzero(per_group > group_sizes)
  if too_many.size:
    g = too_many[0]
    raise DataError(
        f"--n-clients {n_clients} would split group {str(groups[g])!r} ({group_sizes[g]} training samples) into"
        f" {per_group[g]} clients, leaving one empty; lower --n-clients")
  rng = as_rng(rng)
  client = np.empty(len(values), np.int32)
  names: list[str] = []
  for g, name in enumerate(groups):
    idx = rng.permutation(np.flatnonzero(group_of == g))
    if y is not None:
      idx = idx[np.argsort(np.asarray(y)[idx], kind="stable")]
    k = per_group[g]
    # Dealing round-robin through the label-sorted order balances labels across the parts.
    client[idx] = len(names) + np.arange(len(idx)) % k
    names.extend([str(name)] if k == 1 else [f"{name}/{i}" for i in range(k)])
  return client, names
