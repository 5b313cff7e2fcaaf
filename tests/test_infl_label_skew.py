"""Clients that hold few classes: LayerNorm in the MLP, the single-class warning, the choice of drift correction
and FedRS's restricted softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from infl_jax.config import TrainConfig
from infl_jax.keys import generate_key
from infl_jax.models import make_mlp_classifier
from infl_jax.tasks import classification, label_skew
from infl_jax.tasks.common import class_presence, split_clients

COORDS = generate_key(3).coords


def _model_and_variables(norm="none"):
  model = make_mlp_classifier((8,), 4, key_strength=2.0, norm=norm)
  variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(0)}, jnp.zeros((2, 5)),
                         key_coords=None, train=False)
  return model, variables


def test_layer_norm_mlp_has_no_batch_statistics():
  model, variables = _model_and_variables(norm="layer")
  assert "batch_stats" not in variables and "ln_0" in variables["params"]
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5)), jnp.float32)
  # Per-sample normalisation: a sample's output does not depend on the rest of the batch.
  together = model.apply(variables, x, key_coords=COORDS, train=False)
  alone = model.apply(variables, x[:1], key_coords=COORDS, train=False)
  np.testing.assert_allclose(together[:1], alone, rtol=1e-5, atol=1e-6)


def test_single_class_clients_are_warned_about(tmp_path, capsys):
  _tiny_split(tmp_path, partition="label-skew", classes_per_client=1, n_clients=4)
  err = capsys.readouterr().err
  assert "4 of 4 clients hold a single class" in err and "--norm layer" in err


def _tiny_split(tmp_path, **overrides):
  import anndata
  import pandas as pd

  rng = np.random.default_rng(0)
  y = np.repeat(np.arange(4), 30)
  x = rng.normal(size=(120, 12)).astype(np.float32) + y[:, None]
  adata = anndata.AnnData(x, obs=pd.DataFrame({"cell_type": pd.Categorical([f"t{c}" for c in y])},
                                              index=[f"c{i}" for i in range(120)]))
  adata.write_h5ad(tmp_path / "cells.h5ad")
  config = TrainConfig.for_dataset(str(tmp_path / "cells.h5ad"), label_key="cell_type", norm="batch", **overrides)
  return classification.load_data(config)


def test_auto_drift_correction_follows_the_partition(tmp_path):
  # 4 classes: a client with 1, or with fewer than 2, gets SCAFFOLD; IID clients keep plain FedAvg.
  skewed = _tiny_split(tmp_path, partition="label-skew", classes_per_client=1, n_clients=4)
  config, choice = label_skew.fit_to_federation(TrainConfig.for_dataset("x.h5ad"), skewed)
  assert config.drift_correction == "scaffold" and config.rounds == 100  # twice the generic preset's 50
  assert choice == {"drift_correction": "scaffold", "rounds": 100,
                    "reason": "4 of 4 clients hold a single class or fewer than half of the 4 classes"}
  # Rounds the user set are kept, and a config built without a preset is never lengthened.
  config, choice = label_skew.fit_to_federation(TrainConfig.for_dataset("x.h5ad", rounds=30), skewed)
  assert config.rounds == 30 and choice["rounds"] == 30 and config.drift_correction == "scaffold"
  assert label_skew.fit_to_federation(TrainConfig(rounds=30), skewed)[0].rounds == 30
  iid = _tiny_split(tmp_path, partition="iid", n_clients=3)
  config, choice = label_skew.fit_to_federation(TrainConfig.for_dataset("x.h5ad"), iid)
  assert config.drift_correction == "none" and choice is None and config.rounds == 50
  # An explicit setting is never overridden, and a sharded run cannot take SCAFFOLD.
  for explicit in ("none", "scaffold"):
    config, choice = label_skew.fit_to_federation(TrainConfig.for_dataset("x.h5ad", drift_correction=explicit),
                                                      skewed)
    assert config.drift_correction == explicit and choice is None
  config, choice = label_skew.fit_to_federation(TrainConfig.for_dataset("x.h5ad", shard_clients=True), skewed)
  assert config.drift_correction == "none" and choice["drift_correction"] == "none" and config.rounds == 50


def test_a_skewed_run_says_and_records_its_choice(tmp_path, capsys):
  import json

  from infl_jax.main import main

  _tiny_split(tmp_path, partition="label-skew", classes_per_client=1, n_clients=4)
  capsys.readouterr()
  assert main([f"--dataset={tmp_path / 'cells.h5ad'}", "--label-key", "cell_type", "--partition", "label-skew",
               "--classes-per-client", "1", "--n-clients", "4", "--rounds", "2", "--hidden", "8",
               "--absent-class-scale", "0.5", "--no-central-baseline", "--key-seed", "1",
               "--workdir", str(tmp_path / "run")]) == 0
  assert "training with SCAFFOLD drift correction" in capsys.readouterr().err
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert summary["federation_choice"]["drift_correction"] == "scaffold"
  assert summary["federation_choice"]["rounds"] == summary["rounds"] == 2  # --rounds given: kept
  assert summary["config"]["drift_correction"] == "scaffold" and summary["config"]["absent_class_scale"] == 0.5
  label_skew.say_federation_choice({"drift_correction": "scaffold", "rounds": 100, "reason": "5 of 5 clients ..."}, 50)
  assert ("training with SCAFFOLD drift correction and 100 rounds instead of the preset's 50 (--drift-correction "
          "none, --rounds N override" in capsys.readouterr().err)
  # The resume resolves the same choice from the same data and accepts the checkpoint.
  assert main([f"--dataset={tmp_path / 'cells.h5ad'}", "--label-key", "cell_type", "--partition", "label-skew",
               "--classes-per-client", "1", "--n-clients", "4", "--rounds", "3", "--hidden", "8",
               "--absent-class-scale", "0.5", "--no-central-baseline", "--workdir", str(tmp_path / "run"),
               "--resume"]) == 0
  assert json.loads((tmp_path / "run" / "summary.json").read_text())["rounds"] == 3


def test_class_presence_marks_the_classes_a_client_holds(tmp_path):
  np.testing.assert_array_equal(class_presence(np.array([2, 0, 2]), 4, rows=5), [[1, 0, 1, 0]] * 5)
  # Stacked clients carry it on each sample's row, each client its own classes (padding rows, left out of the
  # loss, are zeros).
  split = _tiny_split(tmp_path, partition="label-skew", classes_per_client=1, n_clients=4)
  clients = split_clients(split, 1, presence=True).stack(range(4), 40)
  held, y = np.asarray(clients.data["held"]), np.asarray(clients.data["y"])
  for k in range(4):
    n = int(clients.num_samples[k])
    assert held[k].shape == (40, 4) and (held[k, :n] == held[k, 0]).all() and not held[k, n:].any()
    np.testing.assert_array_equal(np.flatnonzero(held[k, 0]), np.unique(y[k, :n]))
  assert "held" not in split_clients(split, 1).stack(range(4), 40).data


def test_restricted_softmax_scales_the_logits_of_absent_classes():
  """FedRS's loss against a hand computation: the logits of classes 1 and 3, which the client lacks, halved."""
  model, variables = _model_and_variables()
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5)), jnp.float32)
  y = jnp.asarray([0, 2, 0])
  batch, mask = {"x": x, "y": y, "held": jnp.asarray(class_presence(np.asarray(y), 4))}, jnp.ones(3)
  logits = np.asarray(model.apply(variables, x, key_coords=COORDS, train=False), np.float64)
  params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}

  def loss(scale):
    task = classification.classification_task(model, absent_class_scale=scale)
    return float(task.loss(params, state, batch, mask, jax.random.key(0), COORDS)[0])

  def hand(z):
    z = z - z.max(1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(3), np.asarray(y)]))

  np.testing.assert_allclose(loss(0.5), hand(logits * [1, 0.5, 1, 0.5]), rtol=1e-5)
  np.testing.assert_allclose(loss(1.0), hand(logits), rtol=1e-5)
  np.testing.assert_allclose(loss(1.0), float(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()),
                             rtol=1e-5)
  assert loss(0.5) != loss(1.0)
