"""The sharded round (client axis split over devices) against the single-device round.

Several CPU devices exist only if XLA_FLAGS asks for them before jax is imported, so the
comparison runs in a subprocess with four host devices.
"""

import json
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from infl_jax.federated import ClientData, Task, client_mesh, fedavg, shard_clients, stack_clients

_CHILD = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np, optax
    from infl_jax import keys, models
    from infl_jax.federated import client_mesh, fedavg, shard_clients, stack_clients
    from infl_jax.tasks.classification import classification_task

    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    sizes = [13, 30, 21, 7, 9, 16]  # 6 clients on 4 devices: two padding clients
    per_client = [{"x": rng.normal(size=(n, 5)).astype(np.float32), "y": rng.integers(0, 3, n).astype(np.int32)}
                  for n in sizes]
    clients = stack_clients(per_client, key_version=[1, 1, 2, 1, 1, 1])  # client 2 holds a stale key
    mesh = client_mesh()
    sharded = shard_clients(clients, mesh)
    model = models.make_mlp_classifier((8,), 3, key_strength=1.0, norm="batch", dropout_rate=0.2)
    coords = jnp.asarray(keys.generate_key(0).coords)
    # One init program instead of a compile per initializer shape (the start is the same for both runs).
    init = jax.jit(model.init, static_argnames=("key_coords", "train"))
    variables = init({"params": jax.random.key(1), "dropout": jax.random.key(1)}, jnp.zeros((2, 5)),
                     key_coords=None, train=False)
    task = classification_task(model)

    # 4 of 6 clients sampled per round, one client per vmap chunk; client 2 (stale key) is among
    # round 1's sample. Plain SGD: Adam divides each gradient by its running root mean square, so on a
    # coordinate whose gradient is near zero the last-bit difference between two compilations of one client's
    # step becomes a step-sized difference (2e-5 after two rounds on jaxlib 0.12), hiding what is compared.
    algo = fedavg(task, optax.sgd(0.1), local_epochs=2, batch_size=8, client_fraction=0.67, client_chunk_size=1)
    rnd = jax.jit(algo.round)
    single = algo.init(variables, jax.random.key(7))
    # The server state replicated over the mesh from the start, as a sharded round leaves it: both sharded
    # rounds then share one compiled program (an unplaced first state compiled the sharded round twice).
    sharded_state = jax.device_put(single, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    report = {"data_spec": list(sharded.clients.data["x"].sharding.spec),
              "shard_rows": sorted({s.data.shape[0] for s in sharded.clients.data["x"].addressable_shards}),
              "rounds": []}
    for _ in range(2):
        single, m_single = rnd(single, clients, coords)
        sharded_state, m_sharded = rnd(sharded_state, sharded, coords)
        leaves = lambda s: jax.tree_util.tree_leaves((s.params, s.model_state))
        report["rounds"].append({
            "max_abs_diff": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                                for a, b in zip(leaves(single), leaves(sharded_state))),
            "moved": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                         for a, b in zip(jax.tree_util.tree_leaves(single.params),
                                         jax.tree_util.tree_leaves(variables["params"]))),
            "single": {k: float(v) for k, v in m_single.items()},
            "sharded": {k: float(v) for k, v in m_sharded.items()},
            "round": [int(single.round), int(sharded_state.round)],
            "params_replicated": bool(sharded_state.params["key_encoder"]["W1"]["kernel"].sharding.is_fully_replicated)})
    print("REPORT" + json.dumps(report))
