"""Heterogeneous feature panels: union alignment with masks, and the classification data path."""

import anndata
import numpy as np
import pandas as pd
import pytest

from infl_jax import data
from infl_jax.data.anndata_io import union_feature_mask


def _site(genes, values, labels):
  obs = pd.DataFrame({"cell_type": pd.Categorical(labels)}, index=[f"c{i}" for i in range(len(labels))])
  return anndata.AnnData(np.asarray(values, np.float32), obs=obs, var=pd.DataFrame(index=genes))


def test_union_alignment_matches_hand_built_columns_and_mask():
  alignment = data.align_feature_panels([["a", "b", "c"], ["c", "d", "a"], ["e"]], ["s0", "s1", "s2"], join="union")
  assert alignment.feature_names == ["a", "b", "c", "d", "e"]
  np.testing.assert_array_equal(alignment.site_columns[0], [0, 1, 2, -1, -1])
  np.testing.assert_array_equal(alignment.site_columns[1], [2, -1, 0, 1, -1])
  np.testing.assert_array_equal(alignment.site_columns[2], [-1, -1, -1, -1, 0])
  np.testing.assert_array_equal(alignment.present, [[1, 1, 1, 0, 0], [1, 0, 1, 1, 0], [0, 0, 0, 0, 1]])


def test_load_sites_union_keeps_every_feature_with_nan_and_mask():
  s0 = _site(["g0", "g1", "g2"], [[1, 2, 3], [4, 5, 6]], ["x", "y"])
  s1 = _site(["g2", "g3"], [[7, 8], [9, 10], [11, 12]], ["x", "y", "x"])
  combined = data.load_sites([s0, s1], site_names=["A", "B"], join="union")
  assert list(combined.var_names) == ["g0", "g1", "g2", "g3"]  # nothing cut to the intersection (g2)
  x = np.asarray(combined.X)
  np.testing.assert_array_equal(x[:2, :3], [[1, 2, 3], [4, 5, 6]])
  assert np.isnan(x[:2, 3]).all() and np.isnan(x[2:, :2]).all()
  np.testing.assert_array_equal(x[2:, 2:], [[7, 8], [9, 10], [11, 12]])
  mask = union_feature_mask(combined)
  np.testing.assert_array_equal(mask, ~np.isnan(x))


def test_union_split_standardises_each_feature_on_the_sites_that_have_it():
  rng = np.random.default_rng(0)
  n = 40
  genes = [f"g{j}" for j in range(6)]
  labels = np.array(["x", "y"] * (n // 2))
  # Site B measures g5 on a very different scale; site A lacks g5 and B lacks g0.
  a = _site(genes[:5], rng.normal(0, 1, (n, 5)) + (labels == "y")[:, None], labels)
  b_vals = np.concatenate([rng.normal(0, 1, (n, 4)) + (labels == "y")[:, None], rng.normal(100, 5, (n, 1))], 1)
  b = _site(genes[1:], b_vals, labels)
  split = data.load_dataset([a, b], site_names=["A", "B"], label_key="cell_type", join="union", seed=0)
  assert split.feature_names == genes
  present = split.config["feature_present"]
  assert present["A"] == [True] * 5 + [False] and present["B"] == [False] + [True] * 5
  for k, name in enumerate(split.client_names):
    rows = split.train_client == k
    missing = ~np.array(present[name])
    # Unmeasured features are exactly 0 (the training mean of the sites that measured them).
    np.testing.assert_allclose(split.train_x[rows][:, missing], 0.0, atol=1e-6)
  # g5 came only from B: its standardised training values have mean 0 over B (not dragged by A's absence).
  b_rows = split.train_client == split.client_names.index("B")
  assert abs(split.train_x[b_rows][:, 5].mean()) < 1e-5


def test_exact_join_error_offers_union():
  a = _site(["g0", "g1"], [[1, 2]], ["x"])
  b = _site(["g0", "g9"], [[1, 2]], ["x"])
  with pytest.raises(data.DataError, match="join='union'"):
    data.load_sites([a, b])


def test_pbmc_panels_builtin_sites_each_miss_a_different_fifth():
  split = data.load_dataset("pbmc_panels", seed=0)
  present = np.array([split.config["feature_present"][c] for c in split.client_names])
  assert present.shape == (3, 765)
  assert (present.sum(1) == 765 - 153).all()
  assert (present.sum(0) >= 2).all()  # each gene is missing in at most one site
  assert len({tuple(np.flatnonzero(~p)) for p in present}) == 3
