"""Keyed layers, keys and keyed models of infl_jax (docs/design.md, "Keys" and "Keyed layers")."""

import json
import os
import stat

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infl_jax.keyed import (
    FiLM,
    KeyedDense,
    KeyEncoder,
    PositionalDense,
    copy_plain_params,
    dense_call_order,
    key_sensitivity,
    key_vector,
    keyed,
    keyed_dense_apply,
    keyed_weights,
    modulate_dense_output,
    plain_variables,
)
from infl_jax.keys import (
    KeyFileError,
    SecretKey,
    generate_key,
    load_key,
    other_mode_key,
    save_key,
    wrong_key_like,
)
from infl_jax.models import (
    PlainMLPClassifier,
    PlainProteomicsNet,
    make_mlp_classifier,
    make_proteomics_net,
)

# ---------------------------------------------------------------------------------------------
# numpy hand computations of the equations in docs/design.md, "Keyed layers"


def np_silu(x):
  return x / (1.0 + np.exp(-x))


def np_layer_norm(x, scale, bias, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale + bias


def np_affine(p, x):
  # torch layout: W [out, in] = kernel.T
  W, b = np.asarray(p["kernel"], np.float64).T, np.asarray(p["bias"], np.float64)
  return x @ W.T + b


def randomize(params, rng, scale=0.5):
  """Same tree, every leaf replaced by N(0, scale^2): no initialiser hides an error."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(rng, len(leaves))
  return jax.tree.unflatten(
      treedef, [scale * jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)]
  )


def f64(x):
  return np.asarray(x, np.float64)


RNG = jax.random.key(0)
COORDS = generate_key(7).coords


# ---------------------------------------------------------------------------------------------
# Equations


def test_key_encoder_matches_hand_computation():
  coords = COORDS[:5]
  encoder = KeyEncoder(hidden=3, key_dim=4)
  params = randomize(encoder.init(RNG, coords)["params"], jax.random.key(1))
  k = encoder.apply({"params": params}, coords)
  hidden = np_silu(np_affine(params["W1"], f64(coords)))
  per_point = np_layer_norm(
      np_silu(np_affine(params["W2"], hidden)), f64(params["norm"]["scale"]), f64(params["norm"]["bias"])
  )
  chex.assert_shape(k, (4,))
  np.testing.assert_allclose(k, per_point.mean(0), rtol=1e-5, atol=1e-5)


def test_keyed_dense_matches_hand_computation():
  lam = 2.5
  x = jax.random.normal(jax.random.key(2), (3, 5))
  k = jax.random.normal(jax.random.key(3), (4,))
  layer = KeyedDense(features=3, key_strength=lam, key_dim=4, key_hidden=2)
  params = randomize(layer.init(RNG, x, k)["params"], jax.random.key(4))
  y = layer.apply({"params": params}, x, k)

  mod = params["key_mod"]
  hidden = np_layer_norm(
      np_silu(np_affine(mod["V1"], f64(k))), f64(mod["norm"]["scale"]), f64(mod["norm"]["bias"])
  )
  st = np_affine(mod["V2"], hidden)
  s, t = st[:3], st[3:]
  W = f64(params["kernel"]).T  # [out, in]
  W_eff = np.diag(1 + lam * np.tanh(s)) @ W
  b_eff = f64(params["bias"]) + lam * np.tanh(t)
  expected = f64(x) @ W_eff.T + b_eff
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)

  # The interceptor's form (from the plain layer's output) is the same function.
  y_plain = f64(x) @ W.T + f64(params["bias"])
  np.testing.assert_allclose(
      modulate_dense_output(y_plain, f64(params["bias"]), s, t, lam), expected, rtol=1e-6, atol=1e-6
  )
  np.testing.assert_allclose(
      keyed_dense_apply(f64(x), f64(params["kernel"]), f64(params["bias"]), s, t, lam), expected, rtol=1e-6
  )
  # No INR path: exactly the plain layer.
  np.testing.assert_allclose(layer.apply({"params": params}, x, None), y_plain, rtol=1e-5, atol=1e-6)


def test_film_matches_hand_computation():
  lam = 1.7
  h = jax.random.normal(jax.random.key(5), (2, 3))
  k = jax.random.normal(jax.random.key(6), (4,))
  film = FiLM(key_strength=lam, key_dim=4, hidden=2)
  params = randomize(film.init(RNG, h, k)["params"], jax.random.key(7))
  out = film.apply({"params": params}, h, k)

  a = np_layer_norm(
      np_silu(np_affine(params["A"], f64(h))), f64(params["norm"]["scale"]), f64(params["norm"]["bias"])
  )
  kk = np.broadcast_to(f64(k), a.shape)
  gb = np_affine(params["F2"], np_silu(np_affine(params["F1"], np.concatenate([a, kk, a * kk], -1))))
  gamma, beta = gb[:, :3], gb[:, 3:]
  expected = f64(h) * (1 + lam * np.tanh(gamma)) + lam * np.tanh(beta)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  chex.assert_shape(params["F1"]["kernel"], (12, 2))  # [a; k; a*k] -> hidden
  np.testing.assert_array_equal(film.apply({"params": params}, h, None), h)


def test_positional_bias_matches_hand_computation():
  x = jax.random.normal(jax.random.key(8), (2, 4))
  layer = PositionalDense(features=5)
  params = randomize(layer.init(RNG, x)["params"], jax.random.key(9))
  y = layer.apply({"params": params}, x)

  j = np.arange(5)
  coord = 2 * j / 4 - 1
  enc = np.stack(
      [f(2.0**i * np.pi * coord) for i in range(8) for f in (np.sin, np.cos)], axis=-1
  )  # [5, 16]
  pb = params["pos_bias"]
  delta = np_affine(pb["L3"], np.maximum(np_affine(pb["L2"], np.maximum(np_affine(pb["L1"], enc), 0)), 0))[:, 0]
  plain = f64(x) @ f64(params["kernel"]) + f64(params["bias"])
  np.testing.assert_allclose(y, plain + delta, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(layer.apply({"params": params}, x, use_inr=False), plain, rtol=1e-5, atol=1e-6)


def test_fresh_keyed_layer_is_close_to_plain():
  x = jax.random.normal(jax.random.key(10), (16, 32))
  k = KeyEncoder().apply(KeyEncoder().init(RNG, COORDS), COORDS)
  layer = KeyedDense(features=24, key_strength=1.0)
  variables = layer.init(RNG, x, k)
  y_key, y_plain = layer.apply(variables, x, k), layer.apply(variables, x, None)
  rel = float(jnp.linalg.norm(y_key - y_plain) / jnp.linalg.norm(y_plain))
  assert 0 < rel < 0.1, rel


# ---------------------------------------------------------------------------------------------
# keyed() on a user's model


class UserBlock(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dense(6)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.relu(x)


class UserMLP(nn.Module):
  """What a user would write: plain nn.Dense, a submodule, dropout."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Dense(8)(x))
    x = UserBlock()(x, train)
    x = nn.Dropout(0.1, deterministic=not train)(x)
    return nn.Dense(3)(x)


X = jax.random.normal(jax.random.key(11), (4, 5))


def plain_and_keyed(key_strength, **kw):
  plain_vars = UserMLP().init(jax.random.key(12), X)
  model = keyed(UserMLP(), key_strength=key_strength, **kw)
  keyed_vars = copy_plain_params(model.init(jax.random.key(13), X, key_coords=COORDS), plain_vars)
  return plain_vars, model, keyed_vars


def test_keyed_user_mlp_keeps_tree_and_places_film():
  plain_vars, model, keyed_vars = plain_and_keyed(2.0)
  p = keyed_vars["params"]
  assert dense_call_order(UserMLP(), X) == ["Dense_0", "UserBlock_0/Dense_0", "Dense_1"]
  assert set(p) == {"Dense_0", "UserBlock_0", "Dense_1", "key_encoder"}
  assert {"kernel", "bias", "key_mod", "film"} == set(p["Dense_0"])
  assert {"kernel", "bias", "key_mod", "film"} == set(p["UserBlock_0"]["Dense_0"])
  assert {"kernel", "bias", "key_mod"} == set(p["Dense_1"])  # the last Dense gets no FiLM
  chex.assert_trees_all_equal(plain_variables(keyed_vars), plain_vars)
  # key-less init creates the same tree
  chex.assert_trees_all_equal_shapes(model.init(RNG, X), keyed_vars)


def test_keyed_user_mlp_matches_plain_when_key_path_is_neutral():
  plain_vars, model, keyed_vars = plain_and_keyed(0.0)
  y_plain = UserMLP().apply(plain_vars, X)
  np.testing.assert_array_equal(model.apply(keyed_vars, X, key_coords=COORDS), y_plain)

  plain_vars, model, keyed_vars = plain_and_keyed(3.0)
  np.testing.assert_array_equal(model.apply(keyed_vars, X), y_plain)  # no INR path
  y_fresh = model.apply(keyed_vars, X, key_coords=COORDS)
  # V2 and F2 zero: s = t = gamma = beta = 0, the keyed model is the plain one.
  zeroed = jax.tree_util.tree_map_with_path(
      lambda path, leaf: jnp.zeros_like(leaf)
      if any(getattr(k, "key", None) in ("V2", "F2") for k in path) else leaf,
      keyed_vars,
  )
  np.testing.assert_allclose(model.apply(zeroed, X, key_coords=COORDS), y_plain, rtol=1e-6, atol=1e-6)
  # lambda > 0 with a trained (here: perturbed) key path changes the function.
  perturbed = jax.tree_util.tree_map_with_path(
      lambda path, leaf: leaf + 0.5 * jax.random.normal(jax.random.key(len(path)), leaf.shape)
      if any(getattr(k, "key", None) in ("V2", "F2") for k in path) else leaf,
      keyed_vars,
  )
  y_key = model.apply(perturbed, X, key_coords=COORDS)
  y_wrong = model.apply(perturbed, X, key_coords=wrong_key_like(generate_key(7)).coords)
  assert float(jnp.abs(y_key - y_plain).max()) > 0.1
  assert float(jnp.abs(y_key - y_wrong).max()) > 1e-3
  assert float(jnp.abs(y_fresh - y_plain).max()) > 0  # fresh: close but not identical


def test_keyed_handles_train_mode_nesting_and_variants():
  _, model, keyed_vars = plain_and_keyed(1.0)
  y, updates = model.apply(
      keyed_vars, X, train=True, key_coords=COORDS, rngs={"dropout": jax.random.key(1)},
      mutable=["batch_stats"],
  )
  chex.assert_shape(y, (4, 3))
  chex.assert_trees_all_equal_shapes(updates["batch_stats"], keyed_vars["batch_stats"])

  class Outer(nn.Module):  # a keyed model used inside a bigger user model
    @nn.compact
    def __call__(self, x, key_coords=None):
      return nn.Dense(2)(keyed(UserMLP(), key_strength=1.0, name="inner")(x, key_coords=key_coords))

  class OuterUnnamed(nn.Module):  # keyed in place: same parameter path as the plain submodule
    @nn.compact
    def __call__(self, x, key_coords=None):
      return nn.Dense(2)(keyed(UserMLP(), key_strength=1.0)(x, key_coords=key_coords))

  for outer, inner in ((Outer(), "inner"), (OuterUnnamed(), "UserMLP_0")):
    outer_vars = outer.init(RNG, X, COORDS)
    assert set(outer_vars["params"]) == {inner, "Dense_0"}
    assert {"film", "key_mod"} <= set(outer_vars["params"][inner]["Dense_0"])
    assert "film" not in outer_vars["params"][inner]["Dense_1"]
    assert "key_encoder" in outer_vars["params"][inner]
    assert "key_mod" not in outer_vars["params"]["Dense_0"]  # outside the keyed part

  pos = keyed(UserMLP(), key_strength=1.0, variant="positional")
  pos_vars = pos.init(RNG, X, key_coords=COORDS)
  assert {"kernel", "bias", "pos_bias", "film"} == set(pos_vars["params"]["Dense_0"])
  assert not np.allclose(pos.apply(pos_vars, X, key_coords=COORDS), pos.apply(pos_vars, X))


def test_keyed_rejects_bad_input():
  _, model, keyed_vars = plain_and_keyed(1.0)
  with pytest.raises(ValueError, match=r"shape \[M, 2\]"):
    model.apply(keyed_vars, X, key_coords=np.zeros((128, 3), np.float32))
  with pytest.raises(ValueError, match="variant"):
    keyed(UserMLP(), variant="lora")

  class NoDense(nn.Module):
    @nn.compact
    def __call__(self, x):
      return x * 2

  with pytest.raises(ValueError, match="no flax.linen.Dense"):
    keyed(NoDense()).init(RNG, X, key_coords=COORDS)


# ---------------------------------------------------------------------------------------------
# Reference models (one small configuration shared by the tests: on CPU, initialising a new
# shape costs more than running it)

NET_X = jax.random.normal(jax.random.key(14), (6, 10))


@pytest.fixture(scope="module")
def small_net():
  model = make_proteomics_net(num_classes=3, hidden=8, bottleneck=4)
  return model, model.init(RNG, NET_X)


def test_proteomics_net_three_modes_and_tree(small_net):
  model, variables = small_net
  x = NET_X
  p = variables["params"]
  assert set(p) == {"embed", "block_0", "block_1", "bottleneck", "head", "key_encoder"}
  assert set(p["block_0"]) == {"dense_0", "dense_1", "bn_0", "bn_out"}
  for dense in (p["embed"], p["block_0"]["dense_0"], p["block_1"]["dense_1"], p["bottleneck"]):
    assert {"kernel", "bias", "key_mod", "film"} == set(dense)
  assert {"kernel", "bias", "key_mod"} == set(p["head"])
  assert dense_call_order(model.model, x)[-1] == "head"
  assert model.key_strength == 20.0 and make_proteomics_net(5).model.hidden == 64
  assert model.model.dropout_rate == 0.2

  right = generate_key(1)
  y_right = model.apply(variables, x, key_coords=right.coords)
  y_wrong = model.apply(variables, x, key_coords=wrong_key_like(right).coords)
  y_mode = model.apply(variables, x, key_coords=other_mode_key(right).coords)
  y_none = model.apply(variables, x, key_coords=None)
  chex.assert_shape([y_right, y_wrong, y_mode, y_none], (6, 3))
  assert not np.allclose(y_right, y_wrong) and not np.allclose(y_right, y_mode)
  assert not np.allclose(y_right, y_none)
  # No INR path = the plain network with the same W, b.
  plain_out = PlainProteomicsNet(3, 8, 4).apply(plain_variables(variables), x)
  np.testing.assert_array_equal(y_none, plain_out)
  np.testing.assert_allclose(key_vector(variables, right), key_vector(variables, right.coords))


def test_zero_key_strength_model_equals_plain_model_in_training():
  x = NET_X
  for model, plain_model in (
      (make_mlp_classifier((8, 4), 3, key_strength=0.0, norm="batch", dropout_rate=0.3),
       PlainMLPClassifier((8, 4), 3, norm="batch", dropout_rate=0.3)),
      (make_proteomics_net(3, key_strength=0.0, hidden=8, bottleneck=4), PlainProteomicsNet(3, 8, 4)),
  ):
    plain_vars = plain_model.init(jax.random.key(2), x)
    keyed_vars = copy_plain_params(model.init(RNG, x), plain_vars)
    kwargs = dict(train=True, rngs={"dropout": jax.random.key(4)}, mutable=["batch_stats"])
    y_keyed, stats_keyed = model.apply(keyed_vars, x, key_coords=COORDS, **kwargs)
    y_plain, stats_plain = plain_model.apply(plain_vars, x, **kwargs)
    np.testing.assert_array_equal(y_keyed, y_plain)
    chex.assert_trees_all_equal(stats_keyed, stats_plain)


def test_jit_vmap_over_stacked_client_params_and_grad(small_net):
  model, variables = small_net
  x = NET_X
  # three "clients": the same tree at three scales, stacked on a leading axis
  stacked = jax.tree.map(lambda leaf: jnp.stack([leaf, 1.1 * leaf, 0.9 * leaf]), variables)
  chex.assert_tree_shape_prefix(stacked, (3,))
  forward = jax.jit(lambda v, coords: model.apply(v, x, key_coords=coords))
  y = jax.jit(jax.vmap(forward, in_axes=(0, None)))(stacked, jnp.asarray(COORDS))
  for c in range(3):
    client = jax.tree.map(lambda leaf: leaf[c], stacked)
    np.testing.assert_allclose(y[c], forward(client, COORDS), rtol=1e-5, atol=1e-5)

  def loss(params, batch_stats):
    logits, _ = model.apply(
        {"params": params, "batch_stats": batch_stats}, x, key_coords=COORDS, train=True,
        rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"],
    )
    return jnp.mean(logits**2)

  grads = jax.jit(jax.grad(loss))(variables["params"], variables["batch_stats"])
  # the key encoder is trained: its weights get gradient
  assert float(jnp.abs(grads["key_encoder"]["W1"]["kernel"]).sum()) > 0


def test_key_coords_never_enter_variables(small_net):
  model, _ = small_net
  x = NET_X
  variables = model.init(RNG, x, key_coords=COORDS)
  _, updates = model.apply(
      variables, x, key_coords=COORDS, train=True, rngs={"dropout": RNG}, mutable=True
  )
  coord_values = set(np.asarray(COORDS).ravel().tolist())
  for tree in (variables, updates):
    for leaf in jax.tree.leaves(tree):
      leaf = np.asarray(leaf)
      assert leaf.shape != COORDS.shape
      shared = coord_values & set(leaf.ravel().tolist())
      assert len(shared) <= 2, "key coordinates found in the variables"


def test_key_sensitivity_reports_the_weakness(small_net):
  model, variables = small_net
  right = generate_key(0)
  report = key_sensitivity(
      variables, right, {"seed": wrong_key_like(right).coords, "none": None}, 20.0
  )
  # Documented weakness (docs/design.md, "The known weakness"): another seed gives a nearly identical k.
  assert 0.98 < report["seed"]["k_cosine"] < 1.0
  assert 0 < report["seed"]["weight_rel_diff"] < report["none"]["weight_rel_diff"]
  w = keyed_weights(variables, right, 20.0)
  assert set(w) == {"embed", "block_0/dense_0", "block_0/dense_1", "block_1/dense_0",
                    "block_1/dense_1", "bottleneck", "head"}


# ---------------------------------------------------------------------------------------------
# Keys


def test_generate_key_is_deterministic_and_modes_behave():
  key = generate_key(0)
  # Golden values: the same on every machine (PCG64 bits, arithmetic done here).
  np.testing.assert_array_equal(
      key.coords[:2], np.float32([[0.779477596282959, 0.11427610367536545],
                                  [0.6018161773681641, 0.9130276441574097]])
  )
  np.testing.assert_array_equal(
      generate_key(0, "normal").coords[0], np.float32([-0.9756027460098267, -0.6053361296653748])
  )
  chex.assert_shape(key.coords, (128, 2))
  assert key.coords.dtype == np.float32 and -1 <= key.coords.min() and key.coords.max() <= 1
  assert generate_key(0) == key and hash(generate_key(0)) == hash(key)
  assert not np.array_equal(generate_key(0, version=2).coords, key.coords)  # rotation
  assert not np.array_equal(wrong_key_like(key).coords, key.coords)
  assert other_mode_key(key).mode == "normal"
  np.testing.assert_array_equal(generate_key(3, "ones").coords, np.ones((128, 2)))
  np.testing.assert_array_equal(generate_key(3, "zeros").coords, np.zeros((128, 2)))
  const = generate_key(3, "constant").coords
  assert np.all(const == const[0, 0]) and const[0, 0] != generate_key(4, "constant").coords[0, 0]
  assert "seed" in repr(key) and "0.77" not in repr(key) and "hidden" in repr(key)
  with pytest.raises(ValueError):
    key.coords[0, 0] = 1.0  # read-only
  with pytest.raises(ValueError, match="mode"):
    generate_key(0, "gaussian")
  with pytest.raises(ValueError, match="other_mode_key"):
    wrong_key_like(generate_key(0, "ones"))


def test_key_file_round_trip_permissions_and_no_overwrite(tmp_path):
  key = generate_key(5, "normal", version=3)
  path = save_key(key, tmp_path / "sub" / "client.key")
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
  loaded = load_key(path)
  assert loaded == key and (loaded.seed, loaded.mode, loaded.version) == (5, "normal", 3)
  np.testing.assert_array_equal(loaded.coords, key.coords)

  before = path.read_bytes()
  with pytest.raises(KeyFileError, match="already exists"):
    save_key(generate_key(6), path)
  assert path.read_bytes() == before
  save_key(generate_key(6), path, overwrite=True)
  assert load_key(path) == generate_key(6)
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
  assert [p.name for p in path.parent.iterdir()] == ["client.key"]  # no temp files left


def write_private(path, text):
  path.write_text(text)
  path.chmod(0o600)  # like a real key file, so load_key has no permission warning to give


def test_key_file_errors(tmp_path):
  key = generate_key(5)
  path = save_key(key, tmp_path / "k.json")
  record = json.loads(path.read_text())

  # A format-1 file (seed and coordinates) of the wrong shape.
  wrong_shape = {"format": "infl-secret-key", "format_version": 1, "seed": 5, "mode": "uniform", "version": 1,
                 "coords_sha256": "0" * 64, "coords": np.zeros((128, 3)).tolist()}
  write_private(tmp_path / "shape.json", json.dumps(wrong_shape))
  with pytest.raises(KeyFileError, match=r"shape \(128, 3\)"):
    load_key(tmp_path / "shape.json")

  write_private(tmp_path / "trunc.json", path.read_text()[:200])
  with pytest.raises(KeyFileError, match="corrupted"):
    load_key(tmp_path / "trunc.json")

  tampered = dict(record, material=("1" if record["material"][0] == "0" else "0") + record["material"][1:])
  write_private(tmp_path / "tampered.json", json.dumps(tampered))
  with pytest.raises(KeyFileError, match="checksum"):
    load_key(tmp_path / "tampered.json")

  with pytest.raises(KeyFileError, match="no key file"):
    load_key(tmp_path / "missing.json")

  os.chmod(path, 0o644)
  with pytest.raises(KeyFileError, match="chmod 600"):
    load_key(path)
  assert load_key(path, allow_shared=True) == key

  with pytest.raises(ValueError, match=r"\[M, 2\]"):
    SecretKey(bytes(32), "uniform", 1, np.zeros((128, 3)))
