"""SCAFFOLD (control variates) in the engine: a hand-computed two-client case, the published update
equations as a per-client loop, sampling, chunking, key-version rejection, resume, and the drift it removes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from infl_jax.federated import RunDir, Task, fedavg, run_rounds, scaffold, stack_clients
from infl_jax.federated.engine import round_keys


def _quadratic_task():
  """Client loss mean_j a_j (w - y_j)^2 / 2 over its real samples: gradient mean_j a_j (w - y_j)."""

  def loss(params, state, batch, mask, rng, context):
    per = 0.5 * batch["a"] * (params["w"] - batch["y"]) ** 2
    return jnp.sum(per * mask) / jnp.maximum(jnp.sum(mask), 1.0), state

  return Task(loss=loss)


def _quadratic_clients(ys, curvatures=None, key_versions=None):
  curvatures = curvatures or [1.0] * len(ys)
  per_client = [{"y": np.asarray([y], np.float32), "a": np.asarray([a], np.float32)} for y, a in zip(ys, curvatures)]
  return stack_clients(per_client, key_version=1 if key_versions is None else np.asarray(key_versions))


def test_two_clients_hand_computed():
  # lr 0.1, two local steps of one sample each, uniform weights, server lr 1 (worked out in docs/design.md's
  # notation: c_i+ is the mean of the client's two raw gradients).
  algo = scaffold(_quadratic_task(), optax.sgd(0.1), local_epochs=2, batch_size=1, weighting="uniform")
  clients = _quadratic_clients([1.0, 3.0])
  state = algo.init({"params": {"w": jnp.float32(0.0)}}, jax.random.key(0), num_clients=2)
  rnd = jax.jit(algo.round)
  state, _ = rnd(state, clients, None)
  # Round 1, c = c_i = 0: client 1 steps 0 -> 0.1 -> 0.19 (gradients -1, -0.9), client 2 0 -> 0.3 -> 0.57
  # (-3, -2.7); x = (0.19 + 0.57) / 2; c_1 = -0.95, c_2 = -2.85, c = (c_1 + c_2) / 2.
  np.testing.assert_allclose(state.params["w"], 0.38, atol=1e-6)
  np.testing.assert_allclose(state.controls["clients"]["w"], [-0.95, -2.85], atol=1e-6)
  np.testing.assert_allclose(state.controls["server"]["w"], -1.9, atol=1e-6)
  state, _ = rnd(state, clients, None)
  # Round 2 from x = 0.38: client 1 corrects by c - c_1 = -0.95: gradients -0.62, -0.463, steps to 0.537, 0.6783;
  # client 2 by +0.95: gradients -2.62, -2.453, steps to 0.547, 0.6973.
  np.testing.assert_allclose(state.params["w"], (0.6783 + 0.6973) / 2, atol=1e-5)
  np.testing.assert_allclose(state.controls["clients"]["w"], [-0.5415, -2.5365], atol=1e-5)
  np.testing.assert_allclose(state.controls["server"]["w"], -1.9 + (0.4085 + 0.3135) / 2, atol=1e-5)


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.tanh(nn.Dense(6)(x)))


def _classification_setup(sizes, seed=0):
  rng = np.random.default_rng(seed)
  per_client = []
  for k, n in enumerate(sizes):  # label skew: client k sees mostly class k % 3
    y = np.where(rng.random(n) < 0.8, k % 3, rng.integers(0, 3, n)).astype(np.int32)
    x = (rng.normal(size=(n, 4)) + y[:, None]).astype(np.float32)
    per_client.append({"x": x, "y": y})
  model = _Net()
  variables = model.init(jax.random.key(1), jnp.zeros((1, 4)))

  def loss(params, state, batch, mask, rng_, context):
    logits = model.apply({"params": params}, batch["x"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0), state

  return Task(loss=loss), variables, stack_clients(per_client), per_client


def _published_scaffold_round(task, lr, local_steps, params, controls, per_client, sampled, weighting, num_clients):
  """One SCAFFOLD round as Karimireddy et al. (2020) write it, client by client: local SGD on the full batch
  with y <- y - lr (g_i(y) - c_i + c), then option II, c_i+ = c_i - c + (x - y_i) / (K lr), and the server step
  x <- x + mean_i (y_i - x), c <- c + sum_i (c_i+ - c_i) / N."""
  server_c, client_c = controls
  grad = jax.jit(jax.grad(lambda p, b, m: task.loss(p, {}, b, m, None, None)[0]))
  tree = jax.tree_util.tree_map
  deltas, weights, control_changes = [], [], []
  new_client_c = dict(enumerate(client_c))
  for k in sampled:
    data = per_client[k]
    mask = np.ones(len(data["y"]), np.float32)
    y = params
    for _ in range(local_steps):
      g = grad(y, data, mask)
      y = tree(lambda p, gi, ci, c: p - lr * (gi - ci + c), y, g, client_c[k], server_c)
    c_new = tree(lambda ci, c, x, yi: ci - c + (x - yi) / (local_steps * lr), client_c[k], server_c, params, y)
    control_changes.append(tree(jnp.subtract, c_new, client_c[k]))
    new_client_c[k] = c_new
    deltas.append(tree(jnp.subtract, y, params))
    weights.append(float(len(data["y"])) if weighting == "samples" else 1.0)
  total = sum(weights)
  mean_delta = tree(lambda *d: sum(w * x for w, x in zip(weights, d)) / total, *deltas)
  new_params = tree(jnp.add, params, mean_delta)
  new_server_c = tree(lambda c, *d: c + sum(d) / num_clients, server_c, *control_changes)
  return new_params, (new_server_c, [new_client_c[k] for k in range(num_clients)])


@pytest.mark.parametrize("chunk", [None, 2])
def test_round_equals_the_published_equations_under_sampling_and_chunking(chunk):
  sizes = [5, 9, 3, 7, 6]
  task, variables, clients, per_client = _classification_setup(sizes)
  lr, epochs = 0.3, 3
  # One full batch per epoch, so the loop's local SGD sees the same minibatches as the engine's.
  algo = scaffold(task, optax.sgd(lr), local_epochs=epochs, batch_size=max(sizes), client_fraction=0.6,
                  weighting="samples", client_chunk_size=chunk)
  state = algo.init(variables, jax.random.key(3), num_clients=len(sizes))
  params = variables["params"]
  controls = (jax.tree_util.tree_map(jnp.zeros_like, params), [jax.tree_util.tree_map(jnp.zeros_like, params)] * 5)
  rnd = jax.jit(algo.round)
  for _ in range(3):
    sampled = np.asarray(jnp.sort(jax.random.choice(round_keys(state).sample, 5, (3,), replace=False)))
    state, metrics = rnd(state, clients, None)
    assert int(metrics["num_accepted"]) == 3
    params, controls = _published_scaffold_round(task, lr, epochs, params, controls, per_client, sampled,
                                                 "samples", 5)
    for got, want in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(params)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        jax.flatten_util.ravel_pytree(state.controls["server"])[0],
        jax.flatten_util.ravel_pytree(controls[0])[0], rtol=1e-5, atol=1e-5)
    for k in range(5):
      got = jax.flatten_util.ravel_pytree(jax.tree_util.tree_map(lambda c: c[k], state.controls["clients"]))[0]
      np.testing.assert_allclose(got, jax.flatten_util.ravel_pytree(controls[1][k])[0], rtol=1e-5, atol=1e-5)


def test_rejected_client_keeps_its_variate_and_moves_nothing():
  algo = scaffold(_quadratic_task(), optax.sgd(0.1), local_epochs=2, batch_size=1, weighting="uniform")
  clients = _quadratic_clients([1.0, 3.0], key_versions=[1, 2])  # client 2 holds a stale key version
  state = algo.init({"params": {"w": jnp.float32(0.0)}}, jax.random.key(0), num_clients=2)
  state, metrics = jax.jit(algo.round)(state, clients, None)
  assert int(metrics["num_accepted"]) == 1
  np.testing.assert_allclose(state.params["w"], 0.19, atol=1e-6)  # client 1's update alone
  np.testing.assert_allclose(state.controls["clients"]["w"], [-0.95, 0.0], atol=1e-6)
  np.testing.assert_allclose(state.controls["server"]["w"], -0.95 / 2, atol=1e-6)


def test_scaffold_removes_the_drift_of_local_steps():
  # Clients with different curvatures: FedAvg with many local steps settles away from the global optimum
  # sum a_i y_i / sum a_i; SCAFFOLD's corrected steps converge to it.
  ys, curvatures = [0.0, 4.0, 1.0], [4.0, 0.5, 1.0]
  optimum = np.dot(ys, curvatures) / np.sum(curvatures)
  clients = _quadratic_clients(ys, curvatures)
  finals = {}
  for name, build in (("fedavg", fedavg), ("scaffold", scaffold)):
    algo = build(_quadratic_task(), optax.sgd(0.2), local_epochs=10, batch_size=1, weighting="uniform")
    state = algo.init({"params": {"w": jnp.float32(0.0)}}, jax.random.key(0), num_clients=3)
    rnd = jax.jit(algo.round)
    for _ in range(60):
      state, _ = rnd(state, clients, None)
    finals[name] = float(state.params["w"])
  assert abs(finals["scaffold"] - optimum) < 1e-4
  assert abs(finals["fedavg"] - optimum) > 0.1


def test_resume_equals_an_uninterrupted_run(tmp_path):
  task, variables, clients, _ = _classification_setup([5, 9, 3, 7])
  algo = scaffold(task, optax.adam(1e-2), local_epochs=2, batch_size=4, client_fraction=0.5)
  init = lambda: algo.init(variables, jax.random.key(5), num_clients=4)
  rnd = jax.jit(algo.round)
  whole = run_rounds(rnd, init(), clients, None, rounds=4, run_dir=RunDir(tmp_path / "whole"))
  run_rounds(rnd, init(), clients, None, rounds=4, run_dir=RunDir(tmp_path / "cut"),
             should_stop=lambda _, done: done >= 2)
  resumed = run_rounds(rnd, init(), clients, None, rounds=4, run_dir=RunDir(tmp_path / "cut", resume=True))
  assert int(resumed.state.round) == 4
  for got, want in zip(jax.tree_util.tree_leaves(resumed.state), jax.tree_util.tree_leaves(whole.state)):
    np.testing.assert_array_equal(got, want)


def test_misuse_meets_one_line_errors():
  algo = scaffold(_quadratic_task(), optax.sgd(0.1))
  with pytest.raises(ValueError, match="num_clients"):
    algo.init({"params": {"w": jnp.float32(0.0)}}, jax.random.key(0))
  state = algo.init({"params": {"w": jnp.float32(0.0)}}, jax.random.key(0), num_clients=3)
  with pytest.raises(ValueError, match="control variates for 3 clients but the round was given 2"):
    algo.round(state, _quadratic_clients([1.0, 2.0]), None)
  plain = fedavg(_quadratic_task(), optax.sgd(0.1)).init({"params": {"w": jnp.float32(0.0)}}, jax.random.key(0))
  with pytest.raises(ValueError, match="no control variates"):
    algo.round(plain, _quadratic_clients([1.0, 2.0]), None)
