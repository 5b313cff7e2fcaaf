"""The README's path: a user's plain Flax MLP, keyed in one call, trained by the federated engine."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from infl_jax.federated import fedavg, stack_clients
from infl_jax.keyed import keyed
from infl_jax.keys import generate_key, wrong_key_like
from infl_jax.tasks.classification import classification_metrics, predict_logits, classification_task


class UserMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(32)(x)))


def test_keyed_user_model_learns_federated_and_depends_on_the_key():
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(3, 10)) * 2
  def sample(n):
    y = rng.integers(0, 3, n)
    return (centers[y] + rng.normal(size=(n, 10))).astype(np.float32), y.astype(np.int32)
  per_client = [sample(n) for n in (30, 50, 40)]
  x_test, y_test = sample(300)

  model = keyed(UserMLP(), key_strength=20.0)
  key = generate_key(seed=1234)
  variables = model.init(jax.random.key(0), jnp.ones((4, 10)), key_coords=key.coords)
  algo = fedavg(classification_task(model), optax.adam(3e-3), local_epochs=2, batch_size=16)
  clients = stack_clients([{"x": x, "y": y} for x, y in per_client])
  state = algo.init(variables, jax.random.key(1))
  round_fn = jax.jit(algo.round)
  for _ in range(15):
    state, metrics = round_fn(state, clients, key.coords)
  trained = {"params": state.params}
  right = classification_metrics(y_test, predict_logits(model, trained, x_test, key.coords), 3)
  plain = predict_logits(model, trained, x_test, None)
  assert right["accuracy"] > 0.9
  assert not np.allclose(plain, predict_logits(model, trained, x_test, key.coords), atol=1e-3)
  wrong = predict_logits(model, trained, x_test, wrong_key_like(key).coords)
  assert wrong.shape == (300, 3) and np.isfinite(wrong).all()
