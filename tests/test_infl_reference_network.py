"""The keyed proteomics network against an independent numpy implementation of the reference
equations (docs/design.md, "Keyed layers" and "Data sets and presets"): the whole network, on the
same weights, in inference mode (BatchNorm running statistics, no dropout).

Reference forward pass, written out layer by layer:

    k   = mean_m LN(SiLU(W2 SiLU(W1 c_m + b1) + b2))              key encoder, 16 wide throughout
    KL(x)   = (x W^T) * (1 + l tanh s) + b + l tanh t,  [s;t] = V2 LN(SiLU(V1 k))
    FiLM(h) = h * (1 + l tanh g) + l tanh b,  [g;b] = F2 SiLU(F1 [a; k; a*k]),  a = LN(SiLU(A h))
    h = FiLM(KL_embed(x))
    twice: r = h; h = FiLM(KL(h)); h = ReLU(BN(h)); h = FiLM(KL(h)); h = BN(h + r)    (no ReLU)
    h = ReLU(FiLM(KL_fc1(h))); logits = KL_fc2(h)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infl_jax.keys import generate_key
from infl_jax.models import make_proteomics_net

LAM = 3.0
EPS = 1e-5


def silu(x):
  return 0.5 * x * (1.0 + np.tanh(0.5 * x))  # x * sigmoid(x), without exp overflow


def layer_norm(p, x):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + EPS) * p["scale"] + p["bias"]


def linear(p, x):
  return x @ p["kernel"] + p["bias"]


def key_vector(p, coords):
  return layer_norm(p["norm"], silu(linear(p["W2"], silu(linear(p["W1"], coords))))).mean(0)


def keyed_linear(p, x, k):
  s, t = np.split(linear(p["key_mod"]["V2"], layer_norm(p["key_mod"]["norm"], silu(linear(p["key_mod"]["V1"], k)))),
                  2)
  return (x @ p["kernel"]) * (1 + LAM * np.tanh(s)) + p["bias"] + LAM * np.tanh(t)


def film(p, h, k):
  a = layer_norm(p["norm"], silu(linear(p["A"], h)))
  kk = np.broadcast_to(k, a.shape)
  g, b = np.split(linear(p["F2"], silu(linear(p["F1"], np.concatenate([a, kk, a * kk], -1)))), 2, axis=-1)
  return h * (1 + LAM * np.tanh(g)) + LAM * np.tanh(b)


def batch_norm(p, stats, h):
  return (h - stats["mean"]) / np.sqrt(stats["var"] + EPS) * p["scale"] + p["bias"]


def reference_forward(params, stats, x, coords):
  k = key_vector(params["key_encoder"], coords)
  keyed = lambda name, h, p=params: film(p[name]["film"], keyed_linear(p[name], h, k), k)
  h = keyed("embed", x)
  for i in range(2):
    p, s = params[f"block_{i}"], stats[f"block_{i}"]
    residual = h
    h = np.maximum(batch_norm(p["bn_0"], s["bn_0"], keyed("dense_0", h, p)), 0)
    h = batch_norm(p["bn_out"], s["bn_out"], keyed("dense_1", h, p) + residual)
  h = np.maximum(keyed("bottleneck", h), 0)
  return keyed_linear(params["head"], h, k)


def randomized(variables, seed):
  """Every parameter N(0, 0.5^2) and every running variance positive: no initialiser hides an error."""
  leaves, treedef = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(variables)[0]]
  out = []
  for path, key, leaf in zip(paths, keys, leaves):
    value = 0.5 * jax.random.normal(key, leaf.shape, leaf.dtype)
    out.append(jnp.abs(value) + 0.5 if path.endswith("'var']") else value)
  return jax.tree.unflatten(treedef, out)


@pytest.mark.parametrize("num_classes", [2, 5])
def test_keyed_proteomics_net_equals_reference_equations(num_classes):
  model = make_proteomics_net(num_classes, key_strength=LAM)
  x = np.asarray(jax.random.normal(jax.random.key(1), (6, 11)), np.float64)
  coords = np.asarray(generate_key(3).coords, np.float64)
  variables = randomized(model.init({"params": jax.random.key(0), "dropout": jax.random.key(0)},
                                    jnp.zeros((2, 11)), key_coords=None, train=False), seed=2)
  as_np = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
  # The reference's key encoder is as wide as the key vector.
  assert as_np["params"]["key_encoder"]["W1"]["kernel"].shape == (2, 16)

  # Both in float64: the random parameters drive the logits to ~1e7, where float32 rounding through eight
  # keyed layers reaches a relative 2e-4 (and moves with the compiler: jaxlib 0.12 differs from 0.10).
  with jax.enable_x64(True):
    logits = model.apply(jax.tree.map(jnp.asarray, as_np), jnp.asarray(x), key_coords=jnp.asarray(coords),
                         train=False)
    assert logits.dtype == jnp.float64
  expected = reference_forward(as_np["params"], as_np["batch_stats"], x, coords)
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-10)


def test_residual_relu_option_differs_from_reference():
  model = make_proteomics_net(2, key_strength=LAM, residual_relu=True)
  x = np.asarray(jax.random.normal(jax.random.key(1), (6, 11)), np.float64)
  coords = np.asarray(generate_key(3).coords, np.float64)
  variables = randomized(model.init({"params": jax.random.key(0), "dropout": jax.random.key(0)},
                                    jnp.zeros((2, 11)), key_coords=None, train=False), seed=2)
  as_np = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
  logits = model.apply(variables, jnp.asarray(x, jnp.float32), key_coords=coords, train=False)
  assert not np.allclose(np.asarray(logits), reference_forward(as_np["params"], as_np["batch_stats"], x, coords),
                         atol=1e-3)
