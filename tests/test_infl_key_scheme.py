"""The key schemes (infl_jax.key_scheme): the hardened scheme's scramble, the key study's views, and
``--key-scheme hardened`` in the tasks: training under it is faithful training on the key's scrambled data."""

from __future__ import annotations


import numpy as np
import pytest

from infl_jax import keys as keylib
from infl_jax.config import TrainConfig
from infl_jax.key_scheme import client_view, input_scrambler, scramble, study_views, unscramble
from infl_jax.main import train_and_evaluate

anndata = pytest.importorskip("anndata")
pd = pytest.importorskip("pandas")


def test_views_feed_the_model_what_each_party_holds():
  key = keylib.generate_key(seed=5)
  x = np.random.default_rng(0).normal(size=(4, 7)).astype(np.float32)
  assert client_view(key, "faithful", 7).scramblers is None
  np.testing.assert_array_equal(client_view(key, "faithful", 7).inputs(x), x)
  hardened = client_view(key, "hardened", 7)
  s = input_scrambler(key, 7)
  np.testing.assert_array_equal(hardened.inputs(x), x[:, s.permutation] * s.signs)  # x_s[i] = sign_i x[perm_i]
  np.testing.assert_array_equal(unscramble(hardened.inputs(x), s), x)
  np.testing.assert_array_equal(hardened.coords, key.coords)
  views = study_views(key, "hardened", 7, seed=0)
  assert views["no_inr"].coords is None and views["no_inr"].scramblers is None  # no key: raw features
  guessed = views["wrong_key_same_mode"]
  assert not np.array_equal(guessed.inputs(x), hardened.inputs(x))  # an attacker scrambles with their guess
  # Unsigned (the perturbation task's): the same secret permutation, no sign flips, in every view.
  unsigned = client_view(key, "hardened", 7, signed=False)
  np.testing.assert_array_equal(unsigned.inputs(x), x[:, s.permutation])
  np.testing.assert_array_equal(unscramble(unsigned.inputs(x), unsigned.scramblers[""]), x)
  assert all(v.scramblers is None or (v.scramblers[""].signs == 1).all()
             for v in study_views(key, "hardened", 7, seed=0, signed=False).values())
  # Two inputs of one client (multi-omics layers) get scrambles of their own.
  two = client_view(key, "hardened", {"genes": 50, "lipids": 50})
  assert not np.array_equal(two.scramblers["genes"].permutation, two.scramblers["lipids"].permutation)


def _cohort(path, x):
  n = len(x)
  y = np.arange(n) % 3
  obs = pd.DataFrame({"cell_type": pd.Categorical([f"t{c}" for c in y]), "site": [f"s{i % 3}" for i in range(n)]},
                     index=[f"c{i}" for i in range(n)])
  anndata.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(x.shape[1])])).write_h5ad(path)
  return path


def test_hardened_training_is_faithful_training_on_the_keys_scrambled_data(tmp_path):
  rng = np.random.default_rng(1)
  y = np.arange(90) % 3
  x = (rng.normal(size=(90, 12)) + 1.5 * rng.normal(size=(3, 12))[y]).astype(np.float32)
  key = keylib.generate_key(seed=2)
  settings = dict(label_key="cell_type", client_key="site", rounds=2, hidden=(8,), central_baseline=False,
                  checkpoint_every=100)

  def run(path, scheme, workdir):
    config = TrainConfig.for_dataset(str(path), key_scheme=scheme, **settings).validate()
    return train_and_evaluate(config, tmp_path / workdir, key, show_progress=False)

  hardened = run(_cohort(tmp_path / "raw.h5ad", x), "hardened", "hardened")
  scrambled_file = _cohort(tmp_path / "scrambled.h5ad", scramble(x, input_scrambler(key, 12)))
  faithful = run(scrambled_file, "faithful", "faithful")
  assert hardened["key_scheme"] == "hardened" and hardened["config"]["key_scheme"] == "hardened"
  assert hardened["test"]["right_key"] == faithful["test"]["right_key"]
  # The attacker without the key feeds raw features: under hardened, that is not what the model was trained on.
  assert set(hardened["test"]) == {"right_key", "wrong_key_same_mode", "wrong_key_other_mode", "no_inr"}


def test_perturbation_view_points_each_perturbation_at_its_scrambled_gene():
  from infl_jax.data.perturbation import PerturbationData
  from infl_jax.tasks.perturbation import _perturbation_examples, client_data_view

  rng = np.random.default_rng(0)
  genes = [f"g{j}" for j in range(6)]
  data = PerturbationData(gene_names=genes, control=rng.normal(size=(5, 6)), control_cell_type=np.zeros(5, int),
                          cells={("g1",): rng.normal(size=(3, 6)), ("g2", "g4"): rng.normal(size=(3, 6))},
                          cell_type={("g1",): np.zeros(3, int), ("g2", "g4"): np.zeros(3, int)},
                          train_conditions=[("g1",)], test_conditions=[("g2", "g4")], simulated=True, description="")
  key = keylib.generate_key(seed=3)
  view = client_view(key, "hardened", 6)
  held = client_data_view(data, view)
  examples, _ = _perturbation_examples(held, [("g1",), ("g2", "g4")], np.random.default_rng(0))
  raw, _ = _perturbation_examples(data, [("g1",), ("g2", "g4")], np.random.default_rng(0))
  np.testing.assert_allclose(examples["x"], view.inputs(raw["x"]))
  np.testing.assert_allclose(examples["y"], view.inputs(raw["y"]))
  for p_held, p_raw in zip(examples["perts"], raw["perts"]):
    assert [held.gene_names[i] for i in p_held if i >= 0] == [genes[i] for i in p_raw if i >= 0]
  assert client_data_view(data, client_view(key, "faithful", 6)) is data


def test_multi_omics_layers_are_scrambled_each_with_its_own_stream():
  from infl_jax.tasks.multiomics import _inputs

  key = keylib.generate_key(seed=4)
  layers = {"genes": np.arange(12.0).reshape(2, 6), "lipids": np.arange(8.0).reshape(2, 4)}
  view = client_view(key, "hardened", {m: x.shape[1] for m, x in layers.items()})
  held = _inputs(view, layers)
  for m, x in layers.items():
    np.testing.assert_array_equal(held[m], scramble(x, input_scrambler(key, x.shape[1], stream=m)))
  assert _inputs(client_view(key, "faithful", {"genes": 6, "lipids": 4}), layers)["genes"].tolist() == \
      layers["genes"].tolist()


def test_every_task_defaults_to_hardened_but_perturbation():
  from infl_jax.config import TrainConfig

  for dataset in ("proteomics", "pbmc", "pbmc_patients", "spatial", "nutrimouse", "cells.h5ad"):
    assert TrainConfig.for_dataset(dataset).key_scheme == "hardened", dataset
  assert TrainConfig().key_scheme == "hardened"
  # Perturbation keeps the published scheme (docs/privacy.md, "Every task, both schemes"), built-in or a user's
  # file, unless the user asks.
  assert TrainConfig.for_dataset("perturbation_sim").key_scheme == "faithful"
  assert TrainConfig.for_dataset("gears.h5ad", task="perturbation").key_scheme == "faithful"
  assert TrainConfig.for_dataset("perturbation_sim", key_scheme="hardened").key_scheme == "hardened"
