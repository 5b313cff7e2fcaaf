"""Tests of infl_jax.data: partitions, held-out splits, train-only preprocessing, loaders, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from infl_jax import data
from infl_jax.data import DataError

anndata = pytest.importorskip("anndata")
pd = pytest.importorskip("pandas")


def make_adata(n=120, n_features=12, n_classes=3, n_sites=3, seed=0, gene_prefix="g"):
  """Small labelled AnnData: class-dependent means so a classifier can learn something."""
  rng = np.random.default_rng(seed)
  y = np.arange(n) % n_classes
  x = rng.normal(size=(n, n_features)) + y[:, None] * np.linspace(0, 1, n_features)[None]
  obs = pd.DataFrame({
      "cell_type": pd.Categorical([f"type{c}" for c in y]),
      "site": [f"site{i % n_sites}" for i in rng.permutation(n)],
      "age": rng.uniform(20, 80, n),
  }, index=[f"cell{i}" for i in range(n)])
  var = pd.DataFrame(index=[f"{gene_prefix}{j}" for j in range(n_features)])
  return anndata.AnnData(X=x.astype(np.float32), obs=obs, var=var)


@pytest.fixture
def h5ad_path(tmp_path):
  path = tmp_path / "cohort.h5ad"
  make_adata().write_h5ad(path)
  return path


# ---------------------------------------------------------------------------------------------
# Partitions


def test_stratified_holdout_is_disjoint_complete_and_stratified():
  y = np.repeat(np.arange(4), [100, 50, 20, 10])
  train, val, test = data.stratified_holdout(y, 0.15, 0.2, rng=0)
  all_idx = np.concatenate([train, val, test])
  assert len(all_idx) == len(y) and len(np.unique(all_idx)) == len(y)
  np.testing.assert_array_equal(np.bincount(y[test]), [20, 10, 4, 2])
  np.testing.assert_array_equal(np.bincount(y[val]), [15, 8, 3, 2])  # round(7.5) = 8, round(1.5) = 2
  again = data.stratified_holdout(y, 0.15, 0.2, rng=0)
  for a, b in zip((train, val, test), again):
    np.testing.assert_array_equal(a, b)


def test_stratified_holdout_smallest_possible_class_keeps_one_per_split():
  y = np.array([0] * 3 + [1] * 30)
  train, val, test = data.stratified_holdout(y, 0.15, 0.2, rng=1)
  assert [int((y[s] == 0).sum()) for s in (train, val, test)] == [1, 1, 1]


@pytest.mark.parametrize("make", [
    lambda y: data.partition_iid(y, 7, rng=3),
    lambda y: data.partition_dirichlet(y, 7, 0.3, rng=3),
    lambda y: data.partition_dirichlet_balanced(y, 7, 0.3, rng=3),
    lambda y: data.partition_by_column(np.array(["a", "b", "c"])[np.arange(len(y)) % 3], 7, rng=3, y=y)[0],
])
def test_every_sample_in_exactly_one_client(make):
  y = np.random.default_rng(0).integers(0, 5, size=400)
  client = make(y)
  assert client.shape == y.shape and client.dtype == np.int32
  assert set(np.unique(client)) == set(range(7))  # no client empty, ids 0..6
  # one id per sample is "exactly one client"; bincount adding back to n is "none dropped"
  assert np.bincount(client).sum() == len(y)


def test_iid_sizes_differ_by_at_most_one():
  sizes = np.bincount(data.partition_iid(np.zeros(103, int), 10, rng=0))
  assert sizes.max() - sizes.min() <= 1


def test_dirichlet_is_deterministic_per_seed_and_skewed():
  y = np.repeat(np.arange(10), 60)
  a = data.partition_dirichlet(y, 5, 0.1, rng=7)
  np.testing.assert_array_equal(a, data.partition_dirichlet(y, 5, 0.1, rng=7))
  assert not np.array_equal(a, data.partition_dirichlet(y, 5, 0.1, rng=8))
  counts = np.zeros((5, 10), int)
  np.add.at(counts, (a, y), 1)
  # With alpha 0.1 most of each class lands on one client; IID would give ~12 everywhere.
  assert (counts.max(axis=0) / counts.sum(axis=0)).mean() > 0.6
  iid_counts = np.zeros((5, 10), int)
  np.add.at(iid_counts, (data.partition_iid(y, 5, rng=7), y), 1)
  assert (iid_counts.max(axis=0) / iid_counts.sum(axis=0)).mean() < 0.4


def test_balanced_dirichlet_fills_hundreds_of_equal_clients_with_few_classes():
  # The per-class scheme cannot give 100 clients samples of 455 (most shares of each class round to nothing);
  # the balanced one gives each 4 or 5, from its own few classes.
  y = np.repeat(np.arange(10), [156, 84, 62, 44, 35, 28, 20, 12, 9, 5])
  with pytest.raises(data.DataError, match="--alpha"):
    data.partition_dirichlet(y, 100, 0.1, rng=0, max_tries=20)
  client = data.partition_dirichlet_balanced(y, 100, 0.1, rng=0)
  np.testing.assert_array_equal(client, data.partition_dirichlet_balanced(y, 100, 0.1, rng=0))
  assert sorted(set(np.bincount(client, minlength=100))) == [4, 5] and np.bincount(client).sum() == len(y)
  held = np.array([len(np.unique(y[client == k])) for k in range(100)])
  assert held.max() <= 4 and np.median(held) <= 3  # IID draws of 4-5 from these shares hold 3-4 classes
  near_iid = data.partition_dirichlet_balanced(y, 100, 1000.0, rng=0)
  assert np.mean([len(np.unique(y[near_iid == k])) for k in range(100)]) > held.mean()


def test_dirichlet_respects_min_size_by_redrawing():
  y = np.repeat(np.arange(10), 20)
  client = data.partition_dirichlet(y, 10, 0.05, rng=0, min_size=5)
  assert np.bincount(client, minlength=10).min() >= 5


def test_partition_by_column_one_client_per_value():
  values = np.array(["plateB", "plateA", "plateB", "plateA", "plateC"])
  client, names = data.partition_by_column(values)
  assert names == ["plateA", "plateB", "plateC"]
  np.testing.assert_array_equal(client, [1, 0, 1, 0, 2])


def test_partition_by_column_splits_each_group_in_halves_label_balanced():
  values = np.repeat(["p1", "p2"], 40)
  y = np.tile([0, 1], 40)
  client, names = data.partition_by_column(values, 4, rng=0, y=y)
  assert names == ["p1/0", "p1/1", "p2/0", "p2/1"]
  np.testing.assert_array_equal(np.bincount(client), [20, 20, 20, 20])
  for k in range(4):
    assert set(values[client == k]) == {names[k].split("/")[0]}
    np.testing.assert_array_equal(np.bincount(y[client == k]), [10, 10])


# ---------------------------------------------------------------------------------------------
# Preprocessing


def test_preprocessing_is_fitted_on_training_rows_only():
  adata = make_adata(n=90)
  adata.X[:, 0] *= 50.0
  split = data.load_dataset(adata, label_key="cell_type", client_key="site", seed=4, n_top_features=5,
                            log_transform="none")
  row = {name: i for i, name in enumerate(adata.obs_names)}
  raw = np.asarray(adata.X, np.float64)
  train_raw = raw[[row[i] for i in split.train_ids]]
  test_raw = raw[[row[i] for i in split.test_ids]]
  # Top-variance selection by hand, on the training rows only.
  expected_features = np.sort(np.argsort(-train_raw.var(axis=0), kind="stable")[:5])
  np.testing.assert_array_equal(split.preprocessing.feature_index, expected_features)
  assert split.feature_names == [adata.var_names[j] for j in expected_features]
  mean = train_raw[:, expected_features].mean(axis=0)
  std = train_raw[:, expected_features].std(axis=0)
  np.testing.assert_allclose(split.test_x, (test_raw[:, expected_features] - mean) / std, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(split.train_x.mean(axis=0), 0, atol=1e-5)
  np.testing.assert_allclose(split.train_x.std(axis=0), 1, atol=1e-5)
  # Statistics over all rows would differ: the held-out rows did not leak in.
  assert not np.allclose(raw[:, expected_features].mean(axis=0), mean)


def test_preprocessor_json_roundtrip_and_log_and_impute():
  rng = np.random.default_rng(0)
  x = rng.lognormal(size=(30, 6))
  x[3, 2] = np.nan
  pre = data.Preprocessor(log_transform="log2", impute="median").fit(x[:20])
  restored = data.Preprocessor.from_json(json.dumps(pre.to_dict()))
  np.testing.assert_allclose(restored.transform(x[20:]), pre.transform(x[20:]))
  logged = np.log2(x[:20])
  fill = np.nanmedian(logged[:, 2])
  filled = np.where(np.isnan(logged), fill, logged)
  expected = (filled - filled.mean(0)) / filled.std(0)
  np.testing.assert_allclose(pre.transform(x[:20]), expected, rtol=1e-5, atol=1e-6)


def test_standardizer_maps_constant_features_to_zero():
  x = np.c_[np.ones(5), np.arange(5.0)]
  z = data.Standardizer().fit(x).transform(x)
  np.testing.assert_allclose(z[:, 0], 0.0)
  np.testing.assert_allclose(z[:, 1], (np.arange(5) - 2) / np.sqrt(2), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Loading


def test_load_h5ad_by_site_column(h5ad_path):
  split = data.load_dataset(h5ad_path, label_key="cell_type", client_key="site", seed=1)
  assert split.n_clients == 3 and split.client_names == ["site0", "site1", "site2"]
  assert split.n_features == 12 and split.n_classes == 3 and split.class_names == ["type0", "type1", "type2"]
  total = len(split.train_y) + len(split.val_y) + len(split.test_y)
  assert total == 120
  assert len(set(split.train_ids) | set(split.val_ids) | set(split.test_ids)) == 120
  adata = anndata.read_h5ad(h5ad_path)
  site_of = dict(zip(adata.obs_names, adata.obs["site"]))
  for k, name in enumerate(split.client_names):
    assert {site_of[i] for i in split.train_ids[split.train_client == k]} == {name}
  assert split.client_sizes().sum() == len(split.train_y)
  # rows are grouped by client, so client_arrays are contiguous blocks of train_x
  assert np.all(np.diff(split.train_client) >= 0)
  x, y, mask = split.padded_client_arrays()
  assert x.shape == (3, split.client_sizes().max(), 12) and mask.sum() == len(split.train_y)
  for k, (xk, yk) in enumerate(split.client_arrays()):
    np.testing.assert_array_equal(x[k][mask[k]], xk)
    np.testing.assert_array_equal(y[k][mask[k]], yk)
  np.testing.assert_array_equal(split.client_label_counts().sum(axis=0), np.bincount(split.train_y))


def test_central_and_federated_see_the_same_training_samples():
  adata = make_adata()
  kw = dict(label_key="cell_type", seed=5)
  by_site = data.load_dataset(adata, client_key="site", **kw)
  iid = data.load_dataset(adata, partition="iid", n_clients=4, **kw)
  skewed = data.load_dataset(adata, partition="dirichlet", n_clients=4, alpha=0.3, **kw)
  for other in (iid, skewed):
    assert set(other.train_ids) == set(by_site.train_ids)
    np.testing.assert_array_equal(other.test_ids, by_site.test_ids)
    np.testing.assert_array_equal(other.val_ids, by_site.val_ids)


def test_load_sites_inner_join_keeps_shared_genes(tmp_path):
  a = make_adata(n=60, seed=1)
  b = make_adata(n=60, seed=2)[:, ["g3", "g1", "g0", "g2", "g5", "g4", "g6", "g7", "g8"]].copy()
  b.var_names = ["g3", "g1", "g0", "g2", "g5", "g4", "g6", "g7", "extra"]
  with pytest.raises(DataError, match=r"already has an obs column 'site'.*drop or rename"):
    data.load_sites([a, b], join="inner")
  a.obs = a.obs.drop(columns="site")
  b.obs = b.obs.drop(columns="site")
  pa, pb = tmp_path / "hospA.h5ad", tmp_path / "hospB.h5ad"
  a.write_h5ad(pa)
  b.write_h5ad(pb)
  split = data.load_dataset([pa, pb], label_key="cell_type", join="inner", seed=0, standardize=False)
  assert split.client_names == ["hospA", "hospB"]
  assert split.feature_names == [f"g{j}" for j in range(8)]
  # hospB's columns were reordered onto the shared panel, not taken by position
  row = split.train_client == 1
  ids = [i.split(":")[-1] for i in split.train_ids[row]]
  np.testing.assert_allclose(split.train_x[row][:, 3], b[ids, "g3"].X.ravel())


def test_mismatched_panels_error_names_genes_and_offers_inner_join():
  a = make_adata(n=30, n_features=5)
  b = make_adata(n=30, n_features=5)
  b.var_names = ["g0", "g1", "g2", "g3", "GENE_X"]
  with pytest.raises(DataError, match=r"panels differ.*'s1' lacks 1 \(g4\).*GENE_X.*join='inner'"):
    data.load_sites([a, b], site_names=["s0", "s1"])
  union = data.align_feature_panels([list(a.var_names), list(b.var_names)], ["s0", "s1"], join="union")
  assert union.feature_names == ["g0", "g1", "g2", "g3", "g4", "GENE_X"]  # join="union" is implemented now
  alignment = data.align_feature_panels([["a", "b"], ["b", "a"]], ["x", "y"])
  np.testing.assert_array_equal(alignment.site_columns[1], [1, 0])
  assert alignment.present.all()


# ---------------------------------------------------------------------------------------------
# Built-in data sets (real data shipped in packages)


def test_builtin_proteomics_shapes_labels_and_plates():
  pytest.importorskip("somadata")
  adata = data.load_builtin_anndata("proteomics")
  assert adata.shape == (170, 5207)
  assert adata.obs["Sex"].value_counts().to_dict() == {"F": 85, "M": 85}
  assert adata.obs["PlateId"].nunique() == 2
  split = data.load_dataset("proteomics")
  assert split.n_clients == 2 and split.n_features == 5207 and split.class_names == ["F", "M"]
  assert len(split.train_y) + len(split.val_y) + len(split.test_y) == 170
  np.testing.assert_array_equal(np.bincount(split.test_y), [17, 17])
  four = data.load_dataset("proteomics", n_clients=4)
  assert four.n_clients == 4 and set(four.train_ids) == set(split.train_ids)
  assert [n.split("/")[0] for n in four.client_names] == [split.client_names[0]] * 2 + [split.client_names[1]] * 2
  # log2 is part of the recorded preprocessing, so new raw RFU data goes through the same path
  assert four.preprocessing.log_transform == "log2"


def test_builtin_pbmc_shapes_and_dirichlet_default():
  pytest.importorskip("scanpy")
  adata = data.load_builtin_anndata("pbmc")
  assert adata.shape == (700, 765) and adata.obs["bulk_labels"].nunique() == 10
  assert float(adata.X.min()) >= 0.0  # log1p-normalised, not the all-cells scaled matrix
  split = data.load_dataset("pbmc")
  assert split.n_clients == 5 and split.n_classes == 10 and split.n_features == 765
  assert split.client_sizes().min() >= 2
  again = data.load_dataset("pbmc")
  np.testing.assert_array_equal(split.train_client, again.train_client)
  np.testing.assert_array_equal(split.train_x, again.train_x)


def test_builtin_pbmc_patients_sites_hold_two_related_populations():
  pytest.importorskip("scanpy")
  adata = data.load_builtin_anndata("pbmc_patients")
  held = adata.obs.groupby("patient", observed=True)["bulk_labels"].unique()
  assert sorted(held.index) == sorted(data.builtin.PBMC_PATIENT_POPULATIONS)
  assert {site: set(pops) for site, pops in held.items()} == {
      site: set(pops) for site, pops in data.builtin.PBMC_PATIENT_POPULATIONS.items()}
  split = data.load_dataset("pbmc_patients")
  assert split.n_clients == 5 and split.n_classes == 10
  assert [len(np.unique(y)) for _, y in split.client_arrays()] == [2] * 5


# ---------------------------------------------------------------------------------------------
# Bad input: each error names the problem and the fix


def test_error_missing_label_column_lists_obs_columns(h5ad_path):
  with pytest.raises(DataError, match=r"label column 'celltype' not found.*cell_type, site, age"):
    data.load_dataset(h5ad_path, label_key="celltype", client_key="site")
  with pytest.raises(DataError, match=r"label_key is required.*cell_type"):
    data.load_dataset(h5ad_path)


def test_error_missing_client_column(h5ad_path):
  with pytest.raises(DataError, match=r"client column 'hospital' not found.*site"):
    data.load_dataset(h5ad_path, label_key="cell_type", client_key="hospital")
  with pytest.raises(DataError, match=r"needs n_clients"):
    data.load_dataset(h5ad_path, label_key="cell_type", partition="dirichlet")


def test_error_nan_and_inf_values_counted_and_named():
  adata = make_adata()
  adata.X[[1, 2, 5], 3] = np.nan
  with pytest.raises(DataError, match=r"3 NaN values in 1 of 12 features \(g3\).*impute='median'"):
    data.load_dataset(adata, label_key="cell_type", client_key="site")
  split = data.load_dataset(adata, label_key="cell_type", client_key="site", impute="median")
  assert np.isfinite(split.train_x).all() and np.isfinite(split.test_x).all()
  adata.X[0, 7] = np.inf
  with pytest.raises(DataError, match=r"1 inf values in 1 of 12 features \(g7\).*replace the infinite"):
    data.load_dataset(adata, label_key="cell_type", client_key="site", impute="median")


def test_error_empty_client():
  y = np.repeat([0, 1], 6)
  with pytest.raises(DataError, match=r"client \d+ with \d samples.*raise alpha"):
    data.partition_dirichlet(y, 4, 0.01, rng=0, min_size=3, max_tries=3)
  with pytest.raises(DataError, match=r"only 12 training samples; lower n_clients"):
    data.partition_dirichlet(y, 5, 0.5, rng=0, min_size=3)
  with pytest.raises(DataError, match=r"would split group 'a' \(2 training samples\) into 3 clients, leaving one empty"):
    data.partition_by_column(np.array(["a", "a", "b", "b"]), 5, rng=0)


def test_error_site_without_training_samples():
  adata = make_adata(n=60)
  adata.obs["site"] = ["tiny"] + ["big"] * 59
  with pytest.raises(DataError, match=r"'tiny' have no training samples"):
    data.load_dataset(adata, label_key="cell_type", client_key="site", seed=0, test_fraction=0.5,
                      val_fraction=0.45)


def test_error_class_too_small_to_stratify_and_min_class_count_fix():
  adata = make_adata(n=60)
  labels = adata.obs["cell_type"].astype(str).to_numpy()
  labels[:2] = "rare"
  adata.obs["cell_type"] = labels
  with pytest.raises(DataError, match=r"too few samples to stratify.*'rare' \(2\).*min_class_count=3"):
    data.load_dataset(adata, label_key="cell_type", client_key="site")
  split = data.load_dataset(adata, label_key="cell_type", client_key="site", min_class_count=3)
  assert "rare" not in split.class_names and split.n_classes == 3


def test_error_single_class_label():
  adata = make_adata()
  adata.obs["tissue"] = "blood"
  with pytest.raises(DataError, match=r"single class \('blood'\).*at least 2"):
    data.load_dataset(adata, label_key="tissue", client_key="site")


def test_error_unknown_dataset_and_bad_files(tmp_path):
  with pytest.raises(DataError, match=r"unknown dataset 'proteomic' \(did you mean 'proteomics'\?\).*pbmc"):
    data.load_dataset("proteomic")
  with pytest.raises(DataError, match=r"not found.*cohort\.h5ad"):
    make_adata().write_h5ad(tmp_path / "cohort.h5ad")
    data.load_dataset(tmp_path / "cohrt.h5ad", label_key="cell_type")
  csv = tmp_path / "table.csv"
  csv.write_text("a,b\n1,2\n")
  with pytest.raises(DataError, match=r"not an \.h5ad file.*read_csv"):
    data.load_dataset(csv, label_key="a")
  fake = tmp_path / "broken.h5ad"
  fake.write_bytes(b"not hdf5 at all")
  with pytest.raises(DataError, match=r"not a valid h5ad file.*write_h5ad"):
    data.load_dataset(fake, label_key="a")


def test_error_unlabelled_samples_and_continuous_labels():
  adata = make_adata()
  labels = adata.obs["cell_type"].astype(object).to_numpy()
  labels[[0, 4]] = None
  adata.obs["cell_type"] = labels
  with pytest.raises(DataError, match=r"missing for 2 of 120 samples.*drop_unlabelled=True"):
    data.load_dataset(adata, label_key="cell_type", client_key="site")
  split = data.load_dataset(adata, label_key="cell_type", client_key="site", drop_unlabelled=True)
  assert len(split.train_y) + len(split.val_y) + len(split.test_y) == 118
  with pytest.raises(DataError, match=r"continuous values.*classification"):
    data.load_dataset(adata, label_key="age", client_key="site")


def test_error_transform_with_wrong_panel_and_bad_log_domain():
  pre = data.Preprocessor().fit(np.random.default_rng(0).normal(size=(10, 4)))
  with pytest.raises(DataError, match=r"3 features but the preprocessing was fitted on 4"):
    pre.transform(np.zeros((2, 3)))
  with pytest.raises(DataError, match=r"log2.*positive.*already log-transformed"):
    data.Preprocessor(log_transform="log2").fit(np.array([[1.0, -2.0], [3.0, 4.0]]))


def test_import_and_array_path_work_without_anndata():
  # The accelerator image has no anndata: the package must import, and split arrays, without it.
  import subprocess
  import sys
  import textwrap

  code = textwrap.dedent("""
      import sys
      class Block:
        def find_spec(self, name, path=None, target=None):
          if name.split(".")[0] in ("anndata", "scanpy", "somadata"):
            raise ImportError("blocked " + name)
      sys.meta_path.insert(0, Block())
      import numpy as np
      from infl_jax import data
      x = np.random.default_rng(0).normal(size=(40, 3))
      split = data.make_federated_split(x, np.arange(40) % 2, partition="iid", n_clients=2)
      assert split.client_sizes().sum() == len(split.train_y)
      try:
        data.load_dataset("pbmc")
      except data.DataError as e:
        assert "not installed" in str(e) and "pip install" in str(e), e
      else:
        raise AssertionError("loading pbmc without scanpy should fail clearly")
      print("ok")
  """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
