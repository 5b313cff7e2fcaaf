"""The host-driven round (``infl_jax.federated.host_round``) computes what the compiled round computes, in every
setting it accepts: client sampling, rejected key versions, either weighting, a round schedule, FedProx, Adam,
site-local variables and wrapped last batches; it refuses what it does not run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from infl_jax.federated import Task, cosine_round_schedule, fedavg, stack_clients
from infl_jax.federated.host_round import host_round
from infl_jax.federated.site_local import SiteLocal


def _regression_task():
  """A linear model with a per-client-able offset ("local") and a running mean as model state."""
  def loss(params, state, batch, mask, rng, context):
    pred = batch["x"] @ params["w"] + params["local"]["b"]
    per_row = (pred - batch["y"]) ** 2
    new_state = {"mean": 0.9 * state["mean"] + 0.1 * jnp.sum(batch["x"] * mask[:, None], 0) / jnp.sum(mask)}
    return jnp.sum(per_row * mask) / jnp.sum(mask), new_state
  return Task(loss=loss)


def _clients(sizes, versions):
  rng = np.random.default_rng(0)
  data = []
  for k, n in enumerate(sizes):
    x = rng.normal(size=(n, 3)).astype(np.float32)
    data.append({"x": x, "y": (x @ np.array([1.0, -2.0, 0.5], np.float32) + k).astype(np.float32)})
  return stack_clients(data, key_version=versions)


SPLIT = SiteLocal(split=lambda p: ({"w": p["w"]}, {"local": p["local"]}),
                  merge=lambda shared, local: {**shared, **local})


@pytest.mark.parametrize("settings", [
    dict(client_fraction=0.5, weighting="samples"),
    dict(weighting="uniform", prox_mu=0.1, client_lr_schedule=cosine_round_schedule(3)),
    dict(site_local=SPLIT, wrap_last_batch=True, client_fraction=0.75),
    dict(wrap_last_batch=True, local_epochs=2),
])
@pytest.mark.parametrize("optimizer", [optax.sgd(0.05), optax.adam(0.01)], ids=["sgd", "adam"])
def test_host_round_equals_compiled_round(settings, optimizer):
  algorithm = fedavg(_regression_task(), optimizer, batch_size=3, **{"local_epochs": 1, **settings})
  clients = _clients((4, 7, 2, 5), versions=(1, 1, 2, 1))  # client 2 holds a stale key version
  variables = {"params": {"w": jnp.zeros(3), "local": {"b": jnp.zeros(())}}, "mean": jnp.zeros(3)}
  compiled = host = algorithm.init(variables, jax.random.key(1), num_clients=4)
  run_compiled, run_host = jax.jit(algorithm.round), host_round(algorithm)
  for _ in range(3):
    compiled, compiled_metrics = run_compiled(compiled, clients, None)
    host, host_metrics = run_host(host, clients, None)
    for got, want in zip(jax.tree_util.tree_leaves((host, host_metrics)),
                         jax.tree_util.tree_leaves((compiled, compiled_metrics))):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert int(host_metrics["num_accepted"]) == int(compiled_metrics["num_accepted"])


def test_host_round_refuses_scaffold():
  algorithm = fedavg(_regression_task(), optax.sgd(0.1), control_variates=True)
  with pytest.raises(ValueError, match="SCAFFOLD"):
    host_round(algorithm)
