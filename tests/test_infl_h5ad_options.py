"""``infl-train`` on a user's own .h5ad: the data options, the label-skew partition, the IID default,
and one-line errors that name the flag to fix (docs/design.md, "Data sets and presets")."""

from __future__ import annotations

import numpy as np
import pytest

from infl_jax.config import TrainConfig
from infl_jax.data import DataError
from infl_jax.data.partition import partition_label_skew
from infl_jax.main import main
from infl_jax.tasks.classification import load_data
from infl_jax.tasks.registry import TASKS, TaskRunner

anndata = pytest.importorskip("anndata")
pd = pytest.importorskip("pandas")

N_CELLS, N_GENES, N_TYPES = 120, 30, 4


def make_cohort(seed: int = 0):
  """120 cells x 30 genes, 4 cell types (30 each), 4 patients; ``layers["counts"]`` holds raw counts and
  X their library-size-normalised log1p, so the two matrices are easy to tell apart."""
  rng = np.random.default_rng(seed)
  y = np.arange(N_CELLS) % N_TYPES
  rates = np.exp(rng.normal(1.0, 0.5, size=(N_TYPES, N_GENES)))
  counts = rng.poisson(rates[y]).astype(np.float32)
  normalised = np.log1p(counts / np.maximum(counts.sum(1, keepdims=True), 1) * 1e4).astype(np.float32)
  obs = pd.DataFrame({"cell_type": pd.Categorical([f"type{c}" for c in y]),
                      "patient": [f"p{i % 4}" for i in rng.permutation(N_CELLS)]},
                     index=[f"cell{i}" for i in range(N_CELLS)])
  adata = anndata.AnnData(X=normalised, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(N_GENES)]))
  adata.layers["counts"] = counts
  return adata


@pytest.fixture
def cohort(tmp_path):
  path = tmp_path / "cohort.h5ad"
  make_cohort().write_h5ad(path)
  return path


def _config(path, **kw) -> TrainConfig:
  return TrainConfig.for_dataset(str(path), **{"label_key": "cell_type", **kw}).validate()


def _standardised(x: np.ndarray) -> np.ndarray:
  """The loader's z-score by hand: training mean and (population) std per feature."""
  x = x.astype(np.float64)
  return (x - x.mean(0)) / x.std(0)


def _rows(adata, ids) -> np.ndarray:
  return np.asarray([list(adata.obs_names).index(i) for i in ids])


# ---------------------------------------------------------------------------------------------
# Each option changes the loaded data as computed by hand


def test_layer_reads_that_layer_and_log1p_is_applied_before_standardisation(cohort):
  adata = make_cohort()
  counts = adata.layers["counts"]
  split = load_data(_config(cohort, client_key="patient", layer="counts"))
  train = _rows(adata, split.train_ids)
  np.testing.assert_allclose(split.train_x, _standardised(counts[train]), atol=1e-4)
  logged = load_data(_config(cohort, client_key="patient", layer="counts", log_transform="log1p"))
  np.testing.assert_allclose(logged.train_x, _standardised(np.log1p(counts[train])), atol=1e-4)
  default = load_data(_config(cohort, client_key="patient"))  # X, no log transform
  np.testing.assert_allclose(default.train_x, _standardised(adata.X[train]), atol=1e-4)
  assert logged.config["layer"] == "counts" and "log1p" in logged.preprocessing.describe()


def test_fractions_set_the_held_out_sizes(cohort):
  split = load_data(_config(cohort, client_key="patient"))
  # 30 cells per type: round(30 * 0.15) = 4 (4.5 rounds to even) validation, 6 test.
  assert (len(split.val_y), len(split.test_y), len(split.train_y)) == (16, 24, 80)
  split = load_data(_config(cohort, client_key="patient", val_fraction=0.3, test_fraction=0.1))
  assert (len(split.val_y), len(split.test_y), len(split.train_y)) == (36, 12, 72)


