"""Clients that hold few classes: LayerNorm in the MLP and the single-class warning."""

import jax
import jax.numpy as jnp
import numpy as np

from infl_jax.config import TrainConfig
from infl_jax.keys import generate_key
from infl_jax.models import make_mlp_classifier
from infl_jax.tasks import classification

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
