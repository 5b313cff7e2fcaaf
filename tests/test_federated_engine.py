"""The federated engine against hand computations and a per-client loop."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fed_oracles import looped_fedavg_round
from infl_jax.federated import ClientData, LocalConfig, Task, fedavg, server_optimizer, stack_clients, weighted_mean


# A task whose one full-batch SGD step (lr 1) moves the parameter exactly to the client's
# masked sample mean, so the FedAvg result can be computed by hand.
def _mean_task():
  def loss(params, state, batch, mask, rng, context):
    diff = params["w"] - batch["x"]
    per_row = 0.5 * jnp.sum(diff**2, axis=-1)
    return jnp.sum(per_row * mask) / jnp.sum(mask), state

  return Task(loss=loss)


def _mean_clients(rng, sizes, dim=3, versions=1):
  xs = [rng.normal(size=(n, dim)).astype(np.float32) + i for i, n in enumerate(sizes)]
  return xs, stack_clients([{"x": x} for x in xs], key_version=versions)


def _run_mean_round(clients, weighting="samples", fraction=1.0, chunk=None, server_key_version=1):
  algo = fedavg(_mean_task(), optax.sgd(1.0), local_epochs=1, batch_size=max(np.asarray(clients.num_samples)),
                client_fraction=fraction, weighting=weighting, client_chunk_size=chunk)
  state = algo.init({"params": {"w": jnp.zeros(3)}}, jax.random.key(0), key_version=server_key_version)
  return jax.jit(algo.round)(state, clients, None)


def test_weighted_mean_hand_computed():
  trees = {"a": jnp.array([[1.0, 2.0], [3.0, 4.0], [10.0, 10.0]])}
  w = jnp.array([1.0, 3.0, 0.0])
  np.testing.assert_allclose(weighted_mean(trees, w)["a"], [(1 + 9) / 4, (2 + 12) / 4])
  np.testing.assert_allclose(weighted_mean(trees, jnp.zeros(3))["a"], [0.0, 0.0])


def test_fedavg_weighted_by_sample_count_equals_pooled_mean():
  rng = np.random.default_rng(0)
  xs, clients = _mean_clients(rng, [5, 17, 9])
  state, metrics = _run_mean_round(clients)
  np.testing.assert_allclose(state.params["w"], np.concatenate(xs).mean(0), rtol=1e-5, atol=1e-6)
  assert int(metrics["num_accepted"]) == 3


def test_fedavg_unweighted_is_mean_of_client_means():
  rng = np.random.default_rng(1)
  xs, clients = _mean_clients(rng, [5, 17, 9])
  state, _ = _run_mean_round(clients, weighting="uniform")
  np.testing.assert_allclose(state.params["w"], np.mean([x.mean(0) for x in xs], 0), rtol=1e-5, atol=1e-6)


def test_stale_key_version_is_rejected():
  rng = np.random.default_rng(2)
  xs, clients = _mean_clients(rng, [5, 17, 9], versions=[1, 2, 2])
  state, metrics = _run_mean_round(clients, server_key_version=2)
  np.testing.assert_allclose(state.params["w"], np.concatenate(xs[1:]).mean(0), rtol=1e-5, atol=1e-6)
  assert int(metrics["num_accepted"]) == 2
  state, metrics = _run_mean_round(clients, server_key_version=3)  # nobody current: nothing changes
  np.testing.assert_array_equal(state.params["w"], np.zeros(3))
  assert int(metrics["num_accepted"]) == 0


def test_chunked_round_equals_single_vmap():
  rng = np.random.default_rng(3)
  _, clients = _mean_clients(rng, [4, 8, 6, 3, 7])
  full, _ = _run_mean_round(clients)
  chunked, _ = _run_mean_round(clients, chunk=2)
  np.testing.assert_allclose(chunked.params["w"], full.params["w"], rtol=1e-6)


def test_client_sampling_uses_the_requested_fraction_and_varies_by_round():
  rng = np.random.default_rng(4)
  _, clients = _mean_clients(rng, [4] * 10)
  algo = fedavg(_mean_task(), optax.sgd(1.0), batch_size=4, client_fraction=0.5)
  state = algo.init({"params": {"w": jnp.zeros(3)}}, jax.random.key(0))
  rnd = jax.jit(algo.round)
  seen = []
  for _ in range(3):
    new_state, metrics = rnd(state, clients, None)
    assert int(metrics["num_sampled"]) == 5
    seen.append(np.asarray(new_state.params["w"]))
    state = new_state
  assert not np.allclose(seen[0], seen[1])


class _TinyNet(nn.Module):
  @nn.compact
  def __call__(self, x, mask, train):
    x = nn.Dense(8, use_bias=False)(x)  # a bias before BN gets ~0 gradients that Adam would amplify into noise
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x, mask=mask[:, None] > 0)
    x = nn.relu(x)
    x = nn.Dropout(0.2, deterministic=not train)(x)
    return nn.Dense(3)(x)


def _classifier_task(model):
  def loss(params, state, batch, mask, rng, context):
    logits, updates = model.apply({"params": params, **state}, batch["x"], mask, True,
                                  rngs={"dropout": rng}, mutable=["batch_stats"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0), updates

  return Task(loss=loss)


def _classifier_setup(sizes, seed=0):
  rng = np.random.default_rng(seed)
  per_client = [{"x": rng.normal(size=(n, 5)).astype(np.float32), "y": rng.integers(0, 3, n).astype(np.int32)}
                for n in sizes]
  model = _TinyNet()
  variables = model.init(jax.random.key(1), jnp.zeros((2, 5)), jnp.ones(2), False)
  return model, variables, per_client


@pytest.mark.parametrize("server", ["fedavg", "fedadam"])
def test_vmapped_round_equals_per_client_loop(server):
  model, variables, per_client = _classifier_setup([13, 30, 21, 7])
  clients = stack_clients(per_client)
  task, opt = _classifier_task(model), optax.adam(1e-2)
  server_opt = server_optimizer(server)
  algo = fedavg(task, opt, local_epochs=2, batch_size=8, client_fraction=0.75, server_opt=server_opt, prox_mu=0.1)
  state = algo.init(variables, jax.random.key(7))
  new_state, _ = jax.jit(algo.round)(state, clients, None)

  round_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.round)
  sample_rng, _ = jax.random.split(round_rng)
  sampled = jnp.sort(jax.random.choice(sample_rng, 4, (3,), replace=False))
  params, model_state = looped_fedavg_round(task, opt, LocalConfig(2, 8, 0.1), state, clients, None, sampled,
                                            server_opt=server_opt)
  for got, want in zip(jax.tree_util.tree_leaves((new_state.params, new_state.model_state)),
                       jax.tree_util.tree_leaves((params, model_state))):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_padded_client_trains_exactly_as_unpadded():
  model, variables, per_client = _classifier_setup([13, 30, 21])
  task, opt = _classifier_task(model), optax.adam(1e-2)
  local = LocalConfig(local_epochs=3, batch_size=8)
  from infl_jax.federated import client_update

  update = jax.jit(lambda d, n: client_update(task, opt, local, variables["params"], {"batch_stats": variables["batch_stats"]},
                                              d, n, jax.random.key(3), None))
  alone = stack_clients([per_client[0]])
  padded = stack_clients(per_client)
  take = lambda c: jax.tree_util.tree_map(lambda x: x[0], c.data)
  assert padded.max_samples == 30 and alone.max_samples == 13
  p_alone, s_alone, l_alone = update(take(alone), alone.num_samples[0])
  p_pad, s_pad, l_pad = update(take(padded), padded.num_samples[0])
  for a, b in zip(jax.tree_util.tree_leaves((p_alone, s_alone, l_alone)), jax.tree_util.tree_leaves((p_pad, s_pad, l_pad))):
    np.testing.assert_array_equal(a, b)


def test_each_sample_used_once_per_epoch():
  from infl_jax.federated.local import epoch_order

  order = np.asarray(epoch_order(jax.random.key(0), jnp.int32(11), 16))
  assert sorted(order[:11]) == list(range(11))
  assert sorted(order[11:]) == list(range(11, 16))


def test_learning_happens():
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(3, 5)) * 3
  per_client = []
  for n in [40, 25, 60]:
    y = rng.integers(0, 3, n)
    per_client.append({"x": (centers[y] + rng.normal(size=(n, 5))).astype(np.float32), "y": y.astype(np.int32)})
  model, variables, _ = _classifier_setup([1])
  task = _classifier_task(model)
  algo = fedavg(task, optax.adam(1e-2), local_epochs=2, batch_size=16)
  state = algo.init(variables, jax.random.key(0))
  clients = stack_clients(per_client)
  rnd = jax.jit(algo.round)
  losses = []
  for _ in range(10):
    state, m = rnd(state, clients, None)
    losses.append(float(m["train_loss"]))
  assert losses[-1] < 0.5 * losses[0]


def test_stack_clients_rejects_bad_input():
  with pytest.raises(ValueError, match="client 1 has no samples"):
    stack_clients([{"x": np.ones((3, 2))}, {"x": np.ones((0, 2))}])
  with pytest.raises(ValueError, match="disagree on the number of samples"):
    stack_clients([{"x": np.ones((3, 2)), "y": np.ones(4)}])
  with pytest.raises(ValueError, match="client_fraction"):
    fedavg(_mean_task(), optax.sgd(1.0), client_fraction=0.0)