""")


def test_sharded_round_equals_single_device_round_on_four_host_devices():
  env = dict(os.environ)
  # First: XLA stops reading flags at a malformed token, and conftest's value ends with one.
  env["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=4 " + env.get("XLA_FLAGS", "")).strip()
  env["JAX_PLATFORMS"] = "cpu"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  done = subprocess.run([sys.executable, "-c", _CHILD], env=env, cwd=root, capture_output=True, text=True,
                        timeout=900)
  assert done.returncode == 0, done.stderr[-4000:]
  report = json.loads(done.stdout.split("REPORT", 1)[1])
  assert report["data_spec"] == ["clients"]
  assert report["shard_rows"] == [2]  # 6 clients padded to 8, two per device
  for row in report["rounds"]:
    single, sharded = row["single"], row["sharded"]
    assert row["round"][0] == row["round"][1] and row["params_replicated"]
    assert row["moved"] > 1e-3, row  # the round did train
    assert row["max_abs_diff"] < 1e-6, row  # float32 rounding (2e-7 seen on jaxlib 0.10 and 0.12)
    assert single["num_sampled"] == sharded["num_sampled"] == 4
    assert single["num_accepted"] == sharded["num_accepted"]
    np.testing.assert_allclose(sharded["train_loss"], single["train_loss"], rtol=1e-5)
  assert report["rounds"][0]["single"]["num_accepted"] == 3  # the stale-key client was sampled and rejected


def _clients():
  rng = np.random.default_rng(0)
  return stack_clients([{"x": rng.normal(size=(n, 2)).astype(np.float32)} for n in (3, 5, 4)])


def test_shard_clients_pads_and_keeps_the_real_client_count():
  sharded = shard_clients(_clients(), client_mesh(jax.devices()[:1]))
  assert sharded.num_clients == 3 and sharded.num_devices == 1 and sharded.clients_per_device == 3
  np.testing.assert_array_equal(sharded.clients.num_samples, [3, 5, 4])


def test_shard_clients_rejects_bad_input():
  clients = _clients()
  with pytest.raises(ValueError, match="'clients' axis"):
    shard_clients(clients, jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",)))
  with pytest.raises(ValueError, match="already sharded"):
    shard_clients(shard_clients(clients, client_mesh()), client_mesh())
  with pytest.raises(TypeError, match="ClientData"):
    shard_clients({"x": np.ones((3, 2))}, client_mesh())
  assert isinstance(clients, ClientData)


def _linear_task():
  def loss(params, state, batch, mask, rng, context):
    logits = batch["x"] @ params["w"] + params["b"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0), state

  return Task(loss=loss)


def _many_clients(num_clients, samples=4, features=16):
  rng = np.random.default_rng(num_clients)
  return ClientData(data={"x": jnp.asarray(rng.normal(size=(num_clients, samples, features)), jnp.float32),
                          "y": jnp.asarray(rng.integers(0, 3, (num_clients, samples)), jnp.int32)},
                    num_samples=jnp.full((num_clients,), samples, jnp.int32),
                    key_version=jnp.ones((num_clients,), jnp.int32))


def test_chunked_round_memory_is_bounded_by_the_chunk_not_the_client_count():
  algo = fedavg(_linear_task(), optax.adam(1e-2), batch_size=4, client_chunk_size=256)
  state = algo.init({"params": {"w": jnp.zeros((16, 3)), "b": jnp.zeros(3)}}, jax.random.key(0))
  temp = {}
  for num_clients in (500, 2000):
    clients = _many_clients(num_clients)
    compiled = jax.jit(algo.round).lower(state, clients, None).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
      pytest.skip("this backend reports no memory analysis")
    temp[num_clients] = analysis.temp_size_in_bytes
    new_state, metrics = compiled(state, clients, None)
    assert int(metrics["num_accepted"]) == num_clients and np.isfinite(float(metrics["train_loss"]))
  # 4x the clients, the same working memory: only the data argument grows.
  assert temp[2000] <= 1.05 * temp[500], temp


def test_sharded_round_on_a_one_device_mesh_equals_the_round():
  clients = _many_clients(7)
  algo = fedavg(_linear_task(), optax.sgd(0.1), batch_size=2, client_fraction=0.5, client_chunk_size=2)
  state = algo.init({"params": {"w": jnp.zeros((16, 3)), "b": jnp.zeros(3)}}, jax.random.key(0))
  round_fn = jax.jit(algo.round)
  want, want_metrics = round_fn(state, clients, None)
  got, got_metrics = round_fn(state, shard_clients(clients, client_mesh(jax.devices()[:1])), None)
  chex.assert_trees_all_close(got.params, want.params, atol=1e-6)
  assert {k: float(v) for k, v in got_metrics.items()} == pytest.approx({k: float(v) for k, v in want_metrics.items()})