def test_impute_min_class_count_and_drop_unlabelled(tmp_path):
  adata = make_cohort()
  adata.X[[3, 8], 5] = np.nan
  labels = adata.obs["cell_type"].astype(str).to_numpy(dtype=object)
  labels[:2] = "rare"
  labels[[10, 11]] = None
  adata.obs["cell_type"] = labels
  path = tmp_path / "messy.h5ad"
  adata.write_h5ad(path)
  with pytest.raises(DataError, match="--drop-unlabelled"):
    load_data(_config(path, client_key="patient"))
  with pytest.raises(DataError, match="--impute median"):
    load_data(_config(path, client_key="patient", drop_unlabelled=True))
  with pytest.raises(DataError, match="--min-class-count 3"):
    load_data(_config(path, client_key="patient", drop_unlabelled=True, impute="median"))
  split = load_data(_config(path, client_key="patient", drop_unlabelled=True, min_class_count=3, impute="median"))
  assert "rare" not in split.class_names and split.n_classes == N_TYPES
  assert len(split.train_y) + len(split.val_y) + len(split.test_y) == N_CELLS - 4
  assert np.isfinite(split.train_x).all() and np.isfinite(split.test_x).all()


def test_file_without_client_column_gets_iid_clients_and_a_note(cohort, capsys):
  split = load_data(_config(cohort))
  assert split.n_clients == 5 and split.config["partition"] == "iid"
  err = capsys.readouterr().err.strip()
  assert err == ("no --client-key given: split into 5 IID clients (set --client-key COLUMN or "
                 "--partition/--n-clients)")
  assert load_data(_config(cohort, n_clients=3)).n_clients == 3
  assert "3 IID clients" in capsys.readouterr().err
  load_data(_config(cohort, partition="dirichlet"))  # a chosen partition: default count, no note
  assert capsys.readouterr().err == ""
  assert TrainConfig.for_dataset(str(cohort)).key_strength == 20.0


# ---------------------------------------------------------------------------------------------
# Label skew


