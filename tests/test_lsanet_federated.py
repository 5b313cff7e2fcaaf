"""Federated LSANet (`lsanet-federated`): one round under vmap equals a per-hospital loop and the host-driven round
in both BatchNorm modes,
a resumed run equals an uninterrupted one, learning happens, and bad partitions meet one-line errors.

The CNN is the plain VGG-16-BN at width 1/16 (the backbone that compiles fastest on CPU) on tiny 3-class data."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cli_cases import entries, exit_status, one_line_error
from infl_jax.federated import client_update, stack_clients
from infl_jax.federated.engine import fedavg
from infl_jax.federated.host_round import host_round
from infl_jax.federated.local import LocalConfig
from infl_jax.federated.site_local import site_variables
from lsanet_jax import train as central
from lsanet_jax.data import write_medmnist_npz
from lsanet_jax.federated.config import FederatedConfig
from lsanet_jax.federated.main import main
from lsanet_jax.federated.task import batch_norm_site_local, lsanet_task

SMALL = ["--variant", "plain", "--backbone", "vgg16_bn", "--width", "0.0625", "--batch-size", "8",
         "--no-compile-cache"]


def class_images(n_classes: int, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Grey 28x28 uint8 images whose class shows as a bright row, and their (N, 1) labels."""
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(n_classes), per_class)
  images = rng.integers(0, 80, (len(labels), 28, 28, 1), dtype=np.uint8)
  images[np.arange(len(labels)), 4 + 8 * labels, :, 0] = 250
  return images, labels[:, None]


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
  arrays = {}
  for i, (split, n) in enumerate({"train": 16, "val": 4, "test": 4}.items()):
    arrays[f"{split}_images"], arrays[f"{split}_labels"] = class_images(3, n, seed=i)
  arrays["train_sites"] = np.array(["north", "south", "east"] * 16)
  path = tmp_path_factory.mktemp("fed") / "three.npz"
  write_medmnist_npz(path, arrays)
  return path


def _model_and_variables():
  config = FederatedConfig.for_variant("plain", flag="", data="unused.npz", backbone="vgg16_bn", width=0.0625)
  model = central.build_model(config, 3)
  return model, central.init_variables(model, (28, 28, 1), central.init_key(0))


