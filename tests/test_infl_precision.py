"""Mixed precision (bfloat16 compute, float32 master weights) against float32."""

import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from infl_jax import keys as keylib
from infl_jax import models
from runkit.checkpoint import Checkpointer
from runkit.errors import UserInputError
from infl_jax.config import TrainConfig
from infl_jax.federated import fedavg, stack_clients
from infl_jax.keyed import FiLM, KeyedDense, PositionalDense
from infl_jax.keyed._params import compute_dtype
from infl_jax.main import main, train_and_evaluate
from infl_jax.tasks.classification import classification_task, create_model

COORDS = jnp.asarray(keylib.generate_key(0).coords)
X = jax.random.normal(jax.random.key(0), (16, 12))


def _relative_max_diff(a, b):
  return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("make", [
    lambda dtype: models.make_proteomics_net(3, hidden=16, bottleneck=8, dtype=dtype),  # lambda 20
    lambda dtype: models.make_mlp_classifier((16, 8), 3, key_strength=20.0, norm="batch", dtype=dtype),
], ids=["proteomics", "mlp"])
def test_bf16_logits_close_to_float32_and_state_stays_float32(make):
  full, mixed = make(None), make("bfloat16")
  variables = full.init(jax.random.key(1), X, key_coords=None, train=False)
  mixed_variables = mixed.init(jax.random.key(1), X, key_coords=None, train=False)
  chex.assert_trees_all_equal(variables, mixed_variables)  # same float32 parameters either way
  assert {a.dtype for a in jax.tree_util.tree_leaves(mixed_variables)} == {jnp.dtype(jnp.float32)}

  for coords in (COORDS, None):
    want = full.apply(variables, X, key_coords=coords, train=False)
    got = mixed.apply(variables, X, key_coords=coords, train=False)
    assert got.dtype == jnp.float32  # the head computes in float32, so do softmax and the loss
    assert _relative_max_diff(got, want) < 5e-2
    train_kw = dict(train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(2)})
    want, want_stats = full.apply(variables, X, key_coords=coords, **train_kw)
    got, got_stats = mixed.apply(variables, X, key_coords=coords, **train_kw)
    assert _relative_max_diff(got, want) < 5e-2
    assert {a.dtype for a in jax.tree_util.tree_leaves(got_stats)} == {jnp.dtype(jnp.float32)}
    chex.assert_trees_all_close(got_stats, want_stats, atol=5e-2, rtol=5e-2)

  # The hidden layers really compute in bfloat16 (and the key still changes the function).
  _, inter = mixed.apply(variables, X, key_coords=COORDS, train=False, capture_intermediates=True)
  dtypes = {a.dtype for a in jax.tree_util.tree_leaves(inter)}
  assert jnp.dtype(jnp.bfloat16) in dtypes
  assert not np.allclose(mixed.apply(variables, X, key_coords=COORDS, train=False),
                         mixed.apply(variables, X, key_coords=None, train=False), atol=1e-2)


def test_bf16_keyed_layers_compute_in_bf16_close_to_float32():
  k = jax.random.normal(jax.random.key(3), (16,))
  h = jax.random.normal(jax.random.key(4), (16, 8))
  for layer_cls, kwargs, args in ((KeyedDense, dict(features=6, key_strength=20.0), (X, k)),
                                  (FiLM, dict(key_strength=20.0), (h, k)),
                                  (PositionalDense, dict(features=6), (X,))):
    layer = layer_cls(**kwargs)
    variables = layer.init(jax.random.key(5), *args)
    want = layer.apply(variables, *args)
    if layer_cls is FiLM:  # FiLM keeps its input's dtype; its matmuls run in the compute dtype
      got = layer_cls(**kwargs, dtype=jnp.bfloat16).apply(variables, args[0].astype(jnp.bfloat16), *args[1:])
    else:
      got = layer_cls(**kwargs, dtype=jnp.bfloat16).apply(variables, *args)
    assert got.dtype == jnp.bfloat16, layer_cls
    assert _relative_max_diff(got, want) < 5e-2, layer_cls


def _blobs(seed, sizes):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(3, 12)) * 0.7  # overlapping classes: the loss plateaus well above 0
  per_client = []
  for n in sizes:
    y = rng.integers(0, 3, n)
    per_client.append({"x": (centers[y] + rng.normal(size=(n, 12))).astype(np.float32), "y": y.astype(np.int32)})
  return stack_clients(per_client)


def test_bf16_training_reaches_float32_loss_with_float32_master_weights():
  clients = _blobs(0, [40, 25, 60])
  losses, finals = {}, {}
  for dtype in (None, "bfloat16"):
    model = models.make_mlp_classifier((16,), 3, key_strength=5.0, norm="batch", dtype=dtype)
    variables = model.init(jax.random.key(1), X, key_coords=None, train=False)
    algo = fedavg(classification_task(model), optax.adam(3e-3), local_epochs=2, batch_size=16)
    state = algo.init(variables, jax.random.key(0))
    round_fn = jax.jit(algo.round)
    history = []
    for _ in range(6):
      state, metrics = round_fn(state, clients, COORDS)
      history.append(float(metrics["train_loss"]))
    losses[dtype], finals[dtype] = history, state
  full, mixed = losses[None], losses["bfloat16"]
  assert mixed[-1] < 0.6 * mixed[0]  # bf16 learns (float32 here: about 1.0 -> 0.40)
  # The two runs follow the same loss curve (measured: within 0.01 per round).
  np.testing.assert_allclose(mixed, full, atol=0.05)
  state = finals["bfloat16"]
  dtypes = {a.dtype for a in jax.tree_util.tree_leaves((state.params, state.model_state, state.opt_state))
            if jnp.issubdtype(a.dtype, jnp.floating)}
  assert dtypes == {jnp.dtype(jnp.float32)}


def test_infl_train_bf16_and_sharded_end_to_end(tmp_path):
  config = TrainConfig.for_dataset("proteomics", model="mlp", hidden=(16,), rounds=2, local_epochs=1, batch_size=16,
                                   checkpoint_every=1, central_baseline=False, n_top_features=200,
                                   compute_dtype="bfloat16", shard_clients=True)
  summary = train_and_evaluate(config, tmp_path, keylib.generate_key(3), show_progress=False)
  assert np.isfinite(summary["test"]["right_key"]["accuracy"])
  fingerprint, defaults = config.resume_fingerprint()
  ckpt = Checkpointer(pathlib.Path(tmp_path) / "checkpoints", config=fingerprint, config_defaults=defaults)
  metadata = ckpt._manager.item_metadata(ckpt.latest_step())["state"]
  ckpt.close()
  assert {str(m.dtype) for m in jax.tree_util.tree_leaves(dict(metadata["state"]["params"]))} == {"float32"}
  assert fingerprint["compute_dtype"] == "bfloat16"
  assert defaults["compute_dtype"] == "float32"  # a checkpoint from before the setting resumes as float32


def test_bad_precision_settings_give_clear_errors(tmp_path, capsys):
  with pytest.raises(ValueError, match="bfloat16"):
    compute_dtype("int8")
  with pytest.raises(ValueError, match="unknown compute dtype"):
    models.make_mlp_classifier((4,), 2, dtype="bf17")
  assert compute_dtype("float32") is None and compute_dtype("bfloat16") == jnp.bfloat16
  with pytest.raises(UserInputError, match="compute_dtype"):
    create_model(TrainConfig(compute_dtype="float16"), 3)
  assert main(["--dataset", "nutrimouse", "--bf16", "--workdir", str(tmp_path / "w")]) != 0
  assert "--bf16 is available for the classification task" in capsys.readouterr().err