@pytest.mark.parametrize("n_clients, k", [(5, 2), (4, 1), (3, 3), (6, 3), (10, 4)])
def test_label_skew_holds_at_most_k_classes_covers_all_and_assigns_each_sample_once(n_clients, k):
  y = np.repeat(np.arange(N_TYPES), [40, 25, 12, 4])
  client = partition_label_skew(y, n_clients, k, rng=3)
  assert client.shape == y.shape and set(np.unique(client)) == set(range(n_clients))  # once each, none empty
  held = [set(y[client == c]) for c in range(n_clients)]
  assert all(1 <= len(h) <= k for h in held)
  assert set().union(*held) == set(range(N_TYPES))
  if -(-n_clients * k // N_TYPES) <= 4:  # every class has samples for all its holders: exactly k each
    assert all(len(h) == k for h in held)
  np.testing.assert_array_equal(client, partition_label_skew(y, n_clients, k, rng=3))
  assert any(not np.array_equal(client, partition_label_skew(y, n_clients, k, rng=s)) for s in range(4, 8))


def test_label_skew_spreads_classes_evenly():
  y = np.repeat(np.arange(5), 20)
  client = partition_label_skew(y, 6, 2, rng=0)
  holders = [len(set(client[y == c])) for c in range(5)]  # 12 slots over 5 classes: 2 or 3 each
  assert sorted(holders) == [2, 2, 2, 3, 3]
  assert all(len(set(y[client == c])) == 2 for c in range(6))


def test_label_skew_impossible_requests_name_the_flag():
  y = np.repeat(np.arange(4), 10)
  with pytest.raises(DataError, match=r"--classes-per-client 5 is more than the 4 classes"):
    partition_label_skew(y, 3, 5, rng=0)
  with pytest.raises(DataError, match=r"some class would be dropped.*--classes-per-client 2 or --n-clients 4"):
    partition_label_skew(y, 3, 1, rng=0)


@pytest.fixture
def loaded_by_cli(monkeypatch):
  """Runs ``infl-train`` up to the classification runner, which only loads the data: the flags' path
  from the command line to the loader, without a minute of XLA compilation for a training run
  (tests/test_infl_train.py trains end to end)."""
  loaded = []

  def run(config, workdir, key, **_):
    loaded.append(load_data(config))
    return {}

  monkeypatch.setitem(TASKS, "classification", TaskRunner(run, lambda summary: "loaded"))
  return loaded


def test_cli_label_skew_and_data_flags_reach_the_loader(cohort, tmp_path, loaded_by_cli, capsys):
  code = main(["--dataset", str(cohort), "--label-key", "cell_type", "--partition", "label-skew",
               "--classes-per-client", "2", "--n-clients", "4", "--layer", "counts", "--log-transform", "log1p",
               "--val-fraction", "0.3", "--test-fraction", "0.1", "--rounds", "1", "--workdir", str(tmp_path / "w")])
  assert code == 0, capsys.readouterr().err
  (split,) = loaded_by_cli
  assert "label-skew, 2 classes per client" in split.description
  assert (split.client_label_counts() > 0).sum(1).tolist() == [2, 2, 2, 2]
  assert (len(split.val_y), len(split.test_y)) == (36, 12)
  counts = make_cohort().layers["counts"][_rows(make_cohort(), split.train_ids)]
  np.testing.assert_allclose(split.train_x, _standardised(np.log1p(counts)), atol=1e-4)


def test_cli_without_client_key_says_it_splits_iid(cohort, tmp_path, loaded_by_cli, capsys):
  assert main(["--dataset", str(cohort), "--label-key", "cell_type", "--workdir", str(tmp_path / "w")]) == 0
  assert loaded_by_cli[0].n_clients == 5
  assert "no --client-key given: split into 5 IID clients" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2, one line, naming the flag


@pytest.mark.parametrize("extra, expected", [
    (["--layer", "count"], ["--layer", "did you mean 'counts'"]),
    (["--label-key", "cell_typ"], ["--label-key", "did you mean 'cell_type'"]),
    (["--label-key", "cell_type", "--client-key", "patients"], ["--client-key", "did you mean 'patient'"]),
    (["--val-fraction", "1.5"], ["--val-fraction", "<= 0.9"]),
    (["--test-fraction", "0"], ["--test-fraction", "> 0"]),
    (["--val-fraction", "0.6", "--test-fraction", "0.5"], ["--val-fraction + --test-fraction"]),
    (["--partition", "label-skew", "--classes-per-client", "7"], ["--classes-per-client 7", "4 classes"]),
    (["--partition", "label-skew", "--classes-per-client", "1", "--n-clients", "2"],
     ["--n-clients 4", "--classes-per-client 2"]),
    (["--classes-per-client", "0"], ["--classes-per-client", ">= 1"]),
    (["--min-class-count", "31"], ["--min-class-count 31", "0 class(es)"]),
    (["--partition", "column"], ["--client-key COLUMN", "patient"]),
    ([], ["--label-key COLUMN", "cell_type, patient"]),
])
def test_bad_input_exits_2_with_one_line_naming_the_flag(cohort, tmp_path, capsys, extra, expected):
  label = [] if not extra or "--label-key" in extra else ["--label-key", "cell_type"]
  assert main(["--dataset", str(cohort), "--rounds", "1", "--workdir", str(tmp_path / "w")] + label + extra) == 2
  err = capsys.readouterr().err
  errors = [line for line in err.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "Traceback" not in err, err
  for text in expected:
    assert text in errors[0], errors[0]


def test_missing_file_lists_every_builtin(tmp_path, capsys):
  assert main(["--dataset", str(tmp_path / "nope.h5ad"), "--label-key", "x", "--workdir", str(tmp_path / "w")]) == 2
  err = capsys.readouterr().err
  for name in ("proteomics", "pbmc", "pbmc_sites", "pbmc_panels", "pbmc_patients", "nutrimouse", "spatial",
               "perturbation_sim"):
    assert name in err
  assert "--dataset" in err and "Traceback" not in err


def test_builtin_names_in_messages_match_the_presets():
  from infl_jax.config import PRESETS
  from infl_jax.data import BUILTIN_DATASETS
  from infl_jax.data.errors import BUILTIN_NAMES

  assert set(BUILTIN_NAMES) == set(PRESETS) and set(BUILTIN_DATASETS) <= set(BUILTIN_NAMES)