@pytest.mark.parametrize("batch_norm", ["fedavg", "fedbn"])
def test_vmapped_round_equals_a_loop_over_hospitals(batch_norm):
  model, variables = _model_and_variables()
  task = lsanet_task(model, "multi-class", dynamic_weights=False, synergy=False, augment=False)
  site_local = batch_norm_site_local(variables) if batch_norm == "fedbn" else None
  # SGD with a small step: vmapped (grouped), scanned and lone convolutions sum in other orders, and the last
  # stage's BatchNorm (1x1 maps, 4 images) magnifies rounding: at lr 0.01 two rounds drift 3e-4 apart, at 1e-3
  # 1e-5. Adam would be worse: its first steps move a parameter by about lr whatever its gradient's size.
  optimizer = optax.sgd(1e-3)
  sizes = (5, 11, 8)  # unequal: padding, a wrapped last batch and an extra step for the largest
  hospitals = [dict(zip(("images", "labels"), class_images(3, n, seed=10 + k))) for k, n in enumerate(sizes)]
  hospitals = [jax.tree_util.tree_map(lambda x, n=n: x[:n], h) for h, n in zip(hospitals, sizes)]
  algorithm = fedavg(task, optimizer, batch_size=4, local_epochs=2, site_local=site_local, wrap_last_batch=True)
  state = algorithm.init(variables, jax.random.key(3), num_clients=len(sizes))
  # A first round makes the hospitals' own BatchNorm layers differ, so the second one tests the gather too.
  state, _ = jax.jit(algorithm.round)(state, stack_clients(hospitals), None)
  new_state, metrics = jax.jit(algorithm.round)(state, stack_clients(hospitals), None)
  # The host-driven round (the CPU default of lsanet-federated) computes the same round.
  host_state, host_metrics = host_round(algorithm)(state, stack_clients(hospitals), None)
  for got, want in zip(jax.tree_util.tree_leaves((host_state, host_metrics)),
                       jax.tree_util.tree_leaves((new_state, metrics))):
    np.testing.assert_allclose(got, want, atol=1e-5)

  train_rng = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.round))[1]
  local = LocalConfig(local_epochs=2, batch_size=4, wrap_last_batch=True)
  update = jax.jit(lambda p, s, d, n, r: client_update(task, optimizer, local, p, s, d, n, r, None))
  deltas, states, weights = [], [], np.asarray(sizes, float)
  for k, data in enumerate(hospitals):  # each hospital alone, unpadded
    params, model_state = state.params, state.model_state
    if site_local is not None:
      params, model_state = site_variables(site_local, state.sites, k, params, model_state)
    p, s, _ = update(params, model_state, data, jnp.int32(sizes[k]), jax.random.fold_in(train_rng, k))
    if site_local is not None:
      local_part = site_local.split(p)[1]
      for got, want in zip(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda x: x[k], new_state.sites["params"])),
                           jax.tree_util.tree_leaves(local_part)):
        np.testing.assert_allclose(got, want, atol=1e-5)
      for got, want in zip(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda x: x[k], new_state.sites["model_state"])),
                           jax.tree_util.tree_leaves(s)):
        np.testing.assert_allclose(got, want, atol=1e-5)
      p = site_local.merge(site_local.split(p)[0], site_local.split(state.params)[1])
    deltas.append(jax.tree_util.tree_map(lambda a, b: a - b, p, state.params))
    states.append(s)
  mean = lambda trees: jax.tree_util.tree_map(lambda *xs: sum(w * x for w, x in zip(weights, xs)) / weights.sum(),
                                              *trees)
  expected = jax.tree_util.tree_map(jnp.add, state.params, mean(deltas))
  for got, want in zip(jax.tree_util.tree_leaves(new_state.params), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_allclose(got, want, atol=1e-5)
  for got, want in zip(jax.tree_util.tree_leaves(new_state.model_state), jax.tree_util.tree_leaves(mean(states))):
    np.testing.assert_allclose(got, want, atol=1e-5)
  if site_local is not None:  # the hospitals' BatchNorm layers are their own, never the server's
    shared_bn = site_local.split(new_state.params)[1]
    for got, want in zip(jax.tree_util.tree_leaves(shared_bn), jax.tree_util.tree_leaves(site_local.split(state.params)[1])):
      np.testing.assert_array_equal(got, want)


def test_fedbn_keeps_exactly_the_batch_norm_layers_local():
  _, variables = _model_and_variables()
  site_local = batch_norm_site_local(variables)
  shared, local = site_local.split(variables["params"])
  flat_local = jax.tree_util.tree_flatten_with_path(local)[0]
  assert flat_local and all("bn" in jax.tree_util.keystr(path) for path, _ in flat_local)
  assert not any("bn" in jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(shared)[0])
  merged = site_local.merge(shared, local)
  assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(variables["params"])


def test_resumed_run_equals_uninterrupted_and_learns(npz, tmp_path):
  run = [*SMALL, "--data", str(npz), "--n-clients", "3", "--partition", "iid", "--rounds", "4", "--lr", "3e-3",
         "--checkpoint-every", "1"]
  assert main([*run, "--workdir", str(tmp_path / "whole")]) == 0
  assert main([*run, "--workdir", str(tmp_path / "parts"), "--stop-after-rounds", "2"]) == 0
  assert not (tmp_path / "parts" / "summary.json").exists()
  assert main([*run, "--workdir", str(tmp_path / "parts"), "--resume"]) == 0
  rows = lambda d: [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
  strip = lambda rs: [{k: v for k, v in r.items() if not k.endswith("time_s") and k != "time"} for r in rs]
  assert strip(rows("whole")) == strip(rows("parts"))
  whole, parts = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("whole", "parts"))
  assert whole["heads"] == parts["heads"] and whole["selected_round"] == parts["selected_round"]
  losses = [r["train_loss"] for r in rows("whole")]
  assert losses[-1] < losses[0]
  assert [h["images"] for h in whole["hospitals"]] == [16, 16, 16]
  assert (tmp_path / "whole" / "curves.png").stat().st_size > 0


def test_sites_partition_and_fedbn_run(npz, tmp_path):
  assert main([*SMALL, "--data", str(npz), "--partition", "sites", "--n-clients", "0", "--batch-norm", "fedbn",
               "--rounds", "1", "--workdir", str(tmp_path / "w")]) == 0
  summary = json.loads((tmp_path / "w" / "summary.json").read_text())
  assert sorted(h["name"] for h in summary["hospitals"]) == ["east", "north", "south"]
  assert len(summary["per_hospital_test"]) == 3
  mean_auc = np.mean([s["main"]["auc"] for s in summary["per_hospital_test"]])
  assert summary["heads"]["main"]["test_auc"] == pytest.approx(mean_auc)


@pytest.mark.parametrize("extra, needles", [
    (["--partition", "sites"], ["--partition sites", "train_sites"]),  # digits has no site column
    (["--n-clients", "2", "--client-label-fractions", "0.5,0"], ["hospital 1", "no labelled image"]),
    (["--n-clients", "3", "--client-label-fractions", "0.5,1"], ["--client-label-fractions", "one per hospital"]),
    (["--n-clients", "2000"], ["--n-clients"]),
    (["--partition", "label-skew", "--n-clients", "2", "--classes-per-client", "1"], ["--classes-per-client"]),
    (["--rounds", "0"], ["--rounds"]),
])
def test_bad_partitions_meet_one_line_errors(capsys, tmp_path, extra, needles):
  workdir = tmp_path / "w"
  assert exit_status(main, [*SMALL, "--flag", "digits", *extra, "--workdir", str(workdir)]) == 2
  one_line_error(capsys, *needles)
  assert not workdir.exists() or entries(workdir) == []


@pytest.fixture
def compilation_cache_in(tmp_path, monkeypatch):
  """The runs' compilation cache in a folder of the test's (the programs the cache writes are searched too);
  JAX's cache settings restored afterwards."""
  from jax.experimental.compilation_cache import compilation_cache
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  saved = {k: getattr(jax.config, k) for k in keys}
  folder = tmp_path / "xla_cache"
  monkeypatch.setenv("INFL_JAX_CACHE_DIR", str(folder))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield folder
  for k, v in saved.items():
    jax.config.update(k, v)
  compilation_cache.reset_cache()


def test_keyed_run_keeps_the_key_in_its_file_only(npz, tmp_path, compilation_cache_in):
  from infl_jax import keys as keylib
  workdir = tmp_path / "k"
  run = [*[a for a in SMALL if a != "--no-compile-cache"], "--data", str(npz), "--n-clients", "2", "--partition",
         "iid", "--rounds", "2", "--key-scheme", "faithful", "--workdir", str(workdir)]
  assert main([*run, "--stop-after-rounds", "1"]) == 0
  key_file = workdir / "client_secret.key"
  assert key_file.stat().st_mode & 0o077 == 0  # owner-only
  key = keylib.load_key(key_file)
  assert main([*run, "--resume"]) == 0
  assert any(p.is_file() for p in compilation_cache_in.rglob("*"))  # the cache was written
  assert keylib.load_key(key_file).fingerprint == key.fingerprint  # read back, not remade
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["key"]["fingerprint"] == key.fingerprint
  assert set(summary["key"]) >= {"test_no_key", "test_wrong_key"}
  # Neither the coordinates' bytes (float32 or float64) nor their printed values are in any other file.
  needles = [np.asarray(key.coords, np.float32).tobytes()[:16], np.asarray(key.coords, np.float64).tobytes()[:16],
             f"{float(np.ravel(key.coords)[0]):.6f}".encode()]
  for path in [*workdir.rglob("*"), *compilation_cache_in.rglob("*")]:
    if path.is_file() and path != key_file:
      data = path.read_bytes()
      assert not any(n in data for n in needles), path


def test_keyed_resume_without_its_key_file_is_refused(npz, tmp_path, capsys):
  workdir = tmp_path / "k"
  run = [*SMALL, "--data", str(npz), "--n-clients", "2", "--partition", "iid", "--rounds", "2",
         "--key-scheme", "faithful", "--workdir", str(workdir)]
  assert main([*run, "--stop-after-rounds", "1"]) == 0
  (workdir / "client_secret.key").unlink()
  before = entries(workdir)
  capsys.readouterr()  # the first run's "stopped after round 1" note
  assert exit_status(main, [*run, "--resume"]) == 2
  one_line_error(capsys, "client_secret.key", "--resume")
  assert entries(workdir) == before


@pytest.mark.parametrize("rounds", range(1, 9))
def test_round_step_schedule_is_central_trainings_per_epoch(rounds):
  from lsanet_jax.config import TrainConfig
  from lsanet_jax.federated.train import round_lr_factor
  central_schedule = central.learning_rate_schedule(TrainConfig(epochs=rounds, learning_rate=1.0), 1)
  factor = round_lr_factor(rounds)
  np.testing.assert_allclose([float(factor(r)) for r in range(rounds)],
                             [float(central_schedule(r)) for r in range(rounds)], rtol=1e-6)
